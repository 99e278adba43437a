"""What `prepare` reads: ImageNet's downloads, streamed, and ImageFolder trees.

    source = open_source(src)            # SourceError (one line) for anything incomplete
    source.layout, source.notes          # named on prepare's first lines
    source.classes, source.names         # sorted WNIDs (label = position) and their words
    for split in source.splits:          # SourceSplit: name, total (for progress)
        for item in split.items(start):  # Item(stem, label, data | path, pos), in a fixed order

Archives are read once, front to back: the train tar's class tars in the order they are
stored, each one's images in stored order, then the val tar. Nothing is extracted, and a
spinning disk or a network filesystem only ever sees forward reads. A folder tree is
read in sorted order. Either way the order is a function of the source alone, so any
worker count and any number of interruptions give the same output.

A position is (unit, index): a unit is one class tar, one folder split, or the val tar;
`items(start)` resumes at a position by skipping whole class tars without reading them
(the outer tar's member table says where each begins) and, inside the one it resumes in,
by reading headers only.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from alexnetd.pipeline.dataset import NAME_FILES, DatasetError, ImageFolderDataset, image_files
from alexnetd.pipeline.downloads import CLASS_TAR, KAGGLE_DATA, find_download
from alexnetd.pipeline.imagenetmeta import (DEVKIT, KAGGLE_MAPPING, KAGGLE_VAL, TRAIN_TAR, VAL_TAR, MetaError,
                                            read_devkit, read_kaggle_val, read_synset_mapping)

__all__ = ["open_source", "Source", "SourceSplit", "Item", "SourceError", "START"]

START = (0, 0)


class SourceError(Exception):
    """A source that cannot be prepared as it is; one line naming what is missing."""


@dataclass
class Item:
    stem: str  # the sample's key: the source file's name without extension
    label: int | None  # None: a validation file the label files do not mention
    data: bytes | None  # read here (archives) ...
    path: str | None  # ... or read by the worker (folders)
    pos: tuple[int, int]  # (unit, index) of this item
    where: str  # for skipped.txt: the file, or archive:member


@dataclass
class SourceSplit:
    name: str
    total: int | None  # images, for progress; None when unknown before reading
    units: list  # each: a callable(skip) -> iterator of Items' (stem, label, data, path, where)

    def items(self, start: tuple[int, int] = START) -> Iterator[Item]:
        first_unit, skip = start
        for u in range(first_unit, len(self.units)):
            offset = skip if u == first_unit else 0
            for i, (stem, label, data, path, where) in enumerate(self.units[u](offset), start=offset):
                yield Item(stem, label, data, path, (u, i), where)

    @property
    def end(self) -> tuple[int, int]:
        return (len(self.units), 0)


@dataclass
class Source:
    layout: str
    root: Path
    classes: list[str]
    names: list[str]
    splits: list[SourceSplit]
    notes: list[str] = field(default_factory=list)


def open_source(src: Path) -> Source:
    src = Path(src)
    if not src.exists():
        raise SourceError(f"{src}: no such directory")
    download = find_download(src)
    try:
        if download is None:
            return _imagefolder(src)
        if download.kind == "kaggle":
            return _kaggle(download.root, src, download.what)
        if download.root != src:  # the train tar itself, or the folder of class tars
            raise SourceError(f"{src}: {download.what}")
        if download.kind == "ilsvrc2012":
            return _official(src, download.what)
        return _class_tars(src, download.what)
    except (MetaError, DatasetError) as exc:
        raise SourceError(str(exc)) from None
    except (tarfile.TarError, EOFError) as exc:
        raise SourceError(f"{src}: an archive cannot be read ({exc}); check the download with --verify") from None


# -- the official archives -------------------------------------------------------------


def _official(root: Path, what: str) -> Source:
    train_tar, val_tar, devkit_path = root / TRAIN_TAR, root / VAL_TAR, root / DEVKIT
    if not train_tar.is_file():
        raise SourceError(f"{train_tar}: missing; the training images are in it (138 GB from image-net.org)")
    devkit = read_devkit(devkit_path) if devkit_path.is_file() else None
    if val_tar.is_file() and devkit is None:
        raise SourceError(f"{devkit_path}: missing; {VAL_TAR}'s labels and the class names are in it "
                          f"(2.5 MB from image-net.org), or remove {VAL_TAR} to prepare train only")
    with tarfile.open(train_tar, "r:") as outer:  # the member table only: one header per class
        members = [m for m in outer.getmembers() if m.isfile()]
    class_tars = [m for m in members if CLASS_TAR.match(os.path.basename(m.name))]
    if not class_tars:
        raise SourceError(f"{train_tar}: no nXXXXXXXX.tar class archives inside; not the ILSVRC2012 train tar")
    wnids = sorted(os.path.basename(m.name)[:-4] for m in class_tars)
    classes, names, notes = _classes_from(root, wnids, devkit, train_tar)
    label_of = {w: i for i, w in enumerate(classes)}

    def unit(member: tarfile.TarInfo) -> Callable:
        wnid = os.path.basename(member.name)[:-4]
        return lambda skip: _read_class_tar(train_tar, member, label_of[wnid], skip)

    splits = [SourceSplit("train", devkit.train_images if devkit and devkit.train_images else None,
                          [unit(m) for m in class_tars])]
    if val_tar.is_file():
        val_labels = {stem: label_of.get(w) for stem, w in devkit.val_wnids.items()}  # None: not a class here
        splits.append(SourceSplit("val", len(devkit.val_wnids),
                                  [lambda skip: _read_flat_tar(val_tar, val_labels, skip)]))
    else:
        notes.append(f"train only: no {VAL_TAR} in {root}, so the dataset will have no val split")
    return Source(f"ILSVRC2012 archives ({what.partition('(')[2].rstrip(')')})", root, classes, names, splits, notes)


def _classes_from(root: Path, wnids: list[str], devkit, train_where: Path):
    """(classes, names, notes): the devkit's leaves when there is one, checked against the
    class tars; else the class tars themselves."""
    if devkit is None:
        names_of = _names_file(root)
        notes = [f"no {DEVKIT}: class names are " + ("from " + names_of[1] if names_of[0] else "the WNIDs")]
        return wnids, [names_of[0].get(w, w) for w in wnids], notes
    odd = sorted(set(wnids) - set(devkit.wnids))
    if odd:
        raise SourceError(f"{train_where}: class {odd[0]} is not one of {DEVKIT}'s {len(devkit.wnids)} classes")
    notes = []
    if len(wnids) < len(devkit.wnids):
        notes.append(f"{train_where}: {len(wnids)} of the devkit's {len(devkit.wnids)} classes have training images")
    return devkit.wnids, devkit.names, notes


def _names_file(root: Path) -> tuple[dict[str, str], str]:
    for name in (KAGGLE_MAPPING, *NAME_FILES):
        if (root / name).is_file():
            return read_synset_mapping(root / name), name
    return {}, ""


def _read_class_tar(outer_path: Path, member: tarfile.TarInfo, label: int, skip: int):
    """The images of one class tar inside the train tar, from its `skip`-th on."""
    with open(outer_path, "rb") as f:
        f.seek(member.offset_data)
        window = _Window(f, member.offset_data, member.size)
        yield from _members(tarfile.open(fileobj=window, mode="r:"), lambda stem: label, skip,
                            f"{outer_path.name}:{member.name}")


def _read_flat_tar(path: Path, labels: dict, skip: int):
    with tarfile.open(path, "r:") as tar:
        yield from _members(tar, labels.get, skip, path.name)


def _read_tar_file(path: Path, label: int, skip: int):
    with tarfile.open(path, "r:") as tar:
        yield from _members(tar, lambda stem: label, skip, str(path))


def _members(tar: tarfile.TarFile, label_of, skip: int, where: str):
    """(stem, label, data, None, where) of each regular file, the first `skip` passed over
    by their headers alone."""
    n = 0
    for member in tar:
        if not member.isfile():
            continue
        if n >= skip:
            stem = os.path.splitext(os.path.basename(member.name))[0]
            data = tar.extractfile(member).read()
            yield stem, label_of(stem), data, None, f"{where}:{member.name}"
        n += 1


class _Window:
    """A read-only, seekable view of bytes [start, start+size) of an open file: a class
    tar inside the train tar, read in place (tarfile wants a file object)."""

    def __init__(self, f, start: int, size: int):
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos


# -- a train/ of class tars ------------------------------------------------------------


def _class_tars(root: Path, what: str) -> Source:
    train = root / "train"
    tars = sorted(p for p in train.iterdir() if CLASS_TAR.match(p.name) and p.is_file())
    wnids = [p.name[:-4] for p in tars]
    devkit = read_devkit(root / DEVKIT) if (root / DEVKIT).is_file() else None
    classes, names, notes = _classes_from(root, wnids, devkit, train)
    label_of = {w: i for i, w in enumerate(classes)}
    units = [(lambda p: lambda skip: _read_tar_file(p, label_of[p.name[:-4]], skip))(p) for p in tars]
    splits = [SourceSplit("train", devkit.train_images if devkit and devkit.train_images else None, units)]
    splits += _val_split(root, classes, devkit, notes)
    return Source(what, root, classes, names, splits, notes)


# -- Kaggle ----------------------------------------------------------------------------


def _kaggle(root: Path, given: Path, what: str) -> Source:
    data = root / KAGGLE_DATA if (root / KAGGLE_DATA).is_dir() else given
    train = ImageFolderDataset(data, with_val=False)
    names_of = read_synset_mapping(root / KAGGLE_MAPPING) if (root / KAGGLE_MAPPING).is_file() else {}
    notes = [] if names_of else [f"no {KAGGLE_MAPPING} in {root}: class names are the WNIDs"]
    classes = train.classes
    val_csv = root / KAGGLE_VAL
    splits = [_folder_split("train", train)]
    if (data / "val").is_dir():
        if not val_csv.is_file():
            raise SourceError(f"{val_csv}: missing; the labels of {data / 'val'} are in it")
        labels = read_kaggle_val(val_csv)
        splits.append(_flat_folder_split(data / "val", {s: w for s, w in labels.items()}, classes))
    else:
        notes.append(f"train only: no {data / 'val'}")
    return Source(what, root, classes, [names_of.get(c, c) for c in classes], splits, notes)


# -- ImageFolder -----------------------------------------------------------------------


def _imagefolder(root: Path) -> Source:
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory")
    if (root / "manifest.json").exists():
        raise SourceError(f"{root}: already a prepared dataset")
    val = root / "val"
    flat_val = val.is_dir() and not any(e.is_dir() for e in os.scandir(val)) and any(os.scandir(val))
    train = ImageFolderDataset(root, with_val=not flat_val) if (root / "train").is_dir() else None
    if train is None:
        raise SourceError(f"{root}: not a dataset: no manifest.json (prepared), no train/ folder (ImageFolder) "
                          "and no ImageNet download (ILSVRC2012_img_train.tar, the Kaggle ILSVRC/ folder)")
    notes: list[str] = []
    splits = [_folder_split("train", train)]
    if flat_val or (not val.is_dir() and (root / VAL_TAR).is_file()):
        devkit = read_devkit(root / DEVKIT) if (root / DEVKIT).is_file() else None
        splits += _val_split(root, train.classes, devkit, notes)
    elif "val" in train.splits:
        splits.append(_folder_split("val", train))
    return Source("ImageFolder", root, train.classes, train.class_names, splits, notes)


def _folder_split(name: str, ds: ImageFolderDataset) -> SourceSplit:
    sp = ds.split(name)
    files = [(os.path.splitext(os.path.basename(rel))[0], int(label), sp.path(i), rel)
             for i, (rel, label) in enumerate(zip(sp.rels, sp.labels))]
    return SourceSplit(name, len(files), [lambda skip: ((s, lab, None, p, r) for s, lab, p, r in files[skip:])])


def _val_split(root: Path, classes: list[str], devkit, notes: list[str]) -> list[SourceSplit]:
    """A flat val/ folder or the val tar next to a train/, labelled by the devkit or the CSV."""
    val_tar, val_dir = root / VAL_TAR, root / "val"
    if not val_tar.is_file() and not val_dir.is_dir():
        notes.append(f"train only: no val/ and no {VAL_TAR} in {root}")
        return []
    if devkit is not None:
        wnid_of = devkit.val_wnids
    elif (root / KAGGLE_VAL).is_file():
        wnid_of = read_kaggle_val(root / KAGGLE_VAL)
    else:
        have = val_tar.name if val_tar.is_file() else f"{val_dir}/ (no class folders)"
        raise SourceError(f"{root / DEVKIT}: missing; the labels of {have} are in it "
                          f"(or in Kaggle's {KAGGLE_VAL}), or sort val/ into class folders")
    if val_tar.is_file():
        label_of = {w: i for i, w in enumerate(classes)}
        labels = {s: label_of.get(w) for s, w in wnid_of.items()}
        return [SourceSplit("val", len(wnid_of), [lambda skip: _read_flat_tar(val_tar, labels, skip)])]
    return [_flat_folder_split(val_dir, wnid_of, classes)]


def _flat_folder_split(folder: Path, wnid_of: dict[str, str], classes: list[str]) -> SourceSplit:
    label_of = {w: i for i, w in enumerate(classes)}
    rows = []
    for name in image_files(folder):
        stem = os.path.splitext(os.path.basename(name))[0]
        rows.append((stem, label_of.get(wnid_of.get(stem)), None, str(folder / name), str(folder / name)))
    return SourceSplit("val", len(rows), [lambda skip: iter(rows[skip:])])
