"""The run's append-only history (RUN_DIR/history.jsonl), which `alexnetd report` plots.

One JSON object per line with a "kind": "step" (loss, lr, images/s), "val" (top-1/top-5
error), "stages" (per-stage images/s and busy share), "event" (start, resume, restart,
checkpoint, stop). Lines are written whole and flushed, so a crash loses at most the
line being written, which readers skip.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["History", "read_history"]


class History:
    def __init__(self, run_dir):
        self.path = Path(run_dir) / "history.jsonl"
        self._fh = open(self.path, "a", buffering=1)
        self.dropped = 0

    def write(self, kind: str, **fields) -> None:
        try:
            self._fh.write(json.dumps({"t": round(time.time(), 3), "kind": kind, **fields}) + "\n")
        except OSError:
            # A full disk loses history lines, never the training: readers skip a torn line.
            self.dropped += 1

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass  # on a full disk the last buffered line is lost; closing must not fail the process


def read_history(run_dir) -> list[dict]:
    path = Path(run_dir) / "history.jsonl"
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the last line of a run that died mid-write
    return rows
