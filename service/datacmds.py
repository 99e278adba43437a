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


_FAKE_HELP = """Write a small synthetic ImageNet-like dataset.

\b
--layout prepared     prepared shards, as `alexnetd prepare` writes them (the default)
--layout imagefolder  an ImageFolder tree OUT/{train,val}/<wnid>/*.JPEG (same as --raw)
--layout ilsvrc2012   the three files as distributed: ILSVRC2012_img_train.tar (a tar
                      of per-class tars), ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz
--layout kaggle       the Kaggle imagenet-object-localization-challenge root: LOC_*.csv,
                      LOC_synset_mapping.txt, ILSVRC/Data/CLS-LOC/{train,val,test}

The ilsvrc2012 and kaggle layouts keep the real data's traps (unsorted archive members,
devkit IDs that are not the sorted-WNID order, one CMYK JPEG and one PNG named .JPEG)."""

# Defaults of --classes/--train-per-class/--val-per-class: the ImageNet miniatures are
# full-size images, so they default to fewer.
_COUNTS = {"prepared": (10, 100, 20), "imagefolder": (10, 100, 20), "ilsvrc2012": (5, 6, 3), "kaggle": (5, 6, 3)}


@click.command("fake-data", help=_FAKE_HELP)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Choice(list(_COUNTS)), default=None,
              help="What to write, see above [default: prepared].")
@click.option("--classes", type=click.IntRange(1, 100_000), default=None,
              help="Number of classes [default: 10; 5 for ilsvrc2012/kaggle].")
@click.option("--train-per-class", type=click.IntRange(1), default=None,
              help="Training images per class [default: 100; 6 for ilsvrc2012/kaggle].")
@click.option("--val-per-class", type=click.IntRange(0), default=None,
              help="Validation images per class [default: 20; 3 for ilsvrc2012/kaggle].")
@click.option("--size", type=click.IntRange(8, 4096), default=256, show_default=True,
              help="Side of the stored square images (--layout prepared only).")
@click.option("--shards", type=click.IntRange(1), default=4, show_default=True,
              help="Training shards (--layout prepared only).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical output.")
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality.")
@click.option("--raw", is_flag=True, help="Same as --layout imagefolder.")
@click.option("--corrupt", type=click.IntRange(0), default=0, show_default=True,
              help="With --raw: mix this many bad files into train (PNG, CMYK, grayscale, truncated, random, empty).")
@click.option("--force", is_flag=True, help="Replace OUT if it is a dataset written earlier.")
def fake_data(out, layout, classes, train_per_class, val_per_class, size, shards, seed, quality, raw, corrupt, force):
    from alexnetd.pipeline.fakedata import OutputExists, make_fake_data

    if raw and layout not in (None, "imagefolder"):
        raise click.BadParameter(f"is --layout imagefolder; not with --layout {layout}", param_hint="--raw")
    layout = "imagefolder" if raw else layout or "prepared"
    raw = layout == "imagefolder"
    if corrupt and not raw:
        raise click.BadParameter("only applies with --raw (--layout imagefolder)", param_hint="--corrupt")
    imagenet = layout in ("ilsvrc2012", "kaggle")
    for name, value, default in (("--size", size, 256), ("--shards", shards, 4)):
        if imagenet and value != default:
            raise click.BadParameter(f"does not apply to --layout {layout}", param_hint=name)
    defaults = _COUNTS[layout]
    classes = defaults[0] if classes is None else classes
    train_per_class = defaults[1] if train_per_class is None else train_per_class
    val_per_class = defaults[2] if val_per_class is None else val_per_class
    start = time.monotonic()
    try:
        with _sigterm_as_exit():
            if imagenet:
                from alexnetd.pipeline.fakeimagenet import make_fake_imagenet

                summary = make_fake_imagenet(out, layout, classes=classes, train_per_class=train_per_class,
                                             val_per_class=val_per_class, seed=seed, quality=quality, force=force)
            else:
                make_fake_data(
                    out, classes=classes, train_per_class=train_per_class, val_per_class=val_per_class, size=size,
                    shards=shards, seed=seed, quality=quality, raw=raw, corrupt=corrupt, force=force,
                )
    except (OutputExists, DatasetError) as exc:
        raise user_error(exc) from None
    except OSError as exc:
        raise user_error(f"{exc.filename or out}: {exc.strerror or exc}") from None
    elapsed = f"in {time.monotonic() - start:.1f} s -> {out}"
    if imagenet:
        quirks = ", ".join(f"{len(summary[k])} {label}" for k, label in (("cmyk", "CMYK"), ("png", "PNG named .JPEG"))
                           if summary[k])
        test = f", test {summary['test']}" if summary["test"] else ""
        click.echo(f"wrote the {layout} layout: {classes} classes, train {summary['train']} ({quirks}), "
                   f"val {summary['val']}{test} {elapsed}")
        return
    n_train, n_val = classes * train_per_class, classes * val_per_class
    kind = "an ImageFolder tree" if raw else "a prepared dataset"
    bad = f", {corrupt} bad files" if corrupt else ""
    click.echo(f"wrote {kind}: {classes} classes, train {n_train}, val {n_val}{bad} {elapsed}")


PREPARE_HELP = """Convert ImageNet, as downloaded, into 256x256 JPEG tar shards with an index, the
mean image and the colour PCA (the paper's section 2).

SRC is any of: the folder holding the official ILSVRC2012_img_train.tar,
ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz; the Kaggle ILSVRC root (or its
ILSVRC/Data/CLS-LOC folder); a train/ of the 1,000 class tars; or an ImageFolder tree
train/<class>/*, val/<class>/* (a flat val/ is labelled from the devkit or
LOC_val_solution.csv next to train/). The layout found is named on the first line.

\b
Archives are streamed, front to back, never extracted: beside OUT itself, the disk
needed is one shard (--shard-size) in progress, plus the old OUT while --force replaces
it. Labels are positions in the sorted WNIDs, as torchvision's. Interrupted at any
point (Ctrl-C, a kill, a power cut, a full disk), the work stays in OUT.partial and the
same command continues it, to the same bytes."""


@click.command("prepare", help=PREPARE_HELP)
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality of the re-encoded images.")
@click.option("--shard-size", type=SizeParam(), default="256M", show_default=True, help="Largest shard (K/M/G suffixes).")
@click.option("--workers", type=click.IntRange(1), default=None, help="Decoding processes [default: all cores]; the output is the same for any.")
@click.option("--verify", is_flag=True, help="First check the official archives' MD5s (a truncated download is common).")
@click.option("--force", is_flag=True, help="Start over: replace OUT if it is a prepared dataset, and drop OUT.partial.")
def prepare(src, out, quality, shard_size, workers, verify, force):
    from alexnetd.pipeline.prepare import PrepareError
    from alexnetd.pipeline.prepare import prepare as run_prepare

    try:
        with _sigterm_as_exit():
            report = run_prepare(src, out, quality=quality, shard_size=shard_size, workers=workers, force=force,
                                 verify=verify, say=click.echo)
    except (PrepareError, DatasetError) as exc:
        raise user_error(exc) from None
    except OSError as exc:
        raise user_error(f"{exc.filename or out}: {exc.strerror or exc}{_CONTINUE.format(out=out)}") from None
    except (KeyboardInterrupt, SystemExit) as exc:
        if Path(f"{out}.partial").is_dir():
            click.echo(f"interrupted{_CONTINUE.format(out=out)}", err=True)
        raise SystemExit(exc.code if isinstance(exc, SystemExit) else 130) from None
    click.echo(report.summary())
    if sum(report.skipped.values()):
        click.echo(f"skipped files are listed in {Path(out) / 'skipped.txt'}")


_CONTINUE = "; the finished shards are kept in {out}.partial: run the same command again to continue"
