"""Where each CoOp dataset lives under the data root, in the layouts CoOp publishes with its code, and the one-line
errors for a layout that is not there.

Five readers cover the fifteen datasets (``reader`` of :class:`CoOpLayout`):

* ``split_json``: an image directory and CoOp's ``split_zhou_*.json``
  (``{"train"|"val"|"test": [[relpath, label, classname], ...]}``, ``relpath`` relative to the image directory).
* ``aircraft``: FGVC Aircraft's own files: ``variants.txt`` (one class name a line, label = line number) and
  ``images_variant_{train,val,test}.txt`` (``<image id> <variant>`` a line; the image is ``images/<id>.jpg``).
* ``imagenet``: ``images/train/<wnid>/`` and ``images/val/<wnid>/`` (the validation set is the test set) and
  ``classnames.txt`` (``<wnid> <class name>`` a line); labels follow the sorted wnid folders.
* ``imagenet_v2``: ``imagenetv2-matched-frequency-format-val/<label>/`` with ``<label>`` the line of
  ``classnames.txt`` (ImageNet's 1000 classes).
* ``wnid_folders``: ``<image dir>/<wnid>/`` (Sketch: 1000 classes; A and R: 200), labels 0.. in sorted-folder order
  and class names from ``classnames.txt`` (a copy of ImageNet's), as CoOp's readers do.

The four ImageNet variants are test-only: they have no training split.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "COOP_DATASETS",
    "CoOpLayout",
    "IMAGENET_VARIANTS",
    "LAYOUTS",
    "TEST_ONLY_DATASETS",
    "check_listed",
    "layout_error",
    "require",
]


@dataclass(frozen=True)
class CoOpLayout:
    """Where a CoOp dataset lives under the data root.

    Attributes:
        folder: the dataset's folder under the data root.
        image_dir: the images' folder under ``folder`` (``""``: the folder itself, StanfordCars' split paths).
        index: the file under ``folder`` that lists the data (a split JSON, ``variants.txt`` or ``classnames.txt``).
        reader: how it is read (see the module docstring).
        shape: the layout's entries under ``folder``, as errors and the docs spell it.
        test_only: no training split (the ImageNet variants).
    """

    folder: str
    image_dir: str
    index: str
    reader: str
    shape: tuple[str, ...]
    test_only: bool = False

    @property
    def expected(self) -> str:
        """The layout in one line, e.g. ``dtd/{images/, split_zhou_DescribableTextures.json}``."""
        return f"{self.folder}/{{{', '.join(self.shape)}}}"


def _split_json(folder: str, image_dir: str, split_file: str, *extra: str) -> CoOpLayout:
    shape = (f"{image_dir}/", split_file) if image_dir else (*extra, split_file)
    return CoOpLayout(folder, image_dir, split_file, "split_json", shape)


def _wnid_folders(folder: str, image_dir: str) -> CoOpLayout:
    return CoOpLayout(
        folder, image_dir, "classnames.txt", "wnid_folders", (f"{image_dir}/<wnid>/", "classnames.txt"), True
    )


_AIRCRAFT_FILES = tuple(f"images_variant_{part}.txt" for part in ("train", "val", "test"))

LAYOUTS: dict[str, CoOpLayout] = {
    "caltech101": _split_json("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": _split_json("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "oxford_flowers": _split_json("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": _split_json("food-101", "images", "split_zhou_Food101.json"),
    "dtd": _split_json("dtd", "images", "split_zhou_DescribableTextures.json"),
    "imagenet": CoOpLayout(
        "imagenet",
        "images",
        "classnames.txt",
        "imagenet",
        ("images/train/<wnid>/", "images/val/<wnid>/", "classnames.txt"),
    ),
    "stanford_cars": _split_json("stanford_cars", "", "split_zhou_StanfordCars.json", "cars_train/", "cars_test/"),
    "fgvc_aircraft": CoOpLayout(
        "fgvc_aircraft", "images", "variants.txt", "aircraft", ("images/<id>.jpg", "variants.txt", *_AIRCRAFT_FILES)
    ),
    "sun397": _split_json("sun397", "SUN397", "split_zhou_SUN397.json"),
    "eurosat": _split_json("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": _split_json("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "imagenet_v2": CoOpLayout(
        "imagenetv2",
        "imagenetv2-matched-frequency-format-val",
        "classnames.txt",
        "imagenet_v2",
        ("imagenetv2-matched-frequency-format-val/<label index>/", "classnames.txt"),
        True,
    ),
    "imagenet_sketch": _wnid_folders("imagenet-sketch", "images"),
    "imagenet_a": _wnid_folders("imagenet-adversarial", "imagenet-a"),
    "imagenet_r": _wnid_folders("imagenet-rendition", "imagenet-r"),
}
"""Every CoOp dataset by name: CoOp's eleven and the four ImageNet variants."""

COOP_DATASETS: dict[str, CoOpLayout] = {name: layout for name, layout in LAYOUTS.items() if not layout.test_only}
"""The eleven CoOp datasets a federation trains on."""

TEST_ONLY_DATASETS: tuple[str, ...] = tuple(name for name, layout in LAYOUTS.items() if layout.test_only)
"""Datasets without a training split: targets to evaluate on, never to train on."""

IMAGENET_VARIANTS: tuple[str, ...] = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
"""ImageNet's distribution-shift targets (CoOp's domain generalisation), in CoOp's order."""


def layout_error(
    name: str, path: str | os.PathLike[str], data_root: str | os.PathLike[str], what: str
) -> FileNotFoundError:
    """One line naming ``path``, what is wrong with it (``what``) and the layout ``name`` expects."""
    return FileNotFoundError(
        f"{path} {what}: expected {name}'s CoOp layout {LAYOUTS[name].expected} under data root {data_root}"
    )


def require(name: str, path: Path, data_root: str | os.PathLike[str], *, folder: bool = False) -> Path:
    """``path`` itself, when it is there (a folder where ``folder``, else a file).

    Raises:
        FileNotFoundError: it is not (one line, :func:`layout_error`).
    """
    if not (path.is_dir() if folder else path.is_file()):
        raise layout_error(name, path, data_root, "not found")
    return path


def check_listed(name: str, paths: Iterable[Path], listed_in: Path, data_root: str | os.PathLike[str]) -> None:
    """Every image that ``listed_in`` names is on disk (cheap stat calls, so that a partial copy fails at loading,
    not after the encoder has run through half of it).

    Raises:
        FileNotFoundError: how many are missing and the first of them (one line).
    """
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise layout_error(
            name,
            listed_in,
            data_root,
            f"names {len(missing)} image{'s' if len(missing) > 1 else ''} not on disk (first: {missing[0]})",
        )
