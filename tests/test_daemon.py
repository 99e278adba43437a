"""The daemon end to end, as CI smoke-tests it: fake shards -> start -> status -> metrics
-> kill -9 an augmenter -> stop -> resume -> stop. Real processes, sockets and files."""

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest
import torch

from alexnetd.model import latest_checkpoint, load_checkpoint
from daemon_helpers import EXACT_STEPS, alive, cli, exact_args, free_port, start_args, status, wait_exit, wait_for

pytestmark = pytest.mark.slow


def scrape(port) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels) -> float:
    """The value of `name` with these labels, summed over the labels not given (the
    per-stage series also carry a `rank`)."""
    found = []
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        metric, _, rest = series.partition("{")
        if metric != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(have.get(k) == str(v) for k, v in labels.items()):
            found.append(float(value))
    if not found:
        raise AssertionError(f"{name}{labels} not exported")
    return sum(found)


def test_smoke_start_status_metrics_kill_stop_resume(prepared_data, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    started = cli(*start_args(prepared_data, run_dir, port), check=True)
    assert "alexnetd is training" in started.stdout and f"127.0.0.1:{port}/metrics" in started.stdout
    # No --device: auto, which says what it chose (this suite runs where torch sees no GPU
    # or on one where it does; either way the start message, status and metrics agree).
    chosen = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"device   {chosen}" in started.stdout and "(auto: " in started.stdout
    assert oct(os.stat(run_dir).st_mode & 0o777) == "0o700"
    try:
        first = wait_for(lambda: (s := status(run_dir)) and s["step"] >= 2 and s, what="training to move")
        assert first["state"] in ("training", "validating")
        assert set(first["stages"]) == {"loader", "augmenter", "copier", "trainer"}
        assert first["stages"]["augmenter"]["processes"] == 2
        assert first["device"] == chosen

        # A second daemon on the same run directory is refused, and nothing new runs.
        again = cli(*start_args(prepared_data, run_dir, free_port()))
        assert again.returncode != 0 and "already running" in again.stderr and "Traceback" not in again.stderr

        text = scrape(port)
        for stage in ("loader", "augmenter", "copier", "trainer"):
            assert sample(text, "alexnetd_stage_images_total", stage=stage) > 0
            assert sample(text, "alexnetd_stage_busy_seconds_total", stage=stage) >= 0
        assert sample(text, "alexnetd_train_steps_total") >= 2
        # Every batch's bytes went through shared memory: none rode the job message.
        assert first["queues"]["inline_jobs"] == 0 and sample(text, "alexnetd_loader_inline_jobs_total") == 0
        from alexnetd.service.statusview import render_status

        assert "job message" not in render_status(first)  # said only when it happens:
        short = dict(first, queues=dict(first["queues"], inline_jobs=3))
        assert "3 batches' bytes sent in the job message (shared memory short)" in render_status(short)
        from alexnetd import __version__
        assert sample(text, "alexnetd_info", device=chosen, version=__version__) == 1  # labels sorted
        assert sample(text, "alexnetd_state", state="training") + sample(text, "alexnetd_state", state="validating") == 1
        augmenter_images = sample(text, "alexnetd_stage_images_total", stage="augmenter")

        # kill -9 one augmenter: the input side is rebuilt, training goes on.
        victim = first["processes"]["augmenter-0"]
        os.kill(victim, signal.SIGKILL)
        after = wait_for(lambda: (s := status(run_dir)) and s["restarts"]["augmenter"] == 1
                         and s["stages"]["augmenter"]["processes"] == 2 and s, what="the augmenter to restart")
        assert after["processes"]["augmenter-0"] != victim and after["generation"] == 1
        moving = wait_for(lambda: (s := status(run_dir)) and s["step"] >= after["step"] + 2 and s,
                          what="training to go on after the restart")
        assert moving["state"] in ("degraded", "training", "validating")
        # Counters stay monotonic across the restart.
        assert sample(scrape(port), "alexnetd_stage_images_total", stage="augmenter") >= augmenter_images
        assert sample(scrape(port), "alexnetd_stage_restarts_total", stage="augmenter") == 1
        pids = list(moving["processes"].values())
    finally:
        stopped = cli("stop", "--run-dir", run_dir)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(alive(pid) for pid in pids), "a stage outlived the daemon"
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None
    saved = load_checkpoint(checkpoint)
    assert status(run_dir) is None  # exit code 2: not running

    # The seq ledger: each consumed batch exactly once, in order, across the kill.
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in history if row["kind"] == "step"]
    assert steps == list(range(1, len(steps) + 1))

    # Start again: it resumes from that checkpoint, at its step.
    cli(*start_args(prepared_data, run_dir, port), check=True)
    try:
        resumed = wait_for(lambda: (s := status(run_dir)) and s["step"] > saved["step"] and s, what="resume")
        assert resumed["restarts"] == {"loader": 0, "augmenter": 0, "copier": 0, "trainer": 0}
    finally:
        cli("stop", "--run-dir", run_dir, check=True)
    log = (run_dir / "alexnetd.log").read_text()
    assert f"at epoch {saved['epoch']} seq {saved['next_seq']}, step {saved['step']}" in log
    assert f"training on {chosen}" in log


def test_resumed_run_reaches_the_same_weights(prepared_data, tmp_path):
    """Stopped at step 6 and resumed to 12 == 12 steps without a stop (CPU, deterministic)."""
    common = ["--deterministic", "--seed", 3, "--val-every", 1]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli(*start_args(prepared_data, straight, free_port(), "--max-steps", 12, *common), check=True)
    wait_exit(straight)
    cli(*start_args(prepared_data, split, free_port(), "--max-steps", 6, *common), check=True)
    wait_exit(split)
    assert load_checkpoint(latest_checkpoint(split / "checkpoints"))["step"] == 6
    cli(*start_args(prepared_data, split, free_port(), "--max-steps", 12, *common), check=True)
    wait_exit(split)
    a = load_checkpoint(latest_checkpoint(straight / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(split / "checkpoints"))
    assert a["step"] == b["step"] == 12
    assert (a["epoch"], a["next_seq"]) == (b["epoch"], b["next_seq"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["schedule"] == b["schedule"]
    # Started again at its --max-steps: nothing to train, said in one line.
    again = cli(*start_args(prepared_data, split, free_port(), "--max-steps", 12, *common))
    assert again.returncode == 1 and "already --max-steps 12: nothing to train" in again.stderr
    assert "Traceback" not in again.stderr
    assert load_checkpoint(latest_checkpoint(split / "checkpoints"))["step"] == 12


@pytest.mark.parametrize("args, words", [
    (["--data", "/nonexistent/imagenet"], "no such directory"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--batch-size", "100000"], "fewer than one batch"),
    (["--metrics-addr", "nonsense"], "HOST:PORT"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--gpus", "3"], "CUDA device" if not torch.cuda.is_available() else "needs parallel data"),
    (["--config", "/nonexistent.toml"], "no such config file"),
])
def test_start_refuses_bad_input_with_one_line(prepared_data, tmp_path, args, words):
    argv = ["start", "--data", prepared_data, "--run-dir", tmp_path / "run", "--batch-size", 8,
            "--metrics-addr", f"127.0.0.1:{free_port()}"]
    result = cli(*argv, *args)
    assert result.returncode != 0
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "alexnetd.pid").exists()


def test_a_new_runs_start_checks_do_not_import_torch(prepared_data, tmp_path):
    """`start` resolves the device and checks everything before it forks. For a new run
    on a machine without a GPU driver none of it needs torch, whose import would take the
    command about 2 s of CPU each time. (With a driver, `--device auto` asks torch.)"""
    from alexnetd.service.config import GPU_DRIVER_FILES

    code = ("import sys; from alexnetd.service.config import resolve_device; "
            "from alexnetd.service.daemoncmds import preflight, resolve_config; "
            f"config = resolve_device(resolve_config({str(prepared_data)!r}, {str(tmp_path / 'run')!r}, None, "
            f"batch_size=8, metrics_addr='127.0.0.1:{free_port()}')); "
            "preflight(config, False); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(any(os.path.exists(p) for p in GPU_DRIVER_FILES))


def test_config_file_unknown_key_is_an_error(prepared_data, tmp_path):
    config = tmp_path / "alexnetd.toml"
    config.write_text("batch_size = 8\nlearning_rte = 0.1\n")
    result = cli("start", "--data", prepared_data, "--run-dir", tmp_path / "run", "--config", config)
    assert result.returncode != 0 and "unknown key learning_rte" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_port_in_use_is_refused(prepared_data, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("start", "--data", prepared_data, "--run-dir", tmp_path / "run", "--batch-size", 8,
                     "--metrics-addr", f"127.0.0.1:{port}")
    assert result.returncode != 0 and "cannot serve metrics" in result.stderr


def test_status_and_stop_without_a_daemon_say_so(tmp_path):
    result = cli("status", "--run-dir", tmp_path)
    assert result.returncode == 2 and "not running" in result.stdout
    result = cli("stop", "--run-dir", tmp_path)
    assert result.returncode == 2 and "not running" in result.stdout


def test_past_the_skip_budget_the_daemon_stops_with_a_reason(raw_data, tmp_path):
    """raw_data has 3 undecodable files among 21 training images: far over a 1 % budget."""
    run_dir = tmp_path / "run"
    result = cli("start", "--data", raw_data, "--run-dir", run_dir, "--batch-size", 4, "--augmenters", 1,
                 "--skip-budget", 0.01, "--metrics-addr", f"127.0.0.1:{free_port()}")
    wait_exit(run_dir)
    reason = json.loads((run_dir / "halt.json").read_text())["reason"]
    assert "over the skip budget" in reason and "truncated" in reason
    assert status(run_dir) is None
    # Either start saw the halt before training moved (and said why), or it was already training.
    assert result.returncode == 0 or "skip budget" in result.stderr
    assert "halting" in (run_dir / "alexnetd.log").read_text()


def test_data_parallel_equals_one_process_with_the_union_batch(prepared_data, exact_config, exact_single, tmp_path):
    """Two replicas (DDP over gloo on the CPU) with batches of 8 take the same steps as one
    trainer with batches of 16 (conftest.py's exact_single): rank r trains on every other
    batch of the same permutation, and DDP averages the gradients. Dropout off, so both
    runs draw no randomness.

    The two sides are equal only up to summation order: one process sums a weight's
    gradient over 16 samples in one reduction, the pair sums two halves of 8 and gloo
    adds them. In float32 that alone moves weights by ~1e-6 after 3 steps, by an amount
    that depends on the CPU's kernels (it broke a 1e-6 tolerance on one CPU and not on
    another). So both sides train in float64 (`dtype`), where the unit roundoff is
    u = 2^-53 instead of 2^-24: the same reorderings move weights 2^29 ≈ 5.4e8 times less,
    ~1e-15. Bound: the longest reduction is conv1's weight gradient, N = 16 x 55 x 55 =
    48,400 terms; two orders differ by at most 2·N·u·Σ|terms| ≈ 1.1e-11·Σ|terms|, and
    after five steps of lr 0.01 with momentum the weights by a few times lr times that,
    which stays far below 1e-9 for per-term gradients of size well below 1e2. A real
    fault (a rank on the wrong batches, gradients summed instead of averaged, a missed
    all-reduce) moves weights by lr·|g| >= 1e-6, three orders above the tolerance."""
    pair = tmp_path / "pair"
    cli(*exact_args(prepared_data, pair, exact_config, "--gpus", 2, "--parallel", "data"), check=True)
    single = exact_single.finished()
    wait_exit(pair)
    a = load_checkpoint(latest_checkpoint(single / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(pair / "checkpoints"))
    assert a["step"] == b["step"] == EXACT_STEPS
    assert (a["epoch"], a["next_seq"]) == (b["epoch"], b["next_seq"])
    for name, tensor in a["model"].items():
        assert tensor.dtype == torch.float64
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-9)
    log = (pair / "alexnetd.log").read_text()
    assert "started trainer@1" in log and "started augmenter-0@1" in log


def test_stages_exit_when_the_supervisor_is_killed(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    cli(*start_args(prepared_data, run_dir, free_port()), check=True)
    pids = status(run_dir)["processes"].values()
    supervisor = int((run_dir / "alexnetd.pid").read_text())
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=60, what="the stages to exit")
