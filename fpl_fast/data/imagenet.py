"""ImageNet and its four test-only variants as CoOp reads them: class folders and a ``classnames.txt``.

``classnames.txt`` has ``<wnid> <class name>`` a line (CLIP's ImageNet class names, in wnid order); every variant's
folder holds a copy. ImageNet's labels are its sorted ``images/train/<wnid>/`` folders, the validation set
(``images/val/<wnid>/``) is the test set. ImageNet-V2 labels its folders by line of ``classnames.txt``;
Sketch, A and R label their sorted wnid folders 0.. (A and R hold 200 of the 1000 classes, so their labels are
their own and their class names the subset's, as in CoOp). In a class folder every file not starting with a dot is
an image; files beside the class folders (A's and R's ``README.txt``) are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

from fpl_fast.data.layouts import LAYOUTS, layout_error, require

__all__ = ["ImageItems", "read_classnames", "read_imagenet", "read_imagenet_variant"]

ImageItems = tuple[list[Path], list[int]]
"""Image paths and their labels."""


def read_classnames(name: str, path: Path, data_root: str | os.PathLike[str]) -> dict[str, str]:
    """wnid -> class name, in the file's order.

    Raises:
        FileNotFoundError: the file is missing (one line naming it and the layout).
        ValueError: a line without a class name after its wnid.
    """
    out: dict[str, str] = {}
    for n, line in enumerate(require(name, path, data_root).read_text(encoding="utf-8").splitlines(), 1):
        wnid, _, classname = line.strip().partition(" ")
        if not wnid:
            continue
        if not classname.strip():
            raise ValueError(f"{path} line {n}: expected '<wnid> <class name>', got {line.strip()!r}")
        out[wnid] = classname.strip()
    if not out:
        raise ValueError(f"{path} lists no classes (expected '<wnid> <class name>' a line)")
    return out


def _subfolders(name: str, path: Path, data_root: str | os.PathLike[str]) -> list[str]:
    folders = sorted(e.name for e in os.scandir(require(name, path, data_root, folder=True)) if e.is_dir())
    folders = [f for f in folders if not f.startswith(".")]
    if not folders:
        raise layout_error(name, path, data_root, "has no class folders")
    return folders


def _images(folder: Path) -> list[Path]:
    return sorted(folder / e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))


def _named(name: str, wnids: list[str], classnames: dict[str, str], listed_in: Path, where: Path) -> list[str]:
    unknown = [w for w in wnids if w not in classnames]
    if unknown:
        raise ValueError(f"{where}: class folder {unknown[0]!r} is not in {listed_in} ({len(unknown)} such folders)")
    return [classnames[w] for w in wnids]


def _read_folders(folder: Path, wnids: list[str], label_of: dict[str, int]) -> ImageItems:
    paths: list[Path] = []
    labels: list[int] = []
    for wnid in wnids:
        images = _images(folder / wnid)
        paths += images
        labels += [label_of[wnid]] * len(images)
    return paths, labels


def read_imagenet(data_root: str | os.PathLike[str]) -> tuple[ImageItems, ImageItems, list[str]]:
    """ImageNet's training set, its validation set (the test set) and its class names.

    Raises:
        FileNotFoundError: a missing folder or ``classnames.txt`` (one line naming it and the layout).
        ValueError: a class folder that ``classnames.txt`` does not name, or a validation folder with no training
            folder.
    """
    layout = LAYOUTS["imagenet"]
    root = require("imagenet", Path(data_root) / layout.folder, data_root, folder=True)
    names = read_classnames("imagenet", root / layout.index, data_root)
    train_dir, val_dir = root / layout.image_dir / "train", root / layout.image_dir / "val"
    wnids = _subfolders("imagenet", train_dir, data_root)
    classnames = _named("imagenet", wnids, names, root / layout.index, train_dir)
    label_of = {w: k for k, w in enumerate(wnids)}
    val_wnids = _subfolders("imagenet", val_dir, data_root)
    stray = [w for w in val_wnids if w not in label_of]
    if stray:
        raise ValueError(f"{val_dir}: class folder {stray[0]!r} has no training folder in {train_dir}")
    return _read_folders(train_dir, wnids, label_of), _read_folders(val_dir, val_wnids, label_of), classnames


def read_imagenet_variant(name: str, data_root: str | os.PathLike[str]) -> tuple[ImageItems, list[str]]:
    """A test-only ImageNet variant's images and class names.

    Args:
        name: ``imagenet_v2``, ``imagenet_sketch``, ``imagenet_a`` or ``imagenet_r``.
        data_root: the directory that holds its folder.

    Raises:
        FileNotFoundError: a missing folder or ``classnames.txt`` (one line naming it and the layout).
        ValueError: a class folder that ``classnames.txt`` does not name (ImageNet-V2: a folder that is not a label).
    """
    layout = LAYOUTS[name]
    root = require(name, Path(data_root) / layout.folder, data_root, folder=True)
    names = read_classnames(name, root / layout.index, data_root)
    image_dir = root / layout.image_dir
    folders = _subfolders(name, image_dir, data_root)
    if layout.reader == "imagenet_v2":
        bad = [f for f in folders if not (f.isdigit() and int(f) < len(names))]
        if bad:
            raise ValueError(
                f"{image_dir}: class folder {bad[0]!r} is not a label 0..{len(names) - 1} of {root / layout.index}"
            )
        return _read_folders(image_dir, folders, {f: int(f) for f in folders}), list(names.values())
    classnames = _named(name, folders, names, root / layout.index, image_dir)
    return _read_folders(image_dir, folders, {w: k for k, w in enumerate(folders)}), classnames
