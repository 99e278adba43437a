"""bench/gpu.py's end-to-end rows: `alexnetd start` as a user runs it, on prepared shards
or on full-size JPEGs, and the data they read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpuhost import not_carried, ok, skipped

IMAGENET_TRAIN = 1_281_167
# The synthetic row each form's daemon rows are compared with (at the run's batch).
FORM_SYNTHETIC = {"--cuda-graphs": "synthetic-cudagraph", "--compile": "synthetic-compile"}
FULL_SIZE_LINKS = 200_000  # the full-size tree's epoch: longer than a 20 s window at 10,000 images/s


def alexnetd(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alexnetd", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def has_decoder_option() -> bool:
    """Whether `alexnetd start` takes --decoder (an older checkout may not)."""
    from alexnetd.service.daemoncmds import start

    return any(p.name == "decoder" for p in start.params)


def run_daemon(ctx, decoder: str = "cpu", form: str | None = None, batch: int | None = None,
               full_size: bool = False) -> dict:
    """`alexnetd start` as a user runs it; images/s from the trainer's step counter over
    a window after warm-up; stage shares from `status` (its last 10 s). `form`: a train
    step form's flag (--compile, --cuda-graphs), at `batch` [the run's]. `full_size`: on
    an ImageFolder tree of ImageNet-size JPEGs (full_size_data) instead of prepared shards."""
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
            return skipped(not_carried("nvidia-dali-cuda130")
                           or f"nvidia.dali does not import: {exc} (pip install '.[dali]')")
    from alexnetd.pipeline.netaddr import free_port

    run_dir = Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=ctx.scratch))
    os.chmod(run_dir, 0o700)
    # The daemon's default augmenters: one per core, less one for the loader and trainer.
    data = full_size_data(ctx) if full_size else ctx.data
    flags = ["--data", data, "--run-dir", run_dir, "--device", ctx.device.type, "--batch-size", batch,
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
            time.sleep(ctx.daemon_poll_seconds)
        t0, s0 = time.monotonic(), first["step"]
        time.sleep(ctx.daemon_seconds)
        # A window without a step measures nothing (a slow CPU under --dry-run): it lasts
        # until the next step.
        deadline = time.monotonic() + ctx.daemon_start_timeout
        while (last := status())["step"] == s0 and last["state"] != "not running" and time.monotonic() < deadline:
            time.sleep(ctx.daemon_poll_seconds)
        t1, s1 = time.monotonic(), last["step"]
        if last["state"] == "not running":
            raise RuntimeError("the daemon stopped during the measurement")
    finally:
        alexnetd("stop", "--run-dir", run_dir, "--now", timeout=120)
    rate = (s1 - s0) * batch / (t1 - t0)
    row = {"images_per_second": round(rate, 1), "steps": s1 - s0, "batch": batch,
           "augmenters": last["stages"]["augmenter"]["processes"],
           "decoder": decoder, "full_size": full_size, "bottleneck": last["bottleneck"],
           "epoch_ends_in_window": last["epoch"] - first["epoch"],  # 0: no epoch-end checkpoint measured
           "stages": {name: {k: stage[k] for k in ("images_per_second", "busy", "starved", "blocked")}
                      for name, stage in last["stages"].items()}}
    if form:
        row.update(form=form, synthetic=FORM_SYNTHETIC[form])
    if rate > 0:
        row["ms_per_step"] = round(batch / rate * 1e3, 3)
    row.update(ctx.peak_share(rate))
    return ok(row)



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



def full_size_data(ctx) -> str:
    """An ImageFolder tree of ImageNet-size JPEGs (mostly ~500x375, a few up to
    1600x1200, one CMYK, one PNG named .JPEG: `fake-data --layout kaggle`'s train/),
    made once per run. Each distinct file is linked many times over, to FULL_SIZE_LINKS
    samples, for the reason tile_dataset gives: an epoch's end (a checkpoint) inside the
    window would measure the disk. Every sample is still read and decoded in full."""
    if ctx.full_size_data is not None:
        return ctx.full_size_data
    from alexnetd.pipeline.fakeimagenet import make_fake_imagenet

    classes, per_class = (2, 4) if ctx.dry_run else (10, 100)
    links = 4 * classes * per_class if ctx.dry_run else FULL_SIZE_LINKS
    make_fake_imagenet(ctx.scratch / "kaggle", "kaggle", classes=classes, train_per_class=per_class,
                       val_per_class=0, seed=0)
    source = ctx.scratch / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC" / "train"
    tree = ctx.scratch / "full-size" / "train"
    for wnid in sorted(p.name for p in source.iterdir()):
        files = sorted((source / wnid).iterdir())
        (tree / wnid).mkdir(parents=True)
        for k in range(links // classes):
            target = files[k % len(files)]
            (tree / wnid / f"{target.stem}_r{k // len(files)}{target.suffix}").symlink_to(target)
    ctx.full_size_data = str(tree.parent)
    return ctx.full_size_data
