"""Stage 2, the augmenters: transform batch n+2 on the CPU (step 3 of the paper's pipeline).

N processes. Each takes a job (one batch of raw JPEG bytes) and has libjpeg-turbo decode
every image straight into its place in the batch's slot of the shared-memory ring: the
whole 256x256 image, for training and validation alike, with no intermediate array and
no copy (a prepared image's bytes are written once, by the IDCT). Then it tells the copier
"seq n is in slot k" with the labels and, for training, each sample's crop offset, flip
and PCA lighting alphas. The random 224 crop, the mirror (§4.1), the mean subtraction
(§2) and the lighting are all applied on the device in one gather
(pipeline/transform.py), where they are cheap.

Every draw comes from plan.train_draws(seed, epoch, sample index), so the bytes of a
batch do not depend on which augmenter made it.

A sample that will not decode is skipped and counted by reason; the batch is still
delivered, short by the skipped samples (the remaining ones packed to the front).
"""

from __future__ import annotations

import numpy as np
import zmq

from alexnetd.pipeline import wire
from alexnetd.pipeline.jobbytes import JobBytesReader
from alexnetd.pipeline.jobloop import job_sockets, run_jobs
from alexnetd.pipeline.jpeg import DEFAULT_MAX_PIXELS, Decoder, SkipSample
from alexnetd.pipeline.plan import train_draws
from alexnetd.pipeline.ring import Ring
from alexnetd.pipeline.stage import Heartbeat, StageClock, StopFlag

__all__ = ["run_augmenter", "augment_batch", "decode_batch", "ready_fields"]


def run_augmenter(cfg: dict) -> None:
    """Process entry point. `cfg` keys: endpoints, ring, slots, batch, seed, index,
    max_pixels, rank."""
    stop = StopFlag()
    ring = Ring(cfg["ring"], cfg["slots"], cfg["batch"])
    decoder = Decoder(max_pixels=cfg.get("max_pixels") or DEFAULT_MAX_PIXELS, fast=True)
    ends = cfg["endpoints"]
    ctx = zmq.Context()
    jobs, ready = job_sockets(ctx, ends)
    clock = StageClock()
    beat = Heartbeat(ctx, ends.get("beats"), "augmenter", index=cfg.get("index", 0), rank=cfg.get("rank", 0))
    job_bytes = JobBytesReader(cfg["ring"], cfg["slots"])
    run_jobs(jobs, ready, clock, beat, lambda job: augment_batch(job, ring, decoder, cfg["seed"], clock),
             lambda: stop.stopping, job_bytes)
    beat.maybe(clock, force=True)
    ctx.destroy(linger=1000)
    job_bytes.close()
    ring.close()


def augment_batch(job: wire.Message, ring: Ring, decoder: Decoder, seed: int, clock: StageClock) -> dict:
    """Decode one job into its slot; return the 'ready' message's fields and arrays."""
    kept, skipped = decode_batch(job, ring.view(job["slot"]), decoder, clock)
    return ready_fields(job, kept, skipped, seed)


def decode_batch(job: wire.Message, out: np.ndarray, decoder: Decoder, clock: StageClock) -> tuple[np.ndarray, list]:
    """Decode a job's images into out[0..n): (positions kept in the job, [[index, reason]] skipped).

    `out` is the job's ring slot here, or a remote host's own buffer (pipeline/remote.py):
    the same code, so a batch's pixels do not depend on where it was decoded."""
    blob, offsets, _labels, indices = job.arrays
    kept, skipped = [], []
    for i in range(len(indices)):
        try:
            # Into the next free place: a skipped sample's half-written pixels are
            # overwritten by the next image, and the kept ones stay packed to the front.
            decoder.decode_into(blob[offsets[i]:offsets[i + 1]], out[len(kept)])
        except SkipSample as exc:
            clock.skip(exc.reason)
            skipped.append([int(indices[i]), exc.reason])
            continue
        kept.append(i)
    clock.images += len(kept)
    return np.asarray(kept, np.int64), skipped


def ready_fields(job: wire.Message, kept: np.ndarray, skipped: list, seed: int) -> dict:
    """The 'ready' message for a decoded job: labels, indices and, for training, the draws."""
    _blob, _offsets, labels, indices = job.arrays
    epoch, split = job["epoch"], job["split"]
    arrays = [np.ascontiguousarray(labels[kept]), np.ascontiguousarray(indices[kept])]
    if split == "train":
        draws = train_draws(seed, epoch, indices[kept])
        arrays += [draws.crops, draws.flips, draws.alphas]
    return dict(arrays=arrays, epoch=epoch, seq=job["seq"], slot=job["slot"], split=split, n=len(kept),
                generation=job["generation"], skipped=skipped)
