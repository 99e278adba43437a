"""Shared fixtures: small generated datasets and a private run directory.

The datasets are generated once per session with the real `fake-data` code and must be
treated as read-only by every test (copy one first to damage it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alexnetd.pipeline.fakedata import CORRUPT_KINDS, make_fake_data

# Sizes of the shared datasets; tests should read counts from the dataset itself where
# they can, these are here for the ones that assert them.
PREPARED = dict(classes=4, train_per_class=16, val_per_class=4, shards=2, seed=0)
RAW = dict(classes=3, train_per_class=6, val_per_class=2, corrupt=len(CORRUPT_KINDS), seed=0)


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """A prepared dataset: 4 classes × 16 train × 4 val, 256×256 JPEGs in 2 train shards
    and 1 val shard, with mean image and colour PCA."""
    return make_fake_data(tmp_path_factory.mktemp("prepared") / "data", **PREPARED, progress=False)


@pytest.fixture(scope="session")
def raw_data(tmp_path_factory) -> Path:
    """An ImageFolder tree (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) of ImageNet-like sizes:
    3 classes × 6 train × 2 val, plus one bad training file of every kind in
    fakedata.CORRUPT_KINDS (PNG, CMYK and grayscale convert; truncated, random bytes and
    empty files are skipped)."""
    return make_fake_data(tmp_path_factory.mktemp("raw") / "data", **RAW, raw=True, progress=False)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """An empty run directory of mode 0700, as the daemon requires."""
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
    return path
