"""The peer input pipelines that `bench/input.py` compares alexnetd against.

Each peer does the training-time work of our augmenters on the same prepared dataset:
read the stored 256x256 JPEG, decode it to RGB, cut a random 224x224 patch, mirror it
on a coin flip, and hand over a batch of 128 as uint8 NHWC (128x224x224x3). Each one
takes `cores` workers or threads, asserts on its first batch that the output really is
that shape and type, warms up, then counts images for `seconds`.

    images_per_second = torch_dataloader(data, cores, seconds)
    images_per_second = dali_cpu(data, cores, seconds)      # DaliUnavailable if no DALI
    images_per_second = pil_dataloader(data, cores, seconds)

Fairness, shared by every peer:
- same files: the training split of one prepared dataset (tar shards);
- same cores: each peer inherits the caller's CPU affinity and uses `cores` workers;
- same batch size (128) and the same output: uint8, NHWC, nothing converted to float;
- an endless sampler: the bench dataset is small, and a DataLoader drains and refills
  its workers at every epoch boundary, a stall that a 1.28 M-image ImageNet epoch
  would almost never show; so the DataLoader peers see one epoch that never ends;
- the same decoder settings where the peer lets us choose: the PyTurboJPEG and DALI
  peers use libjpeg-turbo's fast IDCT, as our augmenters do; the PIL peer keeps
  Pillow's defaults, as torchvision users do.
"""

from __future__ import annotations

import glob
import io
import os
import time

import numpy as np

__all__ = ["BATCH", "CROP", "WARMUP_BATCHES", "DaliUnavailable", "torch_dataloader", "dali_cpu", "pil_dataloader",
           "check_batch"]

BATCH = 128
CROP = 224
WARMUP_BATCHES = 5  # worker start-up, imports, first reads and page-cache misses are not throughput
ENDLESS = 10**9  # samples in the DataLoader peers' one never-ending epoch


class DaliUnavailable(Exception):
    """DALI cannot run here; the message says why."""


def check_batch(images) -> None:
    """Every peer must hand over what our augmenters write: 128x224x224x3 uint8."""
    shape, dtype = tuple(images.shape), str(images.dtype)
    assert shape == (BATCH, CROP, CROP, 3), f"batch shape {shape}, expected {(BATCH, CROP, CROP, 3)}"
    assert dtype in ("uint8", "torch.uint8"), f"batch dtype {dtype}, expected uint8"


def _measure(next_images, seconds: float) -> float:
    """Images per second of `next_images()` (a callable returning one batch of images)
    over `seconds`, after WARMUP_BATCHES untimed batches. The caller has already taken
    and checked the first batch."""
    for _ in range(WARMUP_BATCHES - 1):
        next_images()
    images = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += len(next_images())
    return images / (time.perf_counter() - start)


# -- torch DataLoader + PyTurboJPEG --------------------------------------------------


class _TurboCrops:
    """Map-style dataset: sample i -> (224x224x3 uint8 random crop, maybe mirrored; label).

    The same decode our augmenters do: alexnetd's Decoder (libjpeg-turbo through
    PyTurboJPEG) with the same fast IDCT/upsampling flags, so the two differ in how the
    work is organised, not in the decoder.
    """

    def __init__(self, data: str):
        from alexnetd.pipeline.dataset import open_dataset

        self.split = open_dataset(data).split("train")  # reopens its files in each worker
        self.decoder = None  # made in each worker: the TurboJPEG handle is per process
        self.rng = None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        import torch

        if self.decoder is None:
            from alexnetd.pipeline.jpeg import Decoder

            self.decoder = Decoder(fast=True)
            # torch seeds each worker differently; numpy's generator follows it, so no
            # two workers draw the same crops.
            self.rng = np.random.default_rng(torch.initial_seed())
        image = self.decoder.decode_rgb(self.split.read(i))
        height, width = image.shape[:2]
        top = self.rng.integers(0, height - CROP + 1)
        left = self.rng.integers(0, width - CROP + 1)
        patch = torch.from_numpy(image[top:top + CROP, left:left + CROP])  # a view, no copy
        if self.rng.random() < 0.5:
            # torch.flip, as torchvision's tensor hflip does: numpy's reversed copy of an
            # axis of 3-byte pixels (np.fliplr, [:, ::-1]) takes about 12x longer, longer
            # than the decode itself, and would make this peer slower than careful code.
            patch = patch.flip(1)
        # default_collate copies each patch once, stacking the batch straight into shared
        # memory for the trip back to the main process.
        return patch, int(self.split.labels[i])


def _dataloader_rate(dataset, cores: int, seconds: float) -> float:
    from torch.utils.data import DataLoader, RandomSampler

    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=RandomSampler(dataset, num_samples=ENDLESS),  # shuffled, like our loader
        num_workers=cores,
        persistent_workers=True,
        drop_last=True,
        # prefetch_factor, pin_memory, collate_fn: left at their defaults, as most users
        # leave them (default_collate stacks numpy arrays into one uint8 tensor).
    )
    batches = iter(loader)  # starts the workers
    try:
        check_batch(next(batches)[0])
        return _measure(lambda: next(batches)[0], seconds)
    finally:
        batches._shutdown_workers()  # stop the workers now, not whenever gc gets to them


def torch_dataloader(data: str, cores: int, seconds: float) -> float:
    """torch DataLoader, `cores` worker processes, PyTurboJPEG decode, numpy crop, torch flip."""
    return _dataloader_rate(_TurboCrops(data), cores, seconds)


# -- torchvision-style PIL ----------------------------------------------------------


class _PilCrops(_TurboCrops):
    """What `RandomCrop(224)` + `RandomHorizontalFlip()` on a PIL image do in torchvision,
    written with PIL itself (torchvision is not a dependency and would bring its own
    torch): Image.open(...).convert("RGB"), crop, flip, then to a uint8 HWC array
    (where torchvision users would call PILToTensor for uint8 CHW; same bytes)."""

    def __getitem__(self, i: int):
        from PIL import Image

        if self.rng is None:
            import torch

            self.rng = np.random.default_rng(torch.initial_seed())
        image = Image.open(io.BytesIO(self.split.read(i))).convert("RGB")
        left = self.rng.integers(0, image.width - CROP + 1)
        top = self.rng.integers(0, image.height - CROP + 1)
        image = image.crop((left, top, left + CROP, top + CROP))  # torchvision crops first,
        if self.rng.random() < 0.5:  # so the flip only touches 224x224
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(image), int(self.split.labels[i])  # a writable copy, as PILToTensor makes


def pil_dataloader(data: str, cores: int, seconds: float) -> float:
    """torch DataLoader, `cores` worker processes, PIL decode + crop + flip."""
    return _dataloader_rate(_PilCrops(data), cores, seconds)


# -- NVIDIA DALI, CPU only ----------------------------------------------------------


def dali_cpu(data: str, cores: int, seconds: float) -> float:
    """DALI's CPU pipeline: webdataset reader on the shards, libjpeg-turbo decode,
    crop_mirror_normalize with random crop positions and coin-flip mirroring, uint8 HWC."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except Exception as exc:  # ImportError, or a broken install failing in its own way
        raise DaliUnavailable(f"cannot import nvidia.dali: {exc}") from None

    shards = sorted(glob.glob(os.path.join(data, "train", "*.tar")))
    if not shards:
        raise DaliUnavailable(f"{data}/train: no tar shards for DALI's webdataset reader")

    @pipeline_def(batch_size=BATCH, num_threads=cores, device_id=None)  # device_id=None: CPU only
    def crops():
        # Reads the same tar shards our loader reads (jpg + cls members); the shuffle
        # buffer stands in for our per-epoch permutation.
        jpegs, labels = fn.readers.webdataset(paths=shards, ext=["jpg", "cls"], random_shuffle=True,
                                              name="shards")
        # use_fast_idct: the same libjpeg-turbo fast IDCT our augmenters use.
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, use_fast_idct=True)
        # One fused operator for crop + mirror, as DALI recommends; with dtype=UINT8 and
        # no mean/std it is a pure crop/flip (no float, no normalisation), HWC out.
        images = fn.crop_mirror_normalize(
            images,
            crop=(CROP, CROP),
            crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
            crop_pos_y=fn.random.uniform(range=(0.0, 1.0)),
            mirror=fn.random.coin_flip(probability=0.5),
            dtype=types.UINT8,
            output_layout="HWC",
        )
        return images, labels

    try:
        pipe = crops()
        pipe.build()
    except Exception as exc:  # e.g. a build that wants a GPU after all
        raise DaliUnavailable(f"cannot build the DALI CPU pipeline: {exc}") from None

    def next_images():
        images, _labels = pipe.run()
        # DALI keeps a batch as a TensorList; no copy into one array is counted (the
        # peers' loaders hand over a batch tensor, DALI gets the benefit of the doubt).
        return images

    try:
        first = pipe.run()[0].as_array()  # the only copy: to check the first batch's shape
        check_batch(first)
        return _measure(next_images, seconds)
    finally:
        del pipe  # joins DALI's worker threads
