"""Decoding one image into RGB uint8, and the reasons an image gets skipped.

Everything that turns stored bytes into pixels goes through `Decoder`: the augmenters
(every batch), `prepare` (ImageFolder → shards) and evaluation. libjpeg-turbo does the
work; Pillow is only the fallback for what TurboJPEG cannot convert (CMYK/YCCK JPEGs)
and for files that are not JPEGs at all but carry a .JPEG name (ImageNet has a PNG and
some CMYK files among its "JPEGs").

A file that cannot become an RGB image raises `SkipSample` with one of `REASONS`; the
caller counts it and carries on. Nothing here ever kills a stage.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image
from turbojpeg import TJCS_CMYK, TJCS_YCCK, TJFLAG_FASTDCT, TJFLAG_FASTUPSAMPLE, TJPF_RGB, TurboJPEG

from alexnetd.pipeline.resample import center_square, center_square_into
from alexnetd.pipeline.turbo import Decompressor, TurboError

__all__ = ["Decoder", "SkipSample", "REASONS", "DEFAULT_MAX_PIXELS", "TURBOJPEG_LIB_ENV", "open_turbojpeg"]

REASONS = ("truncated", "undecodable", "too_large", "unsupported")

# A header that claims more than this many pixels is refused before any decoding:
# ImageNet's largest image is about 28 Mpx, a decompression bomb claims gigapixels.
DEFAULT_MAX_PIXELS = 64_000_000

# libjpeg-turbo reports a truncated or slightly corrupt stream as a *warning* and hands
# back a partly grey image; PyTurboJPEG turns that into warnings.warn(). Raising it as
# an exception lets us skip the image instead of training on its grey half. The filter
# is checked before each call (`_damage_raises`), not only set once at import: anything
# that resets the warning filters (pytest does, around every test) would otherwise let
# the truncated image pass as a good one. The check costs ~0.1 µs when in place.

_JPEG_MAGIC = b"\xff\xd8"


class SkipSample(Exception):
    """An image that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# The TurboJPEG library to load, where the system's loader would not find it (a host
# without libturbojpeg installed: bench/gpu.py --wheels points here at the copy it ships).
TURBOJPEG_LIB_ENV = "ALEXNETD_TURBOJPEG_LIB"


def open_turbojpeg() -> TurboJPEG:
    """The one place a TurboJPEG handle is made: the library from $ALEXNETD_TURBOJPEG_LIB,
    else wherever PyTurboJPEG finds it."""
    return TurboJPEG(lib_path=os.environ.get(TURBOJPEG_LIB_ENV) or None)


class Decoder:
    """One per process: holds the TurboJPEG handle (its library load is not free).

    `fast=True` uses libjpeg-turbo's fast integer IDCT and fast upsampling, a few per
    cent faster at a small accuracy cost; training input uses it, `prepare` does not.
    """

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, fast: bool = False):
        self.turbo = open_turbojpeg()
        self.max_pixels = max_pixels
        self.flags = (TJFLAG_FASTDCT | TJFLAG_FASTUPSAMPLE) if fast else 0
        # (num, denom) pairs, largest scale first: 1/1, 7/8, ... 1/8.
        # Down-scaling only: an image smaller than wanted is decoded whole and resized.
        self.scales = sorted((f for f in self.turbo.scaling_factors if f[0] <= f[1]),
                             key=lambda f: f[0] / f[1], reverse=True)
        self._scratch = np.empty(0, np.uint8)  # decode_into's buffer for images to resize
        self._direct = Decompressor(os.environ.get(TURBOJPEG_LIB_ENV) or None)  # decode_into's hot path

    # -- the entry points ----------------------------------------------------------

    def decode_rgb(self, data, min_side: int | None = None) -> np.ndarray:
        """Decode to a fresh H×W×3 uint8 RGB array.

        With `min_side`, decode at the smallest DCT scale (1/2, 1/4, 1/8 ...) whose
        shorter side is still >= min_side: a 2000×1500 photo wanted at 256 decodes
        at 1/4 scale, about 10× less IDCT work than decoding it whole.
        """
        return self._decode(data, min_side, None)

    def decode_square(self, data: bytes, size: int = 256) -> np.ndarray:
        """The paper's §2 down-sampling: shorter side to `size`, then the central
        size×size patch. Images already size×size (prepared shards) pass straight through."""
        image = self.decode_rgb(data, min_side=size)
        return center_square(image, size)

    def decode_into(self, data, out: np.ndarray) -> None:
        """Decode one image into `out`, a C-contiguous (size, size, 3) uint8 view (the
        augmenters' place in a ring slot), as `decode_square` would produce it.

        An image whose (DCT-scaled) size is already size×size, i.e. every image of a
        prepared dataset, is decoded by libjpeg-turbo straight into `out`: no array is
        allocated and no byte is copied. Any other image is DCT-scaled while decoding
        into a reused scratch buffer, then resized once into `out` (resample.py)."""
        size = out.shape[0]
        if len(data) >= 2 and bytes(data[:2]) == _JPEG_MAGIC:
            array = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
            width, height, colorspace = self._direct_header(array)
            if colorspace not in (TJCS_CMYK, TJCS_YCCK):
                scale, scaled = self.scaled_size(width, height, size)
                if scale is None and scaled == (size, size) and out.flags.c_contiguous:
                    self._direct_decode(array, out)  # the prepared-shard case: every training image
                    return
                if scaled == (size, size):
                    self._decode(data, size, out, scale)
                    return
                area = scaled[0] * scaled[1] * 3
                if self._scratch.size < area:
                    self._scratch = np.empty(area, np.uint8)
                image = self._decode(data, size, self._scratch[:area].reshape(*scaled, 3), scale)
                center_square_into(image, out)
                return
        center_square_into(self._decode(data, size, None), out)  # empty, non-JPEG or CMYK: fails or Pillow

    # -- helpers -------------------------------------------------------------------

    def _decode(self, data, min_side: int | None, dst: np.ndarray | None, scale="pick") -> np.ndarray:
        """Decode to RGB, into `dst` when it has exactly the decoded shape (PyTurboJPEG
        allocates a fresh array otherwise). `scale` is the DCT scale if the caller
        already chose it from the header."""
        if len(data) == 0:
            raise SkipSample("truncated", "empty file")
        if bytes(data[:2]) != _JPEG_MAGIC:  # data: bytes or a uint8 array view
            return self._decode_other(data, min_side)
        if scale == "pick":
            width, height, colorspace = self._header(data)
            if colorspace in (TJCS_CMYK, TJCS_YCCK):
                # TurboJPEG cannot convert CMYK to RGB; Pillow can (rare on ImageNet: 22 files).
                return self._decode_other(data, min_side)
            scale = self._scale_for(width, height, min_side)
        try:
            _damage_raises()
            return self.turbo.decode(data, pixel_format=TJPF_RGB, scaling_factor=scale, flags=self.flags, dst=dst)
        except UserWarning as exc:
            raise SkipSample("truncated", str(exc)) from None
        except OSError as exc:
            raise SkipSample("undecodable", str(exc)) from None

    def _direct_header(self, array: np.ndarray) -> tuple[int, int, int]:
        """_header through the persistent handle (pipeline/turbo.py)."""
        try:
            width, height, _subsample, colorspace = self._direct.header(array)
        except TurboError as exc:
            raise SkipSample("undecodable", f"bad JPEG header: {exc}") from None
        if width * height > self.max_pixels:
            raise SkipSample("too_large", f"{width}x{height} is over the {self.max_pixels} pixel budget")
        return width, height, colorspace

    def _direct_decode(self, array: np.ndarray, out: np.ndarray) -> None:
        try:
            self._direct.decompress(array, out, TJPF_RGB, self.flags)
        except TurboError as exc:
            # A warning is a truncated or damaged stream, decoded partly grey: skipped, as
            # PyTurboJPEG's UserWarning is in _decode.
            raise SkipSample("truncated" if exc.warning else "undecodable", str(exc)) from None

    def _header(self, data: bytes) -> tuple[int, int, int]:
        try:
            _damage_raises()
            width, height, _subsample, colorspace = self.turbo.decode_header(data)
        except (OSError, UserWarning) as exc:
            raise SkipSample("undecodable", f"bad JPEG header: {exc}") from None
        if width * height > self.max_pixels:
            raise SkipSample("too_large", f"{width}x{height} is over the {self.max_pixels} pixel budget")
        return width, height, colorspace

    def scaled_size(self, width: int, height: int, min_side: int) -> tuple:
        """(DCT scale, (height, width) that libjpeg-turbo decodes to at that scale)."""
        scale = self._scale_for(width, height, min_side)
        num, denom = scale or (1, 1)
        # TurboJPEG's TJSCALED(): ceil(dimension * num / denom).
        return scale, ((height * num + denom - 1) // denom, (width * num + denom - 1) // denom)

    def _scale_for(self, width: int, height: int, min_side: int | None):
        if not min_side:
            return None
        chosen = None
        for num, denom in self.scales:  # largest first; keep the last that is big enough
            if (min(width, height) * num + denom - 1) // denom >= min_side:
                chosen = (num, denom)
        return None if chosen in (None, (1, 1)) else chosen

    def _decode_other(self, data, min_side: int | None) -> np.ndarray:
        """Pillow for CMYK JPEGs and for non-JPEG files named .JPEG (PNG, GIF...)."""
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > self.max_pixels:
                    raise SkipSample("too_large", f"{im.width}x{im.height} is over the pixel budget")
                if min_side and im.format == "JPEG":
                    im.draft("RGB", (min_side, min_side))  # Pillow's own DCT scaling
                im.load()
                if im.mode not in ("RGB", "L", "CMYK", "P", "RGBA", "LA", "I;16", "I", "F", "YCbCr"):
                    raise SkipSample("unsupported", f"image mode {im.mode}")
                return np.asarray(im.convert("RGB"))
        except SkipSample:
            raise
        except Image.DecompressionBombError as exc:
            raise SkipSample("too_large", str(exc)) from None
        except (OSError, SyntaxError, ValueError) as exc:
            # Pillow says "truncated" itself when the stream ends early.
            reason = "truncated" if "truncated" in str(exc).lower() else "undecodable"
            raise SkipSample(reason, str(exc)) from None


_FILTER = None


def _damage_raises() -> None:
    """Make PyTurboJPEG's UserWarning raise: put our filter back in front if something
    replaced or reordered the process's warning filters since the last call."""
    global _FILTER
    filters = warnings.filters
    if not filters or filters[0] is not _FILTER:
        warnings.filterwarnings("error", category=UserWarning, module="turbojpeg")
        _FILTER = warnings.filters[0]
