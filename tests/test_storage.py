"""Storage faults with a real small filesystem: a tmpfs of a few hundred MB mounted as
the run directory. A checkpoint of the tests' 4-class AlexNet is about 440 MiB."""

import contextlib
import errno
import json
import os
import subprocess
import urllib.request

import pytest

from alexnetd.model import checkpoint_bytes, latest_checkpoint, load_checkpoint
from daemon_helpers import cli, free_port, start_args, status, wait_exit, wait_for

pytestmark = pytest.mark.slow

CKPT = checkpoint_bytes(4)


@contextlib.contextmanager
def small_fs(path, size_bytes):
    """A tmpfs of `size_bytes` at `path` (needs root; skipped where mounting is refused)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k,mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def ballast(path, leave_free: int) -> None:
    """Fill the filesystem of `path` until `leave_free` bytes are left while the run
    (--keep-checkpoints 1) holds its one checkpoint and writes none, as another writer would.

    The run writes a checkpoint every second or so, so free space alone moves all the
    time (a temp file growing, the old checkpoint not yet removed after the rename).
    Free space plus the bytes of every checkpoint file, whole or being written, does not:
    that minus one checkpoint is the room at rest. It is read until two readings agree,
    as a file renamed between listing and stat() makes one reading short."""
    def room_at_rest() -> int:
        st = os.statvfs(path.parent)
        held = 0
        for file in path.parent.rglob("*ckpt-*"):
            with contextlib.suppress(FileNotFoundError):  # renamed or removed meanwhile
                held += file.stat().st_blocks * 512
        return st.f_bavail * st.f_frsize + held - CKPT

    readings = [room_at_rest()]

    def settled() -> bool:
        readings.append(room_at_rest())
        return abs(readings[-1] - readings[-2]) <= (4 << 20)

    try:
        wait_for(settled, timeout=30, what="free space to settle", every=0.01)
    except TimeoutError:
        raise AssertionError(f"free space does not settle: {readings[-5:]}") from None
    size = readings[-1] - leave_free
    assert size > 0, f"the filesystem has only {readings[-1]} bytes at rest, less than {leave_free}"
    # With a write in flight there is less room than at rest; try again when it has ended.
    with open(path, "wb") as fh:
        def filled() -> bool:
            try:
                os.posix_fallocate(fh.fileno(), 0, size)
                return True
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                fh.truncate(0)
                return False

        wait_for(filled, timeout=120, what="room for the ballast", every=0.02)


def test_start_refuses_a_run_dir_that_cannot_hold_two_checkpoints(prepared_data, tmp_path):
    with small_fs(tmp_path / "small", int(1.5 * CKPT)) as run_dir:
        result = cli(*start_args(prepared_data, run_dir, free_port(), "--keep-checkpoints", 1))
        assert result.returncode != 0
        assert "MiB free" in result.stderr and "2 checkpoints" in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (run_dir / "alexnetd.pid").exists()


def test_a_full_disk_fails_checkpoints_not_training(prepared_data, tmp_path):
    """Room for two checkpoints at start; then the disk fills. Checkpoint writes fail, are
    reported, leave the previous one whole and no temp file; training goes on, and the
    write succeeds again once there is room. A final checkpoint that cannot be written
    is said by `stop`."""
    port = free_port()
    with small_fs(tmp_path / "small", 2 * CKPT + (40 << 20)) as run_dir:
        cli(*start_args(prepared_data, run_dir, port, "--keep-checkpoints", 1, "--checkpoint-every", 0.02,
                        "--val-every", 0, "--augmenters", 1), check=True)
        try:
            first = wait_for(lambda: (s := status(run_dir)) and s["checkpoint"] and s, what="a first checkpoint")
            fill = tmp_path / "small" / "ballast"
            ballast(fill, CKPT // 2)
            failing = wait_for(lambda: (s := status(run_dir)) and s["checkpoint_failures"] >= 1 and s,
                               what="a failed checkpoint")
            assert failing["state"] == "degraded"
            assert "No space left on device" in failing["degraded_reason"]
            assert "No space left on device" in cli("status", "--run-dir", run_dir).stdout
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                text = response.read().decode()
            value = next(float(line.split()[-1]) for line in text.splitlines()
                         if line.startswith("alexnetd_checkpoint_failures_total "))
            assert value >= 1
            # Training goes on past the failure, on the previous checkpoint.
            wait_for(lambda: (s := status(run_dir)) and s["step"] >= failing["step"] + 3, what="training to go on")
            kept = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
            assert kept["step"] >= first["checkpoint"]["step"]
            fill.unlink()
            healed = wait_for(lambda: (s := status(run_dir)) and s["checkpoint"]["step"] > failing["step"]
                              and not s["degraded_reason"] and s, what="the retry to succeed")
            assert healed["state"] in ("training", "validating")
            ballast(fill, CKPT // 2)
            wait_for(lambda: (s := status(run_dir)) and s["checkpoint_failures"] > healed["checkpoint_failures"],
                     what="the disk to be full again")
        finally:
            stopped = cli("stop", "--run-dir", run_dir)
        assert stopped.returncode == 1
        assert "final checkpoint was not written: checkpoint of step" in stopped.stdout
        assert "No space left on device" in stopped.stdout
        names = os.listdir(run_dir / "checkpoints")
        assert len(names) == 1 and names[0].startswith("ckpt-"), names  # no temp file left
        assert load_checkpoint(run_dir / "checkpoints" / names[0])["step"] >= healed["checkpoint"]["step"]
        log = (run_dir / "alexnetd.log").read_text()
        assert "Traceback" not in log and "retrying at the next checkpoint time" in log
