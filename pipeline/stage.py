"""What every stage process shares: its endpoints, its clock, its heartbeat, its stop flag.

Each stage accounts for all of its wall time as one of three states, which is what
the dashboard's bottleneck view and `alexnetd status` are built from:
  busy     doing its own work (reading, decoding, training)
  starved  waiting for input or for a free slot (credit)
  blocked  waiting to hand its output on (the next stage is full)
A stage busy ~100% of the time while the others starve is the one holding training back.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from alexnetd.pipeline import wire

__all__ = ["Endpoints", "StageClock", "Heartbeat", "StopFlag", "adopt_children", "spawn_context", "stop_processes", "STAGES",
           "EXIT_BOOT", "EXIT_HALT"]

# Every stage process starts with the spawn context: neither CUDA nor ZeroMQ contexts survive fork.
spawn_context = multiprocessing.get_context("spawn")

STAGES = ("loader", "augmenter", "copier", "trainer")
# Exit codes a stage uses to tell the supervisor not to restart it.
EXIT_BOOT = 3   # could not start (bad checkpoint, data changed): restarting would not help
EXIT_HALT = 4   # stopped on purpose with a reason (skip budget)
BEAT_SECONDS = 0.5
_MAX_IPC_PATH = 100  # sun_path is 108 bytes on Linux


@dataclass(frozen=True)
class Endpoints:
    """The pipeline's sockets, all ipc:// files in the run directory (mode 0700)."""
    jobs: str      # loader PUSH (bind)      -> augmenters PULL
    ready: str     # augmenters PUSH         -> copier PULL (bind); the loader's hello too
    credits: str   # copier PUSH             -> loader PULL (bind)
    beats: str     # every stage PUSH        -> supervisor / bench PULL (bind)

    @classmethod
    def in_dir(cls, run_dir: str | os.PathLike) -> "Endpoints":
        base = Path(run_dir).resolve()
        names = {name: f"ipc://{base / (name + '.sock')}" for name in ("jobs", "ready", "credits", "beats")}
        too_long = [n for n in names.values() if len(n) - len("ipc://") > _MAX_IPC_PATH]
        if too_long:
            raise ValueError(f"run directory {base} is too deep for a unix socket path; choose a shorter one")
        return cls(**names)

    def as_dict(self) -> dict:
        return dict(jobs=self.jobs, ready=self.ready, credits=self.credits, beats=self.beats)


@dataclass
class StageClock:
    """Seconds busy / starved / blocked and images done, since the process started."""
    busy: float = 0.0
    starved: float = 0.0
    blocked: float = 0.0
    images: int = 0
    batches: int = 0
    malformed: int = 0
    skipped: dict = field(default_factory=dict)

    @contextmanager
    def timing(self, state: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, state, getattr(self, state) + time.perf_counter() - start)

    def count_malformed(self, _error=None) -> None:
        self.malformed += 1

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count

    def counters(self) -> dict:
        return dict(busy=self.busy, starved=self.starved, blocked=self.blocked, images=self.images,
                    batches=self.batches, malformed=self.malformed, skipped=dict(self.skipped))


class Heartbeat:
    """Sends the stage's counters to whoever binds `beats`, at most every BEAT_SECONDS."""

    def __init__(self, ctx: zmq.Context, endpoint: str | None, stage: str, index: int = 0, **extra):
        self.stage, self.index, self.extra = stage, index, extra
        self.sock = None
        if endpoint:
            self.sock = ctx.socket(zmq.PUSH)
            self.sock.setsockopt(zmq.SNDHWM, 16)
            self.sock.setsockopt(zmq.LINGER, 1000)
            self.sock.connect(endpoint)
        self.last = 0.0

    def due(self) -> bool:
        """Whether a beat would be sent now: callers skip gathering fields otherwise."""
        return self.sock is not None and time.monotonic() - self.last >= BEAT_SECONDS

    def maybe(self, clock: StageClock, force: bool = False, **fields) -> None:
        if self.sock is None or not (force or self.due()):
            return
        self.last = time.monotonic()
        try:
            # Beats are advisory: drop one rather than block the stage.
            wire.send(self.sock, "beat", flags=zmq.NOBLOCK, stage=self.stage, index=self.index,
                      pid=os.getpid(), t=time.time(), counters=clock.counters(), **self.extra, **fields)
        except zmq.Again:
            pass


def stop_processes(procs, deadline: float) -> None:
    """TERM every process, wait for them until `deadline` (monotonic), KILL the rest and
    reap them: the order gunicorn's arbiter uses. Blocks; the supervisor's own loop
    never calls it (its stops are timers, service/proctable.py)."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


PARENT_ENV = "ALEXNETD_PARENT_PID"


def adopt_children() -> None:
    """Call before spawning stages: they learn whose children they are from the
    environment, not from getppid() at their start, which is already init's when the
    parent was killed while they booted (and they would never notice it gone). Only for
    direct children: a stage's own child would inherit the value and stop at once."""
    os.environ[PARENT_ENV] = str(os.getpid())


class StopFlag:
    """SIGTERM asks a stage to finish what it holds and exit; SIGINT is the supervisor's.
    A stage whose supervisor died (even by SIGKILL) stops too: no orphans."""

    def __init__(self):
        self.requested = False
        expected = os.environ.get(PARENT_ENV, "")
        self._parent = int(expected) if expected.isdigit() and os.getpid() != int(expected) else os.getppid()
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    @property
    def stopping(self) -> bool:
        return self.requested or os.getppid() != self._parent

    def _handle(self, signum, frame):
        self.requested = True
