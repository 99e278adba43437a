"""The decoder: what decodes, what is skipped and why, and the DCT-scaled down-sampling."""

import io

import numpy as np
import pytest
from PIL import Image

from alexnetd.pipeline.jpeg import Decoder, SkipSample

rng = np.random.default_rng(0)


def jpeg(width=320, height=240, mode="RGB", quality=90) -> bytes:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def with_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with a start-of-frame that claims another size (a bomb header)."""
    at = data.index(b"\xff\xc0") + 5  # marker, length(2), precision(1), then height, width
    return data[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 4:]


def test_rgb_jpeg_decodes_to_its_size():
    image = Decoder().decode_rgb(jpeg(320, 240))
    assert image.shape == (240, 320, 3) and image.dtype == np.uint8


def test_decode_into_writes_a_prepared_image_straight_into_the_view():
    data = jpeg(256, 256)
    ring = np.zeros((2, 256, 256, 3), np.uint8)
    Decoder(fast=True).decode_into(data, ring[1])
    assert np.array_equal(ring[1], Decoder(fast=True).decode_rgb(data))
    assert not ring[0].any()  # nothing outside its place


@pytest.mark.parametrize("size", [(2048, 1536), (500, 375), (200, 150), (512, 512)])
def test_decode_into_equals_decode_square_for_any_size(size):
    data = jpeg(*size)
    out = np.empty((256, 256, 3), np.uint8)
    decoder = Decoder(fast=True)
    decoder.decode_into(data, out)
    assert np.array_equal(out, decoder.decode_square(data, 256))


def test_decode_into_refuses_a_bomb_before_allocating():
    out = np.zeros((256, 256, 3), np.uint8)
    with pytest.raises(SkipSample) as info:
        Decoder(fast=True).decode_into(with_size(jpeg(64, 64), 60000, 60000), out)
    assert info.value.reason == "too_large" and not out.any()


def test_dct_scaling_picks_the_smallest_scale_not_below_the_wanted_side():
    image = Decoder().decode_rgb(jpeg(2048, 1536), min_side=256)
    assert image.shape == (384, 512, 3)  # 1/4 scale; 1/8 would be 192 < 256
    small = Decoder().decode_rgb(jpeg(200, 150), min_side=256)
    assert small.shape == (150, 200, 3)  # never scaled up by the IDCT


def test_decode_square_is_the_papers_downsampling():
    image = Decoder().decode_square(jpeg(500, 375), 256)
    assert image.shape == (256, 256, 3)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_become_rgb(mode):
    image = Decoder().decode_rgb(jpeg(64, 48, mode=mode))
    assert image.shape == (48, 64, 3)


def test_png_named_jpeg_is_decoded():
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(out, format="PNG")
    assert Decoder().decode_rgb(out.getvalue()).shape == (30, 40, 3)


@pytest.mark.parametrize("data, reason", [
    (b"", "truncated"),
    (jpeg()[:2000], "truncated"),
    (bytes(rng.integers(0, 256, 5000, dtype=np.uint8)), "undecodable"),
    (with_size(jpeg(), 60000, 60000), "too_large"),
])
def test_bad_images_are_skipped_with_a_reason(data, reason):
    with pytest.raises(SkipSample) as info:
        Decoder().decode_rgb(data)
    assert info.value.reason == reason


def test_pixel_budget_is_checked_before_decoding():
    data = with_size(jpeg(64, 64), 9000, 9000)  # 81 Mpx claimed by a 64x64 stream
    with pytest.raises(SkipSample) as info:
        Decoder(max_pixels=64_000_000).decode_rgb(data)
    assert info.value.reason == "too_large"
    assert Decoder(max_pixels=10_000).decode_rgb(jpeg(64, 64)).shape == (64, 64, 3)


def test_the_turbojpeg_library_can_be_named_by_path(tmp_path):
    """$ALEXNETD_TURBOJPEG_LIB: a host without libturbojpeg installed loads a shipped copy
    (bench/gpu.py --wheels). A fresh process, so the library is loaded from that path."""
    import os
    import shutil
    import subprocess
    import sys

    from alexnetd.pipeline.jpeg import TURBOJPEG_LIB_ENV

    Decoder()  # loads the system's library into this process: its path is in our maps
    (system,) = {line.split()[-1] for line in open("/proc/self/maps") if "libturbojpeg" in line}
    shipped = tmp_path / "libturbojpeg.so.0"
    shutil.copy(os.path.realpath(system), shipped)
    code = ("from alexnetd.pipeline.jpeg import Decoder; import sys; "
            f"Decoder().decode_rgb(open({str(tmp_path / 'x.jpg')!r}, 'rb').read()); "
            "print(any(sys.argv[1] in line for line in open('/proc/self/maps')))")
    (tmp_path / "x.jpg").write_bytes(jpeg(64, 48))
    env = dict(os.environ, **{TURBOJPEG_LIB_ENV: str(shipped)})
    done = subprocess.run([sys.executable, "-c", code, str(shipped)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"  # the copy, not the system's library, is mapped
    env[TURBOJPEG_LIB_ENV] = str(tmp_path / "missing.so")
    done = subprocess.run([sys.executable, "-c", code, str(shipped)], env=env, capture_output=True, text=True)
    assert done.returncode != 0  # a wrong path fails loudly, never falls back unseen


@pytest.mark.parametrize("damage, reason", [
    (lambda d: d[: len(d) // 2], "truncated"),
    (lambda d: d[:2] + bytes(rng.integers(0, 256, 3000, dtype=np.uint8)), "undecodable"),
    (lambda d: with_size(d, 60000, 60000), "too_large"),
])
def test_decode_into_skips_bad_prepared_images_with_a_reason(damage, reason):
    """The hot path (one persistent TurboJPEG handle, pipeline/turbo.py) names damage as
    PyTurboJPEG's path does, and a skipped image never raises anything else."""
    out = np.zeros((256, 256, 3), np.uint8)
    decoder = Decoder(fast=True)
    with pytest.raises(SkipSample) as info:
        decoder.decode_into(np.frombuffer(damage(jpeg(256, 256)), np.uint8), out)
    assert info.value.reason == reason
    good = jpeg(256, 256)  # the same decoder (and its handle) still decodes a good image
    decoder.decode_into(np.frombuffer(good, np.uint8), out)
    assert np.array_equal(out, decoder.decode_rgb(good))
    with pytest.raises(SkipSample) as again:
        Decoder(fast=True).decode_rgb(damage(jpeg(256, 256)))
    assert again.value.reason == reason


def test_one_decoder_decodes_many_images_through_its_handle():
    decoder, out = Decoder(fast=True), np.empty((256, 256, 3), np.uint8)
    for seed in range(5):
        data = jpeg(256, 256, quality=60 + seed * 8)
        decoder.decode_into(np.frombuffer(data, np.uint8), out)
        assert np.array_equal(out, decoder.decode_rgb(data))
