"""`--decoder dali`: DALI's decode against the CPU augmenters and the host path, on
prepared and full-size JPEGs; bad files and the host fallback, counted; the daemon.

DALI runs here on its CPU backend (no GPU): the same pipelines as on CUDA but for the
decoder's device, which is how CI covers this path."""

import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from alexnetd.pipeline import wire
from alexnetd.pipeline.dali import dali_missing
from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.fakedata import class_spec, render
from alexnetd.pipeline.jpeg import Decoder, center_square
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


# -- full-size images: the bound against the host path -------------------------------------

INTERIOR_BOUND = 1  # levels; derived in test_full_size_crops_are_within_the_derived_bound_of_the_host_path


def allowed_difference(full: np.ndarray, top: int, left: int, side: int, flipped: bool) -> np.ndarray:
    """Per output pixel of a crop, |DALI - host| allowed (see the derivation below):
    INTERIOR_BOUND where the filter's support lies inside the central square (the host
    resizes the square alone, resample.py); where it crosses the square's edge, the range
    (max - min, per channel) of the source pixels under it."""
    height, width = full.shape[:2]
    shorter = min(height, width)
    scale, radius = shorter / 256, max(shorter / 256, 1.0)
    steps = np.arange(side) + 0.5
    qx, qy = (width - shorter) // 2, (height - shorter) // 2  # the central square's corner
    cx = qx + (left + steps) * scale   # sample points, in pixel-edge coordinates
    cy = qy + (top + steps) * scale
    edge_x = (cx - radius < qx) | (cx + radius > qx + shorter)
    edge_y = (cy - radius < qy) | (cy + radius > qy + shorter)
    bound = np.full((side, side, 3), INTERIOR_BOUND, np.int16)

    def taps(c, q):  # the square's pixels whose centre is within the radius of sample point c
        return slice(max(math.ceil(c - radius - 0.5), q), min(math.floor(c + radius - 0.5), q + shorter - 1) + 1)

    for y, x in zip(*np.nonzero(edge_y[:, None] | edge_x[None, :])):
        under = full[taps(cy[y], qy), taps(cx[x], qx)].astype(np.int16)
        bound[y, x] = np.maximum(under.max((0, 1)) - under.min((0, 1)), INTERIOR_BOUND)
    return bound[:, ::-1] if flipped else bound


def host_crop(full: np.ndarray, top: int, left: int, side: int, flipped: bool) -> np.ndarray:
    """The host path on an accurate full decode: shorter side to 256 and the central
    square with the bilinear resampler (resample.center_square), then the crop and the mirror."""
    return crop(center_square(full, 256), top, left, flipped, side)


def _encode(pixels: np.ndarray, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", **{"quality": 90, **save})
    return out.getvalue()


def _extra_jpegs() -> list[bytes]:
    """What raw_data lacks: noise (any difference of filter shows there at full
    strength), images smaller than 256 (enlarged: bilinear), a shorter side of exactly
    256 (scale 1), a progressive stream, and an EXIF orientation that must be ignored
    (the host ignores it)."""
    rng = np.random.default_rng(7)
    photo = lambda w, h, c: render(class_spec(0, c), rng, h, w)  # noqa: E731
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return [_encode(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)),
            _encode(photo(200, 150, 1)), _encode(photo(150, 230, 2)), _encode(photo(256, 400, 3)),
            _encode(photo(500, 375, 4), progressive=True), _encode(photo(400, 300, 5), exif=exif.tobytes())]


def _decodable(data: bytes) -> bool:
    """A colour or grey JPEG that DALI is given (pipeline/dali.py: DaliAugmenter._route)."""
    from turbojpeg import TJCS_CMYK, TJCS_YCCK

    if data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return False
    try:
        return Decoder()._header(data)[2] not in (TJCS_CMYK, TJCS_YCCK)
    except Exception:
        return False


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


def test_dali_window_decode_is_libjpeg_turbo_accurate_decode(raw_data):
    """The premise of the bound below: the window DALI's CPU backend decodes of a
    full-size JPEG holds the very pixels of the accurate whole decode (libjpeg-turbo
    skips and crops scanlines without changing them)."""
    from nvidia.dali import fn, pipeline_def, types

    blobs = [b for b in (p.read_bytes() for p in sorted(raw_data.rglob("*.JPEG"))) if _decodable(b)]
    blobs += _extra_jpegs()
    sizes = [Decoder()._header(b)[:2] for b in blobs]
    rng = np.random.default_rng(3)
    anchors = [np.array([rng.integers(0, w // 2), rng.integers(0, h // 2)], np.int32) for w, h in sizes]
    shapes = [np.array([rng.integers(1, w - x + 1), rng.integers(1, h - y + 1)], np.int32)
              for (w, h), (x, y) in zip(sizes, anchors)]

    @pipeline_def(batch_size=len(blobs), num_threads=2, device_id=None, exec_pipelined=False, exec_async=False)
    def windows():
        jpegs, anchor, shape = (fn.external_source(name=n, dtype=t) for n, t in
                                (("jpegs", types.UINT8), ("anchor", types.INT32), ("shape", types.INT32)))
        return fn.decoders.image_slice(jpegs, anchor, shape, device="cpu", output_type=types.RGB,
                                       adjust_orientation=False, use_fast_idct=False)

    pipe = windows()
    pipe.build()
    for name, values in (("jpegs", [np.frombuffer(b, np.uint8) for b in blobs]), ("anchor", anchors),
                         ("shape", shapes)):
        pipe.feed_input(name, values)
    (out,) = pipe.run()
    accurate = Decoder(fast=False)
    for i, data in enumerate(blobs):
        (x, y), (w, h) = anchors[i], shapes[i]
        assert np.array_equal(np.array(out[i]), accurate.decode_rgb(data)[y:y + h, x:x + w]), i


def test_full_size_crops_are_within_the_derived_bound_of_the_host_path(raw_data):
    """A full-size JPEG's crop from DALI (window decode, fn.resize, flip) against the
    host path on the same pixels (accurate decode, the bilinear resize of the central square
    to 256, the 224 crop, the mirror), held per pixel to a bound derived, not measured.

    The decoded pixels are the same (the test above), so only the resampling differs.
    Both sample output pixel j at L0 + (j + 1/2)·S/256 of the source (pixel-edge
    coordinates; pipeline/daliwindow.py) and weight the source pixels by the triangle
    max(0, 1 - |d|/r), d the distance of a pixel's centre from that point, r = max(S/256,
    1), normalised to sum 1 (DALI's triangle is a 3-point table interpolated linearly:
    the same function). The window holds every tap of every output pixel.

    Interior pixels (the support inside the central square): both compute the same exact
    value E and differ in rounding only.
    - The host (resample.py: torch's uint8 kernel, or Pillow without AVX2) rounds twice:
      its horizontal pass to uint8 (<= 1/2 level); the vertical pass's weights are
      non-negative and sum to 1, so that error comes through at most unchanged, and the
      result is rounded again (<= 1/2). Its weights are fixed-point: torch's int16 at a
      precision p with w_max·2^(p+1) >= 2^15 - 1/2, so each weight is off by at most
      2^-(p+1) <= w_max / 32767.5, and a pass by at most 255 · taps · w_max / 32767.5
      <= 0.024 level, since taps · w_max <= 3 for every shrink from 257 to 8192 pixels
      and every enlargement (the normalised triangle's largest weight against its tap
      count, computed for each size); Pillow's 22-bit weights err less. So |H - E| <=
      1 + 2 · 0.024 < 1.05.
    - DALI keeps its intermediate in float32 and rounds once: |D - E| <= 1/2, plus float32
      arithmetic. Its sample points are computed in window coordinates (< 2^11 pixels
      here) with <= 3 operations of <= 2^-13 pixel each: < 3.7e-4 pixel. A shift of the
      sample point moves a normalised triangle mean by at most 255 · (2/r + 1/r^2) <= 765
      levels per pixel: < 0.29 level. The weighted sums in float32 add < 0.01.
    So |D - H| <= 1.05 + 0.8 < 2, and since both are integers, |D - H| <= 1.

    Border pixels (the support crosses the central square's edge: the first or last row
    or column of a crop at offset 0 or 32, on either axis): the host drops the taps
    outside the square and renormalises, DALI's window stops at the square's edge and
    repeats its last pixel. Either way the result is a weighted mean of source pixels
    under the support, rounded: both lie within [min, max] of those pixels, so
    |D - H| <= max - min there (allowed_difference).

    On the device the resize is the same (the same filter tables, float intermediates);
    the decode is nvJPEG's, whose IDCT and chroma upsampling are its own, so there
    this bound is not claimed."""
    from alexnetd.pipeline.dali import DaliDecoder

    blobs = [b for b in (p.read_bytes() for p in sorted(raw_data.rglob("*.JPEG"))) if _decodable(b)]
    blobs += _extra_jpegs()
    n = len(blobs)
    sizes = np.array([Decoder()._header(b)[:2] for b in blobs])
    accurate = Decoder(fast=False)
    fulls = [accurate.decode_rgb(b) for b in blobs]
    rng = np.random.default_rng(11)
    # Every corner (where the support meets the image's edge), then random offsets.
    passes = [(224, [0, 32, 0, 32][k % 4], [0, 0, 32, 32][k % 4], k % 2) for k in range(4)]
    passes = [(side, np.full(n, top), np.full(n, left), np.full(n, flip)) for side, top, left, flip in passes]
    passes += [(224, rng.integers(0, 33, n), rng.integers(0, 33, n), rng.integers(0, 2, n))]
    passes += [(256, np.zeros(n, int), np.zeros(n, int), np.zeros(n, int))]  # validation: the whole frame
    dali = DaliDecoder(n, "cpu")
    for side, tops, lefts, flips in passes:
        got = dali.decode_full([np.frombuffer(b, np.uint8) for b in blobs], sizes[:, 0], sizes[:, 1],
                               tops.astype(np.int16), lefts.astype(np.int16), flips.astype(np.uint8), side).numpy()
        assert got.shape == (n, side, side, 3)
        for i in range(n):
            args = (int(tops[i]), int(lefts[i]), side, bool(flips[i]))
            diff = np.abs(got[i].astype(np.int16) - host_crop(fulls[i], *args).astype(np.int16))
            assert (diff <= allowed_difference(fulls[i], *args)).all(), (i, tuple(sizes[i]), args, int(diff.max()))


def test_imagefolder_batches_have_the_augmenters_order_labels_draws_and_counted_paths(raw_data, tmp_path):
    """An ImageFolder tree of ImageNet-like sizes, with a PNG and a CMYK JPEG named .JPEG
    and files that will not decode: the DALI path's batches have the CPU augmenters'
    order, labels, draws and skips; what DALI decoded is within the derived bound of the
    host path, what the host decoded (the PNG, the CMYK file) is its decode exactly; and
    both paths are counted."""
    runs, paths = {}, None
    for decoder in ("cpu", "dali"):
        with InputPipeline(raw_data, tmp_path / decoder, batch=BATCH, augmenters=2, seed=5,
                           decoder=decoder) as pipe:
            runs[decoder] = collect(pipe, pipe.plan.batches_in_epoch(0))
            if decoder == "dali":
                paths, router = pipe.decoder.paths, pipe.decoder._route
    split = {name: open_dataset(raw_data).split(name) for name in ("train", "val")}
    accurate = Decoder(fast=False)
    on_device, on_host = 0, {}
    for ours, dali in zip(runs["cpu"], runs["dali"]):
        assert (ours.epoch, ours.seq, ours.split) == (dali.epoch, dali.seq, dali.split)
        assert np.array_equal(ours.labels.numpy(), dali.labels.numpy())
        assert np.array_equal(ours.indices, dali.indices)
        assert ours.skipped == dali.skipped
        side = 224 if dali.split == "train" else 256
        assert tuple(dali.images.shape[1:]) == (side, side, 3)
        if dali.split == "train":
            for name in ("crops", "flips", "alphas"):
                assert np.array_equal(getattr(ours, name), getattr(dali, name)), name
        for j, index in enumerate(dali.indices):
            data = split[dali.split].read(int(index))
            top, left = dali.crops[j] if dali.split == "train" else (0, 0)
            args = (int(top), int(left), side, bool(dali.flips[j]) if dali.split == "train" else False)
            got = dali.images[j].numpy().astype(np.int16)
            route, reason = router(data)
            if route == "window":
                full = accurate.decode_rgb(data)
                assert (np.abs(got - host_crop(full, *args)) <= allowed_difference(full, *args)).all(), index
                on_device += 1
            else:
                assert route == "host", route
                whole = np.empty((256, 256, 3), np.uint8)
                accurate.decode_into(data, whole)
                assert np.array_equal(got, crop(whole, args[0], args[1], args[3], side)), index
                on_host[reason] = on_host.get(reason, 0) + 1
    assert on_host == {"cmyk": 1, "not_jpeg": 1}  # the CMYK JPEG and the PNG
    # The thread may have decoded a batch or two of the next epoch before it was stopped.
    assert paths["dali_decoded"] >= on_device and set(paths["host_fallback"]) == set(on_host)
    assert all(paths["host_fallback"][reason] >= count for reason, count in on_host.items())
    assert {reason for b in runs["dali"] for _, reason in b.skipped} == {"truncated", "undecodable"}


def test_status_metrics_and_restarts_count_both_paths():
    """The seam's rows: every rank's thread summed, a replaced thread's counts kept, one
    status line naming the reasons, and the Prometheus counter by path."""
    from alexnetd.pipeline.decoders import CpuDecoding, DaliDecoding, status_lines
    from alexnetd.service.metrics import DALI_METRICS, EXPORTED_METRICS
    from alexnetd.service.layout import ProcName
    from alexnetd.service.metrics import _decoder as decoder_families

    dali = DaliDecoding(2)
    empty = dali.status({})["decoder"]
    assert (empty["dali_decoded"], empty["host_fallback"], empty["host_fallback_reasons"]) == (0, 0, {})
    dali.retire({"paths": {"dali_decoded": 100, "host_fallback": {"cmyk": 2}}})  # a trainer that restarted
    dali.retire({"counters": {}})  # a beat of some other stage
    beats = {ProcName(0, "augmenter"): {"paths": {"dali_decoded": 12_000, "host_fallback": {"not_jpeg": 1}}},
             ProcName(1, "augmenter"): {"paths": {"dali_decoded": 245, "host_fallback": {"cmyk": 3, "dali_error": 8}}},
             ProcName(0, "loader"): {"counters": {}}}
    status = dali.status(beats)
    assert status["remote_augmenters"] is None
    assert status["decoder"] == {"name": "dali", "dali_decoded": 12_345, "host_fallback": 14,
                                 "host_fallback_reasons": {"cmyk": 5, "dali_error": 8, "not_jpeg": 1}}
    assert status_lines(status) == ["  decoder     dali: 12,345 images on the device, 14 on the host "
                                    "(CMYK 5, DALI failed on the batch 8, not JPEG 1)"]
    assert "decoder" not in CpuDecoding(2).status({}) and status_lines({"remote_augmenters": None}) == []

    families = list(decoder_families(status["decoder"]))
    assert [f.name for f in families] == ["alexnetd_decoder_images"]
    assert {s.labels["path"]: s.value for s in families[0].samples if s.name.endswith("_total")} == \
        {"dali": 12_345.0, "host": 14.0}
    assert set(DALI_METRICS).isdisjoint(EXPORTED_METRICS)  # a cpu daemon exports exactly the contract


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
    # DALI: the good 256x256, the grey one and the 300x200 (its window pipeline); the
    # host: the PNG and the CMYK JPEG; what the host skips is not counted as decoded.
    assert dali.paths["dali_decoded"] == 3
    host = dali.paths["host_fallback"]
    assert (host.get("not_jpeg"), host.get("cmyk")) == (1, 1) and set(host) <= {"not_jpeg", "cmyk", "no_eoi"}
    assert dali.paths["dali_decoded"] + sum(host.values()) == out["n"]


def test_a_batch_dali_rejects_is_decoded_on_the_host_and_dali_recovers(prepared_data):
    """When DALI itself fails on a batch (here: a truncated stream let past the host's
    end-of-image check, which DALI refuses with a real error), the pipeline is dropped,
    that batch is decoded on the host with the bad sample skipped (the others counted as
    host fallbacks), and the next batch is DALI's again, on a fresh pipeline."""
    from alexnetd.pipeline.dali import DaliAugmenter

    split = open_dataset(prepared_data).split("train")
    good = [split.read(i) for i in range(4)]
    truncated = good[1][: len(good[1]) // 2]

    class TrustingAugmenter(DaliAugmenter):
        def _route(self, data):
            return ("square", None) if bytes(data) == truncated else super()._route(data)

    dali = TrustingAugmenter({}, 0, 4, "cpu")
    calls = []
    real_build = dali.decoder._build
    dali.decoder._build = lambda kind: (calls.append(kind), real_build(kind))[1]

    def job(seq, parts):
        offsets = np.cumsum([0] + [len(s) for s in parts]).astype(np.int64)
        return wire.Message("job", {"epoch": 0, "seq": seq, "split": "train", "slot": 0, "generation": 0},
                            [np.frombuffer(b"".join(parts), np.uint8), offsets, np.zeros(len(parts), np.int64),
                             np.arange(len(parts), dtype=np.int64)])

    first = dali.augment(job(0, [good[0], truncated, good[2], good[3]]))
    assert first["skipped"] == [[1, "truncated"]] and first["n"] == 3
    assert dali.paths == {"dali_decoded": 0, "host_fallback": {"dali_error": 3}}
    assert calls == []  # DALI raised: its pipeline is dropped, built again when next needed
    second = dali.augment(job(1, good))
    assert second["n"] == 4 and not second["skipped"] and calls == ["square"]
    assert dali.paths == {"dali_decoded": 4, "host_fallback": {"dali_error": 3}}
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
def test_the_daemon_trains_with_dali_on_the_cpu(raw_data, tmp_path):
    """On an ImageFolder tree (full-size JPEGs, a PNG and a CMYK file among them; the
    skip budget lifted for its three undecodable files): `status` counts the images
    DALI decoded and those the host did, and says so in one line."""
    from alexnetd.model import latest_checkpoint, load_checkpoint
    from alexnetd.service.statusview import render_status
    from daemon_helpers import cli, free_port, start_args, status, wait_exit, wait_for

    run_dir = tmp_path / "run"
    cli(*start_args(raw_data, run_dir, free_port(), "--decoder", "dali", "--device", "cpu", "--skip-budget", 1,
                    "--max-steps", 6), check=True)
    try:
        seen = wait_for(lambda: (s := status(run_dir)) and s["step"] >= 2 and s["decoder"]["host_fallback"] >= 2
                        and s, what="training with DALI, the PNG and the CMYK file decoded on the host")
        assert seen["stages"]["augmenter"]["processes"] == 1  # DALI's thread in the trainer
        assert not any(name.startswith("augmenter") for name in seen["processes"])
        decoder = seen["decoder"]
        assert decoder["dali_decoded"] > 0 and set(decoder["host_fallback_reasons"]) == {"cmyk", "not_jpeg"}
        line = f"dali: {decoder['dali_decoded']:,} images on the device, {decoder['host_fallback']:,} on the host"
        assert line in render_status(seen)
    finally:
        wait_exit(run_dir)
    assert load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))["step"] == 6
    assert "decoding with DALI in the trainer" in (run_dir / "alexnetd.log").read_text()
