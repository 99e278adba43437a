"""Where a full-size image's crop lies in its own pixels, for `--decoder dali`.

The host path (pipeline/resample.py, `center_square`) makes the paper's 256×256 frame
of a W×H image: shorter side S to 256, the central S×S square Q = [L0, L0 + S] ×
[T0, T0 + S], L0 = (W - S) // 2, T0 = (H - S) // 2, resized on its own. It samples
output column j of the frame at the source point L0 + (j + 1/2)·S/256 (coordinates of
pixel edges: pixel i covers [i, i + 1]), with a triangle filter of radius max(S/256, 1)
whose weights it normalises over the taps inside Q. So the frame's columns left ..
left + side - 1 are exactly the resampling of the source interval

    [L0 + left·S/256,  L0 + (left + side)·S/256]

to `side` columns with the same filter; rows likewise. That interval is the ROI given
to DALI's `fn.resize` (which samples at the same points with the same normalised
triangle: `antialias=True` when shrinking, bilinear when enlarging). Only a window
around it is decoded (`fn.decoders.image_slice`): the interval widened on each side by
the filter's reach, so that every tap an output pixel uses is a decoded pixel and the
window's own border never enters the result, except where the window stops at Q's
edges, where the host path stops too.

Training: side 224 at the seeded (top, left) of the 256 frame (plan.train_draws).
Validation: side 256 at (0, 0), the whole frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alexnetd.pipeline.ring import IMAGE

__all__ = ["Windows", "crop_windows", "filter_radius"]


@dataclass
class Windows:
    """Per sample: the window to decode and the ROI to resize within it."""
    anchor: np.ndarray     # (n, 2) int32: the window's x, y in the image ("WH", image_slice's order)
    shape: np.ndarray      # (n, 2) int32: its width, height
    roi_start: np.ndarray  # (n, 2) float32: the ROI's y, x in the window (fn.resize's "HW" order)
    roi_end: np.ndarray    # (n, 2) float32


def filter_radius(shorter) -> np.ndarray:
    """Reach of the resampling filter in source pixels: the triangle widened to the
    scale when shrinking (anti-aliasing), bilinear's one pixel when enlarging."""
    return np.maximum(np.asarray(shorter, np.float64) / IMAGE, 1.0)


def crop_windows(widths, heights, tops, lefts, side: int) -> Windows:
    """The windows of a batch: images of widths × heights, crops of side×side at
    (top, left) of each one's 256 frame."""
    widths, heights = np.asarray(widths, np.int64), np.asarray(heights, np.int64)
    shorter = np.minimum(widths, heights)
    scale = shorter / IMAGE  # float64, as the host's resampler computes it
    qx, qy = (widths - shorter) // 2, (heights - shorter) // 2  # the central square's corner
    x0 = qx + np.asarray(lefts, np.float64) * scale
    y0 = qy + np.asarray(tops, np.float64) * scale
    x1, y1 = x0 + side * scale, y0 + side * scale
    # A tap counts while its centre is within the radius of a sample point, and the
    # first sample point is half a step inside the ROI: the taps reach at most
    # radius + 1/2 pixel past it. ceil(radius) + 1 covers that and the float32 rounding
    # of DALI's own coordinates.
    margin = np.ceil(filter_radius(shorter)).astype(np.int64) + 1
    # The window stays inside the central square: the host resizes the square alone.
    wx0 = np.maximum(np.floor(x0).astype(np.int64) - margin, qx)
    wy0 = np.maximum(np.floor(y0).astype(np.int64) - margin, qy)
    wx1 = np.minimum(np.ceil(x1).astype(np.int64) + margin, qx + shorter)
    wy1 = np.minimum(np.ceil(y1).astype(np.int64) + margin, qy + shorter)
    return Windows(
        anchor=np.stack([wx0, wy0], 1).astype(np.int32),
        shape=np.stack([wx1 - wx0, wy1 - wy0], 1).astype(np.int32),
        # Relative to the window: small numbers, so float32 keeps them to ~1e-4 pixel.
        roi_start=np.stack([y0 - wy0, x0 - wx0], 1).astype(np.float32),
        roi_end=np.stack([y1 - wy0, x1 - wx0], 1).astype(np.float32),
    )
