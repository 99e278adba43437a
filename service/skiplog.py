"""RUN_DIR/skipped.jsonl: every sample the run could not use, named once.

One JSON object per line: {"t", "split", "key", "reason", "epoch", "seq"} and, for an
ImageFolder, "path". `key` is the shard and member of a prepared dataset
("train-000003.tar:n01440764_10026") or the file's path below the split's folder.

A bad file is bad in every epoch and after every restart: it is written the first time
it is met in a trained batch and never again, so the file lists what to fix, not how
often training met it. `start --fresh` sets it aside with the rest of the old run.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from pathlib import Path

__all__ = ["SkipLog", "RECENT"]

log = logging.getLogger("alexnetd.skiplog")

RECENT = 5  # how many `status` shows


class SkipLog:
    """`shared`: other processes (data-parallel ranks) append to the same file, so a sample
    not yet seen here is looked up in the file again before it is written."""

    def __init__(self, run_dir, shared: bool = False):
        self.path = Path(run_dir) / "skipped.jsonl"
        self.shared = shared
        self.seen: set[tuple[str, str]] = set()
        self.recent: deque = deque(maxlen=RECENT)
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
                key = (row["split"], row["key"])
            except (ValueError, KeyError, TypeError):
                continue  # the last line of a process killed mid-write
            if key not in self.seen:
                self.seen.add(key)
                self.recent.append({k: row.get(k) for k in ("split", "key", "reason")})

    def record(self, split: str, key: str, reason: str, epoch: int, seq: int, path: str | None = None) -> bool:
        """Write the sample's line unless the run already named it. True if written."""
        if (split, key) in self.seen:
            return False
        if self.shared:
            self._load()
            if (split, key) in self.seen:
                return False
        row = {"t": round(time.time(), 3), "split": split, "key": key, "reason": reason, "epoch": epoch, "seq": seq}
        if path is not None:
            row["path"] = path
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        except OSError as exc:  # a full disk must not stop training over a list of names
            log.warning("could not record skipped sample %s in %s: %s", key, self.path, exc.strerror)
        self.seen.add((split, key))
        self.recent.append({"split": split, "key": key, "reason": reason})
        return True
