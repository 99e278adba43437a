"""`alexnetd bench-input`: the input pipeline's speed on this machine, against bare decoding."""

from __future__ import annotations

import json
import tempfile

import click

from alexnetd.pipeline.dataset import DatasetError, open_dataset
from alexnetd.pipeline.decoders import DECODERS


@click.command("bench-input")
@click.option("--data", required=True, type=click.Path(), help="Dataset directory (prepared or ImageFolder).")
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(min=0.1), help="How long to measure.")
@click.option("--batches", default=None, type=click.IntRange(min=1), help="Measure this many batches instead.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--augmenters", default=None, type=click.IntRange(min=1), help="Augmenter processes [default: fits the cores].")
@click.option("--slots", default=None, type=click.IntRange(min=2), help="Batch slots in the ring [default: 2 per augmenter + 2].")
@click.option("--simulate-step-ms", default=0.0, type=click.FloatRange(min=0), help="A trainer that takes X ms per batch without using the CPU.")
@click.option("--decoder", type=click.Choice(sorted(DECODERS)), default="cpu", show_default=True,
              help="cpu: augmenter processes; dali: NVIDIA DALI in this process.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where batches are handed over (cuda: pinned copies, or DALI's GPU decode).")
@click.option("--no-ceiling", is_flag=True, help="Skip the bare-decode ceiling measurement.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_input(data, seconds, batches, batch_size, augmenters, slots, simulate_step_ms, decoder, device, no_ceiling,
                as_json):
    """Run loader + augmenters + hand-off with a trainer that discards batches; print images/s,
    per-stage busy/starved/blocked shares, and the bare-decode ceiling on the same files."""
    from alexnetd.pipeline.inputbench import bench_input as run

    try:
        dataset = open_dataset(data)
        if len(dataset.split("train")) < batch_size:
            raise click.ClickException(f"{data}: fewer training images than one batch of {batch_size}")
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from None
    missing = DECODERS[decoder].missing()
    if missing:
        raise click.ClickException(missing)
    with tempfile.TemporaryDirectory(prefix="alexnetd-bench-") as run_dir:
        result = run(data, run_dir, seconds=seconds, batches=batches, batch=batch_size, augmenters=augmenters,
                     slots=slots, simulate_step_ms=simulate_step_ms, ceiling=not no_ceiling, decoder=decoder,
                     device=device)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"input pipeline   {result['images_per_second']:>9.1f} images/s  "
               f"({result['batches']} batches of {batch_size}, {result['augmenters']} augmenters"
               + (f", simulated step {simulate_step_ms:g} ms" if simulate_step_ms else "") + ")")
    if "ceiling_images_per_second" in result:
        click.echo(f"decode ceiling   {result['ceiling_images_per_second']:>9.1f} images/s  "
                   f"(libjpeg-turbo only, {result['augmenters']} processes) -> "
                   f"{result['ratio_to_ceiling']:.0%} of ceiling")
    click.echo(f"{'stage':<10} {'busy':>6} {'starved':>8} {'blocked':>8}")
    for stage, share in result["stages"].items():
        click.echo(f"{stage:<10} {share['busy']:>6.0%} {share['starved']:>8.0%} {share['blocked']:>8.0%}")
