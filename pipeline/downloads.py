"""Recognising ImageNet as it is downloaded, before anything is read.

Cheap (a few directory listings, no file opened), so `start --data` can tell a user who
points it at a raw download what they have and what to run, and `prepare` can name the
layout on its first line. Reading these layouts is `sources.py`'s job.

    ILSVRC2012 archives   a folder with ILSVRC2012_img_train.tar [+ _img_val.tar, devkit]
    class tars            a train/ of the 1,000 nXXXXXXXX.tar (the train tar, unpacked once)
    Kaggle                the imagenet-object-localization-challenge root (ILSVRC/Data/CLS-LOC,
                          LOC_synset_mapping.txt, LOC_val_solution.csv), or its CLS-LOC folder
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from alexnetd.pipeline.imagenetmeta import DEVKIT, KAGGLE_MAPPING, KAGGLE_VAL, TRAIN_TAR, VAL_TAR

__all__ = ["Download", "find_download", "CLASS_TAR", "KAGGLE_DATA"]

CLASS_TAR = re.compile(r"n\d{8}\.tar$")
KAGGLE_DATA = Path("ILSVRC", "Data", "CLS-LOC")


@dataclass(frozen=True)
class Download:
    kind: str  # "ilsvrc2012" | "class-tars" | "kaggle"
    root: Path  # the folder holding the download (Kaggle: the root with the CSVs, if found)
    what: str  # how it is named to the user

    def prepare_hint(self, given: Path) -> str:
        out = given.parent / f"{given.name}-prepared"
        return f"{given}: {self.what}, not a dataset yet; convert it once with: alexnetd prepare {given} {out}"


def find_download(root: Path) -> Download | None:
    """What raw ImageNet download `root` is, or None if it is none of them."""
    root = Path(root)
    if root.is_file() and root.name in (TRAIN_TAR, VAL_TAR, DEVKIT):
        return Download("ilsvrc2012", root.parent, f"{root.name} itself; give the folder that holds it")
    if not root.is_dir():
        return None
    if (root / TRAIN_TAR).is_file() or ((root / VAL_TAR).is_file() and not (root / "train").is_dir()):
        have = [n for n in (TRAIN_TAR, VAL_TAR, DEVKIT) if (root / n).is_file()]
        return Download("ilsvrc2012", root, f"the ILSVRC2012 archives ({', '.join(have)})")
    if (root / KAGGLE_DATA / "train").is_dir():
        return Download("kaggle", root, "the Kaggle ILSVRC download (ILSVRC/Data/CLS-LOC)")
    kaggle_root = _kaggle_root_above(root)
    if kaggle_root is not None:
        return Download("kaggle", kaggle_root, f"Kaggle's {root.name} folder (its labels are in {kaggle_root})")
    train = root / "train"
    if train.is_dir() and _has_class_tars(train):
        return Download("class-tars", root, "a train/ of ILSVRC2012 class tars (nXXXXXXXX.tar)")
    if _has_class_tars(root):
        return Download("class-tars", root.parent, f"a folder of ILSVRC2012 class tars; give its parent {root.parent}")
    return None


def _has_class_tars(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(CLASS_TAR.match(e.name) and e.is_file() for e in entries)


def _kaggle_root_above(root: Path) -> Path | None:
    """The Kaggle root when `root` is its ILSVRC/Data/CLS-LOC folder (train/ + a flat val/)."""
    if root.name != "CLS-LOC" or not (root / "train").is_dir():
        return None
    top = root.parent.parent.parent
    if (top / KAGGLE_MAPPING).is_file() or (top / KAGGLE_VAL).is_file():
        return top
    return None
