"""Where the daemon keeps its run directory unless told otherwise."""

import os
from pathlib import Path

__all__ = ["default_run_dir"]


def default_run_dir() -> Path:
    """$ALEXNETD_RUN_DIR, else ~/.local/state/alexnetd/run (XDG state home)."""
    env = os.environ.get("ALEXNETD_RUN_DIR")
    if env:
        return Path(env).expanduser()
    state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state_home) / "alexnetd" / "run"
