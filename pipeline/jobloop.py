"""The augmenter's side of the loader's jobs: take one, decode it, say 'ready'.

Written once for every decoder that poses as the augmenter stage: the CPU augmenter
processes (pipeline/augment.py), the DALI thread in the trainer (see pipeline/decoders.py) and
the remote augmenters' gateway (pipeline/remote.py, which polls more sockets than the
jobs and so calls the parts, not the loop). Each accounts for its time the same way:
starved while it waits for a job, busy while it decodes, blocked while the copier is full.

A job's JPEG bytes may lie in its slot's shared-memory segment rather than in the
message (pipeline/jobbytes.py): `take_job` is the one place that puts them back, so
every consumer gets `job.arrays[0]` as the blob, whichever way it came.
"""

from __future__ import annotations

from typing import Callable

import zmq

from alexnetd.pipeline import wire
from alexnetd.pipeline.jobbytes import FIELD, JobBytesReader
from alexnetd.pipeline.stage import Heartbeat, StageClock

__all__ = ["job_sockets", "take_job", "send_ready", "run_jobs", "POLL_MS"]

POLL_MS = 200


def job_sockets(ctx: zmq.Context, ends: dict, ready_linger: int = 1000) -> tuple[zmq.Socket, zmq.Socket]:
    """(jobs PULL, ready PUSH), connected to the loader's and the copier's endpoints."""
    jobs = ctx.socket(zmq.PULL)
    # Take one job at a time: a job waiting in a busy augmenter's queue is a batch the
    # idle ones cannot start.
    jobs.setsockopt(zmq.RCVHWM, 1)
    jobs.setsockopt(zmq.LINGER, 0)
    jobs.connect(ends["jobs"])
    ready = ctx.socket(zmq.PUSH)
    ready.setsockopt(zmq.LINGER, ready_linger)
    ready.connect(ends["ready"])
    return jobs, ready


def take_job(jobs: zmq.Socket, clock: StageClock, flags: int = 0,
             job_bytes: JobBytesReader | None = None) -> wire.Message | None:
    """One job, or None: none waiting (with NOBLOCK), or a malformed one (counted, dropped).

    `job_bytes` reads the bytes of a job whose descriptor points into shared memory; a
    consumer without one (no ring to name the segments) finds such a job malformed."""
    try:
        job = wire.recv(jobs, flags)
        if job_bytes is None and FIELD in job.header:
            raise wire.WireError("a job's bytes are in shared memory, and this consumer has no ring")
        return job if job_bytes is None else job_bytes.resolve(job)
    except zmq.Again:
        return None
    except wire.WireError:
        clock.malformed += 1
        return None


def send_ready(ready: zmq.Socket, clock: StageClock, out: dict) -> None:
    """Hand a decoded job on: `out` is augment.ready_fields()'s dict."""
    with clock.timing("blocked"):
        wire.send(ready, "ready", out.pop("arrays"), **out)
    clock.batches += 1


def run_jobs(jobs: zmq.Socket, ready: zmq.Socket, clock: StageClock, beat: Heartbeat,
             augment: Callable[[wire.Message], dict], stopping: Callable[[], bool],
             job_bytes: JobBytesReader | None = None) -> None:
    """Until `stopping()`: take a job, `augment(job)` -> the 'ready' fields, send them, beat."""
    while not stopping():
        with clock.timing("starved"):
            has_job = jobs.poll(POLL_MS)
        if has_job:
            job = take_job(jobs, clock, job_bytes=job_bytes)
            if job is not None:
                with clock.timing("busy"):
                    out = augment(job)
                send_ready(ready, clock, out)
        beat.maybe(clock)
