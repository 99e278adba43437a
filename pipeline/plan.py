"""What goes into every batch, as a pure function of (seed, epoch, seq, sample index).

This is what makes the pipeline rebuildable: whichever augmenter decodes a batch, and
however many there are, batch `seq` of epoch `e` has the same samples, crops, flips and
lighting draws. A lost batch is rebuilt from its seq; a checkpoint only records
(epoch, next seq); a resumed run sees exactly what an uninterrupted one would have.

The stream of one epoch is its training batches, then (on epochs that validate) its
validation batches, numbered on: seq 0..T-1 train, T..T+V-1 val.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from alexnetd.pipeline.ring import CROP, IMAGE

__all__ = ["BatchPlan", "TrainDraws", "train_draws", "LIGHTING_STD"]

# §4.1: alpha_i ~ N(0, 0.1), drawn once per image each time it is used.
LIGHTING_STD = 0.1
# 33 offsets per axis (0..32): every 224 patch of a 256 image. The paper's "factor of
# 2048" counts 32x32x2; we include the last row and column so that the test-time
# corner crops are positions training has seen.
MAX_OFFSET = IMAGE - CROP


@dataclass(frozen=True)
class BatchPlan:
    n_train: int
    n_val: int
    batch: int
    seed: int = 0
    val_every: int = 1     # validate after every k-th epoch; 0 never
    rank: int = 0          # data parallel: rank r of `world` takes every world-th batch
    world: int = 1

    def __post_init__(self):
        if self.n_train < self.batch * self.world:
            raise ValueError(f"{self.n_train} training images are fewer than one batch of "
                             f"{self.batch} per rank")

    @property
    def train_batches(self) -> int:
        # The last partial batch is dropped: every training step has the same shape.
        return self.n_train // self.batch // self.world

    @property
    def val_batches(self) -> int:
        return math.ceil(math.ceil(self.n_val / self.batch) / self.world) if self.n_val else 0

    def validates(self, epoch: int) -> bool:
        return self.val_every > 0 and self.n_val > 0 and (epoch + 1) % self.val_every == 0

    def batches_in_epoch(self, epoch: int) -> int:
        return self.train_batches + (self.val_batches if self.validates(epoch) else 0)

    def split_of(self, seq: int) -> str:
        return "train" if seq < self.train_batches else "val"

    def samples(self, epoch: int, seq: int) -> tuple[str, np.ndarray]:
        """(split, sample indices into that split) of batch seq of epoch."""
        if seq < self.train_batches:
            start = (seq * self.world + self.rank) * self.batch
            return "train", _permutation(self.seed, epoch, self.n_train)[start:start + self.batch]
        local = seq - self.train_batches
        if not self.validates(epoch) or local >= self.val_batches:
            raise IndexError(f"epoch {epoch} has no batch {seq}")
        start = (local * self.world + self.rank) * self.batch
        return "val", np.arange(start, min(start + self.batch, self.n_val), dtype=np.int64)

    def next_position(self, epoch: int, seq: int) -> tuple[int, int]:
        seq += 1
        return (epoch + 1, 0) if seq >= self.batches_in_epoch(epoch) else (epoch, seq)


@lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    # A fresh order every epoch, the same order for the same (seed, epoch).
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n).astype(np.int64)


@dataclass
class TrainDraws:
    """Per-sample augmentation draws of one training batch."""
    crops: np.ndarray   # (n, 2) int16: top, left of the 224 patch
    flips: np.ndarray   # (n,) uint8: 1 = mirrored left-right
    alphas: np.ndarray  # (n, 3) float32: PCA lighting coefficients


def train_draws(seed: int, epoch: int, indices: np.ndarray) -> TrainDraws:
    """Crop, flip and lighting of each sample: a function of (seed, epoch, sample index)
    only, never of which batch, augmenter or process handles the sample."""
    n = len(indices)
    crops = np.empty((n, 2), np.int16)
    flips = np.empty(n, np.uint8)
    alphas = np.empty((n, 3), np.float32)
    for i, index in enumerate(indices):
        rng = np.random.default_rng([seed, epoch, int(index), 0xA6])
        crops[i] = rng.integers(0, MAX_OFFSET + 1, size=2)
        flips[i] = rng.random() < 0.5
        alphas[i] = rng.normal(0.0, LIGHTING_STD, size=3)
    return TrainDraws(crops, flips, alphas)
