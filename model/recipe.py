"""The training recipe of §5: the paper's SGD update, its learning-rate schedule, and
the device helpers a step needs (autocast, seeding, RNG state for checkpoints).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterable

import numpy as np
import torch

__all__ = [
    "PaperSGD",
    "PlateauSchedule",
    "set_lr",
    "autocast_context",
    "set_deterministic",
    "rng_state",
    "load_rng_state",
]


class PaperSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay exactly as §5 writes it:

        v <- momentum * v - weight_decay * lr * w - lr * dL/dw
        w <- w + v

    The learning rate is inside the velocity. ``torch.optim.SGD`` keeps it outside
    (``b <- momentum * b + g + wd * w; w <- w - lr * b``). With a constant lr the two are
    the same trajectory (v = -lr * b), but when lr drops by 10x torch's form also
    rescales the momentum already accumulated, while the paper's lets it decay at the
    old lr. The schedule drops the lr three times, so the difference is real.

    Weight decay applies to every parameter, biases included: the paper's "w" is all
    of them. Use parameter groups to do otherwise. The velocity starts at zero and is
    kept in ``state[p]["velocity"]``.

    With ``foreach`` (the default) each of the four operations is one ``torch._foreach_*``
    call over all the tensors of a device and dtype: on a GPU one launch instead of 16
    (AlexNet has 8 weights and 8 biases), which matters once a step takes a millisecond.
    It is the same elementwise arithmetic in the same order, so the result is the same
    to the bit; ``foreach=False`` is the per-tensor form, kept as the reference.

    ``lr_tensor=True`` reads ``-lr`` and ``-weight_decay * lr`` from 0-dim tensors on the
    parameters' device instead of Python floats, so that a CUDA graph captured around
    ``step`` follows ``set_lr`` without a new capture (a float is baked into the graph as
    a kernel argument). ``sync_lr`` writes the groups' values into those tensors; ``step``
    calls it, except while a CUDA graph is being captured (captured, its fill would pin
    the lr of that moment): before each replay, call it yourself. The coefficients are
    rounded to the parameters' dtype as the float path rounds them; the products are
    then rounded before the additions, where the float path's kernels may fuse them (an
    FMA), so the two paths can differ in the last bit.
    """

    def __init__(self, params: Iterable, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 5e-4, foreach: bool = True, lr_tensor: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got "
                             f"{lr}, {momentum}, {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.foreach = foreach
        self.lr_tensor = lr_tensor
        # (group index, device, dtype) -> [(-lr, -wd * lr) last written, -lr tensor, -wd * lr tensor]
        self._coefficients: dict = {}

    def sync_lr(self) -> None:
        """With ``lr_tensor``: write each group's lr into the tensors the update reads
        (only where it changed: one small fill each, no host sync)."""
        for index, group in enumerate(self.param_groups):
            want = (-group["lr"], -group["weight_decay"] * group["lr"])
            for device, dtype in {(p.device, p.dtype) for p in group["params"]}:
                held = self._coefficients.get((index, device, dtype))
                if held is None:
                    self._coefficients[(index, device, dtype)] = [
                        want, *(torch.tensor(w, device=device, dtype=dtype) for w in want)]
                elif held[0] != want:
                    held[1].fill_(want[0])
                    held[2].fill_(want[1])
                    held[0] = want

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.lr_tensor and not _capturing():
            self.sync_lr()  # eager: follow set_lr at once; a captured step is synced by its caller
        for index, group in enumerate(self.param_groups):
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if "velocity" not in self.state[p]:
                    self.state[p]["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.lr_tensor:
                self._tensor_lr_update(index, m, params)
            elif self.foreach:
                # _foreach_* wants one device and dtype per list.
                same: dict = {}
                for p in params:
                    same.setdefault((p.device, p.dtype), []).append(p)
                for ps in same.values():
                    vs, gs = [self.state[p]["velocity"] for p in ps], [p.grad for p in ps]
                    torch._foreach_mul_(vs, m)
                    torch._foreach_add_(vs, ps, alpha=-wd * lr)
                    torch._foreach_add_(vs, gs, alpha=-lr)
                    torch._foreach_add_(ps, vs)
            else:
                for p in params:
                    v = self.state[p]["velocity"]
                    v.mul_(m).add_(p, alpha=-wd * lr).add_(p.grad, alpha=-lr)
                    p.add_(v)
        return loss

    def _tensor_lr_update(self, index: int, m: float, params: list) -> None:
        """The same update with the lr from this group's tensors (``lr_tensor``)."""
        same: dict = {}
        for p in params:
            same.setdefault((p.device, p.dtype), []).append(p)
        for (device, dtype), ps in same.items():
            _, neg_lr, neg_wd_lr = self._coefficients[(index, device, dtype)]
            vs, gs = [self.state[p]["velocity"] for p in ps], [p.grad for p in ps]
            if self.foreach:
                torch._foreach_mul_(vs, m)
                torch._foreach_add_(vs, torch._foreach_mul(ps, neg_wd_lr))
                torch._foreach_add_(vs, torch._foreach_mul(gs, neg_lr))
                torch._foreach_add_(ps, vs)
            else:
                for p, v, g in zip(ps, vs, gs):
                    v.mul_(m).add_(p * neg_wd_lr).add_(g * neg_lr)
                    p.add_(v)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Put one learning rate on every parameter group (§5: "an equal learning rate for
    all layers")."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class PlateauSchedule:
    """§5: "The heuristic which we followed was to divide the learning rate by 10 when
    the validation error rate stopped improving with the current learning rate. The
    learning rate was initialized at 0.01 and reduced three times prior to termination."

    Call ``step(val_error)`` after each validation (one per epoch). An evaluation
    improves when its error is below the best so far by more than ``min_delta``. After
    ``patience`` evaluations in a row without improvement the lr is multiplied by
    ``factor``, at most ``max_drops`` times. Once all drops are spent, the next such
    plateau ends training: ``should_stop`` becomes true (the error stopped improving at
    the last learning rate, which is when the paper stopped). ``should_stop`` is also
    true once ``max_epochs`` evaluations have been seen (the paper's run was ~90 epochs).

    The paper gives no patience; 5 evaluations is a few percent of a 90-epoch run, so
    three drops plus a final plateau fit well within it.

    The best error is kept across drops, so after a drop the lower lr must beat the
    best error seen at any lr.
    """

    def __init__(self, lr: float = 0.01, factor: float = 0.1, patience: int = 5,
                 max_drops: int = 3, max_epochs: int = 90, min_delta: float = 0.0):
        if patience < 1 or max_drops < 0 or max_epochs < 1 or not 0 < factor < 1:
            raise ValueError("need patience >= 1, max_drops >= 0, max_epochs >= 1, "
                             f"0 < factor < 1; got {patience}, {max_drops}, {max_epochs}, "
                             f"{factor}")
        self.factor, self.patience, self.max_drops = factor, patience, max_drops
        self.max_epochs, self.min_delta = max_epochs, min_delta
        self.lr = float(lr)
        self.best: float | None = None
        self.bad = 0          # evaluations since the last improvement (or drop)
        self.drops = 0
        self.epoch = 0        # evaluations seen
        self.plateaued = False  # a plateau was reached with no drops left

    @property
    def should_stop(self) -> bool:
        return self.plateaued or self.epoch >= self.max_epochs

    def step(self, val_error: float, epoch: int | None = None) -> float:
        """Record one validation error; return the learning rate to train with next.

        ``epoch``: the number of epochs completed, when validation does not run once per
        epoch; by default each call counts as one.
        """
        self.epoch = self.epoch + 1 if epoch is None else int(epoch)
        if self.best is None or val_error < self.best - self.min_delta:
            self.best, self.bad = float(val_error), 0
            return self.lr
        self.bad += 1
        if self.bad >= self.patience:
            if self.drops < self.max_drops:
                self.lr *= self.factor
                self.drops += 1
                # A new lr gets a full patience window to improve.
                self.bad = 0
            else:
                self.plateaued = True
        return self.lr

    def state_dict(self) -> dict:
        """Plain Python types only, so it loads with ``torch.load(weights_only=True)``."""
        return {"lr": self.lr, "best": self.best, "bad": self.bad, "drops": self.drops,
                "epoch": self.epoch, "plateaued": self.plateaued}

    def load_state_dict(self, state: dict) -> None:
        self.lr = float(state["lr"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad, self.drops = int(state["bad"]), int(state["drops"])
        self.epoch, self.plateaued = int(state["epoch"]), bool(state["plateaued"])


def autocast_context(device: str | torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; otherwise a no-op context (fp32).

    bf16 keeps fp32's exponent range, so no loss scaling is needed (unlike fp16).
    """
    device = torch.device(device)
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_deterministic(seed: int, algorithms: bool = True) -> None:
    """Seed Python, NumPy and torch (all devices); with ``algorithms``, also ask torch
    for deterministic kernels so two runs from one seed give the same weights.

    Deterministic kernels cost speed (no cuDNN autotuning), hence the switch. Some ops
    used here (max-pool and avg-pool backward on CUDA) have no deterministic kernel;
    torch then warns instead of failing.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too
    if algorithms:
        # cuBLAS reads this when it initializes; without it deterministic matmuls raise.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict[str, torch.Tensor]:
    """torch's generator states as tensors, for a checkpoint's "rng" entry.

    Only torch's generators (dropout) carry state from step to step: the data stream is
    a pure function of (seed, epoch, seq), so Python's and NumPy's are not saved.
    """
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda:{i}"] = s
    return state


def load_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what ``rng_state`` saved; CUDA devices that no longer exist are skipped."""
    torch.set_rng_state(state["cpu"].cpu())
    for key, s in state.items():
        if key.startswith("cuda:"):
            index = int(key.split(":", 1)[1])
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(s.cpu(), index)
