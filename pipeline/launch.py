"""The input side of one rank, assembled one way for the daemon, `bench-input` and the tests.

Two halves, because in the daemon they live in different processes:
- `input_stages(...)`: the processes of one generation of the input side, the loader
  (1) and the decoder's own (augmenters, 2), as name -> (entry point, config). The
  supervisor spawns them, and restarts them together as a new generation at the
  trainer's position, so no process of an old generation can still be writing into a
  slot the new one uses.
- `trainer_input(...)`: what runs inside the trainer process: the decoder's in-trainer
  part (DALI's thread; nothing for the cpu decoder) and the copier (3), which hands the
  trainer (4) batches in seq order.

`InputPipeline` puts both halves in one process with a trainer that is the caller, for
`bench-input`, the benchmarks and the tests:

    with InputPipeline(data, run_dir, batch=128, augmenters=2) as pipe:
        batch = pipe.copier.next_batch()
        ...
        pipe.copier.release(batch)
"""

from __future__ import annotations

import time
from pathlib import Path

import zmq

from alexnetd.pipeline import wire
from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.decoders import default_augmenters, make_decoding
from alexnetd.pipeline.jobbytes import remove_segments
from alexnetd.pipeline.loader import run_loader
from alexnetd.pipeline.plan import BatchPlan
from alexnetd.pipeline.ring import Ring, ring_name
from alexnetd.pipeline.stage import Endpoints, spawn_context, stop_processes

__all__ = ["InputPipeline", "input_stages", "trainer_input"]


def input_stages(data: str, endpoints: dict, plan: BatchPlan, slots: int, ring: str, decoding,
                 generation: int, job_bytes_limit: int | None = None) -> dict:
    """(stage, index) -> (entry point, config) of every input process of one generation.
    `job_bytes_limit` bounds the loader's byte segments (None: jobbytes.MAX_SLOT_BYTES)."""
    common = dict(endpoints=endpoints, batch=plan.batch, seed=plan.seed, slots=slots)
    stages = {("loader", 0): (run_loader, dict(common, data=str(data), val_every=plan.val_every, rank=plan.rank,
                                               world=plan.world, generation=generation, ring=ring,
                                               job_bytes_limit=job_bytes_limit))}
    stages.update(decoding.stages(common, ring, plan.rank))
    return stages


class RankRing(Ring):
    """A rank's ring and the loader's byte segments named after it (pipeline/jobbytes.py):
    whoever creates or unlinks the ring (the supervisor, InputPipeline) does the same to
    them."""

    def unlink(self) -> None:
        super().unlink()
        remove_segments(self.name)


def open_ring(name: str, slots: int, batch: int, decoding, create: bool = False) -> RankRing:
    """A rank's ring: slots of pixels, or slots that are only credits where the decoder
    hands the copier device batches (then nothing is reserved in /dev/shm)."""
    if create:
        # A crashed run's byte segments are replaced, like its ring segment: removed here,
        # made anew by the loader.
        remove_segments(name)
    return RankRing(name, slots, batch if decoding.fills_ring else 0, create=create)


def trainer_input(endpoints: dict, ring: Ring, plan: BatchPlan, decoding, start, device):
    """(the decoder's in-trainer part or None, the copier), neither started."""
    from alexnetd.pipeline.copier import Copier  # torch: only in the process that trains

    decoder = decoding.in_trainer(endpoints, plan.seed, plan.batch, device, plan.rank, ring)
    copier = Copier(endpoints, ring, plan, start, device, decoded=decoder.decoded if decoder else None)
    return decoder, copier


class InputPipeline:
    def __init__(self, data, run_dir, batch: int = 128, augmenters: int | None = None,
                 slots: int | None = None, seed: int = 0, val_every: int = 1, start=(0, 0),
                 device: str = "cpu", rank: int = 0, world: int = 1, beats: bool = True,
                 max_pixels: int | None = None, decoder: str = "cpu", remote: dict | None = None,
                 job_bytes_limit: int | None = None):
        self.data, self.run_dir = str(data), Path(run_dir)
        self.job_bytes_limit = job_bytes_limit
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dataset = open_dataset(self.data)
        self.decoding = make_decoding(decoder, augmenters or default_augmenters(), remote, max_pixels)
        self.slots = slots or self.decoding.default_slots()
        self.plan = BatchPlan.for_dataset(self.dataset, batch, seed, val_every, rank, world)
        self.endpoints = Endpoints.in_dir(self.run_dir)
        self.ring = open_ring(ring_name(self.run_dir), self.slots, batch, self.decoding, create=True)
        self.decoder, self.copier = trainer_input(self.endpoints.as_dict(), self.ring, self.plan, self.decoding,
                                                  start, device)
        self.processes: dict = {}
        self._beats = None
        if beats:
            self._beats = zmq.Context.instance().socket(zmq.PULL)
            self._beats.setsockopt(zmq.LINGER, 0)
            self._beats.bind(self.endpoints.beats)
        self.last_beats: dict[tuple[str, int], dict] = {}

    @property
    def n_augmenters(self) -> int:
        """Augmenter processes (the gateway to remote hosts included)."""
        return sum(1 for stage, _ in self.processes if stage == "augmenter")

    def __enter__(self) -> "InputPipeline":
        self.copier.start()
        if self.decoder:
            self.decoder.start()
        stages = input_stages(self.data, self.endpoints.as_dict(), self.plan, self.slots, self.ring.name,
                              self.decoding, generation=0, job_bytes_limit=self.job_bytes_limit)
        for key, (target, cfg) in stages.items():
            proc = spawn_context.Process(target=target, args=(cfg,), name=f"alexnetd-{key[0]}-{key[1]}", daemon=True)
            proc.start()
            self.processes[key] = proc
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        stop_processes(list(self.processes.values()), deadline=time.monotonic() + 5.0)
        self.processes.clear()
        if self.decoder:
            self.decoder.close()
        self.copier.close()
        if self._beats is not None:
            self._beats.close(linger=0)
        self.ring.close()
        self.ring.unlink()  # and the loader's byte segments (RankRing)

    def wait_beat(self, timeout_ms: int) -> None:
        """Block until a heartbeat arrives or timeout_ms pass."""
        if self._beats is not None:
            self._beats.poll(timeout_ms)

    def poll_beats(self) -> dict:
        """Drain heartbeats; return the latest counters per (stage, index)."""
        for msg in wire.drain(self._beats) if self._beats is not None else ():
            self.last_beats[(msg["stage"], msg.get("index", 0))] = msg.header
        return self.last_beats
