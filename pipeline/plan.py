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

    @classmethod
    def for_dataset(cls, dataset, batch: int, seed: int = 0, val_every: int = 1, rank: int = 0,
                    world: int = 1) -> "BatchPlan":
        """The plan of an opened dataset; one without a val/ split trains without validation."""
        n_val = len(dataset.split("val")) if "val" in dataset.splits else 0
        return cls(len(dataset.split("train")), n_val, batch, seed, val_every, rank, world)

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
    only, never of which batch, augmenter or process handles the sample.

    Counter-based: each draw is a SplitMix64 hash of (seed, epoch, index, draw number),
    computed for the whole batch at once. (A numpy Generator per sample costs ~40 us,
    5 ms per batch of 128, a few per cent of an augmenter's time.)"""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        return _draws(seed, epoch, np.asarray(indices, np.uint64))


def _draws(seed: int, epoch: int, idx: np.ndarray) -> TrainDraws:
    key = _mix(np.uint64(seed) * _GOLDEN + np.uint64(epoch) * _EPOCH_STEP) ^ _mix(idx + _INDEX_OFFSET)
    words = [_mix(key + np.uint64(d) * _GOLDEN) for d in range(7)]
    uniform = [(w >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)) for w in words]
    crops = np.stack([(words[0] % np.uint64(MAX_OFFSET + 1)), (words[1] % np.uint64(MAX_OFFSET + 1))], 1)
    flips = (uniform[2] < 0.5).astype(np.uint8)
    # Box-Muller: three standard normals from pairs of uniforms (1 - u keeps log() finite).
    radius = [np.sqrt(-2.0 * np.log(1.0 - uniform[3])), np.sqrt(-2.0 * np.log(1.0 - uniform[5]))]
    normals = np.stack([radius[0] * np.cos(2 * np.pi * uniform[4]),
                        radius[0] * np.sin(2 * np.pi * uniform[4]),
                        radius[1] * np.cos(2 * np.pi * uniform[6])], 1)
    return TrainDraws(crops.astype(np.int16), flips, (LIGHTING_STD * normals).astype(np.float32))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_EPOCH_STEP = np.uint64(0xD1B54A32D192ED03)
_INDEX_OFFSET = np.uint64(0x632BE59BD9B4E019)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixed hash of 64-bit words."""
    with np.errstate(over="ignore"):
        z = np.asarray(z, np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
