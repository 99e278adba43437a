"""What the tests that run a real input pipeline (InputPipeline) share."""

from __future__ import annotations

import hashlib

import numpy as np


def collect(pipe, count):
    """(epoch, seq, split, labels, sha1 of the pixels) of the next `count` batches."""
    out = []
    for _ in range(count):
        batch = pipe.copier.next_batch(timeout_ms=60_000)
        assert batch is not None, "the pipeline stalled"
        digest = hashlib.sha1(np.ascontiguousarray(batch.images.numpy()).tobytes()).hexdigest()
        out.append((batch.epoch, batch.seq, batch.split, tuple(batch.labels.tolist()), digest))
        pipe.copier.release(batch)
    return out
