"""Running the real `alexnetd` command in tests: start, poll, stop, look at processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ALEXNETD = [sys.executable, "-m", "alexnetd"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args, timeout: float = 900, check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run(ALEXNETD + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"alexnetd {' '.join(map(str, args))} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def status(run_dir) -> dict | None:
    """What `alexnetd status --json` prints, or None when no daemon answers. Asked on the
    control socket from this process: the waits poll it twice a second, and a `status`
    process each time would take a third of a core from the daemon under test (the
    command itself is tested where its output is)."""
    from alexnetd.service.control import NotRunning, request

    try:
        return request(run_dir, "status")["status"]
    except NotRunning:
        return None


def wait_for(predicate, timeout: float = 600, every: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not collected it yet.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def daemon_pid(run_dir) -> int | None:
    path = Path(run_dir) / "alexnetd.pid"
    return int(path.read_text()) if path.exists() and path.read_text().strip() else None


def wait_exit(run_dir, timeout: float = 900) -> None:
    """Until the daemon of run_dir has released its pid file (it has exited)."""
    from alexnetd.service.control import PidFile

    wait_for(lambda: PidFile(run_dir).holder() is None, timeout, what="the daemon to exit")


def start_args(data, run_dir, port, *extra):
    return ["start", "--data", data, "--run-dir", run_dir, "--batch-size", 8, "--augmenters", 2,
            "--metrics-addr", f"127.0.0.1:{port}", "--log-every", 1, "--bias-init", "caffe", *extra]
