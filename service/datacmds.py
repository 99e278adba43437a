"""The data commands: `alexnetd fake-data` and `alexnetd prepare`.

Thin click wrappers over `pipeline.fakedata` and `pipeline.prepare`: every mistake a
user can make comes back as one line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import click

from alexnetd.pipeline.dataset import DatasetError
from alexnetd.pipeline.shards import parse_size
from alexnetd.service.cli import user_error

__all__ = ["fake_data", "prepare"]


class SizeParam(click.ParamType):
    """A byte count with an optional K/M/G/T suffix (powers of 1024): 64M, 1G, 500000."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM raises SystemExit, so the half-built temp dir is removed on the way out."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("fake-data", help="Write a small synthetic ImageNet-like dataset (prepared shards, or --raw ImageFolder).")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--classes", type=click.IntRange(1, 100_000), default=10, show_default=True, help="Number of classes.")
@click.option("--train-per-class", type=click.IntRange(1), default=100, show_default=True, help="Training images per class.")
@click.option("--val-per-class", type=click.IntRange(0), default=20, show_default=True, help="Validation images per class.")
@click.option("--size", type=click.IntRange(8, 4096), default=256, show_default=True,
              help="Side of the stored square images (prepared output only).")
@click.option("--shards", type=click.IntRange(1), default=4, show_default=True, help="Training shards (prepared output).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical output.")
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality.")
@click.option("--raw", is_flag=True, help="Write an ImageFolder tree OUT/{train,val}/<wnid>/*.JPEG of ImageNet-like sizes.")
@click.option("--corrupt", type=click.IntRange(0), default=0, show_default=True,
              help="With --raw: mix this many bad files into train (PNG, CMYK, grayscale, truncated, random, empty).")
@click.option("--force", is_flag=True, help="Replace OUT if it is a dataset written earlier.")
def fake_data(out, classes, train_per_class, val_per_class, size, shards, seed, quality, raw, corrupt, force):
    from alexnetd.pipeline.fakedata import OutputExists, make_fake_data

    if corrupt and not raw:
        raise click.BadParameter("only applies with --raw", param_hint="--corrupt")
    start = time.monotonic()
    try:
        with _sigterm_as_exit():
            make_fake_data(
                out, classes=classes, train_per_class=train_per_class, val_per_class=val_per_class, size=size,
                shards=shards, seed=seed, quality=quality, raw=raw, corrupt=corrupt, force=force,
            )
    except (OutputExists, DatasetError) as exc:
        raise user_error(exc) from None
    except OSError as exc:
        raise user_error(f"{exc.filename or out}: {exc.strerror or exc}") from None
    n_train, n_val = classes * train_per_class, classes * val_per_class
    kind = "an ImageFolder tree" if raw else "a prepared dataset"
    bad = f", {corrupt} bad files" if corrupt else ""
    click.echo(f"wrote {kind}: {classes} classes, train {n_train}, val {n_val}{bad} "
               f"in {time.monotonic() - start:.1f} s -> {out}")


@click.command("prepare", help="Convert an ImageFolder tree to 256x256 JPEG tar shards with index, mean image and colour PCA.")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality of the re-encoded images.")
@click.option("--shard-size", type=SizeParam(), default="256M", show_default=True, help="Largest shard (K/M/G suffixes).")
@click.option("--workers", type=click.IntRange(1), default=None, help="Decoding processes [default: all cores].")
@click.option("--force", is_flag=True, help="Replace OUT if it is a prepared dataset.")
def prepare(src, out, quality, shard_size, workers, force):
    from alexnetd.pipeline.prepare import PrepareError
    from alexnetd.pipeline.prepare import prepare as run_prepare

    try:
        with _sigterm_as_exit():
            report = run_prepare(src, out, quality=quality, shard_size=shard_size, workers=workers, force=force)
    except (PrepareError, DatasetError) as exc:
        raise user_error(exc) from None
    except OSError as exc:
        raise user_error(f"{exc.filename or out}: {exc.strerror or exc}") from None
    click.echo(report.summary())
    if sum(report.skipped.values()):
        click.echo(f"skipped files are listed in {Path(out) / 'skipped.txt'}")
