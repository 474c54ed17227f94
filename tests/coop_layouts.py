"""Tiny synthetic folders in each of CoOp's dataset layouts (fpl_fast.data.layouts): three or four classes, a few small
images per class and split, written as CoOp's files spell them. ``build_layout(name, root)`` writes one under
``root`` (the data root) and returns what it wrote, for the tests to compare with what the loader reads.

Images are 8x8 JPEGs of a colour per class and a shade per image (so the classes differ to an image encoder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

__all__ = ["BuiltLayout", "COUNTS", "build_layout"]

COUNTS = {"train": 4, "val": 1, "test": 2}
"""Images per class in each split (ImageNet: train and test; the test-only variants: test)."""

_COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
# A four-class "ImageNet" (its classnames.txt); ImageNet-A and -R hold a three-class subset of it, as the real ones
# hold 200 of the 1000 classes.
_WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark", "n01491361": "tiger shark"}
_SUBSET = ["n01440764", "n01484850", "n01491361"]


@dataclass
class BuiltLayout:
    """What :func:`build_layout` wrote.

    Attributes:
        classnames: the class names in label order, as the loader should give them.
        counts: images per split (``{"train": n, "val": n, "test": n}``).
        images: every image written, by split.
        index: the file that lists the data (split JSON, variants.txt or classnames.txt).
    """

    classnames: list[str]
    counts: dict[str, int]
    images: dict[str, list[Path]] = field(default_factory=dict)
    index: Path | None = None


def _image(path: Path, label: int, i: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    r, g, b = _COLOURS[label % len(_COLOURS)]
    Image.new("RGB", (8, 8), (r, g, min(255, b + 9 * i))).save(path, format="JPEG")
    return path


# name -> (folder, image dir, split file, class names, relative image path of (class, i, split))
_SPLIT_JSON = {
    "caltech101": (
        "caltech-101",
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        ["accordion", "airplane", "anchor"],
    ),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", ["abyssinian", "beagle", "birman"]),
    "oxford_flowers": (
        "oxford_flowers",
        "jpg",
        "split_zhou_OxfordFlowers.json",
        ["pink primrose", "globe thistle", "blanket flower"],
    ),
    "food101": ("food-101", "images", "split_zhou_Food101.json", ["apple pie", "baby back ribs", "baklava"]),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", ["banded", "blotchy", "braided"]),
    "stanford_cars": (
        "stanford_cars",
        "",
        "split_zhou_StanfordCars.json",
        ["2012 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Acura TL Sedan"],
    ),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json", ["abbey", "airplane cabin", "airport terminal"]),
    "eurosat": (
        "eurosat",
        "2750",
        "split_zhou_EuroSAT.json",
        ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land"],
    ),
    "ucf101": (
        "ucf101",
        "UCF-101-midframes",
        "split_zhou_UCF101.json",
        ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery"],
    ),
}


def _relpath(name: str, classname: str, label: int, i: int, split: str) -> str:
    """An image's path relative to the image folder, shaped as in the real split files."""
    slug = classname.replace(" ", "_")
    if name == "stanford_cars":
        return f"cars_{'test' if split == 'test' else 'train'}/{label:02d}{i:03d}{split[:2]}.jpg"
    if name == "sun397":
        return f"{slug[0]}/{slug}/sun_{split}_{i}.jpg"
    if name == "ucf101":
        return f"{slug}/v_{slug.replace('_', '')}_g{i:02d}_{split}.jpg"
    return f"{slug}/{slug}_{split}_{i:04d}.jpg"


def _split_json(name: str, root: Path) -> BuiltLayout:
    folder, image_dir, split_file, classnames = _SPLIT_JSON[name]
    base = root / folder
    images = base / image_dir if image_dir else base
    split: dict[str, list[list[object]]] = {part: [] for part in COUNTS}
    built = BuiltLayout(classnames, {part: n * len(classnames) for part, n in COUNTS.items()})
    for part, n in COUNTS.items():
        built.images[part] = []
        for label, classname in enumerate(classnames):
            for i in range(n):
                rel = _relpath(name, classname, label, i, part)
                built.images[part].append(_image(images / rel, label, i))
                split[part].append([rel, label, classname])
    built.index = base / split_file
    built.index.write_text(json.dumps(split))
    return built


def _aircraft(root: Path) -> BuiltLayout:
    base = root / "fgvc_aircraft"
    classnames = ["707-320", "A300B4", "Cessna 172"]
    built = BuiltLayout(classnames, {part: n * len(classnames) for part, n in COUNTS.items()})
    base.mkdir(parents=True)
    (base / "variants.txt").write_text("".join(f"{c}\n" for c in classnames))
    for part, n in COUNTS.items():
        lines, built.images[part] = [], []
        for label, classname in enumerate(classnames):
            for i in range(n):
                image_id = f"{label}{i:02d}{len(lines):04d}{part[:2]}"
                built.images[part].append(_image(base / "images" / f"{image_id}.jpg", label, i))
                lines.append(f"{image_id} {classname}\n")
        (base / f"images_variant_{part}.txt").write_text("".join(lines))
    built.index = base / "variants.txt"
    return built


def _classnames_txt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {c}\n" for w, c in _WNIDS.items()))
    return path


def _class_folders(image_dir: Path, folders: list[str], n: int) -> list[Path]:
    return [_image(image_dir / f / f"img_{i}.jpg", k, i) for k, f in enumerate(folders) for i in range(n)]


def _imagenet(name: str, root: Path) -> BuiltLayout:
    wnids = sorted(_WNIDS) if name not in ("imagenet_a", "imagenet_r") else _SUBSET
    names = [_WNIDS[w] for w in wnids]
    n_test = COUNTS["test"] * len(wnids)
    if name == "imagenet":
        base = root / "imagenet"
        built = BuiltLayout(names, {"train": COUNTS["train"] * len(wnids), "val": 0, "test": n_test})
        built.images["train"] = _class_folders(base / "images" / "train", wnids, COUNTS["train"])
        built.images["test"] = _class_folders(base / "images" / "val", wnids, COUNTS["test"])
    elif name == "imagenet_v2":
        base = root / "imagenetv2"
        built = BuiltLayout(names, {"train": 0, "val": 0, "test": n_test})
        labels = [str(k) for k in range(len(wnids))]
        built.images["test"] = _class_folders(base / "imagenetv2-matched-frequency-format-val", labels, COUNTS["test"])
    else:
        folder, image_dir = {
            "imagenet_sketch": ("imagenet-sketch", "images"),
            "imagenet_a": ("imagenet-adversarial", "imagenet-a"),
            "imagenet_r": ("imagenet-rendition", "imagenet-r"),
        }[name]
        base = root / folder
        built = BuiltLayout(names, {"train": 0, "val": 0, "test": n_test})
        built.images["test"] = _class_folders(base / image_dir, wnids, COUNTS["test"])
        (base / image_dir / "README.txt").write_text("not a class folder\n")  # as A and R ship it
    built.index = _classnames_txt(base / "classnames.txt")
    return built


def build_layout(name: str, root: str | Path) -> BuiltLayout:
    """Write a tiny synthetic copy of dataset ``name`` in CoOp's layout under the data root ``root``."""
    root = Path(root)
    if name in _SPLIT_JSON:
        return _split_json(name, root)
    if name == "fgvc_aircraft":
        return _aircraft(root)
    if name in ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        return _imagenet(name, root)
    raise ValueError(f"no synthetic layout for {name!r}")
