"""A benchmark set of real photographs, assembled from what Debian installs.

    .venv/bin/python bench/photos.py            # -> bench/.cache/photos (prepared shards)

Generated patterns (`alexnetd fake-data`) compress unlike photographs: their JPEGs have
other sizes and entropy, so decode speed measured on them may not hold on ImageNet. No
photo data set can be downloaded here, but Debian's desktop-background packages ship real
photographs (flowers, insects, birds, dunes, rain, elephants). This script takes them
(installing the packages when it may), cuts each source photo into many ImageNet-like
pictures, 500x375 or 375x500, at random scales and positions, saved as quality-90 JPEGs
in an ImageFolder tree (one class per source photo), then runs `alexnetd prepare` on it,
exactly as a user prepares ImageNet. The cuts are a function of --seed.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CACHE = Path(__file__).resolve().parent / ".cache"
PACKAGES = ["mate-backgrounds", "lomiri-wallpapers-20.04", "ukui-wallpapers"]
# The photographs among those packages' files (the rest are drawings and gradients).
SOURCES = [
    "/usr/share/backgrounds/mate/nature/*.jpg",
    "/usr/share/backgrounds/mate/abstract/Elephants_5640x3172.jpg",
    "/usr/share/backgrounds/Fossa_by_Jasper_Roks.jpg",
    "/usr/share/backgrounds/Infinite-Sea_by_Aury88.jpg",
    "/usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg",
    "/usr/share/backgrounds/calla.png",
    "/usr/share/backgrounds/city.png",
    "/usr/share/backgrounds/desert.png",
    "/usr/share/backgrounds/goldfish.png",
]
MIN_SOURCES = 8


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def source_photos() -> list[Path]:
    found = sorted({Path(p) for pattern in SOURCES for p in glob.glob(pattern)})
    if len(found) < MIN_SOURCES:
        log(f"installing {' '.join(PACKAGES)} (Debian's background photographs)")
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                       stdout=subprocess.DEVNULL, check=False)
        found = sorted({Path(p) for pattern in SOURCES for p in glob.glob(pattern)})
    if len(found) < MIN_SOURCES:
        sys.exit(f"photos: found {len(found)} source photographs, need {MIN_SOURCES}; "
                 f"install {' '.join(PACKAGES)} as root")
    return found


def cut(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One ImageNet-like picture from a photo: a random window of a random scale, resized
    to 500x375 (or 375x500)."""
    width, height = (500, 375) if rng.random() < 0.75 else (375, 500)
    scale = rng.uniform(0.15, 1.0) * min(photo.width / width, photo.height / height)
    box_w, box_h = int(width * scale), int(height * scale)
    left = int(rng.integers(0, photo.width - box_w + 1))
    top = int(rng.integers(0, photo.height - box_h + 1))
    return photo.resize((width, height), Image.BICUBIC, box=(left, top, left + box_w, top + box_h))


def build(out: Path, per_photo: int, val_per_photo: int, seed: int) -> Path:
    if (out / "manifest.json").exists():
        return out
    raw = out.with_name(out.name + "-raw")
    shutil.rmtree(raw, ignore_errors=True)
    rng = np.random.default_rng(seed)
    photos = source_photos()
    log(f"cutting {len(photos)} photographs into {per_photo + val_per_photo} pictures each: {raw}")
    for path in photos:
        with Image.open(path) as im:
            photo = im.convert("RGB")
        for split, count in (("train", per_photo), ("val", val_per_photo)):
            if not count:
                continue
            folder = raw / split / path.stem.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                cut(photo, rng).save(folder / f"{i:04d}.JPEG", quality=90)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "alexnetd", "prepare", str(raw), str(partial)], check=True,
                   stdout=sys.stderr)
    partial.rename(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=CACHE / "photos")
    ap.add_argument("--per-photo", type=int, default=120, help="training pictures cut from each photo")
    ap.add_argument("--val-per-photo", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build(args.out, args.per_photo, args.val_per_photo, args.seed))


if __name__ == "__main__":
    main()
