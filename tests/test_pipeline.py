"""The four-stage input pipeline with real processes, real sockets and real JPEGs."""


import numpy as np
import pytest
import torch
import zmq

from alexnetd.pipeline import wire
from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.inputbench import bench_input
from alexnetd.pipeline.launch import InputPipeline
from alexnetd.pipeline.plan import BatchPlan, train_draws
from alexnetd.pipeline.stage import STAGES
from daemon_helpers import wait_for
from pipeline_helpers import collect

BATCH = 8


def test_batches_are_identical_with_one_or_three_augmenters(prepared_data, tmp_path):
    plan_len = BatchPlan(64, 16, BATCH).batches_in_epoch(0)
    runs = []
    for augmenters in (1, 3):
        with InputPipeline(prepared_data, tmp_path / f"run{augmenters}", batch=BATCH,
                           augmenters=augmenters, seed=7) as pipe:
            runs.append(collect(pipe, 2 * plan_len))
    assert runs[0] == runs[1]
    keys = [(e, s) for e, s, *_ in runs[0]]
    assert keys == [(e, s) for e in range(2) for s in range(plan_len)]  # strict seq order
    assert {split for _, _, split, _, _ in runs[0]} == {"train", "val"}


def test_each_epoch_has_its_own_order(prepared_data):
    plan = BatchPlan(64, 16, BATCH, seed=3)
    first = np.concatenate([plan.samples(0, s)[1] for s in range(plan.train_batches)])
    second = np.concatenate([plan.samples(1, s)[1] for s in range(plan.train_batches)])
    assert sorted(first) == sorted(second) == list(range(64))  # a permutation each epoch
    assert not np.array_equal(first, second)
    assert np.array_equal(first, np.concatenate([BatchPlan(64, 16, BATCH, seed=3).samples(0, s)[1]
                                                 for s in range(plan.train_batches)]))


def test_rank_sharding_splits_batches_between_ranks():
    ranks = [BatchPlan(64, 0, BATCH, seed=1, rank=r, world=2) for r in range(2)]
    taken = [np.concatenate([p.samples(0, s)[1] for s in range(p.train_batches)]) for p in ranks]
    assert len(set(taken[0]) & set(taken[1])) == 0
    assert sorted(np.concatenate(taken)) == list(range(64))


def test_draws_depend_on_sample_not_on_batch():
    together = train_draws(5, 2, np.array([10, 11, 12, 13]))
    alone = train_draws(5, 2, np.array([12]))
    assert np.array_equal(together.crops[2], alone.crops[0])
    assert together.flips[2] == alone.flips[0]
    assert np.array_equal(together.alphas[2], alone.alphas[0])
    other_epoch = train_draws(5, 3, np.array([12]))
    assert not np.array_equal(other_epoch.alphas, alone.alphas)


def test_draw_statistics_match_the_paper():
    draws = train_draws(0, 0, np.arange(20_000))
    assert draws.crops.min() == 0 and draws.crops.max() == 32
    assert abs(draws.flips.mean() - 0.5) < 0.02
    assert abs(draws.alphas.std() - 0.1) < 0.005  # alpha ~ N(0, 0.1), §4.1
    assert abs(draws.alphas.mean()) < 0.005


def test_ring_holds_whole_images_and_the_device_input_matches_numpy(prepared_data, tmp_path):
    """The augmenters write each whole decoded image; the trainer's input equals a direct
    numpy computation of crop -> mirror -> mean -> lighting for the same draws."""
    from alexnetd.pipeline.jpeg import Decoder
    from alexnetd.pipeline.transform import InputTransform

    dataset = open_dataset(prepared_data)
    split = dataset.split("train")
    mean, eigvals, eigvecs = dataset.stats()
    decoder = Decoder(fast=True)
    seed = 11
    with InputPipeline(prepared_data, tmp_path / "run", batch=BATCH, augmenters=2, seed=seed, val_every=0) as pipe:
        batch = pipe.copier.next_batch(timeout_ms=60_000)
        images = batch.images.numpy().copy()
        x = InputTransform(mean, eigvals, eigvecs).train(batch.images, batch.crops, batch.flips, batch.alphas)
        x = x.numpy().transpose(0, 2, 3, 1)
        pipe.copier.release(batch)
    assert images.shape == (BATCH, 256, 256, 3)
    draws = train_draws(seed, batch.epoch, batch.indices)
    assert np.array_equal(batch.crops, draws.crops) and np.array_equal(batch.flips, draws.flips)
    assert np.array_equal(batch.alphas, draws.alphas)
    shifts = 255.0 * (draws.alphas.astype(np.float64) * eigvals / 255.0 ** 2) @ eigvecs.T
    for j, index in enumerate(batch.indices):
        image = decoder.decode_rgb(split.read(int(index)))
        assert np.array_equal(images[j], image)
        assert batch.labels[j] == split.labels[index]
        top, left = draws.crops[j]
        patch = image[top:top + 224, left:left + 224].astype(np.float64) - mean[top:top + 224, left:left + 224]
        if draws.flips[j]:
            patch = patch[:, ::-1]
        # float32 on the device against float64 here: at most four float32 roundings of
        # values below 512 (< 1.3e-4 in all), whatever the CPU; see test_transform.py.
        np.testing.assert_allclose(x[j], patch + shifts[j], rtol=0, atol=1e-3)


def test_bench_input_counts_its_batches_and_every_stage_reports_its_shares(prepared_data, tmp_path):
    """What `bench-input` measures, without asserting a time: the batches it was asked
    for, each of BATCH images, and every stage's busy / starved / blocked shares, which
    add up to 1. (That the stages overlap, so a step slower than the input sets the rate,
    is measured by bench/overlap.py.)"""
    result = bench_input(prepared_data, tmp_path / "run", batches=12, batch=BATCH, augmenters=2,
                         simulate_step_ms=20.0, ceiling=False)
    assert (result["batches"], result["batch_size"], result["augmenters"]) == (12, BATCH, 2)
    # images/s x seconds is the images trained, to within what rounding the two (to 0.1
    # and to 0.01) can move it: no batch came short.
    rate, seconds = result["images_per_second"], result["seconds"]
    assert abs(rate * seconds - 12 * BATCH) <= 0.05 * seconds + 0.005 * rate + 0.01
    assert set(result["stages"]) == set(STAGES)
    for stage, shares in result["stages"].items():
        assert set(shares) == {"busy", "starved", "blocked"}, stage
        assert all(0 <= v <= 1 for v in shares.values()), (stage, shares)
    # The trainer's and the copier's clocks are read in this process, so they are always
    # there; the loader's and augmenters' come with their beats.
    for stage in ("trainer", "copier"):
        assert sum(result["stages"][stage].values()) == pytest.approx(1, abs=1e-3), stage
    for stage in ("loader", "augmenter"):
        assert sum(result["stages"][stage].values()) in (0, pytest.approx(1, abs=1e-3)), stage
    assert result["stages"]["trainer"]["busy"] > 0  # the simulated step is busy time


def test_a_frozen_trainer_stops_the_loader_at_the_slot_count(prepared_data, tmp_path):
    slots = 3
    with InputPipeline(prepared_data, tmp_path / "run", batch=BATCH, augmenters=2, slots=slots, val_every=0) as pipe:
        def loader_idle(batches):
            """The loader's beat once it has read `batches` and then spent a whole beat
            waiting for a credit (its starved time grew while its count stayed)."""
            seen = {}

            def idle():
                beat = pipe.poll_beats().get(("loader", 0))
                if beat is None or beat["counters"]["batches"] < batches:
                    return None
                first = seen.setdefault("beat", beat)
                if beat["counters"]["batches"] != first["counters"]["batches"]:
                    seen["beat"] = beat  # still reading: start over from this beat
                    return None
                return beat if beat["counters"]["starved"] > first["counters"]["starved"] else None

            return wait_for(idle, timeout=60, what=f"the loader to wait after {batches} batches", every=0.05)

        # Nothing is consumed: the loader reads exactly one batch per slot, then waits.
        beat = loader_idle(slots)
        assert beat["counters"]["batches"] == slots
        assert beat["free_slots"] == 0
        # Consuming one batch frees one slot, and only one more batch is read.
        collect(pipe, 1)
        beat = loader_idle(slots + 1)
        assert beat["counters"]["batches"] == slots + 1
        assert beat["free_slots"] == 0


def test_corrupt_samples_are_skipped_counted_and_never_fatal(raw_data, tmp_path):
    dataset = open_dataset(raw_data)
    n_train = len(dataset.split("train"))
    with InputPipeline(raw_data, tmp_path / "run", batch=4, augmenters=2, val_every=0) as pipe:
        plan = pipe.plan
        delivered = []
        for _ in range(plan.train_batches * 2):  # two whole epochs: still alive after the bad files
            batch = pipe.copier.next_batch(timeout_ms=60_000)
            assert batch is not None
            assert batch.images.shape[1:] == (256, 256, 3)
            delivered.append((batch.epoch, batch.n, len(batch.skipped)))
            pipe.copier.release(batch)
        skipped = pipe.copier.stats()["skipped"]
    used = plan.train_batches * 4
    first_epoch = [d for d in delivered if d[0] == 0]
    assert sum(n + s for _, n, s in first_epoch) == used
    # The three files no decoder can read (truncated, random bytes, empty) are the skips;
    # PNG, CMYK and grayscale files decode. Over 2 epochs each skip counts once per use.
    in_use = open_dataset(raw_data).split("train")
    assert sum(skipped.values()) == sum(s for _, _, s in delivered)
    assert set(skipped) <= {"truncated", "undecodable"}
    assert 0 < sum(s for _, _, s in first_epoch) <= 3
    assert len(in_use) == n_train


def test_a_malformed_message_is_counted_and_the_feed_carries_on(prepared_data, tmp_path):
    with InputPipeline(prepared_data, tmp_path / "run", batch=BATCH, augmenters=1, val_every=0) as pipe:
        first = collect(pipe, 1)
        rogue = zmq.Context.instance().socket(zmq.PUSH)
        rogue.connect(pipe.endpoints.ready)
        rogue.send_multipart([b"not json at all"])
        rogue.send_multipart(wire.encode("ready")[:1] + [b"surplus frame"])
        more = collect(pipe, 3)
        wait_for(lambda: pipe.copier.stats()["malformed"] >= 2, timeout=30, what="both rogue frames counted",
                 every=0.05)
        assert pipe.copier.stats()["malformed"] == 2
        rogue.close(linger=0)
    assert [s for _, s, *_ in first + more] == [0, 1, 2, 3]


def test_a_crashed_runs_ring_segment_is_replaced(prepared_data, tmp_path):
    from alexnetd.pipeline.ring import SHM_DIR, ring_name

    run_dir = tmp_path / "run"
    stale = SHM_DIR / ring_name(run_dir)
    stale.write_bytes(b"left by a run that was killed")
    with InputPipeline(prepared_data, run_dir, batch=BATCH, augmenters=1, val_every=0) as pipe:
        assert stale.stat().st_size == pipe.ring.slots * pipe.ring.slot_bytes
        assert len(collect(pipe, 2)) == 2
    assert not stale.exists()  # and a clean stop removes it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copier_hands_over_device_batches_equal_to_the_ring(prepared_data, tmp_path):
    runs = {}
    for device in ("cpu", "cuda"):
        with InputPipeline(prepared_data, tmp_path / device, batch=BATCH, augmenters=2, seed=2, device=device) as pipe:
            batches = []
            for _ in range(4):
                batch = pipe.copier.next_batch(timeout_ms=60_000)
                assert batch.images.device.type == device
                batches.append(batch.images.cpu().clone())
                pipe.copier.release(batch)
            runs[device] = batches
    for cpu, cuda in zip(runs["cpu"], runs["cuda"]):
        assert torch.equal(cpu, cuda)


def _undecodable(split) -> set[int]:
    """Indices of the samples the pipeline's own decoder refuses."""
    from alexnetd.pipeline.jpeg import Decoder, SkipSample

    decoder, bad = Decoder(), set()
    for i in range(len(split)):
        try:
            decoder.decode_rgb(split.read(i), min_side=256)
        except SkipSample:
            bad.add(i)
    return bad


def test_skips_are_counted_when_trained_not_when_prefetched(raw_data, tmp_path):
    """One epoch trained; the copier has already handed on epoch 1's first batches. The
    count is that of the trained epoch only (it used to include the prefetched ones)."""
    dataset = open_dataset(raw_data)
    bad = _undecodable(dataset.split("train"))
    # A seed whose epoch 1 starts with a bad file, so that counting on hand-on would show.
    seed = next(s for s in range(100) if bad & set(BatchPlan.for_dataset(dataset, 4, s, 0).samples(1, 0)[1]))
    plan = BatchPlan.for_dataset(dataset, 4, seed, 0)
    trained = set(np.concatenate([plan.samples(0, q)[1] for q in range(plan.train_batches)]).tolist())
    with InputPipeline(raw_data, tmp_path / "run", batch=4, augmenters=1, val_every=0, seed=seed) as pipe:
        for _ in range(plan.train_batches):
            pipe.copier.release(pipe.copier.next_batch(timeout_ms=60_000))
        wait_for(lambda: len(pipe.copier.handed) >= 2, timeout=60, what="the prefetch of epoch 1", every=0.05)
        assert {key[0] for key in pipe.copier.handed} == {1}
        assert sum(pipe.copier.stats()["skipped"].values()) == len(bad & trained)
        assert pipe.copier.released_images == len(trained) - len(bad & trained)
