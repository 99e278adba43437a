"""How long `prepare` takes per 1000 ImageNet-size images, by worker count.

    .venv/bin/python bench/prepare.py                    # workers 1 and 2, 1000 images
    .venv/bin/python bench/prepare.py --workers 1,2,4 --json

It generates (once, kept under bench/.cache/) a --raw ImageFolder tree of ImageNet-like
sizes — mostly ~500x375, some portrait, a few up to 1600x1200 — and times the whole of
`alexnetd.pipeline.prepare.prepare` on it: listing, decode with DCT down-scaling, the §2
resize and central crop, JPEG re-encode, the statistics decode, tar and index writing,
the final rename. The OS page cache is warm (the tree is read once before timing).

One peer row for scale: the usual ImageNet resize script, one process of Pillow
(open, convert to RGB, bilinear resize of the shorter side to 256, central crop, save
q90), without shards or statistics. The ratio column is peer seconds ÷ row seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.fakedata import make_fake_data
from alexnetd.pipeline.prepare import prepare

CACHE = Path(__file__).resolve().parent / ".cache"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def raw_tree(images: int) -> Path:
    """10 classes of images/10 training images each (no val), generated on first use."""
    path = CACHE / f"prepare-raw-{images}"
    if not (path / "fake-data.json").is_file():
        log(f"generating {images} ImageNet-size images in {path} (once)")
        CACHE.mkdir(parents=True, exist_ok=True)
        make_fake_data(path, classes=10, train_per_class=images // 10, val_per_class=0, raw=True, force=True)
    return path


def time_prepare(src: Path, workers: int) -> float:
    with tempfile.TemporaryDirectory(prefix="alexnetd-bench-prepare-") as tmp:
        start = time.perf_counter()
        report = prepare(src, Path(tmp) / "out", workers=workers, progress=False)
        seconds = time.perf_counter() - start
    assert report.total_converted == len(open_dataset(src).split("train"))
    return seconds


def time_pillow_script(src: Path) -> float:
    """The common one-process Pillow resize script, writing JPEG files."""
    files = sorted((src / "train").glob("*/*.JPEG"))
    with tempfile.TemporaryDirectory(prefix="alexnetd-bench-pil-") as tmp:
        start = time.perf_counter()
        for i, path in enumerate(files):
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = 256 / min(w, h)
                im = im.resize((max(256, round(w * scale)), max(256, round(h * scale))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - 256) // 2, (h - 256) // 2
                im = im.crop((left, top, left + 256, top + 256))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                (Path(tmp) / f"{i}.jpg").write_bytes(buf.getvalue())
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="size of the generated tree (default 1000)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--no-peer", action="store_true", help="skip the Pillow script row")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()

    src = raw_tree(args.images)
    n = len(open_dataset(src).split("train"))
    for path in (src / "train").glob("*/*"):  # warm the page cache: time the work, not the disk
        path.read_bytes()

    rows = {}
    for workers in [int(w) for w in args.workers.split(",")]:
        log(f"prepare, {workers} worker(s) ...")
        rows[f"alexnetd prepare --workers {workers}"] = time_prepare(src, workers)
    if not args.no_peer:
        log("Pillow resize script, 1 process ...")
        rows["peer: Pillow resize script, 1 process"] = time_pillow_script(src)

    peer = rows.get("peer: Pillow resize script, 1 process")
    result = {
        "images": n,
        "cpus": len(os.sched_getaffinity(0)),
        "rows": {
            name: {"seconds": round(s, 3), "seconds_per_1000": round(s * 1000 / n, 2),
                   "images_per_second": round(n / s, 1), "peer_ratio": round(peer / s, 2) if peer else None}
            for name, s in rows.items()
        },
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"prepare: {n} ImageNet-size images, {result['cpus']} CPUs allowed")
    print(f"{'row':42} {'s/1000 img':>10} {'img/s':>8} {'peer÷row':>9}")
    for name, r in result["rows"].items():
        ratio = f"{r['peer_ratio']:.2f}" if r["peer_ratio"] else "-"
        print(f"{name:42} {r['seconds_per_1000']:10.2f} {r['images_per_second']:8.1f} {ratio:>9}")


if __name__ == "__main__":
    main()
