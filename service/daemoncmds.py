"""`alexnetd start`, `status` and `stop` (the demo is `make demo`, not a command).

`start` checks everything it can before anything is forked (config, data, run
directory, a second daemon, the metrics port, the device, the checkpoint it would
resume from, room for the ring in /dev/shm), so a user's mistake is one line and a
non-zero exit with nothing left running. Then it detaches the supervisor (new session,
pid file, output to RUN_DIR/alexnetd.log) and waits until training moves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from alexnetd.pipeline.decoders import DECODERS
from alexnetd.pipeline.netaddr import probe_bind
from alexnetd.service.config import Config, ConfigError, load_config, parse_addr, resolve_device
from alexnetd.service.control import NotRunning, PidFile, request
from alexnetd.service.paths import default_run_dir

READY_TIMEOUT = 600.0

EXIT_HEALTHY, EXIT_DEGRADED, EXIT_NOT_RUNNING = 0, 1, 2


class _Gpus(click.ParamType):
    """--gpus: a positive count, or "all" (every CUDA device of the machine, counted at start)."""

    name = "N|all"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "all":
            return value
        if str(value).isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"{value!r} is not a positive number of GPUs or 'all'", param, ctx)


GPUS = _Gpus()


def _options(func):
    """The training and pipeline options; each maps to a Config field (also settable in --config)."""
    opts = [
        click.option("--batch-size", type=int, help="Images per SGD step [128, §5]."),
        click.option("--lr", type=float, help="Initial learning rate [0.01, §5]."),
        click.option("--momentum", type=float, help="[0.9, §5]"),
        click.option("--weight-decay", type=float, help="[0.0005, §5]"),
        click.option("--max-epochs", type=int, help="Stop after this many epochs [90]."),
        click.option("--max-steps", type=int, help="Stop after this many steps [no limit]."),
        click.option("--lr-patience", type=int, help="Validations without improvement before lr /10 [5]."),
        click.option("--bias-init", type=click.Choice(["paper", "caffe"]), help="Biases of 1 (paper) or 0.1 (Caffe's AlexNet)."),
        click.option("--val-every", type=int, help="Validate after every k-th epoch (0: never) [1]."),
        click.option("--val-crops", type=click.Choice(["1", "10"]), help="Centre crop, or the paper's 10 crops [1]."),
        click.option("--checkpoint-every", type=float, help="Minutes between checkpoints [30]; also at every epoch's end."),
        click.option("--keep-checkpoints", type=int, help="How many checkpoints to keep [3]."),
        click.option("--augmenters", type=int, help="Augmenter processes [one per core]."),
        click.option("--slots", type=int, help="Batch slots in the shared-memory ring [2 per augmenter + 2]."),
        click.option("--decoder", type=click.Choice(sorted(DECODERS)), help="cpu: augmenter processes (libjpeg-turbo); dali: NVIDIA DALI in the trainer, nvJPEG on CUDA [cpu]."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="auto: CUDA when a device is visible, else the CPU [auto]."),
        click.option("--gpus", type=GPUS, metavar="N|all", help="N or all: with --parallel data one DDP rank per GPU (N CPU replicas with --device cpu); 2 with --parallel model: the paper's two towers [1]."),
        click.option("--parallel", type=click.Choice(["model", "data"]), help="With several GPUs: the paper's two towers (model, exactly 2) or DDP ranks (data, any N)."),
        click.option("--nodes", type=click.IntRange(min=1), help="Daemons in a multi-node group, one per node [$NNODES, $SLURM_NNODES or $WORLD_SIZE; 1]."),
        click.option("--node-rank", type=click.IntRange(min=0), help="This node's place in the group, 0 hosts the rendezvous [$NODE_RANK or $SLURM_NODEID; 0]."),
        click.option("--rendezvous", metavar="HOST:PORT", help="Node 0's address for the group's c10d store [$MASTER_ADDR:$MASTER_PORT]."),
        click.option("--rendezvous-timeout", type=float, help="Seconds to wait for the other nodes and ranks, to join and in any collective [300]."),
        click.option("--metrics-addr", help="HOST:PORT of /metrics [127.0.0.1:9464]."),
        click.option("--remote-augmenters", metavar="HOST:PORT",
                     help="Listen here for remote augmenter hosts (CURVE keys: `alexnetd keys`) [off]."),
        click.option("--seed", type=int, help="[0]"),
        click.option("--deterministic/--no-deterministic", default=None, help="Deterministic kernels, for exact reruns."),
        click.option("--bf16/--no-bf16", default=None, help="bf16 autocast on CUDA [on]."),
        click.option("--compile/--no-compile", default=None,
                     help="torch.compile (inductor) the step's forward and loss, at the first step (status: compiling); "
                          "eager if it fails [off: eager until bench/gpu.py has measured the forms on a GPU]."),
        click.option("--cuda-graphs/--no-cuda-graphs", default=None,
                     help="CUDA, one GPU: forward, backward and update captured as one CUDA graph, replayed each step "
                          "[off: eager until bench/gpu.py has measured the forms on a GPU]."),
        click.option("--lighting/--no-lighting", default=None, help="PCA lighting augmentation (§4.1) [on]."),
        click.option("--skip-budget", type=float, help="Stop when more than this share of images fails to decode [0.01]."),
        click.option("--log-every", type=int, help="Steps between log/history lines [10]."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _run_dir_option(func):
    return click.option("--run-dir", type=click.Path(file_okay=False), default=None,
                        help=f"Run directory [$ALEXNETD_RUN_DIR or {default_run_dir()}].")(func)


# What launchers set (torchrun, SLURM, most MPI-style schedulers) when they start one
# alexnetd per node; a flag wins, and these win over a config file (they are per node).
LAUNCHER_ENV = {
    "nodes": ("NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "WORLD_SIZE"),
    "node_rank": ("NODE_RANK", "SLURM_NODEID", "GROUP_RANK", "RANK"),
}


def launcher_defaults(flags: dict, env=os.environ) -> dict:
    """--nodes, --node-rank and --rendezvous from a launcher's variables where not given."""
    out = dict(flags)
    for key, names in LAUNCHER_ENV.items():
        name = next((n for n in names if env.get(n)), None)
        if out.get(key) is None and name is not None:
            if not env[name].isdigit():
                raise ConfigError(f"${name} is {env[name]!r}, not a number (it gives --{key.replace('_', '-')})")
            out[key] = int(env[name])
    if out.get("rendezvous") is None and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        host = env["MASTER_ADDR"]
        out["rendezvous"] = f"[{host}]:{env['MASTER_PORT']}" if ":" in host else f"{host}:{env['MASTER_PORT']}"
    return out


def resolve_config(data, run_dir, config_file, **flags) -> Config:
    """Defaults <- --config <- launcher variables <- flags, with paths made absolute.
    ConfigError on mistakes."""
    flags = launcher_defaults(flags)
    if flags.get("val_crops") is not None:
        flags["val_crops"] = int(flags["val_crops"])
    every_gpu = flags.get("gpus") == "all"
    if every_gpu:
        flags["gpus"] = None  # counted below, once the device is known
    run_dir = Path(run_dir).expanduser() if run_dir else default_run_dir()
    config = load_config(config_file, data=str(Path(data).expanduser().resolve()), run_dir=str(run_dir.resolve()),
                         **flags)
    if every_gpu:
        config = dataclasses.replace(config, gpus=_count_gpus(resolve_device(config).device))
    return config


def describe_device(config: Config, asked: str) -> str:
    """One line for the start message: which device, and why."""
    if config.device == "cuda":
        import torch

        where = f"cuda ({torch.cuda.get_device_name(0)}" + (f", {config.gpus} GPUs" if config.gpus > 1 else "") + ")"
    else:
        where = "cpu"
    if asked == "auto":
        return where + ("  (auto: a CUDA device is visible)" if config.device == "cuda"
                        else "  (auto: no CUDA device visible; --device cuda to insist)")
    return where


def _count_gpus(device: str) -> int:
    """What --gpus all means: every CUDA device. On the CPU there is nothing to count,
    and guessing a number of replicas would hide a mistake: say so instead."""
    if device != "cuda":
        raise ConfigError("--gpus all counts CUDA devices and needs --device cuda; "
                          "on the CPU give the number of replicas (--gpus N)")
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError("--gpus all: this machine has no CUDA device")
    return count


def preflight(config: Config, fresh: bool):
    """Every check that can fail before forking; the run layout. Raises
    click.ClickException (one line)."""
    from alexnetd.pipeline.dataset import DatasetError, open_dataset
    from alexnetd.service.layout import RunLayout

    try:
        dataset = open_dataset(config.data)
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        layout = RunLayout.from_config(config, dataset)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    missing = layout.decoding.missing()
    if missing:
        raise click.ClickException(missing)
    run_dir = Path(config.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(run_dir, 0o700)  # holds the control socket: owner only
    except OSError as exc:
        raise click.ClickException(f"run directory {run_dir}: {exc.strerror}") from None
    holder = PidFile(run_dir).holder()
    if holder is not None:
        raise click.ClickException(f"alexnetd is already running in {run_dir} (pid {holder}); `alexnetd stop` first")
    try:
        probe_bind(*parse_addr(config.metrics_addr))
    except OSError as exc:
        raise click.ClickException(f"cannot serve metrics on {config.metrics_addr}: {exc.strerror}") from None
    try:
        notes = layout.decoding.preflight(layout.local_ranks)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    for note in notes:
        click.echo(note)
    if config.nodes > 1 and config.node_rank == 0:
        _check_rendezvous(config.rendezvous)
    if config.cuda_graphs and config.device != "cuda":
        raise click.ClickException("--cuda-graphs captures the step on a CUDA device; this run is on the cpu")
    if config.device == "cuda":
        import torch

        if torch.cuda.device_count() < config.gpus:
            raise click.ClickException(f"--device cuda --gpus {config.gpus}: this machine has "
                                       f"{torch.cuda.device_count()} CUDA device(s)")
    need = layout.shm_bytes  # one ring per rank; none where the decoder fills no ring
    free = shutil.disk_usage("/dev/shm").free
    if need and need > free:
        raise click.ClickException(f"the batch ring needs {need / 2**20:.0f} MiB of /dev/shm, {free / 2**20:.0f} MiB free; "
                                   "use fewer --slots or a smaller --batch-size")
    _check_checkpoint_room(config, len(dataset.classes), fresh)
    if not fresh:
        _check_resume(config, dataset)
    return layout


def _check_checkpoint_room(config: Config, num_classes: int, fresh: bool) -> None:
    """Refuse a run directory whose filesystem cannot hold the checkpoints the run will
    keep plus the one being written (at least two): on a full disk every checkpoint
    write would fail, and the work since the last one is redone after any crash."""
    from alexnetd.model.size import checkpoint_bytes

    one = checkpoint_bytes(num_classes, config.dtype)
    need = (config.keep_checkpoints + 1) * one
    directory = Path(config.run_dir) / "checkpoints"
    # Checkpoints already there are rotated away by the new ones (--fresh moves them
    # aside, which is a rename on the same filesystem: they stay).
    existing = 0
    if not fresh and directory.is_dir():
        from alexnetd.model.checkpoint import list_checkpoints  # torch: only where there is a run to resume

        existing = sum(p.stat().st_size for _, p in list_checkpoints(directory))
    free = shutil.disk_usage(config.run_dir).free
    if free + existing < need:
        hint = " or --keep-checkpoints 1" if config.keep_checkpoints > 1 else ""
        raise click.ClickException(
            f"run directory {config.run_dir}: {free / 2**20:.0f} MiB free, but {config.keep_checkpoints + 1} "
            f"checkpoints of {one / 2**20:.0f} MiB need {need / 2**20:.0f} MiB "
            f"(the {config.keep_checkpoints} kept and the one being written); free space{hint}")


def _check_rendezvous(addr: str) -> None:
    """Node 0 serves the group's store on --rendezvous: it must be one of its addresses."""
    try:
        probe_bind(*parse_addr(addr, "rendezvous"))
    except OSError as exc:
        raise click.ClickException(f"node 0 cannot listen for the rendezvous on {addr}: {exc.strerror} "
                                   "(--rendezvous on node 0 must be its own address, and the port free)") from None


def _check_resume(config: Config, dataset) -> None:
    if not (Path(config.run_dir) / "checkpoints").is_dir():
        return  # nothing to resume: a new run (and no torch to import)
    from alexnetd.model import CheckpointError, load_latest_checkpoint

    try:
        # The trainer's own rule: the newest checkpoint that loads.
        found = load_latest_checkpoint(Path(config.run_dir) / "checkpoints", dataset.fingerprint, config.data)
    except CheckpointError as exc:
        raise click.ClickException(f"{exc} (start with --fresh to train from scratch)") from None
    if found is not None and config.max_steps and int(found[1]["step"]) >= config.max_steps:
        raise click.ClickException(f"{found[0]} is at step {found[1]['step']}, already --max-steps {config.max_steps}: "
                                   "nothing to train (raise --max-steps, or --fresh to start over)")


def _set_aside_previous_run(run_dir: Path) -> None:
    """--fresh: move the old checkpoints and history out of the way, never delete them."""
    old = [run_dir / name for name in ("checkpoints", "history.jsonl", "skipped.jsonl") if (run_dir / name).exists()]
    if old:
        archive = run_dir / time.strftime("previous-%Y%m%d-%H%M%S")
        archive.mkdir()
        for path in old:
            path.rename(archive / path.name)
        click.echo(f"previous run moved to {archive}")


@click.command("start")
@click.option("--data", required=True, type=click.Path(), help="Dataset directory (prepared or ImageFolder).")
@_run_dir_option
@click.option("--config", "config_file", type=click.Path(), help="A TOML file of options (keys as below, with _).")
@click.option("--fresh", is_flag=True, help="Train from scratch even if the run directory has checkpoints.")
@click.option("--foreground", is_flag=True, help="Run attached (for systemd and containers).")
@_options
def start(data, run_dir, config_file, fresh, foreground, **flags):
    """Start the training daemon; resumes from the run directory's latest checkpoint."""
    try:
        config = resolve_config(data, run_dir, config_file, **flags)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    asked, config = config.device, resolve_device(config)
    layout = preflight(config, fresh)
    run_dir = Path(config.run_dir)
    if fresh:
        _set_aside_previous_run(run_dir)
    config.save(run_dir / "config.json")
    device_line = describe_device(config, asked)
    args = [sys.executable, "-m", "alexnetd.service.supervisor", str(run_dir)] + (["--fresh"] if fresh else [])
    if foreground:
        os.execv(sys.executable, args)  # the supervisor becomes this process: signals reach it directly
    log_path = run_dir / "alexnetd.log"
    with open(log_path, "ab") as log, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(args, stdin=devnull, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    status = _wait_ready(run_dir, proc, log_path)
    group = status.get("group")
    if status["state"] == "rendezvous" and group:
        click.echo(f"alexnetd is waiting for the other nodes (pid {proc.pid})")
        click.echo(f"  group    node {group['node_rank']} of {group['nodes']}, ranks "
                   f"{group['ranks'][0]}-{group['ranks'][-1]} of {group['world_size']}, rendezvous {group['rendezvous']} "
                   f"(gives up after {config.rendezvous_timeout:.0f} s)")
    else:
        click.echo(f"alexnetd is {status['state']} (pid {proc.pid})")
    click.echo(f"  device   {device_line}")
    click.echo(f"  logs     {log_path}")
    click.echo(f"  control  {run_dir / 'control.sock'}  (alexnetd status --run-dir {run_dir})")
    click.echo(f"  metrics  {status['metrics_url']}")
    for line in layout.decoding.start_lines():
        click.echo(line)


def _wait_ready(run_dir: Path, proc: subprocess.Popen, log_path: Path) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"alexnetd stopped before it was ready: {_last_error(run_dir, log_path)}")
        try:
            status = request(run_dir, "status", timeout_ms=2000)["status"]
            if status["state"] != "starting":
                return status
        except NotRunning:
            pass
        time.sleep(0.5)
    raise click.ClickException(f"alexnetd did not start training within {READY_TIMEOUT:.0f} s; see {log_path}")


def _last_error(run_dir: Path, log_path: Path) -> str:
    halt = run_dir / "halt.json"
    if halt.exists():
        try:
            return json.loads(halt.read_text())["reason"]
        except (ValueError, KeyError):
            pass
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    errors = [line for line in lines if " ERROR " in line or "Error" in line]
    return (errors or lines or ["no log"])[-1].strip() + f" (log: {log_path})"


@click.command("status")
@_run_dir_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object (fields documented in the README).")
@click.option("--watch", is_flag=True, help="Refresh every 2 seconds until interrupted.")
def status(run_dir, as_json, watch):
    """Show the running daemon's state. Exit 0 healthy, 1 degraded, 2 not running."""
    from alexnetd.service.statusview import render_status

    run_dir = Path(run_dir).expanduser() if run_dir else default_run_dir()
    while True:
        try:
            reply = request(run_dir, "status")
        except NotRunning as exc:
            if as_json:
                click.echo(json.dumps({"state": "not running", "run_dir": str(run_dir)}))
            else:
                click.echo(f"alexnetd is not running: {exc}")
            sys.exit(EXIT_NOT_RUNNING)
        state = reply["status"]
        text = json.dumps(state) if as_json else render_status(state)
        if not watch:
            click.echo(text)
            sys.exit(EXIT_DEGRADED if state["state"] in ("degraded", "stopping") else EXIT_HEALTHY)
        click.echo("\x1b[H\x1b[2J" + text, nl=True)  # home + clear: redraw in place
        time.sleep(2.0)


@click.command("stop")
@_run_dir_option
@click.option("--now", is_flag=True, help="Kill every stage at once, without a final checkpoint.")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for the daemon to exit.")
def stop(run_dir, now, timeout):
    """Stop the daemon: finish the current step, write a checkpoint, stop every stage."""
    run_dir = Path(run_dir).expanduser() if run_dir else default_run_dir()
    pidfile = PidFile(run_dir)
    try:
        request(run_dir, "stop", now=now)
    except NotRunning as exc:
        click.echo(f"alexnetd is not running: {exc}")
        sys.exit(EXIT_NOT_RUNNING)
    deadline = time.monotonic() + timeout
    while pidfile.holder() is not None:
        if time.monotonic() > deadline:
            raise click.ClickException(f"alexnetd in {run_dir} did not stop within {timeout:.0f} s")
        time.sleep(0.2)
    from alexnetd.model.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir / "checkpoints")
    failed = None if now else _final_checkpoint_error(run_dir)
    if failed:
        click.echo(f"alexnetd stopped, but its final checkpoint was not written: {failed}")
        click.echo(f"a resume starts from {latest or 'scratch'}: the steps since are trained again")
        sys.exit(1)
    click.echo("alexnetd stopped" + (f"; last checkpoint {latest}" if latest else ""))


def _final_checkpoint_error(run_dir: Path) -> str | None:
    """The trainer's last stop event says whether its final checkpoint was written."""
    from alexnetd.service.history import read_history

    rows = read_history(run_dir)
    starts = [i for i, row in enumerate(rows) if row.get("event") == "daemon-start"]
    stops = [row for row in rows[starts[-1] if starts else 0:] if row.get("event") == "trainer-stop"]
    return stops[-1].get("checkpoint_error") if stops else None
