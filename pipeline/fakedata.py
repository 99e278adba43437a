"""Synthetic ImageNet-like data: learnable, not trivial, photo-like, reproducible.

Each class has a visual signature, drawn once from (seed, class): a pattern kind
(stripes, rings, checks, spokes, waves, dots), a base orientation and spatial
frequency, and a palette. An image of the class is that pattern inside a soft
elliptical "object" over a smooth two-colour background with a couple of out-of-focus
clutter blobs, and sensor-like noise. Within a class the object's position, size,
aspect, rotation, frequency, colours and brightness vary, and the background and
clutter are mostly random, so a network has to look at the object. Classes beyond six
reuse a pattern kind with a different palette, orientation and frequency, which keeps
some pairs hard. The result compresses like a photo (smooth areas, texture, mild
noise): a 256×256 q90 JPEG is a few tens of KB.

Every image is a pure function of (seed, split, class, index): the output is
byte-identical for a seed whatever else changes.

    make_fake_data(out)                   # prepared shards, as `alexnetd prepare` writes
    make_fake_data(out, raw=True, corrupt=6)   # an ImageFolder tree with bad files mixed in
"""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from alexnetd.pipeline.shards import JpegCodec, PreparedWriter, remove_stale_temp_dirs, replace_dir, temp_dir_for

__all__ = [
    "make_fake_data",
    "render",
    "class_spec",
    "wnid",
    "CORRUPT_KINDS",
    "CONVERTIBLE_KINDS",
    "CORRUPT_REASON",
    "KINDS",
    "OutputExists",
]

KINDS = ("stripes", "rings", "checks", "spokes", "waves", "dots")
# --corrupt cycles through these, in this order. The first three still make an RGB
# image (ImageNet holds a PNG and some CMYK JPEGs named .JPEG); the others are skipped
# with the reason in CORRUPT_REASON (jpeg.REASONS).
CORRUPT_KINDS = ("png", "cmyk", "grayscale", "truncated", "random_bytes", "empty")
CONVERTIBLE_KINDS = ("png", "cmyk", "grayscale")
CORRUPT_REASON = {"truncated": "truncated", "random_bytes": "undecodable", "empty": "truncated"}

# ImageNet-like sizes for --raw (width, height): mostly ~500×375, some portrait, a few large.
_LANDSCAPE = ((500, 375), (500, 333), (500, 400), (480, 360), (500, 357))
_PORTRAIT = ((375, 500), (333, 500), (400, 500))
_LARGE = ((800, 600), (1024, 768), (1280, 960), (1600, 1200))

_SPLIT_ID = {"train": 1, "val": 2, "corrupt": 3}


class OutputExists(Exception):
    """OUT exists and may not be replaced."""


def wnid(c: int) -> str:
    """WordNet-id-like class folder name; 'n9' keeps them clear of real ImageNet ids."""
    return f"n9{c:07d}"


@dataclass(frozen=True)
class ClassSpec:
    kind: str
    angle: float  # radians
    freq: float  # cycles per half shorter side
    fg: np.ndarray  # (2, 3) the pattern's two colours
    bg: np.ndarray  # (2, 3) the background's typical colours

    @property
    def name(self) -> str:
        return f"{self.kind} {_colour_name(self.fg[0])}/{_colour_name(self.fg[1])} {math.degrees(self.angle):.0f}deg"


def class_spec(seed: int, c: int) -> ClassSpec:
    rng = np.random.default_rng([seed, 0, c])
    fg = rng.uniform(0, 255, (2, 3))
    while np.abs(fg[0] - fg[1]).sum() < 200:  # the pattern must be visible
        fg[1] = rng.uniform(0, 255, 3)
    return ClassSpec(
        kind=KINDS[c % len(KINDS)],
        angle=float(rng.uniform(0, math.pi)),
        freq=float(rng.uniform(2.0, 6.0)),
        fg=fg.astype(np.float32),
        bg=rng.uniform(30, 225, (2, 3)).astype(np.float32),
    )


def _colour_name(rgb: np.ndarray) -> str:
    names = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 210, 50),
             "cyan": (50, 200, 210), "magenta": (200, 50, 190), "white": (235, 235, 235), "black": (20, 20, 20),
             "grey": (128, 128, 128), "orange": (230, 130, 30), "purple": (110, 50, 150), "brown": (120, 80, 40)}
    return min(names, key=lambda n: float(np.sum((np.asarray(names[n]) - rgb) ** 2)))


def render(spec: ClassSpec, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One H×W×3 uint8 image of the class; all randomness from `rng`."""
    f32 = np.float32
    side = min(height, width)
    y = ((np.arange(height, dtype=f32) - height / 2) * f32(2 / side))[:, None]  # (H,1), ~[-1,1]
    x = ((np.arange(width, dtype=f32) - width / 2) * f32(2 / side))[None, :]  # (1,W)

    # Background: a linear blend between two colours near the class's, in a random direction.
    phi = rng.uniform(0, 2 * math.pi)
    bg = spec.bg + rng.normal(0, 35, (2, 3)).astype(f32)
    g = (x * f32(math.cos(phi)) + y * f32(math.sin(phi))) * f32(0.5) + f32(0.5)  # (H,W)
    image = bg[0] + g[..., None] * (bg[1] - bg[0])  # (H,W,3)

    # Clutter: soft out-of-focus blobs of random colours.
    for _ in range(2):
        bx, by = rng.uniform(-1.2, 1.2, 2)
        sigma = rng.uniform(0.15, 0.45)
        colour = rng.uniform(0, 255, 3).astype(f32)
        alpha = f32(rng.uniform(0.4, 0.9))
        x0, x1, y0, y1 = _box(x, y, (bx, by), 3 * sigma)
        if x0 < x1 and y0 < y1:
            patch = image[y0:y1, x0:x1]
            d2 = (x[:, x0:x1] - f32(bx)) ** 2 + (y[y0:y1] - f32(by)) ** 2
            patch += (np.exp(d2 * f32(-0.5 / sigma**2)) * alpha)[..., None] * (colour - patch)

    # Sometimes a small distractor: another kind of pattern in random colours.
    if rng.uniform() < 0.5:
        kind = KINDS[int(rng.integers(len(KINDS)))]
        colours = rng.uniform(0, 255, (2, 3)).astype(f32)
        centre = rng.uniform(-0.9, 0.9, 2)
        radius = rng.uniform(0.12, 0.25)
        _paint(image, x, y, kind, colours, centre, (radius, radius), rng.uniform(0, math.pi), rng.uniform(2, 6))

    # The object: the class pattern in a soft ellipse, drawn last (in front).
    a = rng.uniform(0.45, 0.8)
    _paint(
        image, x, y, spec.kind,
        spec.fg + rng.normal(0, 20, (2, 3)).astype(f32),
        rng.uniform(-0.35, 0.35, 2),
        (a, a * rng.uniform(0.7, 1.3)),
        spec.angle + rng.normal(0, 0.25),
        spec.freq * rng.uniform(0.8, 1.25),
    )

    # Texture everywhere (a faint fine grating of random orientation: grain, fabric,
    # foliage), lighting, and sensor noise, all on luminance as most of a real sensor's is.
    psi = rng.uniform(0, math.pi)
    lum = np.sin((x * f32(math.cos(psi)) + y * f32(math.sin(psi))) * f32(2 * math.pi * rng.uniform(10, 24)))
    lum *= f32(rng.uniform(4, 10))
    lum += rng.standard_normal((height, width), dtype=f32) * f32(rng.uniform(3.0, 6.0))
    image *= f32(rng.uniform(0.8, 1.15))
    image += lum[..., None]
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def _box(x, y, centre, r) -> tuple[int, int, int, int]:
    """Index bounds of the square of half-side r around centre (x, y increasing)."""
    x0, x1 = np.searchsorted(x[0], [centre[0] - r, centre[0] + r])
    y0, y1 = np.searchsorted(y[:, 0], [centre[1] - r, centre[1] + r])
    return int(x0), int(x1), int(y0), int(y1)


def _paint(image, x, y, kind, colours, centre, axes, theta, freq) -> None:
    """Blend pattern `kind` (two colours, rotation theta, `freq` cycles per unit) into
    `image` inside a soft ellipse with the given centre and half-axes, in place."""
    f32 = np.float32
    # Only the ellipse's bounding box can change (x and y are increasing coordinates).
    x0, x1, y0, y1 = _box(x, y, centre, max(axes))
    if x0 >= x1 or y0 >= y1:
        return
    image, x, y = image[y0:y1, x0:x1], x[:, x0:x1], y[y0:y1]
    ct, st = f32(math.cos(theta)), f32(math.sin(theta))
    dx, dy = x - f32(centre[0]), y - f32(centre[1])
    xr = dx * ct + dy * st
    yr = dy * ct - dx * st
    w = f32(2 * math.pi * freq)
    if kind == "stripes":
        s = np.sin(xr * w)
    elif kind == "rings":
        s = np.sin(np.sqrt(xr * xr + yr * yr) * w)
    elif kind == "checks":
        s = np.sin(xr * w) * np.sin(yr * w) * f32(1.6)
    elif kind == "spokes":
        s = np.sin(np.arctan2(yr, xr) * f32(round(freq) + 2))
    elif kind == "waves":
        s = np.sin(xr * w + np.sin(yr * (w * f32(0.35))) * f32(2.0))
    else:  # dots
        s = np.cos(xr * w) * np.cos(yr * w) * f32(2.5) - f32(0.6)
    t = (np.clip(s, -1, 1) * f32(0.5) + f32(0.5))[..., None]
    obj = colours[1] + t * (colours[0] - colours[1])
    q = (xr / f32(axes[0])) ** 2 + (yr / f32(axes[1])) ** 2
    mask = np.clip((f32(1) - q) * f32(6), 0, 1)[..., None]
    image += mask * (obj - image)


def _image_rng(seed: int, split: str, c: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_ID[split], c, i])


def _raw_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) for a --raw image."""
    p = rng.uniform()
    table = _LANDSCAPE if p < 0.72 else _PORTRAIT if p < 0.93 else _LARGE
    w, h = table[int(rng.integers(len(table)))]
    return h, w


def _corrupt_bytes(kind: str, image: np.ndarray, quality: int, rng: np.random.Generator) -> bytes:
    def save(im: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    rgb = Image.fromarray(image)
    if kind == "png":
        return save(rgb, "PNG")
    if kind == "cmyk":
        return save(rgb.convert("CMYK"), "JPEG", quality=quality)
    if kind == "grayscale":
        return save(rgb.convert("L"), "JPEG", quality=quality)
    if kind == "truncated":
        data = save(rgb, "JPEG", quality=quality)
        return data[: len(data) // 2]
    if kind == "random_bytes":
        return rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    if kind == "empty":
        return b""
    raise ValueError(kind)


def _check_out(out: Path, force: bool) -> None:
    """Refuse to replace anything but a dataset this tool wrote (or an empty folder)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExists(f"{out}: exists and is not a directory")
    if not force:
        raise OutputExists(f"{out}: already exists (use --force to replace it)")
    ours = (out / "manifest.json").is_file() or (out / "fake-data.json").is_file() or not any(out.iterdir())
    if not ours:
        raise OutputExists(f"{out}: exists and is not an alexnetd dataset; not replacing it, even with --force")


def make_fake_data(
    out: str | Path,
    classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 20,
    size: int = 256,
    shards: int = 4,
    seed: int = 0,
    quality: int = 90,
    raw: bool = False,
    corrupt: int = 0,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write a synthetic dataset to `out` (atomically) and return its path.

    Prepared (default): S×S JPEG shards plus index, mean image and colour PCA, exactly
    the layout `prepare` writes. `raw=True`: an ImageFolder tree `out/train/<wnid>/*.JPEG`,
    `out/val/<wnid>/*.JPEG` of ImageNet-like sizes (`size` does not apply), with `corrupt`
    bad files mixed into train, cycling through CORRUPT_KINDS.
    """
    out = Path(out)
    if classes < 1 or train_per_class < 1 or val_per_class < 0 or shards < 1 or size < 8:
        raise ValueError("classes, train-per-class and shards must be >= 1, size >= 8, val-per-class >= 0")
    if corrupt and not raw:
        raise ValueError("--corrupt only applies to --raw output")
    _check_out(out, force)
    specs = [class_spec(seed, c) for c in range(classes)]
    params = dict(classes=classes, train_per_class=train_per_class, val_per_class=val_per_class, seed=seed,
                  quality=quality)
    total = classes * (train_per_class + val_per_class) + corrupt
    bar = tqdm(total=total, desc=f"fake-data {out.name}", unit="img", disable=not progress, leave=False)
    try:
        if raw:
            _write_raw(out, specs, params | {"raw": True, "corrupt": corrupt}, force, bar)
        else:
            _write_prepared(out, specs, params | {"size": size, "shards": shards}, force, bar)
    finally:
        bar.close()
    return out


def _write_prepared(out: Path, specs: list[ClassSpec], params: dict, force: bool, bar) -> None:
    size, classes = params["size"], len(specs)
    codec = JpegCodec(params["quality"])
    per_shard = math.ceil(classes * params["train_per_class"] / params["shards"])
    names = [wnid(c) for c in range(classes)]
    with PreparedWriter(out, names, [s.name for s in specs], size=size, force=force) as writer:
        for split, count in (("train", params["train_per_class"]), ("val", params["val_per_class"])):
            if not count:
                continue
            writer.begin(split, max_count=per_shard)
            n = 0
            for c in range(classes):
                for i in range(count):
                    image = render(specs[c], _image_rng(params["seed"], split, c, i), size, size)
                    data = codec.encode(image, writer.stats if split == "train" else None)
                    stem = f"{names[c]}_{i}" if split == "train" else f"ILSVRC2012_val_{n + 1:08d}"
                    writer.add(writer.key(stem, names[c]), data, c)
                    n += 1
                    bar.update()
            writer.end()
        writer.commit({"source": {"fake-data": params}})


def _write_raw(out: Path, specs: list[ClassSpec], params: dict, force: bool, bar) -> None:
    from turbojpeg import TJPF_RGB, TJSAMP_420

    from alexnetd.pipeline.jpeg import open_turbojpeg

    turbo = open_turbojpeg()
    seed, quality, classes = params["seed"], params["quality"], len(specs)
    names = [wnid(c) for c in range(classes)]
    remove_stale_temp_dirs(out)
    tmp = temp_dir_for(out)
    tmp.mkdir(parents=True)
    try:
        n_val = 0
        for split, count in (("train", params["train_per_class"]), ("val", params["val_per_class"])):
            for c in range(classes):
                folder = tmp / split / names[c]
                folder.mkdir(parents=True)
                for i in range(count):
                    rng = _image_rng(seed, split, c, i)
                    image = render(specs[c], rng, *_raw_size(rng))
                    data = turbo.encode(image, quality=quality, pixel_format=TJPF_RGB, jpeg_subsample=TJSAMP_420)
                    if split == "train":
                        fname = f"{names[c]}_{i}.JPEG"
                    else:
                        n_val += 1
                        fname = f"ILSVRC2012_val_{n_val:08d}.JPEG"
                    (folder / fname).write_bytes(data)
                    bar.update()
        for k in range(params["corrupt"]):
            kind = CORRUPT_KINDS[k % len(CORRUPT_KINDS)]
            c = k % classes
            rng = _image_rng(seed, "corrupt", c, k)
            image = render(specs[c], rng, *_raw_size(rng))
            fname = f"{names[c]}_{params['train_per_class'] + k}.JPEG"
            (tmp / "train" / names[c] / fname).write_bytes(_corrupt_bytes(kind, image, quality, rng))
            bar.update()
        (tmp / "synset_words.txt").write_text("".join(f"{n} {s.name}\n" for n, s in zip(names, specs)))
        (tmp / "fake-data.json").write_text(json.dumps(params, indent=1) + "\n")
        replace_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
