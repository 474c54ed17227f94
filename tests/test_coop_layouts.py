"""CoOp's datasets in their published layouts: each loads from a tiny synthetic copy (tests/coop_layouts.py), a
missing piece is one line naming it and the layout, and `--dataset X` runs a round on each trainable one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from coop_layouts import COUNTS, build_layout
from PIL import Image

from fpl_fast import config
from fpl_fast.data import DATASETS, IMAGENET_VARIANTS, TEST_ONLY_DATASETS, load_dataset
from fpl_fast.data.coop import load_coop
from fpl_fast.data.layouts import COOP_DATASETS, LAYOUTS

TRAINABLE = (
    "caltech101",
    "oxford_pets",
    "oxford_flowers",
    "food101",
    "dtd",
    "imagenet",
    "stanford_cars",
    "fgvc_aircraft",
    "sun397",
    "eurosat",
    "ucf101",
)
VARIANTS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
LISTED = tuple(n for n in TRAINABLE if n != "imagenet")  # datasets whose images a split or index file names
DOCS = Path(__file__).resolve().parents[1] / "docs" / "reference" / "datasets.md"


def test_the_names_are_coops_eleven_and_the_four_test_only_variants() -> None:
    assert tuple(COOP_DATASETS) == TRAINABLE
    assert TEST_ONLY_DATASETS == VARIANTS == IMAGENET_VARIANTS == config.IMAGENET_VARIANTS  # --protocol xdomain's
    assert set(LAYOUTS) == set(TRAINABLE) | set(VARIANTS) and set(LAYOUTS) <= set(DATASETS)


@pytest.mark.parametrize("name", TRAINABLE + VARIANTS)
def test_a_synthetic_layout_loads_with_its_labels_and_class_names(tmp_path: Path, name: str) -> None:
    built = build_layout(name, tmp_path)
    bundle = load_dataset(name, tmp_path)
    assert bundle.name == name and bundle.classnames == built.classnames
    n_cls = len(built.classnames)
    for part in ("train", "test"):
        ds = getattr(bundle, part)
        assert len(ds) == built.counts[part] == len(ds.labels)
        assert ds.labels.dtype == np.int64
        if built.counts[part]:  # every class, as many images each as written
            per_class = COUNTS[part]
            assert np.array_equal(np.bincount(ds.labels, minlength=n_cls), np.full(n_cls, per_class))
            assert sorted(map(str, ds.paths)) == sorted(map(str, built.images[part]))
    if name in VARIANTS:
        assert len(bundle.train) == 0 and bundle.train.labels.shape == (0,)
    else:
        assert len(load_coop(name, tmp_path)["val"]) == built.counts["val"]
    image, label = bundle.test[len(bundle.test) - 1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (8, 8)
    assert 0 <= label < n_cls
    # Each class's images are its own: the synthetic colour (red, green, blue) follows the label written.
    for k in range(min(n_cls, 3)):
        first = int(np.flatnonzero(bundle.test.labels == k)[0])
        assert np.argmax(np.asarray(bundle.test[first][0], dtype=float).mean(axis=(0, 1))) == k, (name, k)


def test_imagenet_a_and_r_label_their_sorted_folders_with_imagenets_names(tmp_path: Path) -> None:
    """200-class subsets in CoOp: labels 0.. in sorted-folder order, class names looked up in ImageNet's list; a
    README beside the class folders is not a class."""
    for name in ("imagenet_a", "imagenet_r", "imagenet"):
        build_layout(name, tmp_path)
    full = load_dataset("imagenet", tmp_path).classnames
    assert full == ["tench", "goldfish", "great white shark", "tiger shark"]
    for name in ("imagenet_a", "imagenet_r"):
        bundle = load_dataset(name, tmp_path)
        assert bundle.classnames == ["tench", "great white shark", "tiger shark"]
        assert sorted(set(bundle.test.labels.tolist())) == [0, 1, 2]
        folders = [p.parent.name for p in bundle.test.paths]
        assert [folders[i] for i in np.argsort(bundle.test.labels, kind="stable")] == sorted(folders)


def test_imagenet_v2_folders_are_label_indices_of_classnames(tmp_path: Path) -> None:
    build_layout("imagenet_v2", tmp_path)
    bundle = load_dataset("imagenet_v2", tmp_path)
    assert all(int(p.parent.name) == label for p, label in zip(bundle.test.paths, bundle.test.labels, strict=True))
    assert bundle.classnames == ["tench", "goldfish", "great white shark", "tiger shark"]


def _one_line_error(name: str, root: Path) -> str:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, root)
    message = str(info.value)
    assert "\n" not in message and LAYOUTS[name].expected in message and str(root) in message, message
    return message


@pytest.mark.parametrize("name", TRAINABLE + VARIANTS)
def test_a_missing_folder_is_one_line_naming_it_and_the_layout(tmp_path: Path, name: str) -> None:
    message = _one_line_error(name, tmp_path)
    assert message.startswith(f"{tmp_path / LAYOUTS[name].folder} not found: expected {name}'s CoOp layout")


@pytest.mark.parametrize("name", TRAINABLE + VARIANTS)
def test_a_missing_split_or_index_file_is_one_line_naming_it(tmp_path: Path, name: str) -> None:
    built = build_layout(name, tmp_path)
    assert built.index is not None
    built.index.unlink()
    assert _one_line_error(name, tmp_path).startswith(f"{built.index} not found")


# stanford_cars has no image folder of its own: its split's paths start at the dataset's folder.
@pytest.mark.parametrize("name", [n for n in TRAINABLE + VARIANTS if LAYOUTS[n].image_dir])
def test_a_missing_image_folder_is_one_line_naming_it(tmp_path: Path, name: str) -> None:
    build_layout(name, tmp_path)
    layout = LAYOUTS[name]
    image_dir = tmp_path / layout.folder / layout.image_dir
    image_dir.rename(image_dir.with_name("moved"))
    message = _one_line_error(name, tmp_path)
    want = image_dir / "train" if name == "imagenet" else image_dir
    assert message.startswith(f"{want} not found"), message


@pytest.mark.parametrize("name", LISTED)
def test_images_a_split_names_but_that_are_not_on_disk_are_counted_and_the_first_named(
    tmp_path: Path, name: str
) -> None:
    built = build_layout(name, tmp_path)
    gone = [built.images["test"][1], built.images["test"][3]]
    for path in gone:
        path.unlink()
    message = _one_line_error(name, tmp_path)
    assert "names 2 images not on disk (first: " in message and str(gone[0]) in message, message


def test_a_split_file_whose_labels_have_no_name_is_refused(tmp_path: Path) -> None:
    built = build_layout("eurosat", tmp_path)
    assert built.index is not None
    split = json.loads(built.index.read_text())
    split["train"] = [[rel, 5 if label == 2 else label, name] for rel, label, name in split["train"]]
    split["val"] = [item for item in split["val"] if item[1] != 2]
    split["test"] = [item for item in split["test"] if item[1] != 2]
    built.index.write_text(json.dumps(split))
    with pytest.raises(ValueError, match=r"no class name for labels \[2, 3, 4\]"):
        load_dataset("eurosat", tmp_path)


def test_an_imagenet_folder_missing_from_classnames_is_named(tmp_path: Path) -> None:
    built = build_layout("imagenet_sketch", tmp_path)
    assert built.index is not None
    built.index.write_text("".join(built.index.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(ValueError, match=r"class folder 'n01440764' is not in .*classnames.txt"):
        load_dataset("imagenet_sketch", tmp_path)


def test_the_datasets_page_shows_every_layout() -> None:
    text = DOCS.read_text()
    missing = [name for name, layout in LAYOUTS.items() if f"`{name}` | `{layout.expected}`" not in text]
    assert missing == []


@pytest.mark.slow  # an end-to-end run each (a few seconds)
@pytest.mark.parametrize("name", TRAINABLE)
def test_dataset_runs_one_round_on_its_synthetic_layout(tmp_path: Path, name: str, capsys) -> None:
    """`python -m fpl_fast.run --dataset X` (in process) on the embedded tiny CLIP: one round, its results."""
    from fpl_fast.run import main

    build_layout(name, tmp_path / "data")
    out = tmp_path / "run"
    argv = ["--quiet", "--dataset", name, "--data-root", str(tmp_path / "data"), "--out", str(out)]
    argv += ["--rounds", "1", "--num-users", "2", "--partition", "iid", "--batch-size", "2"]
    rc = main(argv)
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["dataset"] == name and [r["round"] for r in res["rounds"]] == [1]
    assert 0.0 <= res["final"]["local_acc"] <= 1.0


@pytest.mark.parametrize(("name", "method"), [(n, "dpfpl") for n in VARIANTS] + [("imagenet_a", "feddtpt")])
def test_training_on_a_test_only_dataset_is_one_line(tmp_path: Path, name: str, method: str, capsys) -> None:
    from fpl_fast.run import main

    build_layout(name, tmp_path)  # there, and still refused
    argv = ["--quiet", "--method", method, "--dataset", name, "--data-root", str(tmp_path)]
    rc = main([*argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert f"--dataset '{name}' is test-only" in lines[0] and "train on imagenet" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_the_api_refuses_a_test_only_dataset_naming_the_field() -> None:
    from fpl_fast.config import RunConfig
    from fpl_fast.validation import ConfigError

    with pytest.raises(ConfigError, match=r"^dataset 'imagenet_r' is test-only") as info:
        RunConfig(dataset="imagenet_r")
    assert info.value.field == "dataset"
    assert RunConfig(dataset="imagenet").dataset == "imagenet"


@pytest.mark.slow  # one end-to-end run (seconds)
def test_xdomain_runs_from_imagenet_to_its_four_variants_on_synthetic_layouts(tmp_path: Path, capsys) -> None:
    """`--dataset imagenet --protocol xdomain`: trained on the synthetic ImageNet, the global and the personalised
    prompts evaluated on each variant's own test set and class names (A and R: their 3-class subsets)."""
    from fpl_fast.run import main

    for name in ("imagenet", *VARIANTS):
        build_layout(name, tmp_path / "data")
    out = tmp_path / "run"
    argv = ["--quiet", "--dataset", "imagenet", "--protocol", "xdomain", "--data-root", str(tmp_path / "data")]
    argv += ["--out", str(out), "--rounds", "1", "--num-users", "2", "--partition", "iid", "--batch-size", "2"]
    rc = main(argv)
    assert rc == 0, capsys.readouterr().err
    final = json.loads((out / "results.json").read_text())["final"]
    for name in VARIANTS:
        for kind in ("global", "personal"):
            assert 0.0 <= final[f"{kind}_acc@{name}"] <= 1.0, (kind, name)
