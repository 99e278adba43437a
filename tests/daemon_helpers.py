"""Driving the real `alexnetd` command: run it, wait on it, read its status, look at its
processes. The tests import this module, and so does bench/chaos.py (whose short
scenarios the tests run), so that both wait and ask the same way."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from alexnetd.pipeline.netaddr import free_port  # noqa: F401  (re-exported: the tests' one free_port)

ALEXNETD = [sys.executable, "-m", "alexnetd"]


def cli(*args, timeout: float = 900, check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run(ALEXNETD + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"alexnetd {' '.join(map(str, args))} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def status(run_dir) -> dict | None:
    """What `alexnetd status --json` prints, or None when no daemon answers. Asked on the
    control socket from this process: the waits poll it several times a second, and a
    `status` process each time would take a third of a core from the daemon under test
    (the command itself is tested where its output is)."""
    from alexnetd.service.control import NotRunning, request

    try:
        return request(run_dir, "status")["status"]
    except NotRunning:
        return None


def wait_for(predicate, timeout: float = 600, what: str = "condition", every: float = 0.2):
    """predicate()'s first truthy value, asked every `every` seconds; TimeoutError naming
    `what` once `timeout` seconds have passed. The one way to wait here: for a state, a
    file or a socket, never for a fixed time. The timeout only bounds a failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not collected it yet.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def holder(run_dir) -> int | None:
    """The pid of the daemon that holds run_dir's pid file, None once it has exited."""
    from alexnetd.service.control import PidFile

    return PidFile(run_dir).holder()


def wait_exit(run_dir, timeout: float = 900) -> None:
    """Until the daemon of run_dir has released its pid file (it has exited)."""
    wait_for(lambda: holder(run_dir) is None, timeout, what=f"the daemon of {run_dir} to exit")


def start_args(data, run_dir, port, *extra):
    return ["start", "--data", data, "--run-dir", run_dir, "--batch-size", 8, "--augmenters", 2,
            "--metrics-addr", f"127.0.0.1:{port}", "--log-every", 1, "--bias-init", "caffe", *extra]


# The exact runs: float64 and no dropout, so that runs which differ only in how a batch
# is split (ranks, nodes) draw no randomness and agree to ~1e-15 (test_daemon.py derives
# the tolerance). Five steps: one epoch of four (64 images, 16 a step), its checkpoint,
# and the first step of the next epoch (a new permutation).
EXACT_CONFIG = 'dropout = 0.0\ndtype = "float64"\n'
EXACT_STEPS = 5


def exact_args(data, run_dir, config, *extra):
    """start_args of an exact run on the CPU (config: a file holding EXACT_CONFIG): one
    augmenter, seed 4, EXACT_STEPS steps of batches of 8 unless `extra` says otherwise."""
    return start_args(data, run_dir, free_port(), "--config", config, "--deterministic", "--seed", 4,
                      "--device", "cpu", "--augmenters", 1, "--max-steps", EXACT_STEPS, *extra)
