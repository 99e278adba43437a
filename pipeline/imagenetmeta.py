"""ImageNet's label files as distributed: the ILSVRC2012 devkit and Kaggle's CSVs.

Labels everywhere in alexnetd are positions in the *sorted* list of WNIDs, as
torchvision's ImageNet and any ImageFolder tree of ImageNet give them. The devkit's own
ILSVRC2012_IDs (1..1000) are in another order (ID 1 is not n01440764, "tench"), so they
are only a bridge: a validation image's ground-truth ID → the leaf synset with that ID →
its WNID → its sorted position.

    devkit = read_devkit(path)         # ILSVRC2012_devkit_t12.tar.gz
    devkit.wnids, devkit.names         # the 1000 leaves, sorted by WNID
    devkit.val_wnids                   # {"ILSVRC2012_val_00000001": "n01751748", ...}
    val = read_kaggle_val(path)        # LOC_val_solution.csv → the same mapping
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TRAIN_TAR", "VAL_TAR", "DEVKIT", "OFFICIAL_MD5", "KAGGLE_MAPPING", "KAGGLE_VAL",
    "Devkit", "MetaError", "read_devkit", "read_kaggle_val", "read_synset_mapping", "val_number", "md5_mismatches",
]

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
# The published checksums of the three files (the same ones torchvision checks).
OFFICIAL_MD5 = {
    TRAIN_TAR: "1d675b47d978889d74fa0da5fadfb00e",
    VAL_TAR: "29b22e2961454d5413ddabcf34fc5622",
    DEVKIT: "fa75699e90414af021442c21a62c3abf",
}
KAGGLE_MAPPING = "LOC_synset_mapping.txt"
KAGGLE_VAL = "LOC_val_solution.csv"

_META = "data/meta.mat"
_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d+)$")


class MetaError(Exception):
    """A label file that is missing, unreadable or inconsistent; one line naming it."""


@dataclass
class Devkit:
    wnids: list[str]  # the leaf synsets (the classes), sorted
    names: list[str]  # their `words`, in the same order
    val_wnids: dict[str, str]  # validation file stem → WNID
    train_images: int  # the devkit's count of training images (for progress), 0 if absent


def val_number(stem: str) -> int | None:
    """ILSVRC2012_val_00000042 → 42 (None for any other name)."""
    m = _VAL_NAME.match(stem)
    return int(m.group(1)) if m else None


def read_devkit(path: Path) -> Devkit:
    """The classes, their names and the validation labels from the devkit tarball."""
    import scipy.io

    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            meta = _member(tar, members, _META, path)
            truth = _member(tar, members, _GROUND_TRUTH, path)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise MetaError(f"{path}: not a readable devkit tarball ({exc})") from None
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        ids = [int(s["ILSVRC2012_ID"]) for s in leaves]
        wnid_of_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        words = {str(s["WNID"]): str(s["words"]) for s in leaves}
        train_images = sum(int(s["num_train_images"]) for s in leaves) if "num_train_images" in synsets.dtype.names else 0
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise MetaError(f"{path}: {_META} is not the devkit's synset table ({exc})") from None
    if sorted(ids) != list(range(1, len(ids) + 1)):
        raise MetaError(f"{path}: {_META}: the leaf synsets' ILSVRC2012_IDs are not 1..{len(ids)}")
    val_wnids = {}
    for n, line in enumerate(truth.decode("ascii", "replace").split(), start=1):
        if not line.isdigit() or int(line) not in wnid_of_id:
            raise MetaError(f"{path}: {_GROUND_TRUTH} line {n}: {line!r} is not a class ID 1..{len(ids)}")
        val_wnids[f"ILSVRC2012_val_{n:08d}"] = wnid_of_id[int(line)]
    wnids = sorted(words)
    return Devkit(wnids, [words[w] for w in wnids], val_wnids, train_images)


def _member(tar: tarfile.TarFile, members: dict, suffix: str, path: Path) -> bytes:
    found = [name for name in members if name == suffix or name.endswith("/" + suffix)]
    if not found:
        raise MetaError(f"{path}: no {suffix} inside (is it the ILSVRC2012 devkit?)")
    return tar.extractfile(members[found[0]]).read()


def read_kaggle_val(path: Path) -> dict[str, str]:
    """LOC_val_solution.csv → {ImageId: WNID}: the first WNID of each row's boxes (every
    box of a validation image names the same class)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise MetaError(f"{path}: unreadable ({exc})") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise MetaError(f"{path}: expected the header ImageId,PredictionString")
    labels = {}
    for n, row in enumerate(rows[1:], start=2):
        words = row[1].split() if len(row) > 1 else []
        if not row or not words or not words[0].startswith("n"):
            raise MetaError(f"{path}: line {n}: no WNID in {','.join(row)!r}")
        labels[row[0].strip()] = words[0]
    return labels


def read_synset_mapping(path: Path) -> dict[str, str]:
    """LOC_synset_mapping.txt / synset_words.txt: "wnid words" per line → {wnid: words}."""
    names = {}
    for line in path.read_text(errors="replace").splitlines():
        wnid, _, words = line.strip().partition(" ")
        if wnid:
            names[wnid] = words.strip() or wnid
    return names


def md5_mismatches(files: list[Path], expected: dict[str, str] = OFFICIAL_MD5, chunk: int = 1 << 22) -> list[str]:
    """One line per file whose MD5 is not the published one (a truncated or damaged
    download), in the order given; an empty list when all match."""
    bad = []
    for path in files:
        want = expected.get(path.name)
        if want is None:
            continue
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
        if digest.hexdigest() != want:
            size = path.stat().st_size
            bad.append(f"{path}: MD5 {digest.hexdigest()}, the published one is {want} "
                       f"({size} bytes: a truncated or damaged download? download it again)")
    return bad
