"""The paper's §2 down-sampling of one image: the shorter side rescaled to S, then the
central S×S patch. Every host path that resizes (the augmenters on full-size input,
`prepare`, evaluation) comes here; DALI's window decode matches it (daliwindow.py).

The filter is Pillow's BILINEAR: a triangle widened to the scale when shrinking (so it
anti-aliases), plain bilinear when enlarging, output pixel j sampled at (j + 1/2)·side/S.
Where the CPU has AVX2, the implementation is torch's uint8 anti-aliased bilinear
interpolation, a vectorised port of that same algorithm (Pillow-SIMD's: two separable
passes in 16-bit fixed point with a uint8 intermediate), 0.27 ms for a 375×375 square
to 256 against Pillow's 0.66 on the same core (BENCHMARKS.md, prepare); elsewhere it is
Pillow. Either resizes the central square alone, so at the square's cut edges the
triangle is renormalised over the square's own pixels; the two differ by rounding only.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
from PIL import Image

__all__ = ["center_square", "center_square_into"]

_VECTORISED = ("AVX2", "AVX512")  # the CPU capabilities torch has its uint8 resize kernel for


@functools.cache
def _resampler():
    """torch where its vectorised kernel runs, else None (Pillow): imported on first use,
    since prepared shards never need it. Without AVX2 (an ARM host, an old x86) torch's
    generic loop is slower than Pillow's (measured 1.8 against 1.2 ms), so Pillow does
    the same filter there, on the same square.

    A process that had not imported torch before (an augmenter, a `prepare` worker, the
    CLI) uses it only here, one image at a time, so it gets one intra-op thread: a second
    one does not make one image's resize faster, it only keeps another core busy
    (measured: the same time an image, twice the CPU). A process that already uses torch
    (the trainer) keeps its own setting."""
    fresh = "torch" not in sys.modules
    import torch

    if torch.backends.cpu.get_cpu_capability() not in _VECTORISED:
        return None
    if fresh:
        torch.set_num_threads(1)
    return torch


def center_square(image: np.ndarray, size: int) -> np.ndarray:
    """Rescale the shorter side of an H×W×3 uint8 image to `size` and cut the central
    size×size patch; an image already size×size is returned as it is."""
    height, width = image.shape[:2]
    if height == size and width == size:
        return image
    return np.ascontiguousarray(_resized_square(image, size))


def center_square_into(image: np.ndarray, out: np.ndarray) -> None:
    """center_square(image, out's side) written into `out` (an augmenter's ring slot)."""
    if image.shape == out.shape:
        np.copyto(out, image)
    else:
        np.copyto(out, _resized_square(image, out.shape[0]))


def _resized_square(image: np.ndarray, size: int) -> np.ndarray:
    """The resized central square, H×W×3 (a view of torch's C×H×W result)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    # Resizing only the central square is the same as resize-then-crop, less work.
    crop = image[top:top + side, left:left + side]
    torch = _resampler()
    if torch is None:
        return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR,
                                                                           reducing_gap=None))
    if not crop.flags.writeable:  # Pillow's decodes (CMYK, PNG) are read-only; torch wants a writable view
        crop = crop.copy()
    # The H×W×3 view goes in as it is: permuted, it is a channels-last tensor.
    square = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0)
    resized = torch.nn.functional.interpolate(square, size=(size, size), mode="bilinear", antialias=True)
    return resized[0].permute(1, 2, 0).numpy()
