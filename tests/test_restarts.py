"""Restarts are timers of the supervisor's loop: `status` answers while one waits."""

from __future__ import annotations

import os
import signal

from daemon_helpers import cli, free_port, start_args, status, wait_exit, wait_for


def _answering(run_dir, check):
    """A status answer that satisfies `check`, or None (no answer yet, or not yet so)."""
    s = status(run_dir)
    return s if s and check(s) else None


def test_status_answers_during_a_restart_back_off(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    cli(*start_args(prepared_data, run_dir, free_port(), "--max-epochs", 1000), check=True)
    try:
        wait_for(lambda: _answering(run_dir, lambda s: s["state"] == "training"), 300, what="training")
        # Repeated restarts of one stage back off 0, 1, 2, 4 s: kill the augmenter four times,
        # each time once its replacement runs.
        for kill in range(1, 5):
            s = wait_for(lambda: _answering(run_dir, lambda s: s["restarting"] is None and "augmenter-0" in s["processes"]),
                         300, what="augmenter-0 up")
            os.kill(s["processes"]["augmenter-0"], signal.SIGKILL)
            if kill < 4:
                old = s["processes"]["augmenter-0"]
                wait_for(lambda: _answering(run_dir, lambda s: s["processes"].get("augmenter-0") not in (None, old)),
                         300, every=0.1, what=f"restart {kill}")
        # The fourth restart waits 4 s; the daemon answers meanwhile and says what it waits for.
        s = wait_for(lambda: _answering(run_dir, lambda s: (s["restarting"] or {}).get("in_seconds", 0) > 0),
                     60, every=0.1, what="status during the back-off")
        assert s["restarting"]["stage"] == "augmenter"
        assert "augmenter-0 exited with code -9" in s["restarting"]["why"]
        assert s["state"] == "degraded" and s["degraded_reason"].startswith("restarting the input side in ")
        assert "augmenter-0" not in s["processes"]
        # ...and then restarts it.
        s = wait_for(lambda: _answering(run_dir, lambda s: s["restarting"] is None and "augmenter-0" in s["processes"]),
                     120, what="the fourth restart")
        assert s["restarts"]["augmenter"] == 4
    finally:
        cli("stop", "--now", "--run-dir", run_dir)
        wait_exit(run_dir)
