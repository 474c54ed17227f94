"""`python -m fpl_fast.run`: bad input exits 2 with one line; a short real run writes its files."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fpl_fast.config import RunConfig
from fpl_fast.run import build_parser, config_from_args, method_config_from_args
from fpl_fast.validation import ConfigError

FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "fpl_fast.run", "--quiet", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rank", "0"], "--rank"),
        (["--clip-mode", "tokens"], "--clip-mode"),
        (["--delta", "2"], "--delta"),
        (["--noise", "-1"], "--noise"),
        (["--lr", "abc"], "--lr"),
        (["--rank", "17"], "--rank"),
        (["--config", "/nonexistent/run.json"], "--config"),
        (["--model", "NoSuchCLIP-9"], "NoSuchCLIP-9"),
        (["--dataset", "imagenet"], "imagenet"),
        (["--dataset", "caltech101", "--data-root", "/nonexistent/data"], "/nonexistent/data"),
        (["--epsilon", "0"], "--epsilon"),
        (["--epsilon", "2", "--noise", "1"], "--noise"),
        (["--resume"], "--out"),
        (["--resume", "--out", "/nonexistent/run"], "nothing to resume"),
        (["--num-user", "3"], "unrecognized arguments: --num-user 3"),  # no abbreviation of --num-users
        (["--device", "gpu"], "--device must be cpu, cuda or cuda:N, got 'gpu'"),
        (["--pretrained", "/nope.pt"], "--pretrained /nope.pt: no such file; allowed: a checkpoint file"),
        (["--out", "/dev/null/run"], "--out /dev/null/run is not writable: /dev/null is a file"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    """In process (``main`` is what ``python -m fpl_fast.run`` exits with; the next test runs real processes)."""
    from fpl_fast.run import main

    try:
        rc = main(["--quiet", *args])
    except SystemExit as exc:  # the parser's own errors exit from inside parse_args
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--rank", "0"], "--rank"), (["--model", "NoSuchCLIP-9"], "NoSuchCLIP-9")],  # the parser's, the run's
)
def test_bad_input_exits_2_with_one_line_from_a_process(args: list[str], needle: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert needle in lines[0]


def test_a_bad_flag_is_refused_before_the_heavy_imports() -> None:
    """The parser and the config checks import neither open_clip (with torchvision and torch._dynamo: seconds) nor
    the accountant's scipy, Flower or matplotlib: ``--help`` and a bad flag answer at once."""
    heavy = ("open_clip", "torchvision", "dp_accounting", "flwr", "matplotlib")
    code = (
        "import sys\nfrom fpl_fast.run import main\ntry:\n    main(['--rank', '0'])\nexcept SystemExit:\n    pass\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--rank" in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "", f"imported: {proc.stdout.strip()}"


def test_config_file_then_flags_override(tmp_path: Path) -> None:
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"rank": 4, "rounds": 7, "factorization": "fedpgp"}))
    args = build_parser().parse_args(["--config", str(cfg_file), "--rounds", "9"])
    cfg, _ = config_from_args(args)
    assert (cfg.rank, cfg.rounds, cfg.factorization) == (4, 9, "fedpgp")


@pytest.mark.parametrize(
    ("argv", "field", "message"),
    [
        (["--rank", "0"], "rank", "--rank must be an integer >= 1, got 0"),
        (["--rank", "17"], "rank", "--rank must be <= --n-ctx (16) for dpfpl, got 17"),
        (["--noise-seed", "-1"], "noise_seed", "--noise-seed must be an integer >= 0 (leave it out for secret noise)"),
        (["--calibration", "paper"], "calibration", "--calibration paper needs --epsilon (the authors' formula"),
        (["--clip-mode", "batch", "--sampling", "poisson"], "sampling", "--sampling poisson needs --clip-mode sample"),
        (
            ["--clip-mode", "output", "--noise-global", "1"],
            "noise_global",
            "--noise-global does not apply to --clip-mode output (one release per step protects both prompts); "
            "use --noise",
        ),
        (["--clip-mode", "output", "--clip-uv", "separate"], "clip_uv", "--clip-uv applies to the parameter clip"),
        (
            ["--promptfl-client-noise", "true"],
            "promptfl_client_noise",
            "--promptfl-client-noise needs --factorization promptfl, --sync step and a parameter clip mode",
        ),
        (
            ["--promptfl-client-noise", "true", "--factorization", "promptfl", "--sync", "round"],
            "promptfl_client_noise",
            "--promptfl-client-noise needs --factorization promptfl, --sync step",
        ),
    ],
)
def test_config_errors_name_fields_and_the_cli_names_flags(argv: list[str], field: str, message: str) -> None:
    """RunConfig's ConfigError names the field; config_from_args rewords the same error with flags."""
    with pytest.raises(ConfigError) as api:
        RunConfig(**{k: v for k, v in vars(build_parser().parse_args(argv)).items() if k in FIELDS and v is not None})
    assert api.value.field == field and str(api.value).startswith(field) and "--" not in str(api.value)
    with pytest.raises(ConfigError) as cli:
        config_from_args(build_parser().parse_args(argv))
    assert cli.value.field == field and str(cli.value).startswith(message), str(cli.value)


@pytest.mark.parametrize(
    ("method", "config", "message"),
    [
        ("feddtpt", {"iterations": 0}, "--iterations must be an integer >= 1, got 0"),
        ("rapt", {"rec_weight": 1.0, "n_plain": 0}, "--n-plain must be >= 1 when --rec-weight > 0"),
    ],
)
def test_method_config_errors_name_flags(tmp_path: Path, method: str, config: dict, message: str) -> None:
    cfg_file = tmp_path / "method.json"
    cfg_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        method_config_from_args(build_parser().parse_args(["--method", method, "--config", str(cfg_file)]))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--pathological-split", "even"], "--pathological-split: invalid choice: 'even'"),
        (["--steps-per-round", "min"], "--steps-per-round: invalid choice: 'min'"),
    ],
)
def test_new_choice_flags_refuse_other_values(argv: list[str], needle: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_authors_options_parse_into_the_config() -> None:
    argv = ["--factorization", "promptfl", "--clip-mode", "batch", "--clip-uv", "separate"]
    argv += ["--promptfl-client-noise", "true", "--steps-per-round", "authors", "--pathological-split", "authors"]
    cfg, _ = config_from_args(build_parser().parse_args(argv))
    assert (cfg.promptfl_client_noise, cfg.steps_per_round, cfg.pathological_split) == (True, "authors", "authors")
    default = RunConfig()
    assert (default.promptfl_client_noise, default.steps_per_round, default.pathological_split) == (
        False,
        "mean",
        "balanced",
    )


def test_a_config_error_found_after_the_flags_is_worded_with_flags(capsys) -> None:
    """E.g. --steps-per-round authors with a client smaller than a batch is only known once the data is split."""
    from fpl_fast.run import _fail

    exc = ConfigError("steps_per_round", "steps_per_round='authors' gives 0 local steps", others=("batch_size",))
    assert _fail(exc) == 2
    assert (
        capsys.readouterr().err.strip()
        == "python -m fpl_fast.run: error: --steps-per-round authors gives 0 local steps"
    )


def test_epsilon_without_noise_flag_calibrates() -> None:
    cfg, _ = config_from_args(build_parser().parse_args(["--epsilon", "3"]))
    assert cfg.noise is None and cfg.epsilon == 3


@pytest.mark.slow
def test_short_run_writes_results_csv_plot_and_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli("--rounds", "2", "--num-users", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "mean local accuracy" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    assert set(res["final"]) >= {"local_acc", "neighbor_acc", "zero_shot_acc", "epsilon_local", "epsilon_global"}
    assert res["final"]["accountant"].startswith("dp_accounting")
    for name in ("rounds.csv", "accuracy.png", "checkpoint.pt"):
        assert (out / name).is_file()
    again = run_cli("--rounds", "2", "--num-users", "3", "--out", str(out))  # the same folder without --resume
    assert again.returncode == 2 and "holds a previous run" in again.stderr, again.stderr
    assert json.loads((out / "results.json").read_text()) == res


def _one_line(capsys: pytest.CaptureFixture[str], rc: int | None) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("available", "count", "device"), [(False, 0, "cuda"), (False, 0, "cuda:1"), (True, 1, "cuda:2")]
)
def test_a_missing_gpu_is_named_as_the_device(monkeypatch, capsys, available: bool, count: int, device: str) -> None:
    """Not as weights that cannot be loaded: the device is checked before the backbone loads."""
    import torch

    from fpl_fast import preparation
    from fpl_fast.run import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(preparation, "_load_backbone", lambda cfg: pytest.fail("the backbone loaded"))
    line = _one_line(capsys, main(["--quiet", "--device", device, "--out", "/nonexistent/never"]))
    want = "no CUDA device is available" if not available else "this machine has 1 CUDA device (cuda:0..cuda:0)"
    assert line.startswith(f"python -m fpl_fast.run: error: --device {device}: {want}"), line
    assert line.endswith("; use --device cpu") and "pretrained" not in line
    with pytest.raises(ConfigError, match=rf"^device='{device}': ") as api:  # the API's wording names the field
        preparation.check_device(device)
    assert api.value.field == "device"


def test_a_missing_weights_file_is_named_and_tags_are_listed_only_where_there_are_some() -> None:
    from fpl_fast.backbone.loading import load_backbone

    with pytest.raises(ConfigError) as missing:
        load_backbone("tiny-digits-clip", "/nope.pt")
    assert str(missing.value).startswith("pretrained='/nope.pt': no such file; allowed:")
    assert "[]" not in str(missing.value) and "tag" not in str(missing.value)
    with pytest.raises(ConfigError) as tag:
        load_backbone("ViT-B-16", "no-such-tag")  # refused before anything is built or downloaded
    text = str(tag.value)
    assert text.startswith("pretrained='no-such-tag': neither a file nor an open_clip tag of model 'ViT-B-16'")
    assert "or a tag of model 'ViT-B-16': openai" in text or ", openai" in text, text


def test_a_batch_larger_than_the_smallest_client_is_refused_naming_it(capsys, tmp_path: Path) -> None:
    """Poisson sampling cannot give an expected batch larger than a client's data (q = b / n > 1): the run stops
    before training, naming the client, its size and the largest batch allowed."""
    from fpl_fast.federated.client import sample_rates
    from fpl_fast.run import main

    line = _one_line(capsys, main(["--quiet", "--batch-size", "1000000000", "--out", str(tmp_path / "run")]))
    m = re.fullmatch(
        r"python -m fpl_fast\.run: error: --batch-size 1000000000 is larger than client (\d+)'s (\d+) training "
        r"examples \(Poisson sampling needs q = b / n <= 1\); the largest --batch-size allowed here is (\d+)",
        line,
    )
    assert m is not None and m.group(2) == m.group(3), line
    sizes = [40, 12, 30]
    with pytest.raises(ConfigError, match=r"^batch_size 13 is larger than client 1's 12 training examples"):
        sample_rates(RunConfig(batch_size=13), sizes)
    assert sample_rates(RunConfig(batch_size=12), sizes)[1] == 1.0  # the largest allowed
    # Shuffled batches take all of a smaller client's examples (q = 1), as before.
    assert sample_rates(RunConfig(batch_size=13, clip_mode="batch"), sizes)[1] == 1.0
