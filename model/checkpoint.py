"""Atomic, data-only checkpoints.

A checkpoint is ``<dir>/ckpt-<step:09d>.pt``, a ``torch.save`` of one dict. The trainer
writes these keys:

    "model"                the model's state_dict (grouped AlexNet layout)
    "optimizer"            the optimizer's state_dict
    "schedule"             PlateauSchedule.state_dict()
    "epoch", "next_seq"    where the data stream resumes (batches are a pure function
                           of (seed, epoch, seq), so this is all the data position needs)
    "step"                 optimizer steps taken; names the file
    "rng"                  dict of RNG-state tensors (recipe.rng_state())
    "config"               the resolved config: str/int/float/bool/None/list/dict values
    "dataset_fingerprint"  str identifying the training set
    "classes"              list of class names, in label order

Only tensors and plain Python values are allowed, because loading uses
``torch.load(weights_only=True)``: a checkpoint is data, never code. ``save_checkpoint``
checks this before writing, so a bad value fails at save time, not at resume time.

Which file is "the latest" (the rule the tests pin):
  * only names matching ``ckpt-<digits>.pt`` count; temp files (``.ckpt-*.tmp-*``) never
    do, so a save that died half-way is invisible;
  * ordered by the step in the name, not by mtime;
  * a file whose zip container is incomplete (truncated: no central directory at its
    end) is skipped, so it cannot hide the previous good checkpoint;
  * ``load_latest_checkpoint`` goes further back past any file that fails to load,
    but never past a dataset fingerprint mismatch, which is an error.
"""

from __future__ import annotations

import logging
import os
from pickle import UnpicklingError  # what weights_only loading raises on non-data; nothing is unpickled here
import re
import zipfile
from pathlib import Path

import torch

from alexnetd.durable import fsync_dir

from .size import checkpoint_bytes  # noqa: F401 - re-exported with the checkpoints

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "list_checkpoints",
    "checkpoint_bytes",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
_TEMP = re.compile(r"^\.ckpt-\d+\.pt\.tmp-\d+$")
_PLAIN = (bool, int, float, str, type(None))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read, or used for this dataset. One-line message."""


def _check_plain(value, where: str) -> None:
    """Raise CheckpointError if ``value`` holds anything weights_only loading refuses."""
    if isinstance(value, _PLAIN) or torch.is_tensor(value) or isinstance(value, torch.Size):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"checkpoint key {where}[{k!r}] is a "
                                      f"{type(k).__name__}; keys must be str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"checkpoint value {where} is a {type(value).__name__}; only "
                          "tensors and plain Python values load with weights_only=True")


class _WriteErrors:
    """A file wrapper that remembers the first OSError a write raised."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def list_checkpoints(path_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """All ``ckpt-<step>.pt`` files in ``path_dir`` as (step, path), oldest first."""
    d = Path(path_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(path_dir: str | os.PathLike, state: dict, keep: int = 3) -> Path:
    """Write ``state`` to ``path_dir/ckpt-<state["step"]:09d>.pt`` atomically; keep the
    newest ``keep`` checkpoints (by step) and delete older ones.

    Temp file in the same directory, flush + fsync, ``os.replace``, fsync the
    directory: a crash at any point leaves either the old set of checkpoints or the old
    set plus the complete new one. Returns the new file's path.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if not isinstance(state.get("step"), int) or state["step"] < 0:
        raise CheckpointError(f"checkpoint state needs an int 'step' >= 0, "
                              f"got {state.get('step')!r}")
    _check_plain(state, "state")
    d = Path(path_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"ckpt-{state['step']:09d}.pt"
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            sink = _WriteErrors(f)
            try:
                torch.save(state, sink)
            except RuntimeError:
                # torch's zip writer turns a failed write (ENOSPC, EIO) into a RuntimeError
                # naming stream positions; the OSError behind it is what a user can act on.
                if sink.error is not None:
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(d)
    for step, p in list_checkpoints(d)[:-keep]:
        if p != final:
            p.unlink(missing_ok=True)
    # Temp files left by a process that died mid-save: one trainer writes a run's
    # checkpoint directory, so any temp file other than ours is stale.
    for p in d.iterdir():
        if _TEMP.match(p.name) and p != tmp:
            p.unlink(missing_ok=True)
    return final


def _complete(path: Path) -> bool:
    """True if the zip container is whole: the central directory at the end reads.

    Cheap (reads the file's tail, not the tensors) and catches truncation, the one
    failure an interrupted copy or a full disk produces.
    """
    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def latest_checkpoint(path_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``ckpt-<step>.pt`` in ``path_dir``, or None. See module doc."""
    for step, p in reversed(list_checkpoints(path_dir)):
        if _complete(p):
            return p
        log.warning("skipping incomplete checkpoint %s", p)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read(path: Path, map_location) -> dict:
    """torch.load with weights_only=True; any failure becomes a one-line CheckpointError."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} holds objects that are not plain data "
                              f"(refused by weights_only loading): {_first_line(e)}") from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: "
                              f"{_first_line(e)}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def _check_fingerprint(path: Path, state: dict, expect: str | None,
                       data_dir: str | os.PathLike | None) -> dict:
    if expect is None:
        return state
    have = state.get("dataset_fingerprint")
    where = data_dir if data_dir is not None else "the dataset"
    if have is None:
        raise CheckpointError(f"checkpoint {path} records no dataset fingerprint, "
                              f"but {where} has {expect}")
    if have != expect:
        raise CheckpointError(f"checkpoint {path} was trained on dataset fingerprint "
                              f"{have}, but {where} has {expect}")
    return state


def load_checkpoint(path: str | os.PathLike, expect_fingerprint: str | None = None,
                    data_dir: str | os.PathLike | None = None,
                    map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (``weights_only=True``).

    ``expect_fingerprint``: the fingerprint of the dataset about to be trained on; a
    different one in the checkpoint raises CheckpointError naming both (and
    ``data_dir`` if given). Unreadable, truncated, or non-data files raise
    CheckpointError too, with a one-line reason.
    """
    path = Path(path)
    return _check_fingerprint(path, _read(path, map_location), expect_fingerprint, data_dir)


def load_latest_checkpoint(path_dir: str | os.PathLike,
                           expect_fingerprint: str | None = None,
                           data_dir: str | os.PathLike | None = None,
                           map_location: str | torch.device = "cpu",
                           ) -> tuple[Path, dict] | None:
    """Load the newest checkpoint that loads, going back past unreadable ones.

    Returns (path, state), or None when the directory has no loadable checkpoint. A
    fingerprint mismatch is raised, not skipped: an older checkpoint of the same run
    would have the same fingerprint.
    """
    for step, p in reversed(list_checkpoints(path_dir)):
        try:
            state = _read(p, map_location)
        except CheckpointError as e:
            log.warning("skipping %s", e)
            continue
        return p, _check_fingerprint(p, state, expect_fingerprint, data_dir)
    return None
