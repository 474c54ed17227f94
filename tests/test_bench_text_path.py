"""bench/bench_text_path.py and bench/bench_scaling.py's text-path axes: the alternatives they time compute the same
features and pull-backs as the full path (correctness only, no timings)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "bench"

# The SDPA variant's CPU backward has no vmap batching rule: PyTorch warns and loops (what the bench measures).
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_every_attention_variant_gives_the_full_paths_features_and_gradients(tmp_path: Path) -> None:
    bench = _load("bench_text_path")
    out = tmp_path / "t.json"
    args = ["--classes", "12", "--clients", "2", "--batch", "3", "--chunk", "2", "--reps", "1", "--json", str(out)]
    assert bench.main(args) == 0
    rec = json.loads(out.read_text())
    assert set(rec["median_s"]) == set(bench.PATHS)
    for path, errors in rec["relative_error_vs_full"].items():
        assert set(errors) == set(bench.CASES)
        assert max(errors.values()) < 1e-5, path  # float32: the same function up to summation order
    rows = rec["rows_per_client"]
    assert rows["shared"] == rows["shared_sdpa"] == rows["shared_dense"] < rows["full"]


def test_bench_text_path_refuses_bad_flags_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load("bench_text_path")
    with pytest.raises(SystemExit):
        bench.main(["--paths", "full,packed"])
    assert "--paths must be a comma-separated subset of" in capsys.readouterr().err


def test_scaling_class_names_have_the_asked_number_of_words() -> None:
    scaling = _load("bench_scaling")
    for words in (1, 2, 6):
        names = scaling.classnames(30, words)
        assert len(names) == 30 and all(len(n.split()) == words for n in names)
