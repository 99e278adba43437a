"""The one place that turns messages into ZeroMQ frames and back.

Frame layout of every message on every socket:

    frame 0    UTF-8 JSON header: {"v": 1, "kind": <KINDS>, ...fields,
                                   "arrays": [{"dtype": "<i8", "shape": [128]}, ...]}
    frame 1..n one raw C-contiguous buffer per entry of "arrays", sent copy=False

No pickle, ever: a peer can make us allocate at most what its frames already hold, and
cannot make us run anything. A malformed message raises `WireError`; receivers count it
and carry on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import zmq

__all__ = ["VERSION", "KINDS", "WireError", "Message", "encode", "decode", "send", "recv", "drain"]

VERSION = 1

# The closed set of message kinds, and which stage sends each.
KINDS = frozenset({
    "job",      # loader -> augmenter: raw JPEG bytes of one batch, to decode into slot k
    "ready",    # augmenter -> feed: batch seq is in slot k (labels, crops, flips, alphas)
    "pixels",   # remote augmenter -> gateway: a job's decoded uint8 images (pipeline/remote.py)
    "hello",    # loader -> feed: a new loader generation asks where to start
    "sync",     # feed -> loader: start at (epoch, seq); these slots are free
    "credit",   # feed -> loader: slot k is free again
    "beat",     # any stage -> supervisor: heartbeat with the stage's counters
    "request",  # client -> supervisor control socket
    "reply",    # supervisor -> client
})

# Headers are small; anything bigger is a bug or an attack.
MAX_HEADER_BYTES = 1 << 20
_ALLOWED_DTYPES = frozenset({"|u1", "|i1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f4", "<f8", "|b1"})


class WireError(ValueError):
    """A message that does not follow the frame layout above."""


@dataclass
class Message:
    kind: str
    header: dict
    arrays: list = field(default_factory=list)

    def __getitem__(self, key):
        return self.header[key]

    def get(self, key, default=None):
        return self.header.get(key, default)


def encode(kind: str, arrays=(), **fields) -> list:
    """Build the frames of one message. Arrays are sent without copying."""
    if kind not in KINDS:
        raise WireError(f"unknown kind {kind!r}")
    specs, buffers = [], []
    for array in arrays:
        array = np.ascontiguousarray(array)
        specs.append({"dtype": array.dtype.str, "shape": list(array.shape)})
        buffers.append(array)
    header = {"v": VERSION, "kind": kind, **fields, "arrays": specs}
    return [json.dumps(header, separators=(",", ":")).encode()] + buffers


def decode(frames) -> Message:
    """Parse frames (bytes, memoryview or zmq.Frame) into a Message; WireError if malformed.

    Arrays come back as read-only numpy views of the received frames: no copy."""
    if not frames:
        raise WireError("empty message")
    raw = frames[0].bytes if isinstance(frames[0], zmq.Frame) else bytes(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(raw)} bytes is over {MAX_HEADER_BYTES}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    if header.get("v") != VERSION:
        raise WireError(f"unsupported wire version {header.get('v')!r}")
    kind = header.get("kind")
    if kind not in KINDS:
        raise WireError(f"unknown kind {kind!r}")
    specs = header.pop("arrays", [])
    if not isinstance(specs, list) or len(frames) != 1 + len(specs):
        raise WireError(f"header announces {len(specs) if isinstance(specs, list) else '?'} arrays, "
                        f"message has {len(frames) - 1}")
    arrays = [_array(spec, frame) for spec, frame in zip(specs, frames[1:])]
    return Message(kind, header, arrays)


def send(sock: zmq.Socket, kind: str, arrays=(), flags: int = 0, **fields) -> None:
    sock.send_multipart(encode(kind, arrays, **fields), flags=flags, copy=False)


def recv(sock: zmq.Socket, flags: int = 0) -> Message:
    return decode(sock.recv_multipart(flags=flags, copy=False))


def drain(sock: zmq.Socket, on_malformed=None):
    """Every message already waiting on sock, without blocking. A malformed one is
    passed to on_malformed (to be counted) and skipped: the receiver carries on."""
    while True:
        try:
            yield recv(sock, zmq.NOBLOCK)
        except zmq.Again:
            return
        except WireError as exc:
            if on_malformed is not None:
                on_malformed(exc)


def _bytes(frame) -> memoryview:
    """A flat byte view of a frame: zmq.Frame, bytes, or an array (in-process round trips)."""
    return frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame).cast("B")


def _array(spec, frame) -> np.ndarray:
    try:
        dtype = np.dtype(spec["dtype"])
        shape = tuple(int(d) for d in spec["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"bad array spec {spec!r}: {exc}") from None
    if dtype.str not in _ALLOWED_DTYPES or any(d < 0 for d in shape):
        raise WireError(f"bad array spec {spec!r}")
    buffer = _bytes(frame)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buffer) != expected:
        raise WireError(f"array {spec!r} needs {expected} bytes, frame has {len(buffer)}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)
