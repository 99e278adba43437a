"""A job's JPEG bytes through shared memory instead of the job message.

Why: a batch's raw bytes (about 2.7 MB at 128 prepared images) were copied through
ZeroMQ on every hop of one host; written once into a slot's segment, they are read
in place by whoever takes the job. Only the batch's offsets, labels and sample
indices ride the message, with a descriptor: the header field `shared_bytes`, the
blob's length. Which segment is the job's own `slot`.

One segment per ring slot: a file in /dev/shm named `<ring name>-bytes-<slot>`, so
whatever looks for the ring's name (the stale-segment replacement at start, the leak
checks) finds these too. Only the loader creates and grows them (`JobBytesWriter`):
grow-only, doubling, page-rounded, the pages reserved with posix_fallocate (a full
/dev/shm is then an error at write time, not a SIGBUS in a reader), never shrunk while
a reader may map them. A segment is bounded by MAX_SLOT_BYTES: a batch over it, or one
whose segment cannot grow, goes inline in the message as before (logged once, counted).

Readers (`JobBytesReader`, used by jobloop.take_job only) map a segment read-only and
keep the mapping; a descriptor longer than what they mapped means the file grew, and
they map it again. A descriptor that does not fit (slot out of range, no such segment,
a length past its end) is a malformed message. Files are mapped with mmap for the
reason pipeline/ring.py gives (multiprocessing.shared_memory's resource tracker).
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

import numpy as np

from alexnetd.pipeline import wire
from alexnetd.pipeline.ring import SHM_DIR

__all__ = ["JobBytesWriter", "JobBytesReader", "segment_path", "remove_segments", "MAX_SLOT_BYTES", "FIELD"]

log = logging.getLogger("alexnetd.jobbytes")

# A slot's segment grows to at most this (a batch of 128 prepared images is ~3 MB, of
# full-size ImageNet JPEGs ~15 MB): past it a batch rides the message, as it always could.
MAX_SLOT_BYTES = 256 << 20
FIELD = "shared_bytes"  # the job header's descriptor: the blob's length in the job slot's segment


def segment_path(ring: str, slot: int) -> Path:
    return SHM_DIR / f"{ring}-bytes-{slot}"


def remove_segments(ring: str) -> None:
    """Every byte segment of this ring: at a start (a crashed run's) and at a stop."""
    prefix = f"{ring}-bytes-"
    for name in os.listdir(SHM_DIR):
        if name.startswith(prefix):
            (SHM_DIR / name).unlink(missing_ok=True)


class JobBytesWriter:
    """The loader's end: `job(slot, chunks, offsets, labels, indices)` is a job message's
    arrays and descriptor, the bytes in the slot's segment or, failing that, inline."""

    def __init__(self, ring: str, limit: int = MAX_SLOT_BYTES):
        self.ring, self.limit = ring, limit
        self._maps: dict[int, mmap.mmap] = {}
        self.inline = 0  # batches sent inline: over the bound, or no room in /dev/shm

    def job(self, slot: int, chunks: list[bytes], offsets, labels, indices) -> tuple[list, dict]:
        """(arrays, header fields) of the job: [offsets, labels, indices] and {FIELD: length},
        or [bytes, offsets, labels, indices] and {} as a job always could be."""
        length = self.put(slot, chunks)
        if length is None:
            return [np.frombuffer(b"".join(chunks), np.uint8), offsets, labels, indices], {}
        return [offsets, labels, indices], {FIELD: length}

    def put(self, slot: int, chunks: list[bytes]) -> int | None:
        """Write the chunks back to back into the slot's segment: their length, or None
        when they must go inline."""
        total = sum(len(c) for c in chunks)
        if total == 0:
            return None  # nothing to share (every read failed)
        if total > self.limit:
            return self._inline(f"a batch of {total} bytes is over the {self.limit}-byte bound")
        try:
            segment = self._segment(slot, total)
        except OSError as exc:
            return self._inline(f"cannot grow {segment_path(self.ring, slot)}: {exc.strerror or exc}")
        at = 0
        for chunk in chunks:
            segment[at:at + len(chunk)] = chunk
            at += len(chunk)
        return total

    def _inline(self, why: str) -> None:
        if not self.inline:
            log.warning("%s; such batches ride the job message (counted as inline_jobs)", why)
        self.inline += 1
        return None

    def _segment(self, slot: int, need: int) -> mmap.mmap:
        segment = self._maps.get(slot)
        if segment is not None and len(segment) >= need:
            return segment
        have = len(segment) if segment is not None else 0
        want = _pages(max(need, min(2 * have, self.limit)))
        # Not O_EXCL: a restarted loader keeps the segments of its run (readers may map
        # them); a crashed run's were removed with its ring (pipeline/launch.py).
        fd = os.open(segment_path(self.ring, slot), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size < want:
                os.posix_fallocate(fd, 0, want)  # grows the file; ENOSPC here, not SIGBUS later
                size = want
            grown = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if segment is not None:
            segment.close()  # nothing of ours views it: writes go through slices
        self._maps[slot] = grown
        return grown

    def close(self) -> None:
        for segment in self._maps.values():
            segment.close()
        self._maps.clear()


class JobBytesReader:
    """A consumer's end: `resolve(job)` puts the blob back in front of the job's arrays, a
    read-only view of the slot's segment, valid until the slot's credit comes back."""

    def __init__(self, ring: str, slots: int):
        self.ring, self.slots = ring, slots
        self._views: dict[int, np.ndarray] = {}  # slot -> the whole mapped segment

    def resolve(self, job: wire.Message) -> wire.Message:
        """The job as if its bytes had come inline; WireError if its descriptor is malformed."""
        if job.kind != "job" or FIELD not in job.header:
            return job
        length, slot = job.header[FIELD], job.get("slot")
        if not _is_int(length) or length < 0 or not _is_int(slot) or not 0 <= slot < self.slots:
            raise wire.WireError(f"bad shared-bytes descriptor: slot {slot!r}, length {length!r}")
        if len(job.arrays) != 3 or job.arrays[0].ndim != 1 or len(job.arrays[0]) == 0 or \
                int(job.arrays[0][-1]) != length:
            raise wire.WireError("a shared-bytes job needs [offsets, labels, indices] ending at its length")
        view = self._views.get(slot)
        if view is None or len(view) < length:
            view = self._map(slot, length)
        del job.header[FIELD]  # now it is an inline job: what the remote hosts are sent
        job.arrays.insert(0, view[:length])
        return job

    def _map(self, slot: int, length: int) -> np.ndarray:
        try:
            fd = os.open(segment_path(self.ring, slot), os.O_RDONLY)
        except OSError as exc:
            raise wire.WireError(f"no byte segment for slot {slot}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < length or size == 0:
                raise wire.WireError(f"{length} shared bytes in slot {slot}'s segment of {size}")
            segment = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        # The old mapping, if any, is not closed: a job still being decoded may view it.
        # It goes when its last view does.
        view = np.frombuffer(segment, np.uint8)
        self._views[slot] = view
        return view

    def close(self) -> None:
        self._views.clear()  # each mapping goes with the last view of it


def _pages(n: int) -> int:
    page = mmap.PAGESIZE
    return -(-n // page) * page


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
