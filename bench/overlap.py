"""The stages overlap: when the step is slower than the input, the rate is the step's.

    .venv/bin/python bench/overlap.py                     # a 150 ms step, 12 batches of 8
    .venv/bin/python bench/overlap.py --step-ms 300 --batches 24 --json

Runs `bench_input` (the real loader, augmenters and copier on a small generated set)
with a trainer that sleeps --step-ms per batch without using the CPU, as a device step
would, and prints images/s against batch / step and the trainer's busy share. With the
input hidden behind the step the ratio is about 1 and the trainer nearly always busy;
the exit status is 1 when the ratio is outside 0.9-1.1 or the trainer is busy less than
0.8 of the time. A rate, so it is measured here and not asserted in a test: a loaded
machine moves it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from alexnetd.pipeline.fakedata import make_fake_data
from alexnetd.pipeline.inputbench import bench_input

RATIO = (0.9, 1.1)
MIN_TRAINER_BUSY = 0.8


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-ms", type=float, default=150.0, help="the simulated step [150]")
    parser.add_argument("--batches", type=int, default=12, help="timed batches [12]")
    parser.add_argument("--batch-size", type=int, default=8, help="[8]")
    parser.add_argument("--augmenters", type=int, default=2, help="[2]")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="alexnetd-overlap-") as tmp:
        data = make_fake_data(Path(tmp) / "data", classes=4, train_per_class=16, val_per_class=4, shards=2,
                              seed=0, progress=False)
        result = bench_input(data, Path(tmp) / "run", batches=args.batches, batch=args.batch_size,
                             augmenters=args.augmenters, simulate_step_ms=args.step_ms, ceiling=False)
    expected = args.batch_size / (args.step_ms / 1000.0)
    ratio = result["images_per_second"] / expected
    busy = result["stages"]["trainer"]["busy"]
    met = RATIO[0] < ratio <= RATIO[1] and busy > MIN_TRAINER_BUSY
    out = {"images_per_second": result["images_per_second"], "step_rate": round(expected, 1),
           "ratio": round(ratio, 3), "trainer_busy": busy, "met": met, "stages": result["stages"]}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"images/s {out['images_per_second']}  batch/step {out['step_rate']}  ratio {out['ratio']} "
              f"(target {RATIO[0]}-{RATIO[1]})  trainer busy {busy:.2f} (target > {MIN_TRAINER_BUSY})"
              f"  {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
