"""The shared-memory ring of batch slots that augmenters decode into.

Why not send decoded batches over ZeroMQ: measured on these machines, `ipc://` moves a
19 MB uint8 batch at 1-1.8 GB/s, so at 4,500 images/s the copy alone would eat most of a
core; a reused shared-memory ring hands batches over at memory speed. Only small
"seq n is in slot k" messages travel on sockets.

Each slot holds up to `batch` whole 256x256x3 uint8 images (NHWC), for training and
validation alike. The augmenters decode each stored image straight into its place in
the slot; the random 224 crop and the mirror of a training sample are taken on the
device, in the same gather that subtracts the mean image (pipeline/transform.py).
Why whole images: a decoded image's bytes are then written once on the CPU (no crop
copy, no mirror copy), at the price of 256²/224² = 1.31x more bytes per batch crossing
PCIe (still uint8, 4x fewer than float), which the copier's DMA absorbs.

The segment is a file in /dev/shm named after the run directory, so a crashed run's
segment is found and replaced at the next start instead of leaking. We map the file
ourselves rather than use multiprocessing.shared_memory: in Python 3.11 every process
that attaches to a SharedMemory registers it with a resource tracker that unlinks it
when that process exits, which would tear the ring down under the others.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import numpy as np

__all__ = ["Ring", "ring_name", "IMAGE", "CROP"]

IMAGE = 256  # side of a stored image (§2: down-sampled to 256x256)
CROP = 224   # side of a training crop (§4.1)

SHM_DIR = Path("/dev/shm")


def ring_name(run_dir: str | os.PathLike) -> str:
    """A stable, per-run-directory name, so the next start finds a crashed run's segment."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    return f"alexnetd-{digest}-ring"


class Ring:
    def __init__(self, name: str, slots: int, batch: int, create: bool = False):
        self.name, self.slots, self.batch = name, slots, batch
        self.slot_bytes = batch * IMAGE * IMAGE * 3
        self.path = SHM_DIR / name
        size = slots * self.slot_bytes
        if size == 0:
            # Slots that are only credits (a decoder that hands the copier device batches):
            # nothing to map, nothing reserved in /dev/shm.
            if create:
                self.path.unlink(missing_ok=True)  # a cpu run's segment of this run dir
            self._map, self.buffer = None, np.empty(0, np.uint8)
            return
        if create:
            # A stale segment from a crashed run of the same run dir is replaced, not reused:
            # someone might still hold the old mapping.
            self.path.unlink(missing_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                # Reserve the pages now: a sparse file would let a full /dev/shm kill an
                # augmenter with SIGBUS mid-batch instead of failing here, at start.
                os.posix_fallocate(fd, 0, size)
            except OSError:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
        else:
            fd = os.open(self.path, os.O_RDWR)
            if os.fstat(fd).st_size != size:
                os.close(fd)
                raise ValueError(f"ring {name} has the wrong size for {slots} slots of {batch}")
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.buffer = np.frombuffer(self._map, dtype=np.uint8)

    def view(self, slot: int, n: int | None = None) -> np.ndarray:
        """(n, 256, 256, 3) whole images of the batch in slot k."""
        n = self.batch if n is None else n
        start = slot * self.slot_bytes
        return self.buffer[start:start + n * IMAGE * IMAGE * 3].reshape(n, IMAGE, IMAGE, 3)

    def close(self) -> None:
        self.buffer = None
        if self._map is None:
            return
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when that view does

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)
