"""The whole GPU measurement as one command: one JSON and one markdown table.

    python bench/gpu.py --out gpu-results/                    # a GPU host, <= 13 minutes
    python bench/gpu.py --wheels wheels/ --out gpu-results/   # a host with CUDA torch only
    python bench/gpu.py --dry-run --out /tmp/gpu-dry          # every row on the CPU, tiny sizes

Rows, one after another (each has the machine to itself), each with its own time budget:

  synthetic   the training step at batch 128 on data already on the device: fp32,
              bf16 autocast, bf16 + channels_last, torch.compile and CUDA graphs (both
              bf16 + channels_last); ms/step, images/s, share of the GPU's bf16 peak
  daemon      `alexnetd start` on prepared shards, CPU augmenters on all cores: images/s,
              its ratio to the synthetic step of the same configuration, and the
              per-stage shares (which stage starves the GPU)
  dali        the same with `--decoder dali` (skipped, saying why, until it exists)
  dataloader  a torchvision-style DataLoader (PIL decode, random crop, flip; workers on
              all cores) feeding the same step, end to end: the pipeline peers would pick
  towers      the two-tower model with both towers on one device: outputs and gradients
              equal AlexNet's (the code path of --parallel model; two GPUs need two devices)
  gpu-tests   `pytest -m gpu`: the CUDA copier test and the other GPU tests
  daemon --cuda-graphs, daemon --compile
              after the synthetic CUDA graphs and torch.compile rows: the daemon with
              the train step's other forms (service/trainstep.py) at batch 128 and 256,
              each against the synthetic step of its form; the compile rows last, they
              take longest (the rows above fit in the first 6 minutes)

Targets, judged on CUDA only: daemon >= 0.95 x synthetic; daemon >= 3 x dataloader;
synthetic ms/step within 2 x the arithmetic floor (FLOPs per step / bf16 peak).

--wheels DIR sets the host up first: `pip install --no-index --find-links DIR` of this
checkout (pyzmq, PyTurboJPEG and the rest come from DIR; the installed CUDA torch is
kept), and the TurboJPEG library shipped in DIR (libturbojpeg.so*) is what alexnetd
loads. How to fill DIR: README, "GPU measurement".
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pipeline/jpeg.py's TURBOJPEG_LIB_ENV; spelled out because it must be set before
# alexnetd (and PyTurboJPEG) can be imported at all.
TURBOJPEG_LIB_ENV = "ALEXNETD_TURBOJPEG_LIB"
BUDGET_S = 780  # the whole run on a GPU host: 360 s for the eager rows, then the daemon's other forms

# Dense bf16 tensor-core peak (vendor datasheets), by a substring of the device name.
# First match wins: more specific names first. --peak-tflops overrides.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4), ("H100", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- setting the host up ----------------------------------------------------------------


def imports_cleanly() -> str | None:
    """None when alexnetd and what it needs import in a fresh interpreter, else why not."""
    code = "import zmq, turbojpeg, alexnetd.service.cli; from alexnetd.pipeline.jpeg import Decoder; Decoder()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {done.returncode}"


def set_up_from_wheels(wheels: Path) -> None:
    """Install this checkout from a directory of wheels, without an index; use the
    TurboJPEG library shipped there. Exits with one line when it cannot."""
    if not wheels.is_dir():
        sys.exit(f"bench/gpu.py: --wheels {wheels}: no such directory")
    libs = sorted(glob.glob(str(wheels / "libturbojpeg.so*")))
    if libs:
        # Children (the daemon, its augmenters) inherit it.
        os.environ[TURBOJPEG_LIB_ENV] = str(Path(libs[0]).resolve())
        log(f"TurboJPEG library: {os.environ[TURBOJPEG_LIB_ENV]}")
    if imports_cleanly() is None:
        log("alexnetd already imports here; nothing to install")
        return
    # Without an index, the build backend (setuptools, wheel) comes from DIR too; pytest,
    # for the gpu-tests row, when DIR has it.
    extra = ["pytest"] if glob.glob(str(wheels / "pytest-*.whl")) else []
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
               "-e", str(ROOT), *extra]
    log(f"$ {shlex.join(command)}")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 and "externally-managed-environment" in done.stderr:
        # A distribution's Python on a throwaway GPU host: install beside its packages.
        done = subprocess.run(command + ["--break-system-packages"], capture_output=True, text=True)
    if done.returncode != 0:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["(no output)"]
        sys.exit(f"bench/gpu.py: installing from {wheels} failed: {last[0].strip()}")
    why = imports_cleanly()
    if why is not None:
        sys.exit(f"bench/gpu.py: installed from {wheels}, but alexnetd still does not import: {why}")
    # An editable install is found through a .pth file read at interpreter start: start
    # again (the environment, with the library path, carries over; the install is done).
    log("installed; starting again")
    os.execv(sys.executable, [sys.executable, *sys.argv])


# -- the training step ------------------------------------------------------------------


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: a CPU-GPU sync point, so the clock sees finished work


def make_step(model, device, bf16: bool, keep_grads: bool = False):
    """The daemon's training step (service/trainer.py) on a prepared input: forward under
    alexnetd's autocast, cross-entropy in fp32, backward, PaperSGD. `keep_grads`: zero the
    gradients in place instead of dropping them, as a captured CUDA graph needs."""
    import torch.nn.functional as F

    from alexnetd.model.recipe import PaperSGD, autocast_context

    optimizer = PaperSGD(model.parameters())

    def step(x, y):
        with autocast_context(device, bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=not keep_grads)
        loss.backward()
        optimizer.step()
        return loss

    return step


def time_rate(run_once, device, warmup: int, steps: int, seconds: float) -> tuple[float, int]:
    """Seconds per call of run_once over at least `steps` calls (more while under
    `seconds`), after `warmup` untimed ones. Throughput: one sync at each end, not one per
    step, so the device queue stays full as in training."""
    for _ in range(warmup):
        run_once()
    sync(device)
    done, start = 0, time.perf_counter()
    while done < steps or (time.perf_counter() - start < seconds and done < 50 * steps):
        run_once()
        done += 1
        if done % 10 == 0 or done >= steps:
            sync(device)
    sync(device)
    return (time.perf_counter() - start) / done, done


def flops_per_image() -> float:
    """FLOPs of one trained image (forward + backward, not the update), counted by torch
    on the real network at batch 1 on the CPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from alexnetd.model.alexnet import AlexNet

    model = AlexNet()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224)).sum().backward()
    return float(counter.get_total_flops())


SYNTHETIC = {  # name -> (label, bf16, channels_last, how)
    "fp32": ("fp32", False, False, "eager"),
    "bf16": ("bf16 autocast", True, False, "eager"),
    "bf16_cl": ("bf16 + channels_last", True, True, "eager"),
    "compile": ("torch.compile (bf16 + channels_last)", True, True, "compile"),
    "cudagraph": ("CUDA graphs (bf16 + channels_last)", True, True, "graph"),
}


def run_synthetic(ctx, name: str) -> dict:
    label, bf16, channels_last, how = SYNTHETIC[name]
    device = ctx.device
    if device.type != "cuda" and how == "graph":
        return skipped("CUDA graphs need CUDA")
    if device.type != "cuda" and how == "compile":
        return skipped("measured on CUDA only: on the CPU, torch.compile's minutes of C++ compiling "
                       "would swamp a dry run")
    if device.type != "cuda" and bf16:
        return skipped("alexnetd's bf16 autocast is CUDA only (it trains fp32 on the CPU)")
    try:
        return _synthetic_row(ctx, bf16, channels_last, how)
    except Exception as exc:
        if how == "eager":
            raise
        # "where it works": a compiler or capture that fails here is a finding, not a broken bench.
        return skipped(f"{label} does not run here: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")


def _synthetic_row(ctx, bf16: bool, channels_last: bool, how: str) -> dict:
    import torch

    from alexnetd.model.alexnet import AlexNet

    device, batch = ctx.device, ctx.batch
    torch.manual_seed(0)
    model = AlexNet(ctx.num_classes).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=fmt)
    y = torch.randint(0, ctx.num_classes, (batch,), device=device)
    extra = {}
    if how == "compile":
        # The network compiled, the optimizer eager: what a user turning it on would do.
        step = make_step(torch.compile(model), device, bf16)
        started = time.perf_counter()
        step(x, y)  # compiles here, outside the clock
        sync(device)
        extra["compile_seconds"] = round(time.perf_counter() - started, 1)
        run_once = lambda: step(x, y)  # noqa: E731
    elif how == "graph":
        # Warm up on a side stream (allocations, cuDNN choices), then capture the whole
        # step; replays reuse its input, gradient and optimizer buffers.
        step = make_step(model, device, bf16, keep_grads=True)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step(x, y)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(x, y)
        run_once = graph.replay
    else:
        step = make_step(model, device, bf16)
        run_once = lambda: step(x, y)  # noqa: E731
    per_step, steps = time_rate(run_once, device, ctx.warmup, ctx.steps, ctx.seconds)
    row = {"ms_per_step": round(per_step * 1e3, 3), "images_per_second": round(batch / per_step, 1),
           "steps": steps, "batch": batch, "bf16": bf16, "channels_last": channels_last, **extra}
    row.update(ctx.peak_share(batch / per_step))
    return ok(row)


# -- end to end through the daemon --------------------------------------------------------


def alexnetd(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alexnetd", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def has_decoder_option() -> bool:
    """Whether `alexnetd start` takes --decoder (an older checkout may not)."""
    from alexnetd.service.daemoncmds import start

    return any(p.name == "decoder" for p in start.params)


def run_daemon(ctx, decoder: str = "cpu", form: str | None = None, batch: int | None = None) -> dict:
    """`alexnetd start` as a user runs it; images/s from the trainer's step counter over
    a window after warm-up; stage shares from `status` (its last 10 s). `form`: a train
    step form's flag (--compile, --cuda-graphs), at `batch` [the run's]."""
    batch = batch or ctx.batch
    start_timeout = ctx.daemon_start_timeout
    if form == "--compile":
        if ctx.device.type != "cuda":
            return skipped("measured on CUDA only: on the CPU, torch.compile's minutes of C++ compiling "
                           "would swamp a dry run")
        start_timeout += 180  # the first step compiles (status: compiling) before any is timed
    if decoder == "dali":
        if not has_decoder_option():
            return skipped("alexnetd has no --decoder dali yet")
        try:
            import nvidia.dali  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install failing its own way
            return skipped(f"nvidia.dali does not import: {exc} (pip install '.[dali]')")
    from alexnetd.pipeline.netaddr import free_port

    run_dir = Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=ctx.scratch))
    os.chmod(run_dir, 0o700)
    # The daemon's default augmenters: one per core, less one for the loader and trainer.
    flags = ["--data", ctx.data, "--run-dir", run_dir, "--device", ctx.device.type, "--batch-size", batch,
             "--val-every", 0, "--checkpoint-every", 10_000, "--max-epochs", 10_000,
             "--metrics-addr", f"127.0.0.1:{free_port()}", "--log-every", 50, "--fresh"]
    if decoder != "cpu":
        flags += ["--decoder", decoder]
    flags += [form] if form else []
    from alexnetd.service.control import NotRunning, request

    try:  # the finally stops a daemon whatever happens, a start that timed out included
        started = alexnetd("start", *flags, timeout=start_timeout)
        if started.returncode != 0 and form == "--cuda-graphs" and ctx.device.type != "cuda":
            # The flag reached start, which refuses it off CUDA: the expected answer here.
            return skipped(f"alexnetd start refuses it here: {(started.stderr.strip().splitlines() or ['?'])[-1]}")
        if started.returncode != 0:
            raise RuntimeError(f"alexnetd start: {(started.stderr.strip().splitlines() or ['?'])[-1]}")

        def status() -> dict:
            # In-process over the control socket: a CLI per poll would take CPU from the augmenters.
            try:
                return request(run_dir, "status", timeout_ms=10_000)["status"]
            except NotRunning:
                return {"state": "not running", "step": 0}

        deadline = time.monotonic() + start_timeout
        while (first := status())["step"] < ctx.warmup + 1:
            if time.monotonic() > deadline or first["state"] == "not running":
                raise RuntimeError(f"the daemon did not take {ctx.warmup + 1} steps: state {first['state']}")
            time.sleep(0.5)
        t0, s0 = time.monotonic(), first["step"]
        time.sleep(ctx.daemon_seconds)
        # A window without a step measures nothing (a slow CPU under --dry-run): it lasts
        # until the next step.
        deadline = time.monotonic() + ctx.daemon_start_timeout
        while (last := status())["step"] == s0 and last["state"] != "not running" and time.monotonic() < deadline:
            time.sleep(0.5)
        t1, s1 = time.monotonic(), last["step"]
        if last["state"] == "not running":
            raise RuntimeError("the daemon stopped during the measurement")
    finally:
        alexnetd("stop", "--run-dir", run_dir, "--now", timeout=120)
    rate = (s1 - s0) * batch / (t1 - t0)
    row = {"images_per_second": round(rate, 1), "steps": s1 - s0, "batch": batch,
           "augmenters": last["stages"]["augmenter"]["processes"],
           "decoder": decoder, "bottleneck": last["bottleneck"],
           "epoch_ends_in_window": last["epoch"] - first["epoch"],  # 0: no epoch-end checkpoint measured
           "stages": {name: {k: stage[k] for k in ("images_per_second", "busy", "starved", "blocked")}
                      for name, stage in last["stages"].items()}}
    if form:
        row.update(form=form, synthetic=FORM_SYNTHETIC[form])
    if rate > 0:
        row["ms_per_step"] = round(batch / rate * 1e3, 3)
    row.update(ctx.peak_share(rate))
    return ok(row)


# -- a torchvision-style DataLoader feeding the same step --------------------------------


class TorchvisionStyle:
    """What a torchvision user writes: one sample at a time, PIL decode, RandomCrop(224),
    RandomHorizontalFlip, PILToTensor; default_collate stacks the batch (torchvision's
    transforms spelled out, so the row needs no torchvision)."""

    def __init__(self, data: str):
        from alexnetd.pipeline.dataset import open_dataset

        self.split = open_dataset(data).split("train")
        self.rng = None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i):
        import io

        import numpy as np
        import torch
        from PIL import Image

        if self.rng is None:  # per worker: torch seeds each one differently
            self.rng = np.random.default_rng(torch.initial_seed())
        image = Image.open(io.BytesIO(self.split.read(i))).convert("RGB")
        left, top = (int(self.rng.integers(0, side - 224 + 1)) for side in image.size)
        image = image.crop((left, top, left + 224, top + 224))
        if self.rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # CHW uint8, as PILToTensor
        return pixels, int(self.split.labels[i])


def run_dataloader(ctx) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from alexnetd.model.alexnet import AlexNet

    dataset = TorchvisionStyle(ctx.data)
    loader = DataLoader(dataset, batch_size=ctx.batch, sampler=RandomSampler(dataset, num_samples=10**9),
                        num_workers=ctx.cores, pin_memory=ctx.device.type == "cuda", drop_last=True,
                        persistent_workers=True, prefetch_factor=4)
    device = ctx.device
    bf16 = channels_last = device.type == "cuda"  # the daemon's configuration on each device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = AlexNet(ctx.num_classes).to(device).train().to(memory_format=fmt)
    step = make_step(model, device, bf16)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    batches = iter(loader)

    def run_once():
        pixels, labels = next(batches)
        x = ((pixels.to(device, non_blocking=True).float() - mean) / std).contiguous(memory_format=fmt)
        step(x, (labels % ctx.num_classes).to(device, non_blocking=True))

    try:
        per_step, steps = time_rate(run_once, device, ctx.warmup + 1, ctx.steps, ctx.seconds)
    finally:
        batches._shutdown_workers()  # now, not whenever the collector gets to it
    rate = ctx.batch / per_step
    row = {"images_per_second": round(rate, 1), "ms_per_step": round(per_step * 1e3, 3), "steps": steps,
           "batch": ctx.batch, "workers": ctx.cores}
    row.update(ctx.peak_share(rate))
    return ok(row)


# -- the two-tower code path on one device ------------------------------------------------


def run_towers(ctx) -> dict:
    import torch
    import torch.nn.functional as F

    from alexnetd.model.alexnet import AlexNet, TwoTowerAlexNet

    device = ctx.device
    # float64 on CUDA, so TF32 convolutions do not blur the comparison; float32 on the CPU,
    # where float64 convolutions are slow (tests/test_model.py uses the same bounds).
    dtype, rtol, atol = (torch.float64, 1e-7, 1e-7) if device.type == "cuda" else (torch.float32, 1e-4, 2e-5)
    torch.manual_seed(0)
    grouped = AlexNet(num_classes=10).eval().to(device, dtype)
    towers = TwoTowerAlexNet(num_classes=10, devices=(str(device), str(device))).eval()
    towers.load_state_dict(grouped.state_dict())
    towers = towers.to(dtype)
    x = torch.randn(2, 3, 224, 224, dtype=dtype, device=device) * 50
    y = torch.tensor([3, 7], device=device)
    out_g, out_t = grouped(x), towers(x)
    F.cross_entropy(out_g, y).backward()
    F.cross_entropy(out_t, y).backward()
    output_error = float((out_t - out_g).detach().abs().max() / out_g.detach().abs().max())
    towers_grads = dict(towers.named_parameters())
    worst = 0.0
    for name, p in grouped.named_parameters():
        if name in towers_grads:
            grad = towers_grads[name].grad
        else:  # split into the towers' halves along the output dimension
            grad = torch.cat([towers_grads[name.replace(".weight", ".weight_a").replace(".bias", ".bias_a")].grad,
                              towers_grads[name.replace(".weight", ".weight_b").replace(".bias", ".bias_b")].grad])
        scale = float(p.grad.abs().max())
        worst = max(worst, float((grad - p.grad).abs().max()) / scale)
    equal = output_error <= rtol + atol and worst <= rtol + atol
    row = {"dtype": str(dtype).replace("torch.", ""), "output_relative_error": output_error,
           "gradient_relative_error": worst, "bound": rtol + atol, "equal": equal}
    if not equal:
        return {"status": "failed", "reason": f"towers differ from AlexNet beyond {rtol + atol:g}", **row}
    return ok(row)


# -- the GPU tests that exist --------------------------------------------------------------


def run_gpu_tests(ctx) -> dict:
    import xml.etree.ElementTree as ET

    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return skipped("pytest is not installed here (put its wheels in the --wheels directory)")
    report = ctx.out / "gpu-tests.xml"
    # Only the files that hold GPU tests: the others may need the dev extras to import.
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}",
               *files]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=ctx.tests_timeout)
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    row = {"command": shlex.join(command), **counts, "exit_code": done.returncode}
    if counts["failures"] or counts["errors"]:
        return {"status": "failed", "reason": done.stdout.strip().splitlines()[-1], **row}
    if ctx.device.type != "cuda":
        return {"status": "skipped", "reason": f"no CUDA here: the {counts['skipped']} GPU tests skip", **row}
    return ok(row)


# -- report ---------------------------------------------------------------------------------


class _OverBudget(Exception):
    """The run's time budget has no room for this row."""


def ok(row: dict) -> dict:
    return {"status": "ok", **row}


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


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
            self.daemon_seconds, self.daemon_start_timeout, self.tests_timeout = 4.0, 180, 180
        else:
            self.batch, self.warmup, self.steps, self.seconds = args.batch_size, 10, 30, 5.0
            self.daemon_seconds, self.daemon_start_timeout, self.tests_timeout = 20.0, 120, 90
        self.num_classes = 1000
        self.data = None
        self.name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.flops = flops_per_image()
        self.peak = args.peak_tflops * 1e12 if args.peak_tflops else _peak_for(self.name)

    def peak_share(self, images_per_second: float) -> dict:
        """Achieved FLOP/s and its share of the bf16 peak (None where no peak is known)."""
        achieved = self.flops * images_per_second
        return {"tflops": round(achieved / 1e12, 3),
                "share_of_bf16_peak": round(achieved / self.peak, 4) if self.peak else None}


def _peak_for(name: str) -> float | None:
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


IMAGENET_TRAIN = 1_281_167


def prepare_data(ctx, args) -> str:
    """--data, or prepared shards generated into the scratch directory and tiled to
    ImageNet's length (tile_dataset)."""
    if args.data:
        return str(Path(args.data).resolve())
    out = ctx.scratch / "data"
    # A few thousand distinct JPEGs write in seconds; no validation split (the rows
    # measure training).
    classes, per_class = (4, 16) if args.dry_run else (10, 400)
    done = alexnetd("fake-data", out, "--classes", classes, "--train-per-class", per_class, "--val-per-class", 0,
                    timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"alexnetd fake-data: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return str(tile_dataset(out, ctx.scratch / "tiled", 10 * classes * per_class if args.dry_run else IMAGENET_TRAIN))


def tile_dataset(src: Path, dst: Path, images: int) -> Path:
    """`src` (prepared) with its training index repeated to `images` samples, sharing
    src's shards. Why: the trainer checkpoints at every epoch's end, and a full ring of
    batches waits for it afterwards; with a 4,000-image epoch both would fall inside any
    window and measure the disk and the ring, not the pipeline. An ImageNet-long epoch
    (10,000 steps at batch 128) keeps the window inside one epoch, as in real training.
    Every sample is still read and decoded from its shard; the page cache holds the few
    distinct files, as it would hold a prepared ImageNet on a host with the memory."""
    import numpy as np

    manifest = json.loads((src / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    index = np.load(src / train["index"], allow_pickle=False)
    tiled = np.resize(index, images)  # repeats the rows in order
    dst.mkdir()
    np.save(dst / "train.index.npy", tiled, allow_pickle=False)
    for name in ("train", "classes.json", "mean.npy", "rgb_eig.json"):
        (dst / name).symlink_to((src / name).resolve())
    train.update(count=images, index="train.index.npy")
    manifest["splits"] = {"train": train}
    manifest["fingerprint"] = f"{manifest['fingerprint']}+tiled-{images}"
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dst


def markdown(report: dict) -> str:
    lines = [f"# bench/gpu.py on {report['device']}", "",
             f"`{report['command']}`, {report['started']}; batch {report['batch']}, {report['cores']} cores, "
             f"{report['flops_per_image'] / 1e9:.2f} GFLOP per trained image, bf16 peak "
             + (f"{report['bf16_peak_tflops']:g} TFLOP/s" if report["bf16_peak_tflops"] else "unknown"), "",
             "| row | status | ms/step | images/s | × synthetic | share of bf16 peak | notes |",
             "|---|---|---:|---:|---:|---:|---|"]
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
        if row.get("compile_seconds") is not None:
            notes = f"compiled in {row['compile_seconds']} s"
        lines.append(f"| {row['label']} | {row['status']} | {num('ms_per_step', '{:.2f}')} | "
                     f"{num('images_per_second', '{:.0f}' if (row.get('images_per_second') or 0) >= 100 else '{:.1f}')} | {num('ratio_to_synthetic', '{:.2f}')} | "
                     f"{num('share_of_bf16_peak', '{:.1%}')} | {notes} |")
    lines.append("")
    for target in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not judged"}[target["met"]]
        value = "" if target["value"] is None else f"{target['value']:.3g}"
        lines.append(f"- {target['what']}: {value} ({verdict})")
    return "\n".join(lines) + "\n"


# The synthetic row each form's daemon rows are compared with (at the run's batch).
FORM_SYNTHETIC = {"--cuda-graphs": "synthetic-cudagraph", "--compile": "synthetic-compile"}


def _daemon_form(form: str, batch: int):
    """A daemon row with a train step form at a batch (tiny under --dry-run)."""
    name = f"daemon-{form.strip('-').replace('-', '')}-{batch}"

    def runner(ctx):
        return run_daemon(ctx, form=form, batch=ctx.batch * batch // 128 if ctx.dry_run else batch)

    return name, f"alexnetd daemon {form}, batch {batch}", runner


def _synthetic(key: str):
    return f"synthetic-{key}", f"synthetic step, {SYNTHETIC[key][0]}", lambda ctx: run_synthetic(ctx, key)


# In the order they run. torch.compile and CUDA graphs go last: a compile that takes
# longer than hoped then cannot squeeze out the end-to-end rows.
ROWS = [  # (name, label, runner)
    _synthetic("fp32"), _synthetic("bf16"), _synthetic("bf16_cl"),
    ("daemon", "alexnetd daemon end to end (CPU augmenters)", run_daemon),
    ("dali", "alexnetd daemon end to end (--decoder dali)", lambda ctx: run_daemon(ctx, "dali")),
    ("dataloader", "torchvision-style DataLoader + the same step", run_dataloader),
    ("towers", "two towers on one device = AlexNet", run_towers),
    ("gpu-tests", "pytest -m gpu", run_gpu_tests),
    _synthetic("cudagraph"), _synthetic("compile"),
    _daemon_form("--cuda-graphs", 128), _daemon_form("--cuda-graphs", 256),
    _daemon_form("--compile", 128), _daemon_form("--compile", 256),
]
FORM_ROWS = [name for name, _, _ in ROWS if name.startswith("daemon-") and name[-1].isdigit()]
NEEDS_DATA = {"daemon", "dali", "dataloader", *FORM_ROWS}
# Seconds each row may take on a GPU host (the rows' own timeouts and windows fit in
# these); together under BUDGET_S. A row whose budget no longer fits is skipped.
ROW_BUDGET_S = {"synthetic-fp32": 15, "synthetic-bf16": 15, "synthetic-bf16_cl": 15, "synthetic-compile": 90,
                "synthetic-cudagraph": 20, "daemon": 70, "dali": 70, "dataloader": 30, "towers": 10,
                "gpu-tests": 90, "daemon-cudagraphs-128": 60, "daemon-cudagraphs-256": 60,
                "daemon-compile-128": 150, "daemon-compile-256": 150}


def targets(rows: dict, on_cuda: bool, floor_ms: float | None) -> list[dict]:
    synthetic = rows.get("synthetic-bf16_cl" if on_cuda else "synthetic-fp32", {})
    best = [r for k, r in rows.items() if k.startswith("synthetic-") and r.get("ms_per_step")]
    best_ms = min((r["ms_per_step"] for r in best), default=None)
    daemon, peer = rows.get("daemon", {}), rows.get("dataloader", {})

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    checks = [
        ("daemon ÷ synthetic step of the same configuration (target >= 0.95)",
         ratio(daemon.get("images_per_second"), synthetic.get("images_per_second")), lambda v: v >= 0.95),
        ("daemon ÷ torchvision-style DataLoader (target >= 3)",
         ratio(daemon.get("images_per_second"), peer.get("images_per_second")), lambda v: v >= 3),
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
            left = BUDGET_S - (started - begun)
            try:
                if not args.dry_run and left < ROW_BUDGET_S[name]:
                    raise _OverBudget(f"{left:.0f} s of the {BUDGET_S} s budget left, the row needs "
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
