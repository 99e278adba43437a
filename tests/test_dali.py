"""`--decoder dali`: DALI's decode against the CPU augmenters, bad files, the daemon.

DALI runs here on its CPU backend (no GPU): the same pipeline as on CUDA but for the
decoder's device, which is how CI covers this path."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from alexnetd.pipeline import wire
from alexnetd.pipeline.dali import dali_missing
from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.jpeg import Decoder
from alexnetd.pipeline.launch import InputPipeline
from alexnetd.pipeline.plan import train_draws

pytestmark = pytest.mark.skipif(dali_missing() is not None, reason=str(dali_missing()))

BATCH = 8

# Bound on |DALI CPU - CPU augmenters| per pixel. DALI's CPU backend decodes with
# libjpeg-turbo's accurate IDCT and fancy (triangular) chroma upsampling: bit-identical
# to Decoder(fast=False), tested below. The augmenters use the fast IDCT and fast
# (replicating) upsampling. Fancy upsampling weights neighbouring chroma samples 3/4 and
# 1/4, replication takes the nearer one, so a chroma value differs by at most 1/4 of the
# step between neighbouring chroma samples: 255/4 < 64. YCbCr -> RGB multiplies a chroma
# difference by at most 1.772 (Cb into B): 113. The fast IDCT adds its own error, a few
# levels (libjpeg documents it as "slightly less accurate"; with 8-bit rounding on both
# sides we allow 7). So |ΔRGB| <= 120 at any pixel, on any CPU; on smooth regions it is
# far less, so the mean difference must also stay small (below 8 levels).
MAX_DIFF_VS_FAST = 120
MEAN_DIFF_VS_FAST = 8.0


def collect(pipe, count):
    out = []
    for _ in range(count):
        batch = pipe.copier.next_batch(timeout_ms=120_000)
        assert batch is not None, "the pipeline stalled"
        out.append(batch)
        batch.images = batch.images.clone()  # the slot is reused after release
        pipe.copier.release(batch)
    return out


def crop(image, top, left, flipped, side=224):
    patch = image[top:top + side, left:left + side]
    return patch[:, ::-1] if flipped else patch


def test_dali_cpu_crops_equal_libjpeg_turbo_accurate_decode(prepared_data):
    from alexnetd.pipeline.dali import DaliDecoder

    split = open_dataset(prepared_data).split("train")
    n = 16
    blobs = [np.frombuffer(split.read(i), np.uint8) for i in range(n)]
    rng = np.random.default_rng(0)
    tops = np.array([0, 32, 0, 32] + list(rng.integers(0, 33, n - 4)), np.int16)
    lefts = np.array([0, 0, 32, 32] + list(rng.integers(0, 33, n - 4)), np.int16)
    flips = np.array([0, 1] * (n // 2), np.uint8)
    got = DaliDecoder(n, "cpu").decode(blobs, tops, lefts, flips, 224).numpy()
    accurate = Decoder(fast=False)
    for i in range(n):
        want = crop(accurate.decode_rgb(blobs[i].tobytes()), tops[i], lefts[i], flips[i])
        assert np.array_equal(got[i], want), i


def test_dali_batches_have_the_augmenters_order_labels_draws_and_pixels(prepared_data, tmp_path):
    runs = {}
    for decoder in ("cpu", "dali"):
        with InputPipeline(prepared_data, tmp_path / decoder, batch=BATCH, augmenters=2, seed=5,
                           decoder=decoder) as pipe:
            runs[decoder] = collect(pipe, pipe.plan.batches_in_epoch(0))
    split = {name: open_dataset(prepared_data).split(name) for name in ("train", "val")}
    accurate = Decoder(fast=False)
    diffs = []
    for ours, dali in zip(runs["cpu"], runs["dali"]):
        assert (ours.epoch, ours.seq, ours.split) == (dali.epoch, dali.seq, dali.split)
        assert np.array_equal(ours.labels.numpy(), dali.labels.numpy())
        assert np.array_equal(ours.indices, dali.indices)
        if ours.split == "train":
            for name in ("crops", "flips", "alphas"):
                assert np.array_equal(getattr(ours, name), getattr(dali, name)), name
            assert np.array_equal(dali.crops, train_draws(5, dali.epoch, dali.indices).crops)
            assert tuple(dali.images.shape[1:]) == (224, 224, 3)  # cut and mirrored by DALI
        else:
            assert tuple(dali.images.shape[1:]) == (256, 256, 3)  # whole, for the test-time crops
        for j, index in enumerate(dali.indices):
            if ours.split == "train":
                top, left = ours.crops[j]
                fast = crop(ours.images[j].numpy(), top, left, ours.flips[j])
                exact = crop(accurate.decode_rgb(split["train"].read(int(index))), top, left, ours.flips[j])
            else:
                fast = ours.images[j].numpy()
                exact = accurate.decode_rgb(split["val"].read(int(index)))
            got = dali.images[j].numpy()
            assert np.array_equal(got, exact)
            diffs.append(np.abs(got.astype(np.int16) - fast.astype(np.int16)))
    diffs = np.concatenate([d.ravel() for d in diffs])
    assert diffs.max() <= MAX_DIFF_VS_FAST
    assert diffs.mean() <= MEAN_DIFF_VS_FAST


def _jpeg(width, height, mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _bad_job() -> tuple[wire.Message, list]:
    good = _jpeg(256, 256)
    png = io.BytesIO()
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(png, format="PNG")
    bomb = bytearray(_jpeg(256, 256, seed=1))
    at = bomb.index(b"\xff\xc0") + 5
    bomb[at:at + 4] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    samples = [good, good[: len(good) // 2], bytes(np.random.default_rng(3).bytes(5000)), b"", bytes(bomb),
               png.getvalue(), _jpeg(256, 256, "CMYK", 4), _jpeg(300, 200, seed=5), _jpeg(256, 256, "L", 6),
               good[:-2] + b"\x00\x00"]
    offsets = np.cumsum([0] + [len(s) for s in samples]).astype(np.int64)
    blob = np.frombuffer(b"".join(samples), np.uint8)
    n = len(samples)
    job = wire.Message("job", {"epoch": 0, "seq": 0, "split": "train", "slot": 0, "generation": 0},
                       [blob, offsets, np.arange(n, dtype=np.int64) % 3, np.arange(n, dtype=np.int64)])
    return job, samples


def test_bad_files_are_skipped_and_counted_as_the_cpu_path_does(tmp_path):
    from alexnetd.pipeline.augment import augment_batch
    from alexnetd.pipeline.dali import DaliAugmenter
    from alexnetd.pipeline.ring import Ring
    from alexnetd.pipeline.stage import StageClock

    job, samples = _bad_job()
    ring = Ring(f"alexnetd-test-{os.getpid()}-dali", 1, len(samples), create=True)
    try:
        cpu = augment_batch(job, ring, Decoder(fast=True), 0, StageClock())
    finally:
        ring.close()
        ring.unlink()
    dali = DaliAugmenter({}, 0, len(samples), "cpu")
    out = dali.augment(job)  # no exception: DALI never saw what would have killed it
    assert out["skipped"] == cpu["skipped"]
    assert {reason for _, reason in out["skipped"]} >= {"truncated", "undecodable", "too_large"}
    assert out["n"] == cpu["n"] == len(samples) - len(cpu["skipped"])
    assert np.array_equal(out["arrays"][1], cpu["arrays"][1])  # the same samples kept, in order
    assert dali.decoded[(0, 0, 0)].shape == (out["n"], 224, 224, 3)
    assert sum(dali.clock.skipped.values()) == len(cpu["skipped"])


def test_a_batch_dali_rejects_is_decoded_on_the_host_and_dali_recovers(prepared_data):
    """When DALI itself fails on a batch (here: a truncated stream let past the host's
    end-of-image check, which DALI refuses with a real error), the pipeline is rebuilt,
    that batch is decoded on the host with the bad sample skipped, and the next batch is
    DALI's again."""
    from alexnetd.pipeline.dali import DaliAugmenter

    split = open_dataset(prepared_data).split("train")
    good = [split.read(i) for i in range(4)]
    truncated = good[1][: len(good[1]) // 2]

    class TrustingAugmenter(DaliAugmenter):
        def _precheck(self, data):
            return "dali" if bytes(data) == truncated else super()._precheck(data)

    dali = TrustingAugmenter({}, 0, 4, "cpu")
    calls = []
    real_build = dali.decoder._build
    dali.decoder._build = lambda: (calls.append("rebuilt"), real_build())

    def job(seq, parts):
        offsets = np.cumsum([0] + [len(s) for s in parts]).astype(np.int64)
        return wire.Message("job", {"epoch": 0, "seq": seq, "split": "train", "slot": 0, "generation": 0},
                            [np.frombuffer(b"".join(parts), np.uint8), offsets, np.zeros(len(parts), np.int64),
                             np.arange(len(parts), dtype=np.int64)])

    first = dali.augment(job(0, [good[0], truncated, good[2], good[3]]))
    assert calls == ["rebuilt"]  # DALI raised, and its pipeline was rebuilt
    assert first["skipped"] == [[1, "truncated"]] and first["n"] == 3
    second = dali.augment(job(1, good))
    assert second["n"] == 4 and not second["skipped"] and calls == ["rebuilt"]
    draws = train_draws(0, 0, np.arange(4))
    accurate = Decoder(fast=False)
    for seq, rows in ((0, [0, 2, 3]), (1, [0, 1, 2, 3])):
        for j, i in enumerate(rows):
            want = crop(accurate.decode_rgb(good[i]), *draws.crops[i], draws.flips[i])
            assert np.array_equal(dali.decoded[(0, 0, seq)][j].numpy(), want), (seq, i)


def test_without_dali_the_flag_is_one_line_naming_the_extra(prepared_data, tmp_path):
    # A package named nvidia that cannot import dali, first on the path: DALI "not installed".
    shadow = tmp_path / "shadow" / "nvidia" / "dali"
    shadow.mkdir(parents=True)
    (shadow.parent / "__init__.py").write_text("")
    (shadow / "__init__.py").write_text("raise ImportError('No module named nvidia.dali')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "shadow"))
    result = subprocess.run([sys.executable, "-m", "alexnetd", "start", "--data", str(prepared_data),
                             "--run-dir", str(tmp_path / "run"), "--decoder", "dali", "--device", "cpu", "--batch-size", "8"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "alexnetd[dali]" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_daemon_trains_with_dali_on_the_cpu(prepared_data, tmp_path):
    from alexnetd.model import latest_checkpoint, load_checkpoint
    from daemon_helpers import cli, free_port, start_args, status, wait_exit, wait_for

    run_dir = tmp_path / "run"
    cli(*start_args(prepared_data, run_dir, free_port(), "--decoder", "dali", "--device", "cpu",
                    "--max-steps", 6), check=True)
    try:
        seen = wait_for(lambda: (s := status(run_dir)) and s["step"] >= 2 and s, what="training with DALI")
        assert seen["stages"]["augmenter"]["processes"] == 1  # DALI's thread in the trainer
        assert not any(name.startswith("augmenter") for name in seen["processes"])
    finally:
        wait_exit(run_dir)
    assert load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))["step"] == 6
    assert "decoding with DALI in the trainer" in (run_dir / "alexnetd.log").read_text()
