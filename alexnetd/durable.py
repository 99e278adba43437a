"""Durable renames, for the two places that publish a file by renaming it into place:
checkpoints (model/checkpoint.py) and prepared shards (pipeline/shards.py). Here, in the
root package, because neither of those layers may import the other."""

from __future__ import annotations

import os

__all__ = ["fsync_dir"]


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory: a rename into it is durable only once its entry is on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
