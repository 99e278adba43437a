"""The evaluation commands: `alexnetd eval` and `alexnetd predict`.

Thin click wrappers over `service.evaluate`: every mistake a user can make (a missing
or corrupt checkpoint, a checkpoint of another dataset, a dataset that cannot be read,
a bad option) comes back as one line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from alexnetd.model.checkpoint import CheckpointError
from alexnetd.pipeline.dataset import DatasetError
from alexnetd.service.cli import user_error

__all__ = ["eval_command", "predict_command"]

_CROPS = click.Choice(["1", "10"])
_DEVICE = click.Choice(["cpu", "cuda"])


def _guarded(call, batch_size: int | None = None):
    """Run ``call()``, turning the errors a user can cause into one line."""
    import torch

    from alexnetd.service.evaluate import EvalError

    try:
        return call()
    except (EvalError, CheckpointError, DatasetError) as exc:
        raise user_error(exc) from None
    except torch.cuda.OutOfMemoryError:
        hint = f" at batch size {batch_size}; try a smaller --batch-size" if batch_size else ""
        raise user_error(f"out of GPU memory{hint}") from None
    except OSError as exc:
        raise user_error(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from None


@click.command("eval", help="Top-1 and top-5 error of one network or an ensemble on a dataset's "
                            "validation split (§4.1 test-time patches, §6 ensembles).")
@click.option("--checkpoint", "checkpoints", multiple=True, required=True,
              type=click.Path(path_type=Path),
              help="A checkpoint file, or a checkpoint directory (its newest). Repeat for an "
                   "ensemble: the softmax outputs of the networks are averaged.")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="The dataset the networks were trained on (prepared or ImageFolder).")
@click.option("--split", default="val", show_default=True, help="Which split to score.")
@click.option("--crops", type=_CROPS, default="1", show_default=True,
              help="1: the centre 224 patch; 10: the four corners, the centre and their "
                   "reflections, softmax averaged (§4.1).")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Images per forward pass [default: 32].")
@click.option("--device", type=_DEVICE, default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr [default: when stderr is a terminal].")
def eval_command(checkpoints, data, split, crops, batch_size, device, as_json, progress):
    from alexnetd.service.evaluate import DEFAULT_BATCH_SIZE, evaluate

    batch_size = batch_size or DEFAULT_BATCH_SIZE
    if progress is None:
        progress = sys.stderr.isatty()
    result = _guarded(lambda: evaluate(list(checkpoints), data, crops=int(crops),
                                       batch_size=batch_size, device=device,
                                       progress=progress, split=split), batch_size)
    if as_json:
        click.echo(json.dumps(result))
        return
    nets = "1 network" if result["models"] == 1 else f"an ensemble of {result['models']} networks"
    patches = "the centre patch" if result["crops"] == 1 else "10 patches"
    click.echo(f"{nets}, {patches}, {result['images']} {split} images of {data}")
    click.echo(f"  top-1 error  {result['top1_error']:7.2%}")
    k = result["top5_k"]
    label = "top-5 error" if k == 5 else f"top-{k} error"
    note = f"   (top-{k}: the dataset has {result['classes']} classes)" if k < 5 else ""
    click.echo(f"  {label}  {result['top5_error']:7.2%}{note}")
    if result["skipped"]:
        reasons = ", ".join(f"{n} {r}" for r, n in result["skipped_by_reason"].items())
        click.echo(f"  skipped {result['skipped']} images that did not decode ({reasons})")


@click.command("predict", help="The most probable classes of each image, with probabilities.")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="A checkpoint file, or a checkpoint directory (its newest).")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="The training dataset, for its mean image [default: the one the "
                   "checkpoint's config names].")
@click.option("--top", "topk", type=click.IntRange(1), default=5, show_default=True,
              help="How many classes to list per image.")
@click.option("--crops", type=_CROPS, default="1", show_default=True,
              help="1: the centre 224 patch; 10: the paper's 10 patches, averaged (§4.1).")
@click.option("--device", type=_DEVICE, default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list: {path, predictions: [{class, name, probability}]} or "
                   "{path, error} per image.")
def predict_command(checkpoint, images, data, topk, crops, device, as_json):
    from alexnetd.service.evaluate import predict

    results = _guarded(lambda: predict(checkpoint, list(images), topk=topk, crops=int(crops),
                                       data=data, device=device))
    if as_json:
        rows = []
        for r in results:
            if r.error:
                rows.append({"path": r.path, "error": r.error})
            else:
                rows.append({"path": r.path, "predictions": [
                    {"class": c, "name": name, "probability": p} for c, name, p in r.top]})
        click.echo(json.dumps(rows))
    else:
        for r in results:
            if r.error:
                click.echo(f"error: {r.error}", err=True)
                continue
            click.echo(r.path)
            for c, name, p in r.top:
                label = c if name == c else f"{c}  {name}"
                click.echo(f"  {p:7.2%}  {label}")
    failed = sum(1 for r in results if r.error)
    if failed:
        # The others were predicted; the exit status still says that not all were.
        raise user_error(f"{failed} of {len(results)} images could not be read")
