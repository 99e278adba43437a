"""Input-pipeline throughput: alexnetd against the bare-decode ceiling and its peers.

    .venv/bin/python bench/input.py                      # 10 s a row, on all allowed cores
    .venv/bin/python bench/input.py --seconds 3 --json   # one JSON object on stdout
    .venv/bin/python bench/input.py --data DIR --cores 2 --only alexnetd,dali

In one run, on one prepared dataset and one set of cores, one row after another (never
two at once), it measures images/s of:

  ceiling     the fastest decode loop: libjpeg-turbo decoding the dataset's JPEGs from
              memory into one reused buffer, augmenters' flags, one process per core,
              nothing else (alexnetd.pipeline.inputbench.decode_ceiling)
  alexnetd    `alexnetd bench-input --no-ceiling --augmenters CORES`, in a subprocess:
              whole 256x256 images decoded into the ring + each sample's draws
  dataloader  torch DataLoader, CORES workers, the same job at its fastest: whole
              batches decoded by PyTurboJPEG into shared memory
  dali        NVIDIA DALI's CPU pipeline, ROI decode of the random 224 crop + flip
  dali-whole  NVIDIA DALI's CPU pipeline, whole-image decode (exactly our job)
  pil         torch DataLoader, CORES workers, torchvision-style PIL crop + flip

and prints each row's images/s with alexnetd's ratio to it (alexnetd ÷ row) next to
the target for that ratio; DALI's target is held against the faster of its two forms.
Every row reads the same files, batches of 128, uint8 NHWC out. Details in
bench/peers.py. DALI rows are skipped, saying why, if DALI cannot run.

Without --data it uses one of two sets, made once and kept under bench/.cache/:
`--set generated` (default: `alexnetd fake-data`, 20 classes x 100 training images) or
`--set photos` (real photographs from Debian's background packages, cut into
ImageNet-like pictures and prepared; bench/photos.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import peers  # bench/peers.py, next to this file
import photos  # bench/photos.py

CACHE = Path(__file__).resolve().parent / ".cache"
FAKE = dict(classes=20, train_per_class=100)

# name -> what the row is, in the table
ROWS = {
    "ceiling": "decode ceiling (reused buffer)",
    "alexnetd": "alexnetd bench-input",
    "dataloader": "torch DataLoader, batched, shm",
    "dali": "DALI CPU, ROI decode + flip",
    "dali-whole": "DALI CPU, whole-image decode",
    "pil": "torchvision-style PIL DataLoader",
}
# The least alexnetd ÷ row we aim for ("dali": against the faster DALI form).
TARGETS = {"ceiling": 0.95, "dali": 1.5, "dataloader": 1.5}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cached_dataset() -> Path:
    """The generated dataset, made on first use. Written under a temporary name and
    renamed when complete, so an interrupted run never leaves a half dataset behind."""
    name = f"fake-{FAKE['classes']}x{FAKE['train_per_class']}"
    final = CACHE / name
    if (final / "manifest.json").exists():
        return final
    partial = CACHE / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    log(f"generating the bench dataset once: {final}")
    subprocess.run([sys.executable, "-m", "alexnetd", "fake-data", str(partial),
                    "--classes", str(FAKE["classes"]), "--train-per-class", str(FAKE["train_per_class"]),
                    "--val-per-class", "0"],
                   check=True, stdout=sys.stderr)  # keep stdout for the table / JSON
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def pin_cores(cores: int | None) -> list[int]:
    """Restrict this process, and so every row's workers (they inherit it), to `cores`
    of the CPUs we are allowed; all of them by default."""
    allowed = sorted(os.sched_getaffinity(0))
    if cores is None or cores >= len(allowed):
        return allowed
    chosen = allowed[:cores]
    os.sched_setaffinity(0, chosen)
    return chosen


# -- one function per row: each returns (images/s, extra details for the JSON) ---------


def run_ceiling(data: str, cores: int, seconds: float):
    from alexnetd.pipeline.inputbench import decode_ceiling

    return decode_ceiling(data, cores, seconds), {}


def run_alexnetd(data: str, cores: int, seconds: float):
    # A subprocess, exactly as a user runs it; the same interpreter, so the same install.
    command = [sys.executable, "-m", "alexnetd", "bench-input", "--data", data, "--json",
               "--seconds", str(seconds), "--no-ceiling", "--augmenters", str(cores)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} exited with {done.returncode}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    return float(result["images_per_second"]), {"command": shlex.join(command), "result": result}


def run_dataloader(data: str, cores: int, seconds: float):
    return peers.torch_dataloader(data, cores, seconds), {}


def run_dali(data: str, cores: int, seconds: float, roi: bool = True):
    rate = peers.dali_cpu(data, cores, seconds, roi=roi)  # DaliUnavailable when it cannot run
    from nvidia.dali import __version__ as version

    return rate, {"version": version}


def run_dali_whole(data: str, cores: int, seconds: float):
    return run_dali(data, cores, seconds, roi=False)


def run_pil(data: str, cores: int, seconds: float):
    return peers.pil_dataloader(data, cores, seconds), {}


RUNNERS = {"ceiling": run_ceiling, "alexnetd": run_alexnetd, "dataloader": run_dataloader, "dali": run_dali,
           "dali-whole": run_dali_whole, "pil": run_pil}


# -- report -----------------------------------------------------------------------------


def build_report(rates: dict, details: dict, skipped: dict) -> list[dict]:
    ours = rates.get("alexnetd")
    rows = []
    for name, label in ROWS.items():
        if name not in rates and name not in skipped:
            continue  # not asked for (--only)
        row = {"name": name, "label": label, "images_per_second": rates.get(name), "ratio": None,
               "target": TARGETS.get(name), "met": None, "skipped": skipped.get(name)}
        if ours is not None and rates.get(name):
            row["ratio"] = round(ours / rates[name], 3)
            if row["target"] is not None:
                # DALI at its strongest: the target holds against the faster of its forms.
                best = max(rates.get(n) or 0 for n in ("dali", "dali-whole")) if name == "dali" else rates[name]
                row["met"] = ours / best >= row["target"]
        row["images_per_second"] = None if row["images_per_second"] is None else round(row["images_per_second"], 1)
        row.update(details.get(name, {}))
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'row':<38} {'images/s':>9}  {'alexnetd ÷ row':>14}  {'target':>8}")
    for row in rows:
        if row["skipped"]:
            print(f"{row['label']:<38} {'skipped':>9}  {row['skipped']}")
            continue
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        target = "" if row["target"] is None else f">={row['target']:g}x"
        verdict = {True: "met", False: "MISSED", None: ""}[row["met"]]
        print(f"{row['label']:<38} {row['images_per_second']:>9.1f}  {ratio:>14}  {target:>8}  {verdict}".rstrip())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="prepared dataset directory [default: --set's, cached in bench/.cache/]")
    ap.add_argument("--set", dest="dataset_set", choices=["generated", "photos"], default="generated",
                    help="without --data: generated patterns or real photographs [generated]")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row, after warm-up")
    ap.add_argument("--cores", type=int, default=None, help="cores to use [default: all allowed]")
    ap.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows to run, of: {','.join(ROWS)}")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in ROWS]
    if unknown:
        ap.error(f"unknown rows: {', '.join(unknown)} (have: {', '.join(ROWS)})")
    if args.cores is not None and args.cores < 1:
        ap.error("--cores must be at least 1")

    command = shlex.join([sys.executable, *sys.argv])
    if not args.json:
        print(f"$ {command}", flush=True)
    if args.data:
        data = args.data
    elif args.dataset_set == "photos":
        data = str(photos.build(photos.CACHE / "photos", per_photo=120, val_per_photo=0, seed=0))
    else:
        data = str(cached_dataset())
    cpus = pin_cores(args.cores)
    cores = len(cpus)

    from alexnetd.pipeline.dataset import open_dataset

    dataset = open_dataset(data)
    if dataset.kind != "prepared":
        # The peers read tar shards (DALI) and crop stored 256x256 images; a raw tree of
        # full-size photos would give them different work from ours.
        ap.error(f"{data}: a prepared dataset is needed (alexnetd prepare), not {dataset.kind}")
    images = len(dataset.split("train"))
    if not args.json:
        print(f"data {data} ({images} training images); {cores} cores (CPUs {','.join(map(str, cpus))}); "
              f"{args.seconds:g} s a row after warm-up; batch {peers.BATCH}, uint8 NHWC out", flush=True)

    rates, details, skipped = {}, {}, {}
    for name in ROWS:  # one after another: each row has the cores to itself
        if name not in only:
            continue
        log(f"measuring {ROWS[name]} ...")
        try:
            rate, extra = RUNNERS[name](data, cores, args.seconds)
        except peers.DaliUnavailable as exc:
            skipped[name] = str(exc)
            log(f"  skipped: {exc}")
            continue
        rates[name], details[name] = rate, extra
        log(f"  {rate:.1f} images/s")

    rows = build_report(rates, details, skipped)
    if args.json:
        print(json.dumps({"command": command, "data": data, "train_images": images, "cores": cores, "cpus": cpus,
                          "seconds": args.seconds, "batch_size": peers.BATCH, "rows": rows}))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
