"""Talking to a running daemon, and the run directory's pid file.

The control socket is RUN_DIR/control.sock (ipc://, inside a directory of mode 0700, so
only its owner can reach it). A request is one wire message {"cmd": "status"} or
{"cmd": "stop", "now": bool}; the answer is one "reply" message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import zmq

from alexnetd.pipeline import wire

__all__ = ["request", "NotRunning", "PidFile", "control_endpoint"]

TIMEOUT_MS = 3000


class NotRunning(Exception):
    """No daemon answers on this run directory."""


def control_endpoint(run_dir) -> str:
    return f"ipc://{Path(run_dir).resolve() / 'control.sock'}"


def request(run_dir, cmd: str, timeout_ms: int = TIMEOUT_MS, **fields) -> dict:
    """Send one command to the daemon of run_dir and return its reply's fields."""
    if not (Path(run_dir) / "control.sock").exists():
        raise NotRunning(f"no alexnetd is running in {run_dir}")
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(control_endpoint(run_dir))
        wire.send(sock, "request", cmd=cmd, **fields)
        if not sock.poll(timeout_ms):
            raise NotRunning(f"alexnetd in {run_dir} did not answer within {timeout_ms / 1000:g} s")
        return wire.recv(sock).header
    finally:
        sock.close(linger=0)


class PidFile:
    """RUN_DIR/alexnetd.pid, held locked (flock) by the running daemon: a second daemon on
    the same run directory cannot take it, and a crashed daemon's lock dies with it."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / "alexnetd.pid"
        self.fd: int | None = None

    def holder(self) -> int | None:
        """The pid of the daemon holding the lock, or None."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = self.path.read_text().strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)
        return None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
