"""Evaluating trained networks: error rates on a split (§4.1, §6) and predictions.

    result = evaluate(["run/checkpoints/ckpt-000450000.pt"], "data", crops=10)
    result["top1_error"], result["top5_error"]      # in 0..1
    predict("ckpt.pt", ["cat.jpg"], data="data")    # top-5 classes with probabilities

How an image is scored, as the paper does it:
  * §2: decoded and down-sampled to 256x256 (shorter side to 256, central square);
    images of a prepared dataset already are;
  * the training set's per-pixel mean image is subtracted (it comes from the dataset,
    ``ds.stats()``, the same one the trainer subtracted);
  * §4.1: the network sees the centre 224 patch (``crops=1``), or the four corner
    patches, the centre patch and the horizontal reflections of all five (``crops=10``);
    the softmax outputs of the patches are averaged;
  * §6, Table 2: with several checkpoints the averaged softmax outputs of the networks
    are averaged again ("5 CNNs"), every network and every patch weighing the same.

A simple in-process loop, one batch at a time: read, decode, transform, forward. The
multi-process input pipeline is for training, where the network waits on the data;
here the network is the slow part and the loop stays easy to check.

Errors a user can cause (a missing or corrupt checkpoint, a checkpoint of another
dataset, a dataset that cannot be read) raise ``EvalError``, ``CheckpointError`` or
``DatasetError``, each with a one-line message.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from alexnetd.model.alexnet import AlexNet
from alexnetd.model.checkpoint import latest_checkpoint, load_checkpoint
from alexnetd.pipeline.dataset import Dataset, DatasetError, open_dataset
from alexnetd.pipeline.jpeg import Decoder, SkipSample
from alexnetd.pipeline.ring import IMAGE
from alexnetd.pipeline.transform import InputTransform

__all__ = [
    "EvalError",
    "LoadedModel",
    "Prediction",
    "evaluate",
    "val_probabilities",
    "predict",
    "load_model",
    "ensemble_probabilities",
    "label_ranks",
    "eval_transform",
    "TOPK",
    "DEFAULT_BATCH_SIZE",
]

log = logging.getLogger(__name__)

# The paper reports top-1 and top-5 error (§6).
TOPK = 5
# Images per forward pass; with crops=10 the network sees ten times as many patches.
DEFAULT_BATCH_SIZE = 32


class EvalError(Exception):
    """Evaluation cannot run as asked; the message is one line."""


@dataclass
class LoadedModel:
    path: Path
    model: AlexNet                  # in eval mode, on its device
    classes: list[str]              # class ids in label order
    class_names: list[str]
    fingerprint: str | None
    config: dict


class Prediction(NamedTuple):
    """One image's answer: ``top`` is [(class_id, class_name, probability)...], most
    probable first; when the image could not be read ``top`` is empty and ``error``
    says why in one line."""

    path: str
    top: list[tuple[str, str, float]]
    error: str | None = None


# ---------------------------------------------------------------- loading networks


def _resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a directory of them (its newest complete one)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise EvalError(f"{path}: no checkpoint (ckpt-<step>.pt) in this directory")
        return found
    if not path.exists():
        raise EvalError(f"{path}: no such checkpoint file")
    # torch.load would try any other file as a legacy pickle and report "objects that
    # are not plain data"; a checkpoint is always a zip archive, so say what it is.
    if path.is_file() and not zipfile.is_zipfile(path):
        raise EvalError(f"{path}: not a checkpoint, or a truncated one (no complete "
                        "torch.save archive)")
    return path


def _num_classes(path: Path, weights: dict, config: dict) -> int:
    fc8 = weights.get("fc8.weight")
    if not torch.is_tensor(fc8) or fc8.dim() != 2:
        raise EvalError(f"checkpoint {path} holds no AlexNet weights (no fc8.weight in 'model')")
    n = int(fc8.shape[0])
    declared = config.get("num_classes")
    if isinstance(declared, int) and declared != n:
        raise EvalError(f"checkpoint {path}: config says {declared} classes, fc8 has {n} outputs")
    return n


def load_model(path: str | os.PathLike, dataset: Dataset | None = None,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load one checkpoint (or the newest in a directory) as an eval-mode ``AlexNet``.

    With ``dataset``, the checkpoint's dataset fingerprint must be the dataset's
    (``load_checkpoint`` checks it and names both) and its class list the dataset's.
    """
    path = _resolve(path)
    expect = dataset.fingerprint if dataset is not None else None
    where = dataset.root if dataset is not None else None
    # Read on the CPU: only the weights go to the device, not the optimizer's momentum.
    state = load_checkpoint(path, expect_fingerprint=expect, data_dir=where, map_location="cpu")
    return _build(path, state, dataset, device)


def _build(path: Path, state: dict, dataset: Dataset | None,
           device: str | torch.device) -> LoadedModel:
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise EvalError(f"checkpoint {path} holds no model weights ('model')")
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    n = _num_classes(path, weights, config)

    classes = state.get("classes")
    if classes is None:
        classes = list(dataset.classes) if dataset is not None else [str(i) for i in range(n)]
    classes = [str(c) for c in classes]
    if len(classes) != n:
        raise EvalError(f"checkpoint {path} lists {len(classes)} classes but fc8 has {n} outputs")
    if dataset is not None and classes != list(dataset.classes):
        raise EvalError(f"checkpoint {path} has {n} classes ({_head(classes)}), but {dataset.root} "
                        f"has {len(dataset.classes)} ({_head(dataset.classes)})")
    names = state.get("class_names")
    if not (isinstance(names, list) and len(names) == n):
        names = list(dataset.class_names) if dataset is not None else list(classes)

    # Built on the meta device, the layers get no storage and skip their random
    # initialization; load_state_dict(assign=True) then puts the checkpoint's tensors in.
    with torch.device("meta"):
        model = AlexNet(num_classes=n)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise EvalError(f"checkpoint {path}: its weights do not fit AlexNet: {first}") from None
    model = model.float().to(device).eval()
    fingerprint = state.get("dataset_fingerprint")
    return LoadedModel(path, model, classes, [str(x) for x in names],
                       fingerprint if isinstance(fingerprint, str) else None, config)


def _head(classes: Sequence[str], n: int = 3) -> str:
    more = ", ..." if len(classes) > n else ""
    return ", ".join(map(str, classes[:n])) + more


def _load_all(checkpoints: Sequence[str | os.PathLike], dataset: Dataset,
              device: torch.device) -> list[LoadedModel]:
    if not checkpoints:
        raise EvalError("no checkpoint given")
    # Each network's class list must be the dataset's (load_model checks), so the
    # networks of an ensemble all average over the same classes in the same order.
    return [load_model(path, dataset, device) for path in checkpoints]


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EvalError(f"device {device!r} is not a device (cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("device cuda: CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise EvalError(f"device {device!r}: only cpu and cuda are supported")
    return dev


def eval_transform(dataset: Dataset, device: str | torch.device = "cpu") -> InputTransform:
    """The test-time input of ``dataset``: its mean image subtracted, no PCA lighting."""
    if dataset.image_size != IMAGE:
        raise EvalError(f"{dataset.root} stores {dataset.image_size}x{dataset.image_size} images; "
                        f"the network's input is cut from {IMAGE}x{IMAGE} (§2), prepare it again")
    mean, eigvals, eigvecs = dataset.stats()
    # No PCA lighting at test time: it is a training augmentation (§4.1).
    return InputTransform(mean, eigvals, eigvecs, device=device, lighting=False)


# ---------------------------------------------------------------- scoring


def _check_crops(crops: int) -> None:
    if crops not in (1, 10):
        raise EvalError(f"crops must be 1 (the centre patch) or 10 (§4.1's ten patches), got {crops}")


@torch.inference_mode()
def ensemble_probabilities(models: Sequence[torch.nn.Module], transform: InputTransform,
                           images: np.ndarray | torch.Tensor, crops: int = 1) -> torch.Tensor:
    """Class probabilities of a batch: (n,256,256,3) uint8 images -> (n, C) float32.

    The softmax of every patch, averaged over the ``crops`` patches of each image
    (§4.1), then over the networks (Table 2's ensembles). On the CPU.
    """
    _check_crops(crops)
    images = torch.as_tensor(images)
    n = images.shape[0]
    x = transform.eval(images, crops=crops)            # (n*crops, 3, 224, 224), image-major
    total = None
    for model in models:
        logits = model(x).float()
        p = torch.softmax(logits, dim=1).view(n, crops, -1).mean(dim=1)
        total = p if total is None else total + p
    return (total / len(models)).cpu()


def label_ranks(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For each image, how many classes rank above its true class (0 = top-1 correct).

    A class whose probability equals the true class's counts as ranking above it, so a
    network that gives every class the same probability scores 100 % top-1 error, not
    0 %. Top-k is correct when the rank is < k.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    p_true = probs.gather(1, labels[:, None])
    return (probs >= p_true).sum(dim=1) - 1


class _Batches:
    """Decoded 256x256 batches of a split, skipping images that do not decode."""

    def __init__(self, dataset: Dataset, split: str, batch_size: int):
        if batch_size < 1:
            raise EvalError(f"batch size must be >= 1, got {batch_size}")
        self.split = dataset.split(split)
        self.batch_size = batch_size
        self.skipped: Counter[str] = Counter()
        self.decoder = Decoder()
        self.position = 0  # samples read so far, decoded or skipped

    def __len__(self) -> int:
        return len(self.split)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        labels = self.split.labels
        buf = np.empty((self.batch_size, IMAGE, IMAGE, 3), np.uint8)
        kept: list[int] = []
        for i in range(len(self.split)):
            self.position = i + 1
            try:
                buf[len(kept)] = self.decoder.decode_square(self.split.read(i), IMAGE)
            except SkipSample as exc:
                self.skipped[exc.reason] += 1
                log.warning("skipping %s: %s", self.split.key(i), _reason(exc))
                continue
            except OSError as exc:
                # A file of an ImageFolder tree that vanished or cannot be read.
                self.skipped["unreadable"] += 1
                log.warning("skipping %s: %s", self.split.key(i), exc.strerror or exc)
                continue
            kept.append(i)
            if len(kept) == self.batch_size:
                yield buf, labels[kept]
                kept = []
        if kept:
            yield buf[:len(kept)], labels[kept]


def _run(checkpoints, data, split, crops, batch_size, device, progress,
         consume) -> tuple[Dataset, list[LoadedModel], _Batches]:
    """Shared by evaluate() and val_probabilities(): load, check, then feed each batch's
    (probabilities, labels) to ``consume``."""
    from tqdm import tqdm

    _check_crops(crops)
    dev = _device(device)
    dataset = open_dataset(data)
    batches = _Batches(dataset, split, batch_size)   # a missing split fails before loading
    transform = eval_transform(dataset, dev)
    loaded = _load_all(checkpoints, dataset, dev)
    nets = [m.model for m in loaded]
    with tqdm(total=len(batches), desc=f"eval {split}", unit="img", disable=not progress,
              leave=False) as bar:
        for images, labels in batches:
            consume(ensemble_probabilities(nets, transform, images, crops),
                    torch.as_tensor(labels, dtype=torch.long))
            bar.update(batches.position - bar.n)
    return dataset, loaded, batches


def evaluate(checkpoints: Sequence[str | os.PathLike], data: str | os.PathLike, crops: int = 1,
             batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu", progress: bool = True,
             split: str = "val") -> dict:
    """Top-1 and top-5 error of one network, or of an ensemble, on a dataset's split.

    ``checkpoints``: checkpoint files (or run checkpoint directories: the newest in
    each); one gives a single network, several an ensemble whose softmax outputs are
    averaged (§6). ``crops``: 1 (centre patch) or 10 (§4.1). ``batch_size`` counts
    images, not patches.

    Returns ``{"top1_error", "top5_error", "images", "crops", "models", "skipped",
    "skipped_by_reason", "classes", "top5_k", "split", "checkpoints"}``. Errors are in
    0..1 over the images that decoded; ``skipped`` counts the ones that did not.

    Top-5 with fewer than 5 classes: ``top5_error`` counts an image as correct when its
    class is among the top min(5, C) (``top5_k``); with C <= 5 that is every image, so
    the value is 0.

    Raises EvalError, CheckpointError (also for a dataset fingerprint mismatch, naming
    both fingerprints) or DatasetError, each with a one-line message.
    """
    counts = {"images": 0, "top1": 0, "topk": 0}
    k = TOPK

    def consume(probs, labels):
        ranks = label_ranks(probs, labels)
        counts["images"] += len(labels)
        counts["top1"] += int((ranks < 1).sum())
        counts["topk"] += int((ranks < min(k, probs.shape[1])).sum())

    dataset, loaded, batches = _run(checkpoints, data, split, crops, batch_size, device,
                                    progress, consume)
    n = counts["images"]
    if n == 0:
        raise EvalError(f"{dataset.root}: no image of the {split} split could be evaluated "
                        f"({sum(batches.skipped.values())} skipped)")
    return {
        "top1_error": (n - counts["top1"]) / n,
        "top5_error": (n - counts["topk"]) / n,
        "images": n,
        "crops": crops,
        "models": len(loaded),
        "skipped": sum(batches.skipped.values()),
        "skipped_by_reason": dict(sorted(batches.skipped.items())),
        "classes": len(dataset.classes),
        "top5_k": min(k, len(dataset.classes)),
        "split": split,
        "checkpoints": [str(m.path) for m in loaded],
    }


def val_probabilities(checkpoints: Sequence[str | os.PathLike], data: str | os.PathLike,
                      crops: int = 1, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu",
                      progress: bool = False, split: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """The averaged probabilities ``evaluate`` scores: ((N, C) float32, labels (N,)),
    one row per image that decoded, in split order."""
    probs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []

    def consume(p, y):
        probs.append(p)
        labels.append(y)

    dataset, _, _ = _run(checkpoints, data, split, crops, batch_size, device, progress, consume)
    if not probs:
        return np.zeros((0, len(dataset.classes)), np.float32), np.zeros(0, np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


# ---------------------------------------------------------------- single images


def _dataset_named_in(path: Path, state: dict) -> Dataset:
    """The dataset a checkpoint's config names (where it was trained), checked against
    the checkpoint's fingerprint: its mean image is the one the network was trained with."""
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    named = config.get("data")
    if not isinstance(named, str) or not named:
        raise EvalError(f"checkpoint {path} names no dataset; pass the training data "
                        "(--data DIR): its mean image is subtracted from every input (§2)")
    try:
        dataset = open_dataset(named)
    except DatasetError as exc:
        raise EvalError(f"the dataset checkpoint {path} was trained on cannot be opened ({exc}); "
                        "pass the training data (--data DIR) for its mean image") from None
    have = state.get("dataset_fingerprint")
    if have != dataset.fingerprint:
        raise EvalError(f"checkpoint {path} was trained on dataset fingerprint {have}, but "
                        f"{named} (named in its config) now has {dataset.fingerprint}; "
                        "pass the training data with --data DIR")
    return dataset


def predict(checkpoint: str | os.PathLike, image_paths: Sequence[str | os.PathLike],
            topk: int = TOPK, crops: int = 1, data: str | os.PathLike | None = None,
            device: str = "cpu") -> list[Prediction]:
    """The ``topk`` most probable classes of each image, as ``Prediction(path, top, error)``
    with ``top`` = [(class_id, class_name, probability)...], most probable first.

    Each image is down-sampled as §2 says (shorter side to 256, central 256x256), the
    training set's mean image is subtracted, and the network sees the centre patch
    (``crops=1``) or the ten patches of §4.1 (``crops=10``, probabilities averaged).
    ``data``: the training dataset, for its mean image; by default the one the
    checkpoint's config names. Its fingerprint must match the checkpoint's.

    An image that cannot be read or decoded gets ``top=[]`` and a one-line ``error``;
    the others are still predicted. Fewer than ``topk`` classes: all of them are listed.
    """
    _check_crops(crops)
    if topk < 1:
        raise EvalError(f"topk must be >= 1, got {topk}")
    dev = _device(device)
    path = _resolve(checkpoint)
    if data is not None:
        dataset = open_dataset(data)
        state = load_checkpoint(path, dataset.fingerprint, dataset.root, map_location="cpu")
    else:
        state = load_checkpoint(path, map_location="cpu")
        dataset = _dataset_named_in(path, state)
    loaded = _build(path, state, dataset, dev)
    del state
    transform = eval_transform(dataset, dev)
    decoder = Decoder()
    k = min(topk, len(loaded.classes))
    out: list[Prediction] = []
    for image_path in map(str, image_paths):
        try:
            with open(image_path, "rb") as f:
                image = decoder.decode_square(f.read(), IMAGE)
        except OSError as exc:
            out.append(Prediction(image_path, [], f"{image_path}: {exc.strerror or exc}"))
            continue
        except SkipSample as exc:
            out.append(Prediction(image_path, [], f"{image_path}: not a usable image ({_reason(exc)})"))
            continue
        probs = ensemble_probabilities([loaded.model], transform, np.array(image)[None], crops)[0]
        values, indices = torch.topk(probs, k)
        out.append(Prediction(image_path, [(loaded.classes[i], loaded.class_names[i], float(v))
                                     for v, i in zip(values.tolist(), indices.tolist())]))
    return out


def _reason(exc: SkipSample) -> str:
    # Pillow names its in-memory buffer ("<_io.BytesIO object at 0x...>"): not the user's file.
    return re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-f]+>", "", str(exc)).strip()
