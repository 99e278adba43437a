"""Start and stop the input side: the loader and augmenter processes, the ring, the feed.

Used as a context manager by `bench-input`, the tests and the trainer process:

    with InputPipeline(data, run_dir, batch=128, augmenters=2) as pipe:
        batch = pipe.feed.next_batch()
        ...
        pipe.feed.release(batch)

Stages are started with the spawn context: neither CUDA nor ZeroMQ contexts survive fork.
The supervisor restarts the input side through `restart_input()`: the loader and every
augmenter are stopped together and a new generation starts at the trainer's position,
so no process of the old generation can still be writing into a slot the new one uses.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import zmq

from alexnetd.pipeline import wire
from alexnetd.pipeline.augment import run_augmenter
from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.loader import run_loader
from alexnetd.pipeline.plan import BatchPlan
from alexnetd.pipeline.ring import Ring, ring_name
from alexnetd.pipeline.stage import Endpoints, spawn_context

__all__ = ["InputPipeline", "input_stages", "default_augmenters", "default_slots", "spawn_context"]

REMOTE_SLOTS = 4  # two remote workers' prefetch (pipeline/remote.py); --slots for more


def default_slots(augmenters: int, remote: bool = False) -> int:
    """A few slots per augmenter keep every augmenter busy while the trainer holds one;
    remote hosts get room for a few workers' prefetched jobs on top."""
    return max(3, 2 * augmenters + 2) + (REMOTE_SLOTS if remote else 0)


def default_augmenters(ranks: int = 1) -> int:
    """One augmenter per core, less one for the loader and trainer when there are many;
    with several data-parallel ranks, each rank's input side gets its share of the cores."""
    cores = len(os.sched_getaffinity(0))
    total = max(1, cores - 1) if cores > 2 else cores
    return max(1, total // ranks)


def input_stages(data: str, endpoints: dict, plan: BatchPlan, slots: int, ring: str, augmenters: int,
                 generation: int, max_pixels: int | None = None, remote: dict | None = None) -> dict:
    """name -> (entry point, config) of every input process of one generation.

    With `remote` ({addr, keys_dir, host_timeout}) one more "augmenter", the gateway to
    remote hosts (pipeline/remote.py), named after the local ones so that the
    supervisor watches and restarts it as one of them."""
    common = dict(endpoints=endpoints, batch=plan.batch, seed=plan.seed, slots=slots)
    stages = {"loader": (run_loader, dict(common, data=str(data), val_every=plan.val_every, rank=plan.rank,
                                          world=plan.world, generation=generation))}
    for i in range(augmenters):
        stages[f"augmenter-{i}"] = (run_augmenter, dict(common, ring=ring, index=i,
                                                         max_pixels=max_pixels, rank=plan.rank))
    if remote:
        from alexnetd.pipeline.remote import run_gateway

        stages[f"augmenter-{augmenters}"] = (run_gateway, dict(common, ring=ring, index=augmenters, rank=plan.rank,
                                                               remote=remote))
    return stages


class InputPipeline:
    def __init__(self, data, run_dir, batch: int = 128, augmenters: int | None = None,
                 slots: int | None = None, seed: int = 0, val_every: int = 1, start=(0, 0),
                 device: str = "cpu", rank: int = 0, world: int = 1, beats: bool = True,
                 max_pixels: int | None = None, decoder: str = "cpu", remote: dict | None = None):
        self.data, self.run_dir = str(data), Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dataset = open_dataset(self.data)
        threads = augmenters or default_augmenters()
        # decoder="dali": no augmenter processes, DALI decodes in a thread of this process.
        self.n_augmenters = 0 if decoder == "dali" else threads
        self.remote = remote
        self.slots = slots or default_slots(max(1, self.n_augmenters), bool(remote))
        self.plan = BatchPlan.for_dataset(self.dataset, batch, seed, val_every, rank, world)
        self.endpoints = Endpoints.in_dir(self.run_dir)
        self.ring = Ring(ring_name(self.run_dir), self.slots, batch, create=True)
        from alexnetd.pipeline.feed import Feed  # torch: only in the process that trains

        self.dali = None
        if decoder == "dali":
            from alexnetd.pipeline.dali import DaliAugmenter

            self.dali = DaliAugmenter(self.endpoints.as_dict(), seed, batch, device, rank, max_pixels, threads)
        self.feed = Feed(self.endpoints.as_dict(), self.ring, self.plan, start, device,
                         decoded=self.dali.decoded if self.dali else None)
        self.generation = 0
        self.processes: dict[str, multiprocessing.Process] = {}
        self.max_pixels = max_pixels
        self._beats = None
        if beats:
            self._beats = zmq.Context.instance().socket(zmq.PULL)
            self._beats.setsockopt(zmq.LINGER, 0)
            self._beats.bind(self.endpoints.beats)
        self.last_beats: dict[tuple[str, int], dict] = {}

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> "InputPipeline":
        self.feed.start()
        if self.dali:
            self.dali.start()
        self.start_input()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_input(self) -> None:
        stages = input_stages(self.data, self.endpoints.as_dict(), self.plan, self.slots, self.ring.name,
                              self.n_augmenters, self.generation,
                              self.max_pixels, self.remote)
        for name, (target, cfg) in stages.items():
            proc = spawn_context.Process(target=target, args=(cfg,), name=f"alexnetd-{name}", daemon=True)
            proc.start()
            self.processes[name] = proc

    def stop_input(self, timeout: float = 5.0) -> None:
        for proc in self.processes.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.processes.clear()

    def restart_input(self) -> None:
        """Stop every input process, then start a new generation at the feed's position."""
        self.stop_input()
        self.generation += 1
        self.start_input()

    def close(self) -> None:
        self.stop_input()
        if self.dali:
            self.dali.close()
        self.feed.close()
        if self._beats is not None:
            self._beats.close(linger=0)
        self.ring.close()
        self.ring.unlink()

    # -- observation ---------------------------------------------------------------

    def poll_beats(self) -> dict:
        """Drain heartbeats; return the latest counters per (stage, index)."""
        for msg in wire.drain(self._beats) if self._beats is not None else ():
            self.last_beats[(msg["stage"], msg.get("index", 0))] = msg.header
        return self.last_beats
