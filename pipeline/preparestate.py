"""A prepare's work in progress: `OUT.partial/`, which a rerun of the same command continues.

    OUT.partial/
      .lock                      flock'ed by the prepare writing here (one at a time)
      .journal/params.json       the options the work was started with
      .journal/train-000005.json one record per finished shard: its size, the source
      .journal/train-000005.npy  position after it, its keys, its skipped files; its index rows
      train/train-000005.tar     finished shards, under their final names
      ...                        (the shard being written, rewritten after a crash)

A record is written only once its shard is fsynced, and atomically (temp file, fsync,
rename), so after a SIGKILL or a power cut the journal names exactly the shards that
are whole; anything after the last record is redone. The shards are the output: no
extra copy is kept, so the disk a prepare needs beyond its output is the shard in
progress. When every split is done, the index files, statistics and the manifest (last)
are written into OUT.partial and it is renamed to OUT: a dataset appears complete or not
at all. A half-finished `OUT.partial` never opens as a dataset (no manifest.json).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexnetd.durable import fsync_dir
from alexnetd.pipeline.shards import INDEX_DTYPE, replace_dir, split_entry, write_metadata

__all__ = ["Workspace", "ShardRecord", "WorkspaceError", "partial_dir_for"]

JOURNAL = ".journal"


class WorkspaceError(Exception):
    """OUT.partial cannot be used as asked; one line."""


@dataclass
class ShardRecord:
    shard: dict  # {"name", "bytes", "count"} as in the manifest
    next: tuple[int, int]  # the source position just after this shard's images
    keys: list[str]
    skipped: list[str]  # skipped.txt lines for the source images up to `next`
    kinds: dict[str, int]  # converted file kinds (cmyk, png) up to `next`
    rows: np.ndarray  # INDEX_DTYPE


def partial_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}.partial"


class Workspace:
    def __init__(self, out: Path, params: dict, force: bool):
        self.out = Path(out)
        self.dir = partial_dir_for(self.out)
        self.journal = self.dir / JOURNAL
        self.params = params
        self.force = force
        self._lock_fd: int | None = None
        self.resumed = False
        self.written = False  # everything is in OUT.partial; only the rename is left

    def __enter__(self) -> "Workspace":
        try:
            return self._open()
        except BaseException:
            self.__exit__()
            raise

    def _open(self) -> "Workspace":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise WorkspaceError(f"{self.dir}: another prepare is writing it") from None
            raise
        params_file = self.journal / "params.json"
        manifest = self.dir / "manifest.json"
        if manifest.is_file() and not params_file.is_file() and not self.force:
            # Killed between the journal's removal and the rename: the data is complete.
            self.written = json.loads(manifest.read_text()).get("source") == self.params
            if self.written:
                return self
        if params_file.is_file() and not self.force:
            started = json.loads(params_file.read_text())
            if started != self.params:
                changed = sorted(k for k in set(started) | set(self.params) if started.get(k) != self.params.get(k))
                raise WorkspaceError(
                    f"{self.dir}: a prepare started with other options (changed: {', '.join(changed)}); "
                    "rerun it as it was started to continue, or add --force to start over")
            self.resumed = True
        else:
            self._clear()
            self.journal.mkdir()
            _write_atomically(params_file, json.dumps(self.params, indent=1, sort_keys=True) + "\n")
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _clear(self) -> None:
        for entry in self.dir.iterdir():
            if entry.name != ".lock":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    # -- the journal -------------------------------------------------------------------

    def records(self, split: str) -> list[ShardRecord]:
        """The finished shards of `split`, in order; stops at the first record whose shard
        is not on disk at its recorded size (it and what follows are redone)."""
        records = []
        while True:
            stem = self.journal / f"{split}-{len(records):06d}"
            try:
                meta = json.loads(Path(f"{stem}.json").read_text())
                rows = np.load(f"{stem}.npy", allow_pickle=False)
            except (OSError, ValueError):
                return records
            shard_path = self.dir / meta["shard"]["name"]
            if not shard_path.is_file() or shard_path.stat().st_size != meta["shard"]["bytes"]:
                return records
            records.append(ShardRecord(meta["shard"], tuple(meta["next"]), meta["keys"], meta["skipped"],
                                       meta["kinds"], rows))

    def record(self, split: str, number: int, rec: ShardRecord) -> None:
        """Journal a finished (already fsynced) shard: the rows first, the record last."""
        stem = self.journal / f"{split}-{number:06d}"
        _write_atomically(Path(f"{stem}.npy"), _npy_bytes(rec.rows))
        meta = {"shard": rec.shard, "next": list(rec.next), "keys": rec.keys, "skipped": rec.skipped,
                "kinds": rec.kinds}
        _write_atomically(Path(f"{stem}.json"), json.dumps(meta) + "\n")

    # -- the end -----------------------------------------------------------------------

    def discard(self) -> None:
        """Nothing worth keeping was made (no image decoded): leave no OUT.partial."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def rename(self) -> Path:
        if (self.dir / ".lock").exists():
            os.unlink(self.dir / ".lock")  # our descriptor keeps the lock until we close it
        replace_dir(self.dir, self.out, self.force)
        return self.out

    def commit(self, classes, names, stats, splits: dict[str, list[ShardRecord]], skipped_txt: str,
               size: int, extra: dict) -> Path:
        """Index files, skipped.txt, statistics, manifest (last); then OUT.partial → OUT."""
        manifest_splits = {}
        for split, records in splits.items():
            index = np.concatenate([r.rows for r in records]) if records else np.zeros(0, INDEX_DTYPE)
            if not len(index) and split != "train":
                continue  # every image of the split was skipped: no empty split
            np.save(self.dir / f"{split}.index.npy", index, allow_pickle=False)
            manifest_splits[split] = split_entry(split, index, [r.shard for r in records])
        (self.dir / "skipped.txt").write_text(skipped_txt)
        write_metadata(self.dir, classes, names, stats, manifest_splits, size, {**extra, "source": self.params})
        shutil.rmtree(self.journal)
        return self.rename()


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _write_atomically(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
