import itertools
import json

import numpy as np
import pytest
import zmq

from alexnetd.pipeline import wire
from daemon_helpers import wait_for


_endpoints = itertools.count()


@pytest.fixture
def pair():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    endpoint = f"inproc://wire-test-{next(_endpoints)}"
    a.bind(endpoint)
    b.connect(endpoint)
    yield a, b
    a.close(linger=0)
    b.close(linger=0)


def test_round_trip_keeps_fields_and_arrays(pair):
    a, b = pair
    blob = np.arange(1000, dtype=np.uint8)
    offsets = np.array([0, 10, 1000], np.int64)
    alphas = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    wire.send(a, "job", [blob, offsets, alphas], seq=7, epoch=2, slot=3, split="train")
    msg = wire.recv(b)
    assert msg.kind == "job"
    assert (msg["seq"], msg["epoch"], msg["slot"], msg["split"]) == (7, 2, 3, "train")
    assert [x.dtype for x in msg.arrays] == [np.uint8, np.int64, np.float32]
    np.testing.assert_array_equal(msg.arrays[0], blob)
    np.testing.assert_array_equal(msg.arrays[1], offsets)
    np.testing.assert_array_equal(msg.arrays[2], alphas)


def test_round_trip_without_arrays(pair):
    a, b = pair
    wire.send(a, "credit", slot=5, generation=1)
    msg = wire.recv(b)
    assert msg.kind == "credit" and msg["slot"] == 5 and msg.arrays == []


def test_header_is_json_not_pickle():
    frames = wire.encode("credit", slot=1)
    header = json.loads(frames[0])
    assert header == {"v": 1, "kind": "credit", "slot": 1, "arrays": []}


def test_encode_rejects_unknown_kind():
    with pytest.raises(wire.WireError):
        wire.encode("exec", slot=1)


def _header(**over):
    header = {"v": 1, "kind": "credit", "arrays": []}
    header.update(over)
    return json.dumps(header).encode()


@pytest.mark.parametrize("frames, words", [
    ([], "empty"),
    ([b"\x80not json"], "not JSON"),
    ([b"[1, 2]"], "not a JSON object"),
    ([_header(v=2)], "version"),
    ([_header(kind="shell")], "unknown kind"),
    ([_header(arrays=[{"dtype": "|u1", "shape": [4]}])], "announces 1 arrays"),
    ([_header(), b"extra"], "announces 0 arrays"),
    ([_header(arrays=[{"dtype": "|u1", "shape": [4]}]), b"abc"], "needs 4 bytes"),
    ([_header(arrays=[{"dtype": "|O", "shape": [1]}]), b"x" * 8], "bad array spec"),
    ([_header(arrays=[{"dtype": "|u1", "shape": [-1]}]), b""], "bad array spec"),
    ([_header(arrays=[{"shape": [1]}]), b"x"], "bad array spec"),
    ([b"{" + b" " * (wire.MAX_HEADER_BYTES + 1) + b"}"], "over"),
])
def test_decode_rejects_malformed(frames, words):
    with pytest.raises(wire.WireError, match=words):
        wire.decode(frames)


def test_arrays_are_views_not_copies(pair):
    a, b = pair
    wire.send(a, "job", [np.zeros(1 << 20, np.uint8)])
    frames = b.recv_multipart(copy=False)
    msg = wire.decode(frames)
    assert not msg.arrays[0].flags.owndata


def test_drain_yields_what_waits_and_counts_malformed(pair):
    a, b = pair
    wire.send(a, "credit", slot=1)
    a.send_multipart([b"garbage"])
    wire.send(a, "credit", slot=2)
    # Drained as the frames arrive (each drain takes what has come and returns at once),
    # until all three have come through.
    slots, errors = [], []

    def all_three() -> bool:
        slots.extend(m["slot"] for m in wire.drain(b, errors.append))
        return len(slots) + len(errors) >= 3

    wait_for(all_three, timeout=10, what="the three messages", every=0.01)
    assert slots == [1, 2]
    assert len(errors) == 1 and isinstance(errors[0], wire.WireError)
    assert list(wire.drain(b)) == []  # nothing left, and no blocking
