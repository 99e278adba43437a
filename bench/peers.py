"""The peer input pipelines that `bench/input.py` compares alexnetd against.

Each peer does the training-time input work on the same prepared dataset and hands over
a batch of 128 uint8 NHWC images, each at its strongest configuration for that job:

    images_per_second = torch_dataloader(data, cores, seconds)   # the same job as ours
    images_per_second = dali_cpu(data, cores, seconds, roi=True)  # DaliUnavailable if no DALI
    images_per_second = pil_dataloader(data, cores, seconds)

What each one delivers:
- torch DataLoader: exactly alexnetd's job, organised the DataLoader way: each worker
  builds a whole batch, decoding every stored 256x256 image with libjpeg-turbo straight
  into a batch tensor allocated in shared memory (no collate copy, no per-sample
  pickling), plus each sample's crop offset and flip, for the trainer's gather on the
  device; 128x256x256x3 uint8.
- DALI CPU: `fn.decoders.image_crop` (ROI decode: libjpeg-turbo decodes only the random
  224 crop's region, i.e. less work than a whole decode) + `fn.flip` on a coin flip,
  128x224x224x3 uint8; with roi=False, `fn.decoders.image` of the whole image, exactly
  our job. bench/input.py runs both and holds alexnetd to the faster.
- PIL: what torchvision users write (RandomCrop + RandomHorizontalFlip on PIL images),
  128x224x224x3 uint8; a reference, not a target.

Fairness, shared by every peer:
- same files: the training split of one prepared dataset (tar shards);
- same cores: each peer inherits the caller's CPU affinity and uses `cores` workers;
- same batch size (128), uint8 out, nothing converted to float;
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

__all__ = ["BATCH", "CROP", "IMAGE", "WARMUP_BATCHES", "DaliUnavailable", "torch_dataloader", "dali_cpu", "pil_dataloader",
           "check_batch"]

BATCH = 128
CROP = 224
IMAGE = 256  # side of a stored (prepared) image
WARMUP_BATCHES = 5  # worker start-up, imports, first reads and page-cache misses are not throughput
ENDLESS = 10**9  # samples in the DataLoader peers' one never-ending epoch


class DaliUnavailable(Exception):
    """DALI cannot run here; the message says why."""


def check_batch(images, side: int = CROP) -> None:
    """Every peer must hand over a full batch of uint8 NHWC images of `side`."""
    shape, dtype = tuple(images.shape), str(images.dtype)
    assert shape == (BATCH, side, side, 3), f"batch shape {shape}, expected {(BATCH, side, side, 3)}"
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


# -- torch DataLoader + PyTurboJPEG, alexnetd's job -------------------------------------


class _TurboBatches:
    """Batch-level map-style dataset: a list of sample indices -> (whole images, labels,
    crop offsets, flips), built by one worker.

    The DataLoader's fastest form for this job: with batch_size=None and a batch
    sampler, a worker makes the whole batch, so there is no default_collate stacking and
    no per-sample trip between processes; the batch tensor is allocated in shared memory
    from the start (what default_collate does in a worker), so handing it to the main
    process copies nothing; and each image is decoded by alexnetd's own Decoder (same
    libjpeg-turbo, same fast-IDCT flags, same header checks) straight into its row.
    """

    def __init__(self, data: str):
        from alexnetd.pipeline.dataset import open_dataset

        self.split = open_dataset(data).split("train")  # reopens its files in each worker
        self.decoder = None  # made in each worker: the TurboJPEG handle is per process
        self.rng = None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, indices):
        import torch

        if self.decoder is None:
            from alexnetd.pipeline.jpeg import Decoder

            self.decoder = Decoder(fast=True)
            # torch seeds each worker differently; numpy's generator follows it.
            self.rng = np.random.default_rng(torch.initial_seed())
        n = len(indices)
        storage = torch.UntypedStorage._new_shared(n * IMAGE * IMAGE * 3)
        images = torch.empty(0, dtype=torch.uint8).set_(storage).view(n, IMAGE, IMAGE, 3)
        rows = images.numpy()
        for j, i in enumerate(indices):
            self.decoder.decode_into(self.split.read(i), rows[j])
        crops = self.rng.integers(0, IMAGE - CROP + 1, (n, 2))
        flips = self.rng.random(n) < 0.5
        return images, torch.as_tensor(self.split.labels[indices]), torch.as_tensor(crops), torch.as_tensor(flips)


def torch_dataloader(data: str, cores: int, seconds: float) -> float:
    """torch DataLoader, `cores` worker processes, whole batches decoded by PyTurboJPEG
    into shared memory: alexnetd's input job, the DataLoader way."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    dataset = _TurboBatches(data)
    loader = DataLoader(
        dataset,
        batch_size=None,  # the sampler yields whole batches of indices
        sampler=BatchSampler(RandomSampler(dataset, num_samples=ENDLESS), BATCH, drop_last=True),
        num_workers=cores,
        persistent_workers=True,
        prefetch_factor=4,  # more batches in flight than the default 2: never starved by one slow batch
    )
    batches = iter(loader)  # starts the workers
    try:
        check_batch(next(batches)[0], IMAGE)
        return _measure(lambda: next(batches)[0], seconds)
    finally:
        batches._shutdown_workers()  # stop the workers now, not whenever gc gets to them


# -- torchvision-style PIL ----------------------------------------------------------


def _dataloader_rate(dataset, cores: int, seconds: float) -> float:
    from torch.utils.data import DataLoader, RandomSampler

    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=RandomSampler(dataset, num_samples=ENDLESS),  # shuffled, like our loader
        num_workers=cores,
        persistent_workers=True,
        drop_last=True,
        # default_collate stacks the numpy arrays into one uint8 tensor in shared memory.
    )
    batches = iter(loader)  # starts the workers
    try:
        check_batch(next(batches)[0])
        return _measure(lambda: next(batches)[0], seconds)
    finally:
        batches._shutdown_workers()  # stop the workers now, not whenever gc gets to them


class _PilCrops:
    """What `RandomCrop(224)` + `RandomHorizontalFlip()` on a PIL image do in torchvision,
    written with PIL itself (torchvision is not a dependency and would bring its own
    torch): Image.open(...).convert("RGB"), crop, flip, then to a uint8 HWC array
    (where torchvision users would call PILToTensor for uint8 CHW; same bytes)."""

    def __init__(self, data: str):
        from alexnetd.pipeline.dataset import open_dataset

        self.split = open_dataset(data).split("train")  # reopens its files in each worker
        self.rng = None

    def __len__(self) -> int:
        return len(self.split)

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


def dali_cpu(data: str, cores: int, seconds: float, roi: bool = True) -> float:
    """DALI's CPU pipeline on the shards: webdataset reader, then with `roi` the ROI
    decode of a random 224 crop (`decoders.image_crop`) and `flip` on a coin flip,
    224x224 uint8 HWC out; without it the whole image (`decoders.image`), 256x256."""
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
        if not roi:
            # use_fast_idct: the same libjpeg-turbo fast IDCT our augmenters use.
            return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, use_fast_idct=True), labels
        # DALI's strongest CPU form for a random crop: the decoder decodes only the
        # crop's window (libjpeg-turbo's scanline skipping and cropping), so it does
        # less IDCT and colour-conversion work than a whole decode; then the mirror.
        images = fn.decoders.image_crop(
            jpegs, device="cpu", output_type=types.RGB, use_fast_idct=True,
            crop=(CROP, CROP),
            crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
            crop_pos_y=fn.random.uniform(range=(0.0, 1.0)),
        )
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
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
        check_batch(first, CROP if roi else IMAGE)
        return _measure(next_images, seconds)
    finally:
        del pipe  # joins DALI's worker threads
