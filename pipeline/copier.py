"""Stage 3, the copier (copy batch n+1 to the device: step 2 of the paper's pipeline), and
the trainer's side of the input.

The copier is a thread in the trainer process. It
- receives "seq n is in slot k" from the augmenters and puts batches back in seq order
  (a small reorder buffer absorbs parallel augmenters finishing out of order);
- on CUDA: the ring is pinned in this process (cudaHostRegister), so it copies slot k
  to a device buffer with a non_blocking copy on its own stream, waits for that copy's
  event, returns slot k's credit to the loader at once and hands the device buffer on;
- on the CPU: it hands on a tensor view of slot k (no copy), and the credit goes back
  when the training step releases the batch;
- answers a new loader's hello with where to start, so a restarted input side resumes
  exactly at the trainer's position.
It hands batches to the trainer thread over an inproc:// PAIR socket carrying only the
batch's key; the batch itself stays in this object.

Messages of an older loader generation are ignored: after a restart of the input side
their batches are rebuilt, and any slot they named is accounted for afresh.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq

from alexnetd.pipeline import wire
from alexnetd.pipeline.plan import BatchPlan
from alexnetd.pipeline.ring import Ring
from alexnetd.pipeline.stage import StageClock

__all__ = ["Copier", "Batch"]

POLL_MS = 100
_ids = itertools.count()


@dataclass
class Batch:
    """One batch, in seq order, as the trainer sees it."""
    epoch: int
    seq: int
    split: str
    images: torch.Tensor      # uint8 NHWC (n,256,256,3) whole images; train crops are cut on the device
    labels: torch.Tensor      # int64 (n,)
    indices: np.ndarray       # sample indices in the split
    crops: np.ndarray | None = None    # (n,2) top,left of each training crop
    flips: np.ndarray | None = None    # (n,) 1 = mirrored
    alphas: np.ndarray | None = None   # (n,3) PCA lighting draws
    skipped: list = field(default_factory=list)
    slot: int = -1
    buffer: int = -1          # device buffer index (CUDA)

    @property
    def n(self) -> int:
        return len(self.labels)


class Copier:
    """The copier thread and its trainer-side handle. Start with `start()`; then
    `next_batch()` / `release(batch)` from the trainer thread."""

    def __init__(self, endpoints: dict, ring: Ring, plan: BatchPlan, start=(0, 0),
                 device: str = "cpu", depth: int = 2, decoded: dict | None = None):
        self.ring, self.plan = ring, plan
        # A decoder that runs in the trainer (DALI, pipeline/decoders.py) leaves batches on
        # the device here, keyed (generation, epoch, seq), instead of in a ring slot.
        self.decoded = decoded
        self.ends = endpoints
        self.device = torch.device(device)
        self.depth = depth
        self.position = tuple(start)       # next (epoch, seq) the trainer will receive
        self._cursor = tuple(start)        # next (epoch, seq) the copier hands on
        self.generation = None             # of the loader we answer
        self.clock = StageClock()          # the copier's own busy/starved/blocked
        self.reorder: dict = {}            # (epoch, seq) -> ready Message
        self.handed: dict = {}             # key -> Batch handed on, not yet released
        self.in_use: set[int] = set()      # slots the trainer side still reads
        self.malformed = 0
        self.skipped: dict = {}            # reason -> samples skipped in released batches
        self.released_images = 0           # images of released batches: the skip budget's base
        self._ctx = zmq.Context.instance()
        self._inproc = f"inproc://copier-{next(_ids)}"
        self._trainer_end = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="copier", daemon=True)
        self.error: BaseException | None = None
        self._cuda = self.device.type == "cuda"
        self._buffers, self._free_buffers, self._buffer_events = [], [], []
        self._events: dict = {}  # token -> CUDA event recorded when a step released a buffer

    # -- trainer thread ------------------------------------------------------------

    def start(self) -> "Copier":
        if self._cuda and self.decoded is None:
            self._setup_cuda()
        self._trainer_end = self._ctx.socket(zmq.PAIR)
        self._trainer_end.bind(self._inproc)
        self._thread.start()
        return self

    def next_batch(self, timeout_ms: int | None = None) -> Batch | None:
        """The next batch in seq order, or None if none came within timeout_ms."""
        if not self._trainer_end.poll(timeout_ms if timeout_ms is not None else -1):
            if self.error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the copier thread stopped: {self.error!r}")
            return None
        key = tuple(wire.recv(self._trainer_end)["key"])
        batch = self.handed[key]
        self.position = self.plan.next_position(*key)
        return batch

    def release(self, batch: Batch) -> None:
        """The step is done with this batch: its slot (CPU) or device buffer (CUDA) is free.

        Skipped samples are counted here, once per batch trained: not on arrival (a batch
        rebuilt after a restart arrives twice) nor when handed on (the next epoch's first
        batches are handed on before a stop or the end of training, and never trained)."""
        for _index, reason in batch.skipped:
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.released_images += batch.n
        event = None
        if self._cuda and self.decoded is None:
            event = torch.cuda.Event()
            event.record()  # the step's kernels may still read the buffer
        wire.send(self._trainer_end, "released", key=[batch.epoch, batch.seq],
                  event=self._stash_event(event))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._cuda and self._buffers:  # only the ring path pinned it
            torch.cuda.cudart().cudaHostUnregister(self.ring.buffer.ctypes.data)
        if self._trainer_end is not None:
            self._trainer_end.close(linger=0)

    def stats(self) -> dict:
        return dict(reorder=len(self.reorder), in_use=len(self.in_use), slots=self.ring.slots,
                    copier=self.clock.counters(), malformed=self.malformed, skipped=dict(self.skipped))

    # -- copier thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._copy_loop()
        except BaseException as exc:  # surfaced to the trainer thread by next_batch()
            self.error = exc
            raise

    def _copy_loop(self) -> None:
        if self._cuda:
            torch.cuda.set_device(self.device)  # per thread: streams and events on this device
        ready = self._ctx.socket(zmq.PULL)
        ready.setsockopt(zmq.LINGER, 0)
        ready.bind(self.ends["ready"])
        credits = self._ctx.socket(zmq.PUSH)
        credits.setsockopt(zmq.LINGER, 0)
        credits.connect(self.ends["credits"])
        pair = self._ctx.socket(zmq.PAIR)
        pair.connect(self._inproc)
        poller = zmq.Poller()
        poller.register(ready, zmq.POLLIN)
        poller.register(pair, zmq.POLLIN)
        copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        try:
            while not self._stop.is_set():
                state = "starved" if not self.reorder else "blocked"
                with self.clock.timing(state):
                    events = dict(poller.poll(POLL_MS))
                if pair in events:
                    self._on_release(wire.recv(pair), credits)
                if ready in events:
                    self._on_ready(ready, credits)
                self._hand_on(pair, credits, copy_stream)
        finally:
            for sock in (ready, credits, pair):
                sock.close(linger=0)

    def _on_ready(self, ready, credits) -> None:
        for msg in wire.drain(ready, self._count_malformed):
            generation = msg.get("generation")
            if not isinstance(generation, int):
                self._count_malformed()
            elif msg.kind == "hello":
                # A loader says hello every second until it hears back: answer each
                # generation once, or a second sync would re-issue batches in flight.
                if self.generation is None or generation > self.generation:
                    self._sync(generation, credits)
            elif msg.kind == "ready" and generation == self.generation:
                try:
                    key = (int(msg["epoch"]), int(msg["seq"]))
                except (KeyError, TypeError, ValueError):
                    self._count_malformed()
                    continue
                if key >= self._cursor:
                    self.reorder[key] = msg

    def _count_malformed(self, _error=None) -> None:
        self.malformed += 1

    def _sync(self, generation: int, credits) -> None:
        """A new loader: everything not yet handed on is rebuilt by it, from our cursor."""
        self.generation = generation
        self.reorder.clear()
        free = [k for k in range(self.ring.slots) if k not in self.in_use]
        epoch, seq = self._cursor
        wire.send(credits, "sync", generation=generation, epoch=epoch, seq=seq, free=free)

    def _hand_on(self, pair, credits, copy_stream) -> None:
        # At most `depth` batches handed on and not released (on CUDA: one device buffer each).
        while self._cursor in self.reorder and len(self.handed) < self.depth:
            msg = self.reorder.pop(self._cursor)
            with self.clock.timing("busy"):
                batch = self._to_batch(msg, credits, copy_stream)
            self.handed[self._cursor] = batch
            wire.send(pair, "handed", key=list(self._cursor))
            self.clock.images += batch.n
            self.clock.batches += 1
            self._cursor = self.plan.next_position(*self._cursor)

    def _to_batch(self, msg: wire.Message, credits, copy_stream) -> Batch:
        n, split, slot = msg["n"], msg["split"], msg["slot"]
        arrays = [np.array(a) for a in msg.arrays]  # own the data: frames are reused
        labels, indices = arrays[0], arrays[1]
        crops, flips, alphas = (arrays[2], arrays[3], arrays[4]) if split == "train" else (None, None, None)
        if self.decoded is not None:
            images = self.decoded.pop((msg["generation"], msg["epoch"], msg["seq"]))
            # Nothing of this batch is in the ring: its slot is only a credit, free now.
            wire.send(credits, "credit", generation=self.generation, slot=slot)
            return Batch(msg["epoch"], msg["seq"], split, images, torch.from_numpy(labels), indices,
                         crops, flips, alphas, msg.get("skipped", []), slot, -1)
        host = self.ring.view(slot, n)
        if self._cuda:
            index = self._free_buffers.pop()
            device_buffer = self._buffers[index][:host.size].view(host.shape)
            with torch.cuda.stream(copy_stream):
                pending = self._buffer_events[index]
                if pending is not None:
                    copy_stream.wait_event(pending)  # the last step using this buffer is done
                device_buffer.copy_(torch.from_numpy(host), non_blocking=True)
                done = torch.cuda.Event()
                done.record(copy_stream)
            done.synchronize()  # note: blocks this thread only, never the training stream
            wire.send(credits, "credit", generation=self.generation, slot=slot)
            images, buffer = device_buffer, index
        else:
            self.in_use.add(slot)
            images, buffer = torch.from_numpy(host), -1
        return Batch(msg["epoch"], msg["seq"], split, images, torch.from_numpy(labels), indices,
                     crops, flips, alphas, msg.get("skipped", []), slot, buffer)

    def _on_release(self, msg: wire.Message, credits) -> None:
        batch = self.handed.pop(tuple(msg["key"]))
        if self.decoded is not None:
            return  # its credit went back when it was handed on
        if self._cuda:
            self._buffer_events[batch.buffer] = self._events.pop(msg["event"], None)
            self._free_buffers.append(batch.buffer)
        else:
            self.in_use.discard(batch.slot)
            if self.generation is not None:
                wire.send(credits, "credit", generation=self.generation, slot=batch.slot)

    # -- CUDA ----------------------------------------------------------------------

    def _setup_cuda(self) -> None:
        # Pin the ring in this process so that copies from it are true async DMA.
        cudart = torch.cuda.cudart()
        pointer = self.ring.buffer.ctypes.data
        status = cudart.cudaHostRegister(pointer, self.ring.buffer.nbytes, 0)
        if int(status) != 0:
            raise RuntimeError(f"cudaHostRegister of the batch ring failed ({status})")
        for _ in range(self.depth):
            self._buffers.append(torch.empty(self.ring.slot_bytes, dtype=torch.uint8, device=self.device))
        self._free_buffers = list(range(self.depth))
        self._buffer_events = [None] * self.depth

    def _stash_event(self, event) -> int:
        if event is None:
            return -1
        token = next(_ids)
        self._events[token] = event
        return token
