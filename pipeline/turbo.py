"""The augmenters' hot path: libjpeg-turbo's TurboJPEG API through one persistent handle.

PyTurboJPEG (used everywhere else, pipeline/jpeg.py) creates and destroys a decompressor,
parses the header twice and builds several ctypes addresses on every `decode()`; profiled
with py-spy in `alexnetd bench-input` on 256x256 shards, that bookkeeping plus our own
header check was ~15 % of an augmenter's time next to the IDCT itself. So for the one
call made per training image, the same library is called directly: one decompressor
per process, one header read, one decompress straight into the caller's buffer.
Everything else about decoding stays in PyTurboJPEG.

Errors follow PyTurboJPEG (and a failure replaces the handle, see _raise): libjpeg-turbo reports a damaged or truncated stream as a
warning (return -1, error code TJERR_WARNING) and a hopeless one as a fatal error.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

__all__ = ["Decompressor", "TurboError"]

TJERR_WARNING = 0
_INT_P = ctypes.POINTER(ctypes.c_int)


class TurboError(Exception):
    """A TurboJPEG call failed; `warning` is True when libjpeg-turbo only warned
    (a truncated or slightly corrupt stream, decoded partly grey)."""

    def __init__(self, message: str, warning: bool):
        super().__init__(message)
        self.warning = warning


class Decompressor:
    def __init__(self, lib_path: str | None = None):
        path = lib_path or ctypes.util.find_library("turbojpeg") or "libturbojpeg.so.0"
        lib = ctypes.CDLL(path)
        lib.tjInitDecompress.restype = ctypes.c_void_p
        lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong,
                                            _INT_P, _INT_P, _INT_P, _INT_P]
        lib.tjDecompress2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                                      ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.tjGetErrorStr2.argtypes = [ctypes.c_void_p]
        lib.tjGetErrorStr2.restype = ctypes.c_char_p
        lib.tjGetErrorCode.argtypes = [ctypes.c_void_p]
        lib.tjDestroy.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._handle = self._new_handle()
        self._fields = [ctypes.c_int() for _ in range(4)]
        self._refs = [ctypes.byref(f) for f in self._fields]

    def header(self, data: np.ndarray) -> tuple[int, int, int, int]:
        """(width, height, subsampling, colorspace) of a JPEG held in a uint8 array."""
        if self._lib.tjDecompressHeader3(self._handle, data.ctypes.data, data.size, *self._refs) != 0:
            self._raise()
        return tuple(f.value for f in self._fields)

    def decompress(self, data: np.ndarray, out: np.ndarray, pixel_format: int, flags: int) -> None:
        """Decode into `out`, a C-contiguous (height, width, channels) uint8 array of the
        image's size (the caller read the header)."""
        height, width = out.shape[:2]
        if self._lib.tjDecompress2(self._handle, data.ctypes.data, data.size, out.ctypes.data, width, 0, height,
                                   pixel_format, flags) != 0:
            self._raise()

    def _new_handle(self) -> ctypes.c_void_p:
        handle = ctypes.c_void_p(self._lib.tjInitDecompress())
        if not handle:
            raise OSError("tjInitDecompress failed")
        return handle

    def _raise(self):
        message = self._lib.tjGetErrorStr2(self._handle).decode(errors="replace")
        warning = self._lib.tjGetErrorCode(self._handle) == TJERR_WARNING
        # libjpeg-turbo 2.1 leaves a decompressor whose header read failed unusable: every
        # later header read repeats the old error. A fresh handle per failure (rare) is
        # the safe way back; tests/test_jpeg.py decodes a good image after each bad one.
        self._lib.tjDestroy(self._handle)
        self._handle = self._new_handle()
        raise TurboError(message, warning)
