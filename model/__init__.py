"""alexnetd.model: the 2012 network (§3), its training recipe (§5), and checkpoints.

The names below load their module (and torch) when first used, so that what needs no
network (`alexnetd start`'s checks: model.size) does not pay torch's import."""

import importlib

_HOME = {
    "AlexNet": "alexnet", "TwoTowerAlexNet": "alexnet", "LocalResponseNorm": "alexnet",
    "layer_output_shapes": "alexnet",
    "PaperSGD": "recipe", "PlateauSchedule": "recipe", "set_lr": "recipe", "autocast_context": "recipe",
    "set_deterministic": "recipe", "rng_state": "recipe", "load_rng_state": "recipe",
    "CheckpointError": "checkpoint", "save_checkpoint": "checkpoint", "latest_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint", "load_latest_checkpoint": "checkpoint",
    "checkpoint_bytes": "size",
}

__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
