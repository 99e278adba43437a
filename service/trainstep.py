"""One SGD step of the trainer, in the form the run asked for, behind one seam:
`make_train_step(...)` returns a `TrainStep` whose `run(x, labels)` takes the step and
returns the loss tensor (read with .item() only every log_every steps: a device sync).

  eager     forward under autocast, the loss in fp32, backward, PaperSGD (the default)
  compiled  `--compile`: the forward and the loss through torch.compile (inductor); the
            backward is the compiled graph's, the update stays eager PaperSGD
  graphed   `--cuda-graphs`: forward, backward and update captured as one CUDA graph
            over static input buffers, replayed each step (CUDA, one device)

A form that cannot be prepared (the compiler or the capture raises) says so in one line
and the step runs eager from then on: the run goes on. Both prepare on their first call
and cover one input shape; a batch of another shape (samples that failed to decode) is
stepped eagerly, without a recompile or a new capture. While a form is prepared, the
`preparing` context manager the trainer passes is held (KeepBeating: its heartbeat says
"compiling"), since a compile takes from seconds to minutes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch
import torch.nn.functional as F

from alexnetd.model import autocast_context

__all__ = ["KINDS", "KeepBeating", "TrainStep", "make_train_step"]

log = logging.getLogger("alexnetd.trainer")

KINDS = ("eager", "compiled", "graphed")
WARMUP_STEPS = 3  # before a capture, on a side stream (PyTorch's CUDA graphs notes)


def make_train_step(net, optimizer, device, autocast: bool, *, compile: bool = False, cuda_graphs: bool = False,
                    preparing=None, backend="inductor") -> "TrainStep":
    """The step for `net` (the model, or its DDP wrapper) and `optimizer` (PaperSGD) on
    `device`. `preparing`: a callable returning a context manager, held while a form
    is compiled or captured. `backend`: torch.compile's; tests pass a cheaper one."""
    device = torch.device(device)
    preparing = preparing or contextlib.nullcontext
    if cuda_graphs:
        why = _why_not_graphed(net, device)
        if why is None:
            return _Graphed(net, optimizer, device, autocast, preparing)
        log.warning("--cuda-graphs: %s; the step runs eager", why)
    if compile:
        return _Compiled(net, optimizer, device, autocast, preparing, backend)
    return TrainStep(net, optimizer, device, autocast)


class TrainStep:
    """The eager step, exactly as the trainer has always taken it; the base of the others,
    which fall back to it. `kind`: the form that runs now."""

    kind = "eager"

    def __init__(self, net, optimizer, device, autocast: bool):
        self.net, self.optimizer, self.device, self.autocast = net, optimizer, device, autocast

    def run(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._update(self._loss(x, labels))

    def _autocast(self):
        return autocast_context(self.device, self.autocast)

    def _loss(self, x, labels):
        with self._autocast():
            logits = self.net(x)
        return F.cross_entropy(logits.float() if self.autocast else logits, labels)  # bf16 logits: the loss in fp32

    def _update(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss


def _signature(x, labels) -> tuple:
    """What a compiled graph or a captured one is specialised to (a stride change would
    recompile too)."""
    return tuple(x.shape), x.stride(), x.dtype, tuple(labels.shape)


def _line(exc: BaseException) -> str:
    """One line: the exception and, under a wrapper (dynamo's BackendCompilerFailed), the
    error it wraps, which is the one that says why."""
    root = exc
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = inner
    said = (str(root).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: " + (said if root is exc else f"{type(root).__name__}: {said}")


class _Compiled(TrainStep):
    """torch.compile of the forward and the loss, as one graph (the fp32 cast, the
    log-softmax and the mean fuse; the backward is that graph's). The optimizer stays
    eager, as bench/gpu.py measures it: PaperSGD is already four _foreach_* launches per device with nothing between
    them to fuse, while compiling it would guard on and specialise to every parameter
    and velocity tensor for no speed, and eager it is the same update to the bit as in
    the eager form."""

    kind = "compiled"

    def __init__(self, net, optimizer, device, autocast, preparing, backend):
        super().__init__(net, optimizer, device, autocast)
        self.preparing, self.backend = preparing, backend
        # One shape: a second would make dynamo compile again (dynamic=False), a stall
        # of the length of the first compile in the middle of training.
        self.compiled = torch.compile(self._loss, backend=backend, dynamic=False)
        self.signature = None

    def run(self, x, labels):
        if self.kind == "eager" or (self.signature is not None and _signature(x, labels) != self.signature):
            return super().run(x, labels)
        if self.signature is None:
            return self._first(x, labels)
        return self._update(self.compiled(x, labels))

    def _first(self, x, labels):
        name = self.backend if isinstance(self.backend, str) else getattr(self.backend, "__name__", "backend")
        rng = _rng_save(self.net)  # a fallback then draws the same dropout masks as an eager run
        started = time.perf_counter()
        try:
            with self.preparing():
                # The backward graph may compile at its first use: inside, too.
                loss = self.compiled(x, labels)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
        except Exception as exc:  # the compiler's failure is not the run's
            _rng_load(rng)
            self.kind, self.compiled = "eager", None
            log.warning("torch.compile (%s) of the train step failed, training on eager: %s", name, _line(exc))
            return super().run(x, labels)
        self.optimizer.step()
        self.signature = _signature(x, labels)
        log.info("compiled the train step (torch.compile, %s) in %.1f s", name, time.perf_counter() - started)
        return loss


def _why_not_graphed(net, device) -> str | None:
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, this step runs on {device.type}"
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        return "a graph holds one device's step, not the all-reduce of several ranks"
    if len({p.device for p in net.parameters()}) > 1:
        return "the model spans several devices (the two towers); a graph holds one device's step"
    return None


def _rng_save(net) -> tuple:
    """The generators a step draws from (dropout): the CPU's and those of the model's
    devices only, since asking another device would create a CUDA context on it."""
    devices = sorted({p.device for p in net.parameters() if p.device.type == "cuda"}, key=str)
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]


def _rng_load(saved: tuple) -> None:
    torch.set_rng_state(saved[0])
    for device, state in saved[1]:
        torch.cuda.set_rng_state(state, device)


class _Graphed(TrainStep):
    """Forward, backward and PaperSGD's update as one captured CUDA graph: one launch per
    step instead of a few hundred, over static buffers the step copies each batch into.
    What a graph needs, and how each is met:
      - no new allocations at replay: gradients stay allocated and are zeroed in place
        (zero_grad(set_to_none=False)); the graph's tensors live in its private pool;
      - no Python values baked in that change: the lr is read from device tensors
        (PaperSGD lr_tensor), written before each replay (sync_lr), so the schedule's
        drops need no new capture;
      - warm-up on a side stream first (allocations, cuDNN's choices, lazy state);
      - autocast's weight-cast cache off (the cache is freed when autocast exits, under
        the graph's feet).
    The warm-up steps train: the weights, velocities, buffers and RNG state from before
    them are put back, so the graphed run is the trajectory of the steps it is asked to
    take."""

    kind = "graphed"

    def __init__(self, net, optimizer, device, autocast, preparing):
        super().__init__(net, optimizer, device, autocast)
        self.preparing = preparing
        self.optimizer.lr_tensor = True
        self.graph = self.signature = None
        self.static_x = self.static_labels = self.static_loss = None
        self.captures = 0

    def run(self, x, labels):
        if self.kind == "eager":
            return super().run(x, labels)
        if self.graph is None:
            return self._capture(x, labels)
        if _signature(x, labels) != self.signature:
            return self._static_step(x, labels)  # eager, on the graph's gradients and lr tensors
        self.static_x.copy_(x)
        self.static_labels.copy_(labels)
        self.optimizer.sync_lr()
        self.graph.replay()
        return self.static_loss

    def _autocast(self):
        # The same bf16 autocast, without its cache of weight casts.
        if self.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def _static_step(self, x, labels):
        loss = self._loss(x, labels)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.optimizer.step()
        return loss

    def _capture(self, x, labels):
        started = time.perf_counter()
        saved = self._save()
        try:
            with self.preparing():
                self.static_x, self.static_labels = x.clone(), labels.clone()
                current = torch.cuda.current_stream(self.device)
                side = torch.cuda.Stream(self.device)
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_STEPS):
                        self._static_step(self.static_x, self.static_labels)
                current.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: the copier's thread goes on copying and synchronising its
                # own events meanwhile, which a global capture would forbid.
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.static_loss = self._static_step(self.static_x, self.static_labels)
        except Exception as exc:  # a capture's failure is not the run's
            self._restore(saved)
            self.kind, self.optimizer.lr_tensor = "eager", False
            self.static_x = self.static_labels = self.static_loss = None
            log.warning("CUDA graph capture of the train step failed, training on eager: %s", _line(exc))
            return super().run(x, labels)
        self._restore(saved)
        self.graph, self.signature = graph, _signature(x, labels)
        self.captures += 1
        log.info("captured the train step as one CUDA graph in %.1f s", time.perf_counter() - started)
        self.optimizer.sync_lr()
        self.graph.replay()
        return self.static_loss

    def _save(self) -> dict:
        with torch.no_grad():
            model = self.net.module if hasattr(self.net, "module") else self.net
            tensors = list(model.parameters()) + list(model.buffers())
            velocities = {p: self.optimizer.state[p]["velocity"].clone()
                          for p in model.parameters() if "velocity" in self.optimizer.state.get(p, {})}
            return {"tensors": [(t, t.detach().clone()) for t in tensors], "velocities": velocities,
                    "params": list(model.parameters()), "rng": _rng_save(model)}

    def _restore(self, saved: dict) -> None:
        """In place: the graph holds these tensors' addresses."""
        with torch.no_grad():
            for tensor, value in saved["tensors"]:
                tensor.copy_(value)
            for p in saved["params"]:
                state = self.optimizer.state.get(p, {})
                if "velocity" in state:  # one the warm-up created starts at zero, as a new one does
                    old = saved["velocities"].get(p)
                    state["velocity"].copy_(old) if old is not None else state["velocity"].zero_()
        _rng_load(saved["rng"])


class KeepBeating:
    """Held while a form is prepared: `beat("compiling")` at once, then every `every`
    seconds from a thread, and `beat(back_to())` when done. A compile can outlast the
    supervisor's heartbeat timeout, and the trainer's own thread is inside the compiler
    meanwhile. It touches no socket until it leaves, and join() hands them back (ZeroMQ's
    rule for moving a socket between threads: a full memory barrier). `on_tick`, called
    after each beat from the thread, is where the trainer answers a stop meanwhile."""

    def __init__(self, beat, back_to, every: float = 1.0, on_tick=None):
        self.beat, self.back_to, self.every, self.on_tick = beat, back_to, every, on_tick
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compiling-beats", daemon=True)

    def __enter__(self):
        self.beat("compiling")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.wait(self.every):
            self.beat("compiling")
            if self.on_tick is not None:
                self.on_tick()

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.beat(self.back_to())
