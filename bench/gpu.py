"""The whole GPU measurement as one command: one JSON and one markdown table.

    python bench/gpu.py --out gpu-results/                    # a GPU host, <= 9 minutes
    python bench/gpu.py --wheels wheels/ --out gpu-results/   # a host with CUDA torch only
    python bench/gpu.py --dry-run --out /tmp/gpu-dry          # every row on the CPU, tiny sizes

Rows, one after another (each has the machine to itself), each with its own time budget,
in this order (rows past --budget are skipped, saying so):

  matmul      a large bf16 matmul: the measured peak that the MFU column is held against
  synthetic   the training step at batch 128 on data already on the device: fp32,
              bf16 autocast, bf16 + channels_last, CUDA graphs (and, last, torch.compile);
              ms/step, images/s, share of the datasheet bf16 peak, MFU
  daemon      `alexnetd start` on prepared shards, CPU augmenters on all cores: images/s,
              its ratio to the synthetic step of the same configuration, and the
              per-stage shares (which stage starves the GPU); then with --cuda-graphs
  dali        the same with `--decoder dali` ("not carried" when DALI's wheel is not here)
  full-size   `alexnetd start` on an ImageFolder tree of ImageNet-size JPEGs (decoded and
              down-sampled per sample), with `--decoder cpu` and `--decoder dali`
  dataloader  a torchvision-style DataLoader (PIL decode, random crop, flip; workers on
              all cores) feeding the same step, end to end: the pipeline peers would pick
  towers      the two-tower model with both towers on one device: outputs and gradients
              equal AlexNet's (the code path of --parallel model; two GPUs need two devices)
  gpu-tests   `pytest -m gpu`: the CUDA copier test, the graphed step and the other GPU tests
  daemon --cuda-graphs at 256, torch.compile, daemon --compile at 128 and 256
              each form's daemon rows against the synthetic step of that form

Targets, judged on CUDA only: daemon >= 0.95 x synthetic; daemon >= 3 x dataloader;
full-size dali >= 3 x full-size cpu; synthetic ms/step within 2 x the arithmetic floor
(FLOPs per step / bf16 peak).

--wheels DIR sets the host up first: `pip install --no-index` of this checkout with
--find-links DIR and each of its sub-folders (pyzmq, PyTurboJPEG and the rest come from
there; the installed CUDA torch is kept), DALI too (the `dali` extra) when its wheel is
there whole or in parts (bench/gpuhost.py joins and checks them), and the TurboJPEG
library shipped there (libturbojpeg.so*) is what alexnetd loads. How to fill DIR and
carry it: README, "GPU measurement".
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Sibling modules, found next to this file (the script's directory is on sys.path).
from gpudaemon import prepare_data, run_daemon
from gpuhost import datasheet_peak, imports_cleanly, log, set_up_from_wheels, skipped
from gpupeers import run_dataloader, run_gpu_tests, run_towers
from gpustep import SYNTHETIC, flops_per_image, run_matmul_peak, run_synthetic

# The whole run on a GPU host, under one call's 10 minutes with the start and the
# transfers: the eager and end-to-end rows first, then the daemon's other forms.
# With DALI carried in parts the calls before it spent device time: --budget 420.
BUDGET_S = 540


class _OverBudget(Exception):
    """The run's time budget has no room for this row."""


class Context:
    def __init__(self, args, device, out: Path, scratch: Path):
        import torch

        self.device, self.out, self.scratch = device, out, scratch
        self.dry_run = args.dry_run
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # before any row: CUDA graphs capture the tuned kernels
        self.cores = len(os.sched_getaffinity(0))
        if args.dry_run:  # tiny: every code path, seconds each
            self.batch, self.warmup, self.steps, self.seconds = 2, 1, 2, 0.0
            # No fixed window: it lasts until the next step anyway. Polled 10 times a second.
            self.daemon_seconds, self.daemon_start_timeout, self.tests_timeout = 0.0, 180, 180
            self.daemon_poll_seconds = 0.1
        else:
            self.batch, self.warmup, self.steps, self.seconds = args.batch_size, 10, 30, 5.0
            self.daemon_seconds, self.daemon_start_timeout, self.tests_timeout = 20.0, 120, 90
            self.daemon_poll_seconds = 0.5
        self.num_classes = 1000
        self.data = None
        self.name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.flops = flops_per_image()
        self.peak = args.peak_tflops * 1e12 if args.peak_tflops else datasheet_peak(self.name)
        self.measured_peak = None  # the matmul row's bf16 FLOP/s, once it has run
        self.full_size_data = None  # made by the first full-size row

    def peak_share(self, images_per_second: float) -> dict:
        """Achieved FLOP/s, its share of the datasheet bf16 peak and its MFU (share of the
        measured bf16 matmul rate); None where that peak is not known."""
        achieved = self.flops * images_per_second
        return {"tflops": _figures(achieved / 1e12),
                "share_of_bf16_peak": _figures(achieved / self.peak) if self.peak else None,
                "mfu": _figures(achieved / self.measured_peak) if self.measured_peak else None}


def _figures(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant figures: a slow CPU's 0.0066 TFLOP/s is not 0.007
    (rounding to decimal places would make MFU disagree with tflops ÷ the peak's)."""
    return float(f"{value:.{digits}g}")


def markdown(report: dict) -> str:
    lines = [f"# bench/gpu.py on {report['device']}", "",
             f"`{report['command']}`, {report['started']}; batch {report['batch']}, {report['cores']} cores, "
             f"{report['flops_per_image'] / 1e9:.2f} GFLOP per trained image, bf16 peak "
             + (f"{report['bf16_peak_tflops']:g} TFLOP/s" if report["bf16_peak_tflops"] else "unknown"), "",
             "| row | status | ms/step | images/s | × synthetic | share of bf16 peak | MFU | notes |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in report["rows"]:
        def num(key, fmt):
            return fmt.format(row[key]) if row.get(key) is not None else ""
        notes = row.get("reason") or ""
        if row.get("bottleneck"):
            shares = ", ".join(f"{s} {v['busy']:.0%} busy/{v['starved']:.0%} starved" for s, v in row["stages"].items())
            notes = f"bottleneck {row['bottleneck']}; {shares}"
            if row.get("synthetic"):
                notes += f"; × {row['synthetic']} (batch {report['batch']})"
        if row["name"] == "towers" and row["status"] == "ok":
            notes = (f"{row['dtype']}: outputs within {row['output_relative_error']:.1e}, gradients within "
                     f"{row['gradient_relative_error']:.1e} (bound {row['bound']:.0e})")
        if row["name"] == "gpu-tests" and "tests" in row:
            notes = (notes + "; " if notes else "") + (f"{row['passed']} passed, {row['skipped']} skipped, "
                                                       f"{row['failures'] + row['errors']} failed")
        if row["name"] == "matmul" and row["status"] == "ok":
            notes = f"{row['n']}² bf16 matmul: {row['tflops']:g} TFLOP/s, the MFU column's peak"
        if row.get("compile_seconds") is not None:
            notes = f"compiled in {row['compile_seconds']} s"
        lines.append(f"| {row['label']} | {row['status']} | {num('ms_per_step', '{:.2f}')} | "
                     f"{num('images_per_second', '{:.0f}' if (row.get('images_per_second') or 0) >= 100 else '{:.1f}')} | {num('ratio_to_synthetic', '{:.2f}')} | "
                     f"{num('share_of_bf16_peak', '{:.1%}')} | {num('mfu', '{:.1%}')} | {notes} |")
    lines.append("")
    for target in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not judged"}[target["met"]]
        value = "" if target["value"] is None else f"{target['value']:.3g}"
        lines.append(f"- {target['what']}: {value} ({verdict})")
    return "\n".join(lines) + "\n"


def _daemon_form(form: str, batch: int):
    """A daemon row with a train step form at a batch (tiny under --dry-run)."""
    name = f"daemon-{form.strip('-').replace('-', '')}-{batch}"

    def runner(ctx):
        return run_daemon(ctx, form=form, batch=ctx.batch * batch // 128 if ctx.dry_run else batch)

    return name, f"alexnetd daemon {form}, batch {batch}", runner


def _synthetic(key: str):
    return f"synthetic-{key}", f"synthetic step, {SYNTHETIC[key][0]}", lambda ctx: run_synthetic(ctx, key)


# In the order they run, what decides the CUDA defaults first: the eager and graphed
# steps, the daemon with each; then the input side's rows; torch.compile last, since a
# compile that takes longer than hoped then squeezes out nothing else. Rows past the
# budget are skipped, saying so; `--only` runs them in another call.
ROWS = [  # (name, label, runner)
    ("matmul", "bf16 matmul (the measured peak)", run_matmul_peak),
    _synthetic("fp32"), _synthetic("bf16"), _synthetic("bf16_cl"), _synthetic("cudagraph"),
    ("daemon", "alexnetd daemon end to end (CPU augmenters)", run_daemon),
    _daemon_form("--cuda-graphs", 128),
    ("dali", "alexnetd daemon end to end (--decoder dali)", lambda ctx: run_daemon(ctx, "dali")),
    ("full-size-cpu", "full-size JPEGs, alexnetd daemon (CPU augmenters)",
     lambda ctx: run_daemon(ctx, "cpu", full_size=True)),
    ("full-size-dali", "full-size JPEGs, alexnetd daemon (--decoder dali)",
     lambda ctx: run_daemon(ctx, "dali", full_size=True)),
    ("dataloader", "torchvision-style DataLoader + the same step", run_dataloader),
    ("towers", "two towers on one device = AlexNet", run_towers),
    _daemon_form("--cuda-graphs", 256),
    ("gpu-tests", "pytest -m gpu", run_gpu_tests),
    _synthetic("compile"), _daemon_form("--compile", 128), _daemon_form("--compile", 256),
]
FORM_ROWS = [name for name, _, _ in ROWS if name.startswith("daemon-") and name[-1].isdigit()]
NEEDS_DATA = {"daemon", "dali", "dataloader", *FORM_ROWS}  # the prepared shards; full-size rows make their own
# Seconds each row may take on a GPU host (the rows' own timeouts and windows fit in
# these); together under BUDGET_S. A row whose budget no longer fits is skipped.
ROW_BUDGET_S = {"matmul": 5, "full-size-cpu": 80, "full-size-dali": 80,
                "synthetic-fp32": 15, "synthetic-bf16": 15, "synthetic-bf16_cl": 15, "synthetic-compile": 90,
                "synthetic-cudagraph": 20, "daemon": 70, "dali": 70, "dataloader": 30, "towers": 10,
                "gpu-tests": 90, "daemon-cudagraphs-128": 60, "daemon-cudagraphs-256": 60,
                "daemon-compile-128": 150, "daemon-compile-256": 150}


def targets(rows: dict, on_cuda: bool, floor_ms: float | None) -> list[dict]:
    synthetic = rows.get("synthetic-bf16_cl" if on_cuda else "synthetic-fp32", {})
    best = [r for k, r in rows.items() if k.startswith("synthetic-") and r.get("ms_per_step")]
    best_ms = min((r["ms_per_step"] for r in best), default=None)
    daemon, peer = rows.get("daemon", {}), rows.get("dataloader", {})
    full_cpu, full_dali = rows.get("full-size-cpu", {}), rows.get("full-size-dali", {})

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    checks = [
        ("daemon ÷ synthetic step of the same configuration (target >= 0.95)",
         ratio(daemon.get("images_per_second"), synthetic.get("images_per_second")), lambda v: v >= 0.95),
        ("daemon ÷ torchvision-style DataLoader (target >= 3)",
         ratio(daemon.get("images_per_second"), peer.get("images_per_second")), lambda v: v >= 3),
        ("full-size JPEGs: --decoder dali ÷ cpu (target >= 3)",
         ratio(full_dali.get("images_per_second"), full_cpu.get("images_per_second")), lambda v: v >= 3),
        ("fastest synthetic ms/step ÷ arithmetic floor at the bf16 peak (target <= 2)",
         ratio(best_ms, floor_ms), lambda v: v <= 2),
    ]
    return [{"what": what, "value": value, "met": (test(value) if on_cuda and value is not None else None)}
            for what, value, test in checks]


def build_report(ctx, args, argv, results: dict, begun: float, stamp: str) -> dict:
    import torch

    on_cuda = ctx.device.type == "cuda"
    synthetic = results.get("synthetic-bf16_cl" if on_cuda else "synthetic-fp32", {})
    for row in results.values():
        # A form's daemon rows against the synthetic step of that form; the others the eager one.
        reference = results.get(row["synthetic"], {}) if row.get("synthetic") else synthetic
        if row.get("images_per_second") and reference.get("images_per_second"):
            row["ratio_to_synthetic"] = round(row["images_per_second"] / reference["images_per_second"], 3)
    floor_ms = ctx.flops * ctx.batch / ctx.peak * 1e3 if ctx.peak else None
    return {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench/gpu.py", *argv]),
        "started": stamp, "dry_run": args.dry_run, "device": ctx.name,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cores": ctx.cores, "batch": ctx.batch,
        "flops_per_image": ctx.flops, "bf16_peak_tflops": ctx.peak / 1e12 if ctx.peak else None,
        "floor_ms_per_step": round(floor_ms, 3) if floor_ms else None,
        "seconds": round(time.monotonic() - begun, 1), "rows": list(results.values()),
        "targets": targets(results, on_cuda, floor_ms),
    }


def write_report(out: Path, report: dict) -> None:
    for name, text in (("gpu.json", json.dumps(report, indent=2) + "\n"), ("gpu.md", markdown(report))):
        partial = out / f".{name}.partial"
        partial.write_text(text)
        partial.replace(out / name)  # never a half-written file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="directory for gpu.json and gpu.md")
    ap.add_argument("--dry-run", action="store_true", help="every row on the CPU with tiny sizes")
    ap.add_argument("--wheels", type=Path, help="install what is missing from this directory of wheels first")
    ap.add_argument("--data", help="prepared dataset [default: generated, 10 classes x 400]")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--budget", type=int, default=BUDGET_S, metavar="SECONDS",
                    help=f"rows that no longer fit are skipped, saying so [{BUDGET_S}]")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, where the table lacks it")
    ap.add_argument("--only", help=f"comma-separated rows, of: {','.join(name for name, _, _ in ROWS)}")
    args = ap.parse_args(argv)
    names = [name for name, _, _ in ROWS]
    only = names if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown or not only:
        ap.error(f"unknown rows: {', '.join(unknown)}" if unknown else "--only names no row")
    if args.wheels:
        set_up_from_wheels(args.wheels)
    elif (why := imports_cleanly()) is not None:
        sys.exit(f"bench/gpu.py: alexnetd does not import here ({why}); install it, or pass --wheels DIR")

    import torch

    begun = time.monotonic()
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda:0")
    else:
        sys.exit("bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False); "
                 "--dry-run runs the rows on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with tempfile.TemporaryDirectory(prefix="alexnetd-gpu-") as scratch:
        ctx = Context(args, device, args.out, Path(scratch))
        log(f"{ctx.name}: {ctx.flops / 1e9:.2f} GFLOP per trained image; bf16 peak "
            + (f"{ctx.peak / 1e12:g} TFLOP/s" if ctx.peak else "unknown (--peak-tflops)"))
        results: dict[str, dict] = {}
        for name, label, runner in ROWS:
            if name not in only:
                continue
            log(f"{label} ...")
            started = time.monotonic()
            left = args.budget - (started - begun)
            try:
                if not args.dry_run and left < ROW_BUDGET_S[name]:
                    raise _OverBudget(f"{left:.0f} s of the {args.budget} s budget left, the row needs "
                                      f"{ROW_BUDGET_S[name]} s")
                if name in NEEDS_DATA and ctx.data is None:
                    ctx.data = prepare_data(ctx, args)
                row = runner(ctx)
            except _OverBudget as exc:
                row = skipped(str(exc))
            except Exception as exc:  # one broken row must not lose the others' measurements
                row = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc(limit=4)}
            row = {"name": name, "label": label, **row, "seconds": round(time.monotonic() - started, 1)}
            results[name] = row
            log(f"  {row['status']}" + (f": {row['reason']}" if row.get("reason") else "")
                + (f", {row['images_per_second']:.1f} images/s" if row.get("images_per_second") else ""))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # After every row: a run cut short still leaves what it measured.
            report = build_report(ctx, args, argv, results, begun, stamp)
            write_report(args.out, report)
    sys.stdout.write(markdown(report))
    log(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'} in {report['seconds']:.0f} s")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
