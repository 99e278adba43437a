"""Progress a user can read, wherever the output goes.

On a terminal: a tqdm bar per split with images/s and the time left. Anywhere else (a
log file, CI, `docker logs`): one line a minute, so a three-hour job leaves a readable
log instead of a megabyte of carriage returns.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

__all__ = ["Progress"]

LINE_EVERY = 60.0  # seconds between lines when not on a terminal


class Progress:
    def __init__(self, name: str, total: int | None, done: int = 0, enabled: bool = True, stream=None):
        self.name, self.total, self.done = name, total, done
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._bar = None
        self._start = time.monotonic()
        self._start_done = done
        self._last_line = self._start
        if enabled and self.stream.isatty():
            self._bar = tqdm(total=total, initial=done, desc=f"prepare {name}", unit="img", smoothing=0.1,
                             file=self.stream)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last_line >= LINE_EVERY:
            self._last_line = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = (self.done - self._start_done) / elapsed
        of = f"/{self.total}" if self.total else ""
        left = ""
        if self.total and rate > 0 and self.total > self.done:
            left = f", about {_duration((self.total - self.done) / rate)} left"
        return f"prepare {self.name}: {self.done}{of} images, {rate:.0f} images/s{left}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
