"""Remote augmenters: images/s of 1 local augmenter against 1 local + 1 remote, on loopback.

    .venv/bin/python bench/remote.py                    # 10 s a row, 3 rounds, prepared 256x256 set
    .venv/bin/python bench/remote.py --set raw          # full-size ImageFolder JPEGs (decode is dearer)
    .venv/bin/python bench/remote.py --seconds 5 --rounds 1 --json
    .venv/bin/python bench/remote.py --no-pin           # every process on every core

The two rows alternate (local, remote, local, remote, ...) for --rounds rounds and the
median of each is reported: on a shared machine, load that comes and goes then falls on
both rows alike.

Both rows run the real input side (loader, augmenter, copier; a trainer that discards each
batch, as `bench-input` does); the second adds the gateway and one `alexnetd augment`
process connected over CURVE-encrypted TCP on 127.0.0.1, so every batch it makes is
JPEG bytes out and 256x256 uint8 pixels back through the kernel's TCP stack.

A remote host brings its own cores. To stand in for that on one machine, by default the
trainer's side (loader, augmenter, gateway, copier) is pinned to the first allowed CPU and
the remote worker to the second, in both rows: "1 local" then has one core, and the
remote row one more, as a CPU host on the network would add. On a 2-core machine that
is all there is, so the loader, copier and gateway share the local augmenter's core, and
the ratio says what one remote core adds on top of one busy local core, not what a
bigger box would see. Without --pin every process may use every core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from input import CACHE, cached_dataset  # bench/input.py, next to this file

from alexnetd.pipeline.launch import InputPipeline
from alexnetd.pipeline.netaddr import free_port
from alexnetd.service.keys import add_client

BATCH = 128
WARMUP_BATCHES = 3
RAW = dict(classes=10, train_per_class=40)  # ImageNet-like sizes: ~110 KB, ~400x350 and up


def raw_dataset() -> Path:
    """An ImageFolder set of full-size JPEGs (`fake-data --raw`), made once under bench/.cache."""
    final = CACHE / f"raw-{RAW['classes']}x{RAW['train_per_class']}"
    if (final / "train").is_dir():
        return final
    partial = final.with_name(final.name + ".partial")
    subprocess.run([sys.executable, "-m", "alexnetd", "fake-data", str(partial), "--raw", "--force",
                    "--classes", str(RAW["classes"]), "--train-per-class", str(RAW["train_per_class"]),
                    "--val-per-class", "0"], check=True, stdout=sys.stderr)
    partial.rename(final)
    return final


def measure(pipe: InputPipeline, seconds: float) -> tuple[float, int]:
    for _ in range(WARMUP_BATCHES):  # spawn, imports, first reads are not throughput
        batch = pipe.copier.next_batch(timeout_ms=120_000)
        if batch is None:
            raise SystemExit("the input pipeline delivered nothing in 120 s")
        pipe.copier.release(batch)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = pipe.copier.next_batch(timeout_ms=60_000)
        if batch is None:
            raise SystemExit("the input pipeline stalled for 60 s")
        images += batch.n
        pipe.copier.release(batch)
    return images / (time.perf_counter() - start), images


def remote_images(pipe: InputPipeline) -> int:
    time.sleep(1.2)  # the gateway's next beats carry its counts
    beats = pipe.poll_beats().values()
    return sum(sum(b["remote"]["images"].values()) for b in beats if b.get("remote"))


def run_local(data: Path, tmp: Path, seconds: float, slots) -> float:
    with InputPipeline(data, tmp / "local", batch=BATCH, augmenters=1, val_every=0, slots=slots) as pipe:
        return measure(pipe, seconds)[0]


def run_remote(data: Path, tmp: Path, seconds: float, slots, workers: int, remote_cpus: set) -> tuple[float, float]:
    """(images/s, share of the images the remote host made) with 1 local + the remote host."""
    run_dir, port = tmp / "remote", free_port()
    run_dir.mkdir(mode=0o700, exist_ok=True)
    key = tmp / "bench.key"
    if not key.exists():
        add_client(run_dir, "bench", key)
    remote = dict(addr=f"127.0.0.1:{port}", keys_dir=str(run_dir))
    with InputPipeline(data, run_dir, batch=BATCH, augmenters=1, val_every=0, remote=remote, slots=slots) as pipe:
        worker = subprocess.Popen(
            [sys.executable, "-m", "alexnetd", "augment", "--connect", f"127.0.0.1:{port}", "--key", str(key),
             "--workers", str(workers)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: os.sched_setaffinity(0, remote_cpus))
        try:
            deadline = time.monotonic() + 120
            while not any((b.get("remote") or {}).get("hosts") for b in pipe.poll_beats().values()):
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit("the remote augmenter did not join within 120 s")
                time.sleep(0.2)
            before = remote_images(pipe)
            rate, total = measure(pipe, seconds)
            share = (remote_images(pipe) - before) / total if total else 0.0
        finally:
            worker.kill()
            worker.wait()
    return rate, min(1.0, share)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="A dataset [--set's, made once under bench/.cache].")
    parser.add_argument("--set", choices=["prepared", "raw"], default="prepared",
                        help="prepared: 256x256 shards (fake-20x100); raw: full-size ImageFolder JPEGs.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Per row and round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="Remote worker processes [1].")
    parser.add_argument("--slots", type=int, default=None, help="Ring slots, both rows [the daemon's default].")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="Local side on one CPU, the remote worker on another [on].")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    data = Path(args.data) if args.data else (raw_dataset() if args.set == "raw" else cached_dataset())
    cpus = sorted(os.sched_getaffinity(0))
    local_cpus, remote_cpus = ({cpus[0]}, set(cpus[1:1 + args.workers]) or {cpus[0]}) if args.pin else (set(cpus), set(cpus))
    os.sched_setaffinity(0, local_cpus)  # the pipeline's processes inherit it
    local, remote, shares = [], [], []
    with tempfile.TemporaryDirectory(prefix="alexnetd-bench-remote-") as tmp:
        for _ in range(args.rounds):
            local.append(run_local(data, Path(tmp), args.seconds, args.slots))
            rate, share = run_remote(data, Path(tmp), args.seconds, args.slots, args.workers, remote_cpus)
            remote.append(rate)
            shares.append(share)
    rows = {"1 local": statistics.median(local), "1 local + 1 remote": statistics.median(remote)}
    result = {"data": str(data), "batch_size": BATCH, "slots": args.slots, "seconds": args.seconds,
              "rounds": args.rounds, "pinned": args.pin, "local_cpus": sorted(local_cpus),
              "remote_cpus": sorted(remote_cpus), "remote_workers": args.workers,
              "images_per_second": {k: round(v, 1) for k, v in rows.items()},
              "each_round": {"1 local": [round(v, 1) for v in local], "1 local + 1 remote": [round(v, 1) for v in remote]},
              "ratio": round(rows["1 local + 1 remote"] / rows["1 local"], 2),
              "remote_share_of_images": round(statistics.median(shares), 2)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"data {data}; batch {BATCH}; {args.seconds:.0f} s a row, {args.rounds} round(s), medians; "
          + (f"local side on CPU {sorted(local_cpus)}, remote worker(s) on CPU {sorted(remote_cpus)}" if args.pin
             else f"no pinning, {len(cpus)} CPUs"))
    for name, rate in rows.items():
        print(f"{name:<22} {rate:9.1f} images/s   rounds: {result['each_round'][name]}")
    print(f"ratio {result['ratio']:.2f}x; the remote host made {result['remote_share_of_images']:.0%} of the images")


if __name__ == "__main__":
    main()
