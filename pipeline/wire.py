"""The one place that turns messages into ZeroMQ frames and back.

Frame layout of every message on every socket:

    frame 0    UTF-8 JSON header: {"v": 1, "kind": <KINDS>, ...fields,
                                   "arrays": [{"dtype": "<i8", "shape": [128]}, ...]}
    frame 1..n one raw C-contiguous buffer per entry of "arrays", sent copy=False

No pickle, ever: a peer can make us allocate at most what its frames already hold, and
cannot make us run anything. A malformed message raises `WireError`; receivers count it
and carry on.

Every socket and the kinds it carries. The ipc:// files are named by `Endpoints`
(pipeline/stage.py): jobs, ready and credits in RUN_DIR, or in RUN_DIR/rank<r>/ with
several ranks; beats.sock always in RUN_DIR, one for all the node's ranks. Headers always
hold "v", "kind" and "arrays" too; n is the batch's sample count once skipped samples are
left out (a job's n counts them all).

jobs      ipc://.../jobs.sock. The loader's PUSH binds; each augmenter's PULL connects,
          and so do the remote gateway's and DALI's thread in the trainer.
  job       loader -> augmenter      {epoch, seq, slot, split, generation}
                                     [jpeg bytes uint8 (back to back), offsets int64 (n+1),
                                      labels int64 (n), sample indices int64 (n)]
            or, the usual form,      {..., shared_bytes: length}: the same without the
                                     bytes frame, which lies in slot k's shared-memory
                                     segment (pipeline/jobbytes.py; take_job restores it)

ready     ipc://.../ready.sock. The copier thread's PULL binds; the augmenters', the
          gateway's, the DALI thread's and the loader's PUSH connect.
  ready     augmenter -> copier      {epoch, seq, slot, split, n, generation,
                                      skipped: [[sample index, reason], ...]}
                                     [labels int64 (n), sample indices int64 (n)], and for
                                     split "train" also [crops int16 (n, 2) top and left,
                                      flips uint8 (n), lighting alphas float32 (n, 3)]
  hello     loader -> copier         {generation}: every second until the sync comes

credits   ipc://.../credits.sock. The loader's PULL binds; the copier thread's PUSH
          connects.
  sync      copier -> loader         {generation, epoch, seq, free: [slot, ...]}: where the
                                     new loader starts, and the slots it may fill
  credit    copier -> loader         {generation, slot}: slot is free again

beats     ipc://RUN_DIR/beats.sock. The supervisor's PULL binds (InputPipeline's own when
          no supervisor runs: bench-input, tests); every stage's PUSH connects and sends
          without blocking (a beat that would block is dropped).
  beat      stage -> supervisor      {stage, index, rank, pid, t, counters: {busy, starved,
                                      blocked, images, batches, malformed, skipped}}, plus:
                                     loader: generation, free_slots, inline_jobs (batches
                                     whose bytes missed shared memory); gateway: remote (its
                                     summary: endpoint, hosts, images, refused, reissued,
                                     local_batches); DALI thread: in_trainer (it beats as
                                     the augmenter stage); copier: nothing more; trainer:
                                     state, step, epoch, seq, steps_per_epoch,
                                     batches_in_epoch, loss, lr, images_per_second, val,
                                     checkpoint, reorder, slots_in_use, skipped, malformed,
                                     memory, max_epochs, max_steps, checkpoint_failures,
                                     checkpoint_error, skipped_recent. No arrays.

control   ipc://RUN_DIR/control.sock (service/control.py). The supervisor's REP binds;
          each `status` or `stop` client's REQ connects.
  request   client -> supervisor     {cmd: "status" | "stop", now: bool (stop only)}
  reply     supervisor -> client     {ok: true, status: {...} (status only)}
                                     or {ok: false, error}

remote    tcp://HOST:PORT+r (--remote-augmenters HOST:PORT, r the rank's place on this
          node), ZeroMQ CURVE. The gateway's ROUTER (pipeline/remote.py) binds, as CURVE
          server, its ZAP handler admitting only the keys in RUN_DIR/remote/clients/
          (pipeline/curvekeys.py); each `alexnetd augment` worker's DEALER
          (pipeline/remoteworker.py) connects. The ROUTER adds the peer's routing frame
          before frame 0.
  beat      worker -> gateway        {prefetch, host, worker, workers}: on connect, then
                                     every second
  beat      gateway -> worker        {} answering each beat, or {revoked: true}
  job       gateway -> worker        the loader's job, header fields and arrays, its bytes
                                     always in the message (the worker has no shared memory)
  pixels    worker -> gateway        {epoch, seq, generation, skipped: [[sample index,
                                      reason], ...]}
                                     [kept positions int64 (k), pixels uint8
                                      (k, 256, 256, 3)]

inproc    inproc://copier-<id>: two PAIR sockets per Copier (pipeline/copier.py), in two
          threads of the trainer process. The trainer thread's end binds, the copier
          thread's connects. Only keys cross it: the batch itself stays in the Copier.
  handed    copier -> trainer        {key: [epoch, seq]}: the batch is ready to take
  released  trainer -> copier        {key: [epoch, seq], event}: the step is done with that
                                     batch; event names the CUDA event recorded after
                                     the step (-1 on the CPU and with DALI). No arrays.

Not framed here: the ZAP handler's inproc REP (RFC 27's own frames) and the gateway's
socket monitor, and what nodes and ranks exchange through torch.distributed (its TCPStore
holds JSON text, service/group.py; model/broadcast.py sends tensors).
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
    "ready",    # augmenter -> copier: batch seq is in slot k (labels, crops, flips, alphas)
    "pixels",   # remote augmenter -> gateway: a job's decoded uint8 images (pipeline/remote.py)
    "hello",    # loader -> copier: a new loader generation asks where to start
    "sync",     # copier -> loader: start at (epoch, seq); these slots are free
    "credit",   # copier -> loader: slot k is free again
    "handed",   # copier thread -> trainer thread (inproc): batch (epoch, seq) is ready to take
    "released", # trainer thread -> copier thread (inproc): the step is done with batch (epoch, seq)
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
