"""The `alexnetd` command.

Subcommands are imported only when run: stage processes are started with the spawn
method, which re-imports the main module (this console script) in every child, and a
child must not pay for importing torch or matplotlib that it never uses.
"""

from __future__ import annotations

import importlib

import click

# name -> (module, attribute, one-line help shown by `alexnetd --help`)
COMMANDS = {
    "start": ("alexnetd.service.daemoncmds", "start", "Start the training daemon (resumes from the latest checkpoint)."),
    "status": ("alexnetd.service.daemoncmds", "status", "Show what the running daemon is doing, stage by stage."),
    "stop": ("alexnetd.service.daemoncmds", "stop", "Stop the daemon after a final checkpoint."),
    "fake-data": ("alexnetd.service.datacmds", "fake_data", "Write a generated dataset (prepared shards or a raw ImageFolder)."),
    "prepare": ("alexnetd.service.datacmds", "prepare", "Convert an ImageFolder tree into prepared 256x256 JPEG shards."),
    "bench-input": ("alexnetd.service.benchcmd", "bench_input", "Measure how fast the input pipeline runs on this machine."),
    "report": ("alexnetd.service.report", "report", "Write PNG plots and an HTML page about a run."),
    "eval": ("alexnetd.service.evalcmds", "eval_command", "Top-1/top-5 error of one network or an ensemble of them."),
    "predict": ("alexnetd.service.evalcmds", "predict_command", "The most probable classes of images, with probabilities."),
    "keys": ("alexnetd.service.remotecmds", "keys", "Add, list or revoke the keys of remote augmenter hosts."),
    "augment": ("alexnetd.service.remotecmds", "augment", "Decode batches for a daemon on another host (a remote augmenter)."),
}


def user_error(exc: BaseException | str) -> click.ClickException:
    """A user's mistake as one line and a non-zero exit, never a traceback."""
    return click.ClickException(" ".join(str(exc).split()) or type(exc).__name__)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute, _help = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx, formatter):
        # Listing the commands must not import them all: use the one-liners above.
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="alexnetd")
def main():
    """alexnetd: train AlexNet (NIPS 2012) with the paper's four-stage input pipeline."""
