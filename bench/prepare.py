"""`alexnetd prepare` from the ImageNet tarballs against the fastest plain Pillow script.

    .venv/bin/python bench/prepare.py                    # workers 1 and 2, 4000 images, 3 repeats
    .venv/bin/python bench/prepare.py --workers 1,2 --images 4000 --repeat 3 --json out.json

The data (generated once under bench/.cache/) is a miniature ILSVRC2012 download:
ILSVRC2012_img_train.tar, a tar of class tars of ImageNet-size JPEGs (mostly ~500x375,
some portrait, a few up to 1600x1200, one CMYK, one PNG named .JPEG), with the val tar
and the devkit. Each worker count N gets two rows, on the same cores:

  alexnetd   `alexnetd prepare FOLDER OUT --workers N`, the command a user runs: the whole
             job, from streaming the tar of tars to shards, index, mean/eigen statistics
             and manifest.
  Pillow     the usual resize script at its strongest, on the files extracted beforehand
             (untimed) to train/<wnid>/*.JPEG: a fork Pool(N), draft() DCT-scaled decode,
             shorter side to 256 and central crop in one bilinear resize, one q90 JPEG file
             per image. No statistics, no shards: less work than the alexnetd row.

Every run is one fresh process, timed from its start to its exit, so each row pays its
own start-up (the interpreter, the imports: torch's ~1 s for the resampler in alexnetd's
workers) once per run, as a user does. Rows are interleaved (A B A B ...) --repeat times
and the median is reported, so other load on the machine falls on both alike. The page
cache is warm (every source file is read once before timing). The table is markdown,
for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import PIL
from PIL import Image

from alexnetd.pipeline.fakeimagenet import TRAIN_TAR, make_fake_imagenet

CACHE = Path(__file__).resolve().parent / ".cache"
IMAGENET_TRAIN = 1_281_167
SIZE = 256
STARTUP_IMAGES = 10
CHUNKSIZE = 16  # images per Pool task: ~50 ms of work, so IPC is noise and the tail is short


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def archives(images: int) -> Path:
    """The folder of the three archives, generated on first use (atomically, so a folder
    that exists is complete). With val_per_class=0 the val tar is empty and the devkit
    lists no validation image; prepare accepts that (an empty val split), so all three
    archives stay, as downloaded."""
    path = CACHE / f"prepare-ilsvrc-{images}"
    if not (path / TRAIN_TAR).is_file():
        log(f"generating {images} ImageNet-size images as ILSVRC2012 archives in {path} (once)")
        CACHE.mkdir(parents=True, exist_ok=True)
        make_fake_imagenet(path, "ilsvrc2012", classes=10, train_per_class=images // 10, val_per_class=0,
                           seed=0, force=True)
    return path


def extracted(src: Path) -> Path:
    """train/<wnid>/*.JPEG from the tar of tars, as a user extracts it before a script."""
    path = src.with_name(src.name + "-files")
    if not (path / "train").is_dir():
        log(f"extracting {src / TRAIN_TAR} to {path}/train (once)")
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
        with tarfile.open(src / TRAIN_TAR) as outer:
            for member in outer:
                with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                    inner.extractall(tmp / "train" / member.name[:-4], filter="data")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


def warm(paths) -> None:
    """Read every source once: the rows time decoding and encoding, not the disk."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def draft_check(files: list[Path]) -> str:
    """Confirm draft() really scales the decode, and say how often it can: Pillow's JPEG
    draft only halves (1/2, 1/4, 1/8) while both sides stay >= the requested size, so a
    ~500x375 image, most of ImageNet, is decoded at full size."""
    reduced, example = 0, None
    for p in files:
        with Image.open(p) as im:
            before = im.size
            im.draft("RGB", (SIZE, SIZE))
            if im.size != before:
                reduced += 1
                assert min(im.size) >= SIZE, (p, before, im.size)
                if example is None or before[0] * before[1] > example[0][0] * example[0][1]:
                    example = (before, im.size)
    assert example is not None, "draft() reduced no image: the Pillow row would not DCT-scale"
    (w0, h0), (w1, h1) = example
    return (f"Pillow {PIL.__version__} draft() reduced {reduced} of {len(files)} images at decode "
            f"(e.g. {w0}x{h0} -> {w1}x{h1}); the others decode at full size")


def _pillow_one(task: tuple[str, str]) -> None:
    src, dst = task
    with Image.open(src) as im:
        im.draft("RGB", (SIZE, SIZE))  # DCT-scaled decode, shorter side kept >= 256
        if im.mode != "RGB":  # CMYK, PNG; convert() of an RGB image would only copy it
            im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        # The central square straight to 256x256: the same as scaling the shorter side to
        # 256 and cropping the centre, without the intermediate image or the crop copy.
        # No reducing_gap: after draft a JPEG (shorter side < 4096) has under 2x left to
        # shrink, so there is no integer reduce() for it to do first.
        im = im.resize((SIZE, SIZE), Image.BILINEAR, box=(left, top, left + side, top + side))
        im.save(dst, "JPEG", quality=90)  # Pillow's default 4:2:0 at q90, as alexnetd writes


def pillow_script(files_root: Path, workers: int, tmp: str) -> None:
    """The Pillow row's whole job (run as its own process: `--pillow-run`)."""
    tasks = []
    for cls in sorted(os.scandir(files_root / "train"), key=lambda e: e.name):
        os.mkdir(os.path.join(tmp, cls.name))  # once per class, not per image
        tasks += [(e.path, os.path.join(tmp, cls.name, e.name)) for e in os.scandir(cls.path)]
    if workers == 1:  # in-process, as alexnetd's one worker: no pool to pay for
        for t in tasks:
            _pillow_one(t)
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_pillow_one, tasks, chunksize=CHUNKSIZE):
                pass


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_pillow(files_root: Path, workers: int, expect: int) -> float:
    with tempfile.TemporaryDirectory(prefix="alexnetd-bench-pillow-") as tmp:
        seconds = _timed([sys.executable, __file__, "--pillow-run", str(files_root), str(workers), tmp])
        assert sum(len(os.listdir(d)) for d in Path(tmp).iterdir()) == expect
    return seconds


def time_alexnetd(src: Path, workers: int, expect: int) -> float:
    with tempfile.TemporaryDirectory(prefix="alexnetd-bench-prepare-") as tmp:
        out = Path(tmp) / "out"
        seconds = _timed([str(Path(sys.executable).with_name("alexnetd")), "prepare", str(src), str(out),
                          "--workers", str(workers)])
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["splits"]["train"]["count"] == expect, manifest["splits"]["train"]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if sys.argv[1:2] == ["--pillow-run"]:  # one Pillow row's process (see time_pillow)
        pillow_script(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    parser.add_argument("--images", type=int, default=4000, help="training images generated (default 4000)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each row, interleaved; median (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON to PATH")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    cpus = len(os.sched_getaffinity(0))
    if max(counts) > cpus:
        log(f"warning: {max(counts)} workers on {cpus} CPUs: the rows measure contention, not scaling")

    src = archives(args.images)
    files_root = extracted(src)
    files = sorted((files_root / "train").glob("*/*.JPEG"))
    n = len(files)
    tiny = archives(STARTUP_IMAGES)  # the same job on 10 images: what a run costs before its first image
    tiny_files = extracted(tiny)
    warm([*sorted(src.iterdir()), *files, *sorted(tiny.iterdir()), *(tiny_files / "train").glob("*/*.JPEG")])
    note = draft_check(files)

    times: dict[tuple[str, int, int], list[float]] = {}
    for r in range(args.repeat):
        for workers in counts:
            for tool, fn, where, tiny_where in (("alexnetd", time_alexnetd, src, tiny),
                                                ("pillow", time_pillow, files_root, tiny_files)):
                log(f"run {r + 1}/{args.repeat}: {tool}, {workers} worker(s) ...")
                times.setdefault((tool, workers, n), []).append(fn(where, workers, n))
                times.setdefault((tool, workers, STARTUP_IMAGES), []).append(fn(tiny_where, workers, STARTUP_IMAGES))
    med = {key: statistics.median(v) for key, v in times.items()}
    # Per image once started: the run's time less the same run's on 10 images (start-up,
    # pool, devkit, manifest), over the images between them.
    steady = {(tool, w): (med[(tool, w, n)] - med[(tool, w, STARTUP_IMAGES)]) / (n - STARTUP_IMAGES)
              for tool, w, _ in med}

    rows = []
    for workers in counts:
        for tool in ("alexnetd", "pillow"):
            s = med[(tool, workers, n)]
            one = steady.get((tool, 1))
            rows.append({
                "name": (f"alexnetd prepare from ILSVRC2012 tars, {workers} worker{'s' * (workers > 1)}"
                         if tool == "alexnetd" else f"Pillow script, {workers} process{'es' * (workers > 1)}"),
                "tool": tool, "workers": workers, "seconds": round(s, 3),
                "runs": [round(x, 3) for x in times[(tool, workers, n)]], "images_per_second": round(n / s, 1),
                "startup_seconds": round(med[(tool, workers, STARTUP_IMAGES)], 3),
                "startup_runs": [round(x, 3) for x in times[(tool, workers, STARTUP_IMAGES)]],
                "steady_ms_per_image": round(steady[(tool, workers)] * 1000, 3),
                "alexnetd_vs_pillow": round(s and med[("pillow", workers, n)] / s, 2) if tool == "alexnetd" else None,
                "steady_alexnetd_vs_pillow": (round(steady[("pillow", workers)] / steady[(tool, workers)], 2)
                                              if tool == "alexnetd" else None),
                "steady_scaling_vs_1": round(one / steady[(tool, workers)], 2) if one else None,
            })

    projection = None
    if 1 in counts:
        # A projection, not a measurement: one worker's steady seconds per image, divided by
        # the cores as if scaling were linear (the measured 2-vs-1 scaling says how far it
        # is), plus the start-up once.
        projection = {
            tool: {"seconds_per_image": steady[(tool, 1)], "startup_seconds": med[(tool, 1, STARTUP_IMAGES)],
                   "measured_scaling_2_vs_1": round(steady[(tool, 1)] / steady[(tool, 2)], 2) if 2 in counts else None,
                   **{f"hours_at_{c}_cores": round(steady[(tool, 1)] * IMAGENET_TRAIN / c / 3600, 2)
                      for c in (2, 16)}}
            for tool in ("alexnetd", "pillow")
        }

    def cell(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    print(f"`alexnetd prepare` vs a Pillow script: {n} ImageNet-size training images, {cpus} CPUs allowed, "
          f"median of {args.repeat} interleaved runs, each a fresh process\n")
    print("| row | seconds | images/s | alexnetd ÷ Pillow | start-up s (10 images) | ms/image once started "
          "| alexnetd ÷ Pillow, started | N ÷ 1 worker, started |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['name']} | {row['seconds']:.2f} | {row['images_per_second']:.0f} | "
              f"{cell(row['alexnetd_vs_pillow'], '{:.2f}×')} | {row['startup_seconds']:.2f} | "
              f"{row['steady_ms_per_image']:.2f} | {cell(row['steady_alexnetd_vs_pillow'], '{:.2f}×')} | "
              f"{cell(row['steady_scaling_vs_1'], '{:.2f}×')} |")
    print(f"\n{note}.")
    if projection:
        print(f"\nProjection for ImageNet's {IMAGENET_TRAIN:,} training images, from the 1-worker "
              "ms/image once started, **assuming linear scaling** (not measured):\n")
        print("| tool | ms/image, 1 worker | hours at 2 cores | hours at 16 cores | measured 2 ÷ 1 scaling |")
        print("|---|---:|---:|---:|---:|")
        for tool, p in projection.items():
            print(f"| {tool} | {p['seconds_per_image'] * 1000:.2f} | {p['hours_at_2_cores']:.2f} | "
                  f"{p['hours_at_16_cores']:.2f} | {cell(p['measured_scaling_2_vs_1'], '{:.2f}×')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "images": n, "cpus": cpus, "repeat": args.repeat, "pillow": PIL.__version__, "draft": note,
            "rows": rows, "projection": projection}, indent=1) + "\n")


if __name__ == "__main__":
    main()
