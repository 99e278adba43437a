"""The loader's JPEG bytes through shared memory (pipeline/jobbytes.py), with real
processes, real sockets, real /dev/shm segments and real JPEGs."""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zmq

from alexnetd.pipeline import wire
from alexnetd.pipeline.augment import run_augmenter
from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.decoders import make_decoding
from alexnetd.pipeline.jobbytes import FIELD, JobBytesWriter, segment_path
from alexnetd.pipeline.jpeg import Decoder
from alexnetd.pipeline.launch import InputPipeline, open_ring
from alexnetd.pipeline.ring import SHM_DIR, ring_name
from alexnetd.pipeline.stage import Endpoints, spawn_context, stop_processes
from daemon_helpers import wait_for
from pipeline_helpers import collect

BATCH = 8


def segments(ring: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(f"{ring}-bytes-"))


def loader_beat(pipe, predicate):
    """The first loader beat for which predicate(beat) holds."""
    def beat():
        found = pipe.poll_beats().get(("loader", 0))
        return found if found is not None and predicate(found) else None
    return wait_for(beat, timeout=60, what="the loader's beat", every=0.05)


def batch_bytes(dataset, plan, count) -> list[int]:
    """The JPEG bytes of the loader's first `count` batches, in the order it reads them."""
    splits = {name: dataset.split(name) for name in dataset.splits}
    sizes, position = [], (0, 0)
    for _ in range(count):
        split, indices = plan.samples(*position)
        sizes.append(sum(len(splits[split].read(int(i))) for i in indices))
        position = plan.next_position(*position)
    return sizes


@pytest.mark.parametrize("data", ["prepared_data", "raw_data"])
def test_batches_are_identical_with_shared_or_inline_bytes(data, request, tmp_path):
    """The same batches, bit for bit, whether the bytes ride shared memory or the message
    (bound 0), for prepared shards and for an ImageFolder tree with bad and empty files."""
    data = request.getfixturevalue(data)
    runs, beats = {}, {}
    for limit in (None, 0):
        with InputPipeline(data, tmp_path / f"run{limit}", batch=4, augmenters=2, seed=3,
                           job_bytes_limit=limit) as pipe:
            count = 2 * pipe.plan.batches_in_epoch(0)
            runs[limit] = collect(pipe, count)
            beats[limit] = loader_beat(pipe, lambda b: b["counters"]["batches"] >= count
                                       and b["inline_jobs"] in (0, b["counters"]["batches"]))
            beats[limit]["segments"] = segments(pipe.ring.name)
    assert runs[None] == runs[0]
    assert {split for _, _, split, _, _ in runs[0]} == {"train", "val"}
    assert beats[None]["inline_jobs"] == 0 and beats[None]["segments"]  # all through shared memory
    assert beats[0]["inline_jobs"] == beats[0]["counters"]["batches"] and not beats[0]["segments"]


def test_batches_over_the_bound_go_inline_counted_and_unchanged(raw_data, tmp_path):
    """A bound between the batches' sizes: those over it ride the message, each counted,
    the others shared memory, and the run's batches are those of an all-inline run."""
    dataset = open_dataset(raw_data)
    with InputPipeline(raw_data, tmp_path / "inline", batch=4, augmenters=1, seed=1, val_every=0,
                       job_bytes_limit=0) as pipe:
        count = pipe.plan.batches_in_epoch(0)
        inline = collect(pipe, count)
        sizes = batch_bytes(dataset, pipe.plan, 2 * count + pipe.slots)
    limit = int(np.median(sizes[:count]))
    assert any(s > limit for s in sizes[:count]) and any(s <= limit for s in sizes[:count])
    with InputPipeline(raw_data, tmp_path / "bounded", batch=4, augmenters=1, seed=1, val_every=0,
                       job_bytes_limit=limit) as pipe:
        assert collect(pipe, count) == inline
        # Each batch read so far, counted once if it was over the bound.
        beat = loader_beat(pipe, lambda b: b["counters"]["batches"] >= count and
                           b["inline_jobs"] == sum(s > limit for s in sizes[:b["counters"]["batches"]]))
        assert 0 < beat["inline_jobs"] < beat["counters"]["batches"]
        assert segments(pipe.ring.name)


ALLOCATION_FAILS = textwrap.dedent("""
    import hashlib, json, resource, sys
    from alexnetd.pipeline.launch import InputPipeline

    pipe = InputPipeline(sys.argv[1], sys.argv[2], batch=8, augmenters=1, val_every=0)
    # The ring is made; from here no file of this process or of the stages it spawns can
    # grow: every byte segment's posix_fallocate fails (EFBIG), as a full /dev/shm would.
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    with pipe:
        batches = []
        for _ in range(4):
            batch = pipe.copier.next_batch(timeout_ms=60_000)
            batches.append([batch.labels.tolist(), hashlib.sha1(batch.images.numpy().tobytes()).hexdigest()])
            pipe.copier.release(batch)
        while True:
            pipe.wait_beat(1000)
            beat = pipe.poll_beats().get(("loader", 0))
            if beat and beat["counters"]["batches"] >= 4 and beat["inline_jobs"] == beat["counters"]["batches"]:
                break
    print(json.dumps({"batches": batches, "inline": beat["inline_jobs"]}))
""")


def test_a_segment_that_cannot_grow_sends_the_bytes_inline_logged_once(prepared_data, tmp_path):
    run = subprocess.run([sys.executable, "-c", ALLOCATION_FAILS, str(prepared_data), str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    with InputPipeline(prepared_data, tmp_path / "free", batch=8, augmenters=1, val_every=0) as pipe:
        expected = [[list(labels), digest] for *_, labels, digest in collect(pipe, 4)]
    assert result["batches"] == expected
    assert result["inline"] >= 4
    assert run.stderr.count("ride the job message") == 1


def test_a_crashed_runs_segments_are_replaced_at_start_and_removed_at_stop(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    ring = ring_name(run_dir)
    stale = segment_path(ring, 0)
    stale.write_bytes(b"left by a run that was killed")
    beyond = segment_path(ring, 40)  # of a run with more slots: nothing would ever reuse it
    beyond.write_bytes(b"also left behind")
    with InputPipeline(prepared_data, run_dir, batch=BATCH, augmenters=1, val_every=0) as pipe:
        assert not beyond.exists()
        assert len(collect(pipe, 2)) == 2
        assert stale.read_bytes()[:2] == b"\xff\xd8"  # a JPEG's start: the loader's own segment
        assert stale.stat().st_size % os.sysconf("SC_PAGE_SIZE") == 0
    assert segments(ring) == []


# -- one real augmenter process, the test playing the loader -----------------------------

class Loader:
    """Binds what the loader and the copier bind, writes with the loader's own writer, and
    runs one real augmenter process against them."""

    def __init__(self, data, run_dir, slots: int = 2):
        run_dir.mkdir(mode=0o700)
        self.split = open_dataset(data).split("train")
        self.ends = Endpoints.in_dir(run_dir).as_dict()
        self.slots = slots
        self.ring = open_ring(ring_name(run_dir), slots, BATCH, make_decoding("cpu", 1), create=True)
        self.writer = JobBytesWriter(self.ring.name)
        ctx = zmq.Context.instance()
        self.jobs, self.ready, self.beats = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL), ctx.socket(zmq.PULL)
        for sock, name in ((self.jobs, "jobs"), (self.ready, "ready"), (self.beats, "beats")):
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(self.ends[name])
        cfg = dict(endpoints=self.ends, ring=self.ring.name, slots=slots, batch=BATCH, seed=0, index=0, rank=0)
        self.proc = spawn_context.Process(target=run_augmenter, args=(cfg,), daemon=True)
        self.proc.start()
        self.malformed = 0  # as the augmenter's last beat said

    def job(self, seq: int, slot: int, indices) -> int:
        """Send a well-formed job as the loader would; its byte count."""
        chunks = [self.split.read(int(i)) for i in indices]
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
        indices = np.asarray(indices, np.int64)
        arrays, descriptor = self.writer.job(slot, chunks, offsets, self.split.labels[indices], indices)
        assert FIELD in descriptor  # through shared memory
        self.raw(arrays, seq=seq, slot=slot, **descriptor)
        return int(offsets[-1])

    def raw(self, arrays, **fields) -> None:
        wire.send(self.jobs, "job", arrays, **{"epoch": 0, "split": "train", "generation": 0, **fields})

    def take_ready(self) -> wire.Message:
        assert self.ready.poll(60_000), "no 'ready' from the augmenter"
        return wire.recv(self.ready)

    def wait_malformed(self, count: int) -> None:
        """Until the augmenter's beats say it has counted `count` malformed messages."""
        def counted():
            for msg in wire.drain(self.beats):
                self.malformed = msg["counters"]["malformed"]
            return self.malformed == count
        wait_for(counted, timeout=60, what=f"{count} malformed jobs counted", every=0.05)

    def close(self) -> None:
        stop_processes([self.proc], deadline=time.monotonic() + 5)
        for sock in (self.jobs, self.ready, self.beats):
            sock.close(linger=0)
        self.writer.close()
        self.ring.close()
        self.ring.unlink()


@pytest.fixture
def loader(prepared_data, tmp_path):
    fake = Loader(prepared_data, tmp_path / "run")
    yield fake
    fake.close()
    assert segments(fake.ring.name) == []  # unlinking the ring takes its segments too


def _decoded_right(loader, ready: wire.Message, indices) -> None:
    decoder = Decoder(fast=True)
    assert ready["n"] == len(indices)
    images = loader.ring.view(ready["slot"], ready["n"])
    for j, index in enumerate(indices):
        assert np.array_equal(images[j], decoder.decode_rgb(loader.split.read(index))), index


def test_a_bigger_batch_grows_the_segment_and_the_augmenter_maps_it_again(loader):
    loader.job(0, 0, [0])
    _decoded_right(loader, loader.take_ready(), [0])
    first = segment_path(loader.ring.name, 0).stat().st_size
    # Past what the augmenter mapped for the first job: it has to map the file again.
    indices = list(range(1, BATCH + 1))
    assert loader.job(1, 0, indices) > first
    ready = loader.take_ready()
    assert segment_path(loader.ring.name, 0).stat().st_size > first
    assert (ready["seq"], ready["slot"]) == (1, 0)
    _decoded_right(loader, ready, indices)


def test_a_malformed_descriptor_is_counted_and_dropped_and_the_augmenter_carries_on(loader):
    loader.job(0, 0, [0, 1])
    loader.take_ready()
    size = segment_path(loader.ring.name, 0).stat().st_size
    labels = indices = np.zeros(1, np.int64)

    def ends_at(n):
        return np.array([0, n], np.int64)

    bad = [
        dict(slot=loader.slots, **{FIELD: 10}),              # slot out of range
        dict(slot=-1, **{FIELD: 10}),
        dict(slot=1, **{FIELD: 10}),                         # a slot the loader never wrote
        dict(slot=0, **{FIELD: size + 4096}),                # past the end of its segment
        dict(slot=0, **{FIELD: "ten"}),
        dict(slot=0, **{FIELD: -1}),
    ]
    for seq, fields in enumerate(bad, start=1):
        length = fields[FIELD] if isinstance(fields[FIELD], int) and fields[FIELD] >= 0 else 10
        loader.raw([ends_at(length), labels, indices], seq=seq, **fields)
    loader.raw([ends_at(20), labels, indices], seq=90, slot=0, **{FIELD: 10})  # offsets disagree
    loader.raw([labels, indices], seq=91, slot=0, **{FIELD: 10})              # an array short
    loader.job(100, 0, [2, 3])
    ready = loader.take_ready()
    assert ready["seq"] == 100  # every bad one dropped, the good one decoded
    _decoded_right(loader, ready, [2, 3])
    loader.wait_malformed(len(bad) + 2)
    assert loader.proc.is_alive()
