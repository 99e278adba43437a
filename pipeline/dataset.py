"""Reading a dataset: prepared tar shards (fast path) or a plain ImageFolder tree.

    ds = open_dataset(root)          # DatasetError, one line naming the path, on bad input
    ds.kind                          # "prepared" | "imagefolder"
    ds.classes, ds.class_names       # label = position in ds.classes
    mean, eigvals, eigvecs = ds.stats()
    sp = ds.split("train")           # cheap; opens nothing until the first read
    data = sp.read(i)                # the raw JPEG bytes of sample i (no decoding here)

A split holds open file descriptors once it has read something, so each process opens
its own (`open_dataset(root).split(name)` in the loader process). A split that crossed a
fork or was pickled drops the descriptors it inherited and reopens its own.

The prepared layout is described in `shards.py`, which writes it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from alexnetd.pipeline.downloads import find_download
from alexnetd.pipeline.pixelstats import PixelStats, eigen_decomposition
from alexnetd.pipeline.shards import FORMAT, FORMAT_VERSION, INDEX_DTYPE

__all__ = ["open_dataset", "DatasetError", "Dataset", "Split", "IMAGE_EXTENSIONS", "STATS_SAMPLE"]

# What an ImageFolder tree may hold (compared lower-case); everything else is ignored.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})
# An ImageFolder's mean image and colour PCA come from this many training images.
STATS_SAMPLE = 512
# Where ImageNet-style trees keep "wnid human name" lines.
NAME_FILES = ("synset_words.txt", "LOC_synset_mapping.txt", "words.txt")
SPLITS = ("train", "val")


class DatasetError(Exception):
    """A dataset that cannot be used as it is; the message is one line naming the path."""


def open_dataset(root: str | os.PathLike) -> "Dataset":
    """Open a prepared dataset (has manifest.json) or an ImageFolder tree (has train/<class>/)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such directory")
    if not root.is_dir():
        download = find_download(root)
        raise DatasetError(download.prepare_hint(root) if download else f"{root}: not a directory")
    if (root / "manifest.json").exists():
        return PreparedDataset(root)
    download = find_download(root)
    if download is not None:
        raise DatasetError(download.prepare_hint(root))
    if (root / "train").is_dir():
        if any(p.suffix == ".tar" for p in (root / "train").iterdir()):
            raise DatasetError(f"{root}: tar shards but no manifest.json (an unfinished prepare?); prepare it again")
        return ImageFolderDataset(root)
    raise DatasetError(f"{root}: not a dataset: no manifest.json (prepared) and no train/ folder (ImageFolder)")


class Dataset:
    kind: str
    root: Path
    classes: list[str]
    class_names: list[str]
    image_size: int  # the side of the stored images (prepared) or of the §2 down-sampling
    splits: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean image float32 (S,S,3) RGB 0..255, eigvals float64 (3,), eigvecs float64 (3,3),
        eigenvectors as columns, largest eigenvalue first)."""
        raise NotImplementedError

    def split(self, name: str) -> "Split":
        raise NotImplementedError

    def _check_split(self, name: str) -> None:
        if name not in self.splits:
            have = ", ".join(self.splits) or "none"
            raise DatasetError(f"{self.root}: no {name!r} split (has: {have})")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.root} classes={len(self.classes)} splits={self.splits}>"


class Split:
    name: str
    labels: np.ndarray  # int64 (len,)
    needs_resize: bool

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> bytes:
        raise NotImplementedError

    def key(self, i: int) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- prepared --------------------------------------------------------------------------


def _load_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing ({what})") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable {what}: {exc}") from None


class PreparedDataset(Dataset):
    kind = "prepared"

    def __init__(self, root: Path):
        self.root = root
        manifest = _load_json(root / "manifest.json", "the manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DatasetError(f"{root / 'manifest.json'}: not an alexnetd prepared dataset manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise DatasetError(
                f"{root / 'manifest.json'}: format version {manifest.get('version')!r}, this alexnetd reads {FORMAT_VERSION}"
            )
        self.manifest = manifest
        self.image_size = int(manifest.get("image_size", 256))
        entries = _load_json(root / "classes.json", "the class list")
        if not isinstance(entries, list) or not entries:
            raise DatasetError(f"{root / 'classes.json'}: no classes")
        try:
            self.classes = [str(e["wnid"]) for e in entries]
            self.class_names = [str(e.get("name") or e["wnid"]) for e in entries]
        except (KeyError, TypeError, AttributeError):
            raise DatasetError(f"{root / 'classes.json'}: expected a list of {{'wnid': ..., 'name': ...}}") from None
        splits = manifest.get("splits") or {}
        if "train" not in splits or not (root / "train").is_dir():
            raise DatasetError(f"{root}: no train/ split")
        self.splits = tuple(s for s in SPLITS if s in splits) + tuple(sorted(set(splits) - set(SPLITS)))
        try:
            self._index = {name: self._check_index(name, splits[name]) for name in self.splits}
        except (KeyError, TypeError) as exc:
            raise DatasetError(f"{root / 'manifest.json'}: malformed split entry ({exc!r})") from None
        self._stats = None

    def _check_index(self, name: str, info: dict) -> np.ndarray:
        """Everything a reader could trip on later, checked now with a few stat() calls."""
        path = self.root / info["index"]
        try:
            index = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise DatasetError(f"{path}: missing (the {name} index)") from None
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: unreadable index: {exc}") from None
        if index.dtype != INDEX_DTYPE or index.ndim != 1:
            raise DatasetError(f"{path}: not a shard index (dtype {index.dtype})")
        if len(index) != info["count"]:
            raise DatasetError(f"{path}: {len(index)} samples, manifest.json says {info['count']}")
        sizes = []
        for shard in info["shards"]:
            shard_path = self.root / shard["name"]
            try:
                size = shard_path.stat().st_size
            except FileNotFoundError:
                raise DatasetError(f"{shard_path}: shard missing") from None
            if size != shard["bytes"]:
                raise DatasetError(f"{shard_path}: {size} bytes, manifest.json says {shard['bytes']} (truncated?)")
            sizes.append(size)
        if len(index):
            if int(index["shard"].max()) >= len(sizes):
                raise DatasetError(f"{path}: points at shard {int(index['shard'].max())}, there are {len(sizes)}")
            ends = index["offset"].astype(np.uint64) + index["length"]
            too_far = ends > np.asarray(sizes, np.uint64)[index["shard"]]
            if too_far.any():
                i = int(np.argmax(too_far))
                shard = self.root / info["shards"][int(index["shard"][i])]["name"]
                raise DatasetError(f"{path}: sample {i} ends past the end of {shard}; index and shards do not match")
            if int(index["label"].min()) < 0 or int(index["label"].max()) >= len(self.classes):
                raise DatasetError(f"{path}: labels outside 0..{len(self.classes) - 1}")
        return index

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def stats(self):
        if self._stats is None:
            path = self.root / "mean.npy"
            try:
                mean = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{path}: unreadable mean image: {exc}") from None
            size = self.image_size
            if mean.shape != (size, size, 3):
                raise DatasetError(f"{path}: shape {mean.shape}, expected {(size, size, 3)}")
            eig = _load_json(self.root / "rgb_eig.json", "the colour PCA")
            try:
                eigvals = np.asarray(eig["eigvals"], np.float64).reshape(3)
                eigvecs = np.asarray(eig["eigvecs"], np.float64).reshape(3, 3)
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(f"{self.root / 'rgb_eig.json'}: malformed: {exc}") from None
            self._stats = (mean.astype(np.float32, copy=False), eigvals, eigvecs)
        return self._stats

    def split(self, name: str) -> "PreparedSplit":
        self._check_split(name)
        shards = [self.root / s["name"] for s in self.manifest["splits"][name]["shards"]]
        return PreparedSplit(name, self._index[name], shards)


class PreparedSplit(Split):
    needs_resize = False

    def __init__(self, name: str, index: np.ndarray, shard_paths: list[Path]):
        self.name = name
        self.labels = index["label"].astype(np.int64)
        # Plain contiguous columns: indexing one element is then a cheap C lookup.
        self._shard = np.ascontiguousarray(index["shard"])
        self._offset = np.ascontiguousarray(index["offset"])
        self._length = np.ascontiguousarray(index["length"])
        self._paths = [str(p) for p in shard_paths]
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # crossed a fork: those descriptors are shared, not ours
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self._paths[shard], os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def read(self, i: int) -> bytes:
        """The stored JPEG of sample i: one pread of its tar header and data. (A shard
        truncated after it was opened gives short bytes, which the decoder reports as
        truncated.) A member that is not a plain file of the index's size under a
        relative name (a link, a device, `../x`) raises OSError: the loader sends such a
        sample empty, and it is skipped and counted like any unreadable file."""
        shard, length = int(self._shard[i]), int(self._length[i])
        blob = os.pread(self._fd(shard), length + 512, int(self._offset[i]) - 512)
        _check_member(blob[:512], length, self._paths[shard])
        return blob[512:]

    def key(self, i: int) -> str:
        """"train-000003.tar:n01440764_10026", read from the tar header just before the data."""
        shard = int(self._shard[i])
        header = os.pread(self._fd(shard), 100, int(self._offset[i]) - 512)
        member = header.split(b"\0", 1)[0].decode("ascii", "replace")
        return f"{os.path.basename(self._paths[shard])}:{member.rsplit('.', 1)[0]}"

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = os.getpid()


# -- ImageFolder -----------------------------------------------------------------------


def _check_member(header: bytes, length: int, shard: str) -> None:
    """The ustar header before a sample's data names a regular file of `length` bytes."""
    if len(header) < 512:
        raise OSError(errno.EIO, f"{shard}: tar header cut short")
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    full = (prefix + b"/" + name if prefix else name).decode("ascii", "replace")
    try:
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        size = -1
    if header[156:157] not in (b"0", b"\0") or size != length:
        raise OSError(errno.EINVAL, f"{shard}: member {full!r} is not a plain file of {length} bytes")
    if full.startswith("/") or ".." in full.split("/"):
        raise OSError(errno.EINVAL, f"{shard}: member name {full!r} leaves the shard's directory")


def _class_dirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def image_files(class_dir: Path) -> list[str]:
    """Image files under one class folder (recursively), as sorted relative paths."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, class_dir)
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append(f if rel == "." else os.path.join(rel, f))
    return sorted(found)


def read_class_names(root: Path, classes: list[str]) -> list[str]:
    """Human names from an ImageNet-style "wnid name, name" file next to train/, if any."""
    for fname in NAME_FILES:
        path = root / fname
        if path.is_file():
            names = {}
            for line in path.read_text(errors="replace").splitlines():
                wnid, _, name = line.strip().partition(" ")
                if wnid:
                    names[wnid] = name.strip().lstrip("\t") or wnid
            return [names.get(c, c) for c in classes]
    return list(classes)


class ImageFolderDataset(Dataset):
    kind = "imagefolder"
    image_size = 256

    def __init__(self, root: Path, with_val: bool = True):
        """`with_val=False` reads train/ only (a flat val/ is `prepare`'s to label)."""
        self.root = root
        train = root / "train"
        self.classes = _class_dirs(train)
        if not self.classes:
            raise DatasetError(f"{train}: no classes (expected one folder per class)")
        self.class_names = read_class_names(root, self.classes)
        label_of = {c: i for i, c in enumerate(self.classes)}
        self._files: dict[str, tuple[list[str], np.ndarray]] = {}
        self._files["train"] = self._scan("train", self.classes, label_of)
        if not self._files["train"][0]:
            raise DatasetError(f"{train}: no image files")
        val = root / "val"
        if val.is_dir() and with_val:
            val_classes = _class_dirs(val)
            if not val_classes:
                raise DatasetError(f"{val}: no class folders; `alexnetd prepare {root} {root.parent / (root.name + '-prepared')}` "
                                   "labels a flat val/ from the devkit or Kaggle's LOC_val_solution.csv next to train/")
            unknown = [c for c in val_classes if c not in label_of]
            if unknown:
                more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
                raise DatasetError(f"{val / unknown[0]}: class {unknown[0]!r}{more} not in train/")
            self._files["val"] = self._scan("val", val_classes, label_of)
        self.splits = tuple(self._files)
        self._fingerprint = None
        self._stats = None

    def _scan(self, split: str, classes: list[str], label_of: dict[str, int]) -> tuple[list[str], np.ndarray]:
        rels, labels = [], []
        for c in classes:
            files = image_files(self.root / split / c)
            rels += [f"{split}/{c}/{f}" for f in files]
            labels += [label_of[c]] * len(files)
        return rels, np.asarray(labels, np.int64)

    @property
    def fingerprint(self) -> str:
        """sha256 of the sorted (relative path, size) list; computed once, on first use."""
        if self._fingerprint is None:
            h = hashlib.sha256(b"imagefolder/1\n")
            entries = sorted(rel for rels, _ in self._files.values() for rel in rels)
            for rel in entries:
                h.update(f"{rel}\t{(self.root / rel).stat().st_size}\n".encode())
            self._fingerprint = "sha256:" + h.hexdigest()
        return self._fingerprint

    def stats(self):
        """Mean image and colour PCA over a fixed sample of at most STATS_SAMPLE training
        images, down-sampled as §2 says (cached; a raw tree has no stored statistics)."""
        if self._stats is None:
            from alexnetd.pipeline.jpeg import Decoder, SkipSample

            rels, _ = self._files["train"]
            pick = np.random.default_rng(0).choice(len(rels), min(len(rels), STATS_SAMPLE), replace=False)
            decoder = Decoder()
            acc = PixelStats(self.image_size)
            for i in np.sort(pick):
                try:
                    image = decoder.decode_square((self.root / rels[i]).read_bytes(), self.image_size)
                except (SkipSample, OSError):
                    continue
                acc.add_image(image)
            if not acc.images:
                raise DatasetError(f"{self.root / 'train'}: none of the sampled images decodes")
            self._stats = (acc.mean_image(), *eigen_decomposition(acc.covariance()))
        return self._stats

    def split(self, name: str) -> "ImageFolderSplit":
        self._check_split(name)
        rels, labels = self._files[name]
        return ImageFolderSplit(name, self.root, rels, labels)


class ImageFolderSplit(Split):
    needs_resize = True

    def __init__(self, name: str, root: Path, rels: list[str], labels: np.ndarray):
        self.name = name
        self.root = str(root)
        self.rels = rels
        self.labels = labels

    def read(self, i: int) -> bytes:
        """The file's bytes (OSError if it vanished or cannot be read)."""
        with open(os.path.join(self.root, self.rels[i]), "rb") as f:
            return f.read()

    def key(self, i: int) -> str:
        return self.rels[i]

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.rels[i])
