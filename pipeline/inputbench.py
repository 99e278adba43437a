"""How fast can the input pipeline go on this machine? (`alexnetd bench-input`)

Runs the real loader and augmenters and the copier, with a trainer that discards each
batch (or, with `simulate_step_ms`, sleeps that long per batch without using the CPU,
as a GPU step would), and measures in the same run the bare-decode ceiling: the fastest
decode loop there is, libjpeg-turbo decoding the same files from memory into one reused
buffer with the augmenters' flags (fast IDCT and upsampling), one process per augmenter,
nothing else: no header check, no batch, no socket.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.jpeg import Decoder
from alexnetd.pipeline.ring import IMAGE
from alexnetd.pipeline.decoders import default_augmenters
from alexnetd.pipeline.launch import InputPipeline
from alexnetd.pipeline.stage import BEAT_SECONDS, STAGES, StageClock, spawn_context

__all__ = ["bench_input", "decode_ceiling"]

WARMUP_BATCHES = 3
CEILING_SAMPLES = 256


def _decode_for(data: str, seconds: float, offset: int) -> int:
    """One ceiling process: decode a fixed set of in-memory JPEGs for `seconds`.

    Into one reused buffer: decoding into a fresh array per image is ~1.2x slower on one
    core (allocation and page faults), which would flatter anything measured against it."""
    from turbojpeg import TJPF_RGB

    split = open_dataset(data).split("train")
    count = min(CEILING_SAMPLES, len(split))
    blobs = [split.read((offset + i) % len(split)) for i in range(count)]
    decoder = Decoder(fast=True)  # only for its TurboJPEG handle and the augmenters' flags
    turbo, flags = decoder.turbo, decoder.flags
    buffers, jobs = {}, []
    for blob in blobs:
        # The DCT scale an augmenter picks (1/1 for prepared 256x256 images), and one
        # buffer per decoded shape, made once.
        width, height, _, _ = turbo.decode_header(blob)
        scale, (rows, cols) = decoder.scaled_size(width, height, IMAGE)
        shape = (rows, cols, 3)
        jobs.append((blob, scale, buffers.setdefault(shape, np.empty(shape, np.uint8))))
    done, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        blob, scale, target = jobs[done % count]
        turbo.decode(blob, pixel_format=TJPF_RGB, scaling_factor=scale, flags=flags, dst=target)
        done += 1
    return done


def decode_ceiling(data: str, processes: int, seconds: float = 3.0) -> float:
    """Images per second that bare decoding reaches with `processes` processes."""
    with spawn_context.Pool(processes) as pool:
        start = time.perf_counter()
        counts = pool.starmap(_decode_for, [(str(data), seconds, i * 97) for i in range(processes)])
        elapsed = time.perf_counter() - start
    # Each process ran `seconds` of decoding; pool start-up is not decode time.
    return sum(counts) / min(seconds, elapsed)


def _shares(delta: dict) -> dict:
    total = delta["busy"] + delta["starved"] + delta["blocked"]
    if total <= 0:
        return {"busy": 0.0, "starved": 0.0, "blocked": 0.0}
    return {k: round(delta[k] / total, 4) for k in ("busy", "starved", "blocked")}


def _stage_totals(pipe: InputPipeline, trainer: StageClock) -> dict:
    totals = {stage: {"busy": 0.0, "starved": 0.0, "blocked": 0.0, "images": 0} for stage in STAGES}
    for (stage, _index), beat in pipe.poll_beats().items():
        for key in totals[stage]:
            totals[stage][key] += beat["counters"][key]
    for stage, clock in (("copier", pipe.copier.clock), ("trainer", trainer)):
        counters = clock.counters()
        for key in totals[stage]:
            totals[stage][key] += counters[key]
    return totals


def _await_beats_after(pipe: InputPipeline, t: float, timeout: float = 10 * BEAT_SECONDS) -> None:
    """Until every stage process that has beaten has beaten again after time `t` (a
    stage beats every BEAT_SECONDS while it runs), or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(beat.get("t", 0) > t for beat in pipe.poll_beats().values()):
            return
        pipe.wait_beat(100)


def bench_input(data, run_dir, seconds: float = 10.0, batches: int | None = None, batch: int = 128,
                augmenters: int | None = None, slots: int | None = None,
                simulate_step_ms: float = 0.0, ceiling: bool = True, seed: int = 0, decoder: str = "cpu",
                device: str = "cpu") -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    trainer = StageClock()
    with InputPipeline(data, run_dir, batch=batch, augmenters=augmenters, slots=slots, seed=seed,
                       val_every=0, decoder=decoder, device=device) as pipe:
        n_augmenters = pipe.n_augmenters or augmenters or default_augmenters()
        for _ in range(WARMUP_BATCHES):  # start-up (spawn, imports, first reads) is not throughput
            warm = pipe.copier.next_batch(timeout_ms=120_000)
            if warm is None:
                raise RuntimeError("the input pipeline delivered nothing in 120 s")
            pipe.copier.release(warm)
        # No pause here: during one the ring would fill and its batches would be counted
        # as if made in the window. The shares' start point may be one beat (0.5 s) old.
        before = _stage_totals(pipe, trainer)
        images = done = 0
        start = time.perf_counter()
        while (done < batches) if batches else (time.perf_counter() - start < seconds):
            with trainer.timing("starved"):
                got = pipe.copier.next_batch(timeout_ms=60_000)
            if got is None:
                raise RuntimeError("the input pipeline stalled for 60 s")
            with trainer.timing("busy"):
                if simulate_step_ms:
                    time.sleep(simulate_step_ms / 1000.0)  # a device step: time passes, no CPU used
                images += got.n
            pipe.copier.release(got)
            trainer.images += got.n
            done += 1
        elapsed = time.perf_counter() - start
        _await_beats_after(pipe, time.time())  # the shares' end point: a beat of every stage from now
        after = _stage_totals(pipe, trainer)
    stages = {}
    for stage in STAGES:
        delta = {k: after[stage][k] - before[stage][k] for k in ("busy", "starved", "blocked")}
        stages[stage] = _shares(delta)
    result = {
        "images_per_second": round(images / elapsed, 1),
        "batches": done,
        "batch_size": batch,
        "seconds": round(elapsed, 2),
        "augmenters": n_augmenters,
        "decoder": decoder,
        "simulate_step_ms": simulate_step_ms,
        "stages": stages,
    }
    if ceiling:
        result["ceiling_images_per_second"] = round(decode_ceiling(data, n_augmenters), 1)
        result["ratio_to_ceiling"] = round(result["images_per_second"] / result["ceiling_images_per_second"], 3)
    return result
