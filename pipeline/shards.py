"""Writing the prepared format: tar shards, their index, the pixel statistics, the manifest.

A prepared dataset is one directory:

    manifest.json          format, version, counts, shard list with sizes, fingerprint
    classes.json           [{"wnid": ..., "name": ...}, ...]; list position = label
    mean.npy               float32 (S, S, 3) RGB per-pixel mean over the training images
    rgb_eig.json           eigenvalues/eigenvectors of the 3x3 RGB pixel covariance (0..255)
    train.index.npy        INDEX_DTYPE, one row per sample, in shard order
    train/train-000000.tar ...
    val.index.npy, val/val-000000.tar ...   (when there is a validation split)

Each shard is a plain POSIX (ustar) tar in WebDataset naming: sample `key` is the member
`key.jpg` (an S×S RGB JPEG) followed by `key.cls` (the label in ASCII decimal), so
`webdataset.WebDataset("train/train-{000000..000003}.tar")` reads it unchanged. The
index row of a sample points at the first byte of its .jpg member's data, so a reader
fetches one image with a single `os.pread` and never parses tar headers.

Shards are byte-for-byte reproducible: every header has mtime 0, uid/gid 0, no user
names, mode 0644, and nothing in any file depends on the clock or the host.

Nothing here is visible until `PreparedWriter.commit()`: the tree is built in a sibling
`OUT.tmp-<pid>` directory and renamed into place, so a crash leaves no half dataset
under the name a user asked for.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np

from alexnetd.durable import fsync_dir
from alexnetd.pipeline.pixelstats import PixelStats

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_DTYPE",
    "JpegCodec",
    "ShardWriter",
    "PreparedWriter",
    "KeyMaker",
    "fingerprint",
    "split_entry",
    "write_metadata",
    "parse_size",
    "temp_dir_for",
    "remove_stale_temp_dirs",
    "replace_dir",
]

FORMAT = "alexnetd-prepared"
FORMAT_VERSION = 1

# One row per sample. Packed (no padding): 20 bytes a sample, 25 MB for ImageNet's train set.
INDEX_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("length", "<u4"), ("label", "<i4")])

_BLOCK = 512
# A ustar name is at most 100 bytes; keep keys well inside it (".jpg" and ".cls" follow).
_MAX_KEY = 80


# -- encoding --------------------------------------------------------------------------


class JpegCodec:
    """Encode an S×S RGB image for a shard, and count the pixels the trainer will see.

    The statistics are taken from the *decoded stored JPEG*, not from the pixels
    before encoding: the mean image the trainer subtracts is then the mean of exactly
    what it reads back. Shared by `prepare` and `fake-data` so both compute it the same way.
    """

    def __init__(self, quality: int = 90):
        from turbojpeg import TJPF_RGB, TJSAMP_420

        from alexnetd.pipeline.jpeg import Decoder

        self.quality = quality
        self.decoder = Decoder()
        self._turbo = self.decoder.turbo
        self._pf, self._subsample = TJPF_RGB, TJSAMP_420
        self._readback = np.empty(0, np.uint8)  # the stored JPEG decoded again, reused image after image

    def encode(self, image: np.ndarray, stats: PixelStats | None = None) -> bytes:
        data = self._turbo.encode(
            np.ascontiguousarray(image), quality=self.quality, pixel_format=self._pf, jpeg_subsample=self._subsample
        )
        if stats is not None:
            if self._readback.shape != image.shape:
                self._readback = np.empty(image.shape, np.uint8)
            self.decoder.decode_into(data, self._readback)  # S×S: libjpeg-turbo straight into the buffer
            stats.add_image(self._readback)
        return data


# -- tar shards ------------------------------------------------------------------------


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")
    assert len(header) == _BLOCK
    return header


def _padding(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)


class KeyMaker:
    """WebDataset sample keys: unique within a split, no dots (WebDataset splits the
    member name at the first dot), only [A-Za-z0-9_-], short enough for a ustar name.
    ImageNet's own names ("n01440764_10026") pass through unchanged."""

    _bad = re.compile(r"[^A-Za-z0-9_-]")

    def __init__(self):
        self.used: set[str] = set()

    def make(self, stem: str, class_id: str) -> str:
        key = self._clean(stem)
        if key in self.used:
            key = self._clean(f"{class_id}_{stem}")
        base, n = key, 1
        while key in self.used:
            suffix = f"_{n}"
            key = base[: _MAX_KEY - len(suffix)] + suffix
            n += 1
        self.used.add(key)
        return key

    def _clean(self, text: str) -> str:
        key = self._bad.sub("_", text)[:_MAX_KEY]
        return key or "_"


class ShardWriter:
    """Appends samples to `<dir>/<split>-NNNNNN.tar`, starting a new shard when the
    next sample would take the current one past `max_bytes` or `max_count`. Numbering
    starts at `first` (a resumed prepare continues after the shards it kept)."""

    def __init__(self, directory: Path, split: str, max_bytes: int | None = None, max_count: int | None = None,
                 first: int = 0):
        self.directory = Path(directory)
        self.split = split
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.first = first
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []  # {"name", "bytes", "count"} of closed shards
        # Index columns as typed arrays: 20 bytes a sample, not a Python tuple's ~100.
        self._columns = {name: array.array(code) for name, code in
                         (("shard", "I"), ("offset", "Q"), ("length", "I"), ("label", "i"))}
        self._file = None
        self._size = 0
        self._count = 0

    def add(self, key: str, data: bytes, label: int) -> None:
        cls = str(label).encode()
        need = 2 * _BLOCK + len(data) + len(_padding(len(data))) + len(cls) + len(_padding(len(cls)))
        if self._file is not None and self._count and (
            (self.max_bytes is not None and self._size + need + 2 * _BLOCK > self.max_bytes)
            or (self.max_count is not None and self._count >= self.max_count)
        ):
            self._close_shard()
        if self._file is None:
            self._open_shard()
        header = _tar_header(f"{key}.jpg", len(data))
        self._file.write(header)
        offset = self._size + len(header)
        self._file.write(data)
        self._file.write(_padding(len(data)))
        self._file.write(_tar_header(f"{key}.cls", len(cls)))
        self._file.write(cls)
        self._file.write(_padding(len(cls)))
        for name, value in (("shard", self.first + len(self.shards)), ("offset", offset), ("length", len(data)), ("label", label)):
            self._columns[name].append(value)
        self._size += need
        self._count += 1

    def close(self) -> np.ndarray:
        """Finish the last shard; returns the index (INDEX_DTYPE) of every sample written."""
        if self._file is not None:
            self._close_shard()
        index = np.zeros(len(self._columns["shard"]), INDEX_DTYPE)
        for name, column in self._columns.items():
            index[name] = np.frombuffer(column, dtype=column.typecode) if len(column) else 0
        return index

    def index_rows(self, start: int, count: int) -> np.ndarray:
        """INDEX_DTYPE rows [start, start+count) of what this writer has written."""
        rows = np.zeros(count, INDEX_DTYPE)
        for name, column in self._columns.items():
            rows[name] = np.frombuffer(column, dtype=column.typecode)[start:start + count] if count else 0
        return rows

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _name(self) -> str:
        return f"{self.split}-{self.first + len(self.shards):06d}.tar"

    def _open_shard(self) -> None:
        self._file = open(self.directory / self._name(), "wb", buffering=1 << 20)
        self._size = 0
        self._count = 0

    def _close_shard(self) -> None:
        self._file.write(b"\0" * (2 * _BLOCK))  # end-of-archive marker
        self._size += 2 * _BLOCK
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards.append({"name": f"{self.split}/{self._name()}", "bytes": self._size, "count": self._count})


# -- the whole directory ---------------------------------------------------------------


def fingerprint(root: Path, manifest_splits: dict) -> str:
    """sha256 over classes.json, each split's index file, and its shard names and sizes."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}/{FORMAT_VERSION}\n".encode())
    h.update((root / "classes.json").read_bytes())
    for split in sorted(manifest_splits):
        info = manifest_splits[split]
        h.update(f"\n{split}\n".encode())
        h.update((root / info["index"]).read_bytes())
        for shard in info["shards"]:
            h.update(f"{shard['name']} {shard['bytes']}\n".encode())
    return "sha256:" + h.hexdigest()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


class PreparedWriter:
    """Builds a prepared dataset in a temp dir next to `out`; `commit()` renames it in.

        with PreparedWriter(out, classes, names, size=256) as w:
            w.begin("train", max_bytes=256 << 20)
            w.add(key, jpeg_bytes, label)  ...
            w.stats.merge(partial)         # PixelStats over the training images
            w.end()
            w.commit(extra={...})

    Leaving the `with` block without `commit()` (an exception, Ctrl-C, SIGTERM turned
    into SystemExit) removes the temp dir.
    """

    def __init__(self, out: Path, classes: list[str], class_names: list[str], size: int = 256, force: bool = False):
        self.out = Path(out)
        self.classes = list(classes)
        self.class_names = list(class_names)
        self.size = size
        self.force = force
        self.stats = PixelStats(size)
        self.tmp = temp_dir_for(self.out)
        self.splits: dict[str, dict] = {}
        self._writer: ShardWriter | None = None
        self._keys: KeyMaker | None = None
        self._committed = False

    def __enter__(self) -> "PreparedWriter":
        remove_stale_temp_dirs(self.out)
        self.tmp.mkdir(parents=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.abort()
        if not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def begin(self, split: str, max_bytes: int | None = None, max_count: int | None = None) -> None:
        assert self._writer is None
        self._writer = ShardWriter(self.tmp / split, split, max_bytes=max_bytes, max_count=max_count)
        self._keys = KeyMaker()
        self._split = split

    def key(self, stem: str, class_id: str) -> str:
        return self._keys.make(stem, class_id)

    def add(self, key: str, data: bytes, label: int) -> None:
        self._writer.add(key, data, label)

    def end(self) -> None:
        """Finish the split. A split left with no samples (every validation image was
        undecodable) is dropped rather than written empty."""
        index = self._writer.close()
        split = self._split
        if not len(index) and split != "train":
            shutil.rmtree(self.tmp / split, ignore_errors=True)
            self._writer = None
            return
        np.save(self.tmp / f"{split}.index.npy", index, allow_pickle=False)
        self.splits[split] = split_entry(split, index, self._writer.shards)
        self._writer = None

    def commit(self, extra: dict | None = None) -> Path:
        """Write classes, statistics and the manifest (last), then rename into place."""
        assert self._writer is None and "train" in self.splits
        write_metadata(self.tmp, self.classes, self.class_names, self.stats, self.splits, self.size, extra)
        replace_dir(self.tmp, self.out, self.force)
        self._committed = True
        return self.out


def split_entry(split: str, index: np.ndarray, shards: list[dict]) -> dict:
    """The manifest's entry for one split whose index file is already written."""
    return {
        "count": int(len(index)),
        "bytes": int(sum(s["bytes"] for s in shards)),
        "index": f"{split}.index.npy",
        "shards": shards,
        "urls": f"{split}/{split}-{{000000..{len(shards) - 1:06d}}}.tar" if shards else None,
    }


def write_metadata(root: Path, classes: list[str], class_names: list[str], stats: PixelStats, splits: dict,
                   size: int, extra: dict | None = None) -> None:
    """classes.json, mean.npy, rgb_eig.json and, last, manifest.json into `root`, whose
    shards and index files are written; fsynced, so the manifest never names data that
    a power cut could still take away."""
    _write_json(root / "classes.json", [{"wnid": c, "name": n} for c, n in zip(classes, class_names)])
    np.save(root / "mean.npy", stats.mean_image(), allow_pickle=False)
    eigvals, eigvecs = stats.eigen()
    _write_json(
        root / "rgb_eig.json",
        {
            "eigvals": eigvals.tolist(),
            "eigvecs": eigvecs.tolist(),  # eigvecs[i][j]: component i of eigenvector j
            "covariance": stats.covariance().tolist(),
            "mean_rgb": stats.mean_rgb().tolist(),
            "images": stats.images,
        },
    )
    for name in ("classes.json", "mean.npy", "rgb_eig.json", *(info["index"] for info in splits.values())):
        _fsync(root / name)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "image_size": size,
        "classes": len(classes),
        "splits": splits,
        "fingerprint": fingerprint(root, splits),
    }
    manifest.update(extra or {})
    _write_json(root / "manifest.json", manifest)
    _fsync(root / "manifest.json")
    fsync_dir(root)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- temp dirs and the final rename ----------------------------------------------------


def temp_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}.tmp-{os.getpid()}"


def remove_stale_temp_dirs(out: Path) -> None:
    """Remove `OUT.tmp-<pid>` dirs left by a run that crashed (its pid is gone).
    `OUT.old-<pid>` dirs are left alone: after a crash mid-swap one may be the only copy."""
    pattern = re.compile(re.escape(out.name) + r"\.tmp-(\d+)$")
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_dir(tmp: Path, out: Path, force: bool) -> None:
    """Rename `tmp` to `out`; with `force`, an existing `out` is moved aside first and
    removed only once the new tree is in place."""
    old = None
    if out.exists() and force:
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)  # fails (ENOTEMPTY/EEXIST) if `out` appeared meanwhile
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def parse_size(text: str | int) -> int:
    """'256M', '64MB', '1.5G', '1000000' → bytes (K/M/G/T are powers of 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 256M, 1G, 500000)")
    value = float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())
    if value < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)
