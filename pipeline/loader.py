"""Stage 1, the loader: load batch n+3 from disk (step 4 of the paper's pipeline).

One process. For each batch it waits for a free slot (a credit), reads the raw JPEG
bytes of the batch's samples (one pread each from a prepared shard) back to back into
the slot's shared-memory segment (pipeline/jobbytes.py), and sends the augmenters one
small message: the offsets, labels and sample indices, and where the bytes are. A batch
too big for its segment, or one /dev/shm has no room for, carries its bytes in the
message instead. It never decodes.

Where to start comes from the copier (the trainer side), which knows what has been
trained: a loader says hello with its generation number and the copier answers with the
position and the free slots. So a restarted loader resumes exactly where the trainer
is, and stale credits or batches of an older generation are told apart and ignored.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import zmq

from alexnetd.pipeline import wire
from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.jobbytes import MAX_SLOT_BYTES, JobBytesWriter
from alexnetd.pipeline.plan import BatchPlan
from alexnetd.pipeline.stage import Heartbeat, StageClock, StopFlag

__all__ = ["run_loader"]

log = logging.getLogger("alexnetd.loader")

POLL_MS = 200
HELLO_EVERY = 1.0


def run_loader(cfg: dict) -> None:
    """Process entry point. `cfg` keys: data, endpoints, batch, seed, val_every, rank,
    world, generation, slots, ring, job_bytes_limit (optional: the byte segments' bound,
    jobbytes.MAX_SLOT_BYTES by default; 0 sends every batch's bytes in its message)."""
    stop = StopFlag()
    dataset = open_dataset(cfg["data"])
    splits = {name: dataset.split(name) for name in dataset.splits}
    plan = BatchPlan.for_dataset(dataset, cfg["batch"], cfg["seed"], cfg.get("val_every", 1), cfg.get("rank", 0),
                                 cfg.get("world", 1))
    generation = cfg["generation"]
    ends = cfg["endpoints"]
    limit = cfg.get("job_bytes_limit")
    shared = JobBytesWriter(cfg["ring"], MAX_SLOT_BYTES if limit is None else limit)

    ctx = zmq.Context()
    jobs = ctx.socket(zmq.PUSH)
    # One queued job per augmenter at most: a batch waiting behind a slow augmenter is
    # one the idle ones could have taken.
    jobs.setsockopt(zmq.SNDHWM, 1)
    jobs.setsockopt(zmq.LINGER, 0)
    jobs.bind(ends["jobs"])
    credits = ctx.socket(zmq.PULL)
    credits.setsockopt(zmq.LINGER, 0)
    credits.bind(ends["credits"])
    hello = ctx.socket(zmq.PUSH)
    hello.setsockopt(zmq.LINGER, 0)
    hello.connect(ends["ready"])

    clock = StageClock()
    beat = Heartbeat(ctx, ends.get("beats"), "loader", generation=generation, rank=cfg.get("rank", 0))
    free: set[int] | None = None   # unknown until the copier's sync
    position = None
    last_hello = 0.0
    poller = zmq.Poller()
    poller.register(credits, zmq.POLLIN)

    while not stop.stopping:
        if free is None and time.monotonic() - last_hello > HELLO_EVERY:
            wire.send(hello, "hello", generation=generation)
            last_hello = time.monotonic()
        with clock.timing("starved"):
            ready = dict(poller.poll(0 if free else POLL_MS))
        if credits in ready:
            for msg in wire.drain(credits, clock.count_malformed):
                if msg.get("generation") != generation:
                    continue  # meant for an older loader
                if msg.kind == "sync" and free is None:
                    free = set(msg["free"])
                    position = (msg["epoch"], msg["seq"])
                elif msg.kind == "credit" and free is not None:
                    free.add(msg["slot"])
        if free and position is not None:
            slot = min(free)
            free.discard(slot)
            epoch, seq = position
            split, indices = plan.samples(epoch, seq)
            with clock.timing("busy"):
                chunks, offsets = _read(splits[split], indices)
                labels = splits[split].labels[indices]
                # Slot k's segment is written only while this loader holds slot k's credit,
                # and the copier gives a credit back only once that slot's batch was
                # consumed (a new generation starts from the copier's sync, its
                # predecessors gone): no one still reads the bytes overwritten here.
                arrays, descriptor = shared.job(slot, chunks, offsets, labels, indices)
            with clock.timing("blocked"):
                # Wait for an augmenter to take it, still watching the stop flag: augmenters
                # whose supervisor died exit, and a send blocked on them would never return.
                while not jobs.poll(POLL_MS, zmq.POLLOUT) and not stop.stopping:
                    beat.maybe(clock, free_slots=len(free), inline_jobs=shared.inline)
                if stop.stopping:
                    break
                wire.send(jobs, "job", arrays, epoch=epoch, seq=seq, slot=slot, split=split,
                          generation=generation, **descriptor)
            clock.images += len(indices)
            clock.batches += 1
            position = plan.next_position(epoch, seq)
        beat.maybe(clock, free_slots=len(free) if free else 0, inline_jobs=shared.inline)
    beat.maybe(clock, force=True, inline_jobs=shared.inline)
    ctx.destroy(linger=0)
    shared.close()


def _read(split, indices) -> tuple[list[bytes], np.ndarray]:
    """The samples' bytes, and where each starts once they are back to back (n+1 offsets).
    A file that cannot be read is sent empty: the augmenter skips and counts it like any
    bad image."""
    chunks = [_read_one(split, int(i)) for i in indices]
    offsets = np.zeros(len(chunks) + 1, np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    return chunks, offsets


def _read_one(split, index: int) -> bytes:
    try:
        return split.read(index)
    except OSError as exc:
        log.warning("cannot read %s: %s", split.key(index), exc.strerror or exc)
        return b""
