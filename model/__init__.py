"""alexnetd.model: the 2012 network (§3), its training recipe (§5), and checkpoints."""

from .alexnet import AlexNet, LocalResponseNorm, TwoTowerAlexNet, layer_output_shapes
from .checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint,
                         load_latest_checkpoint, save_checkpoint, checkpoint_bytes)
from .recipe import (PaperSGD, PlateauSchedule, autocast_context, load_rng_state,
                     rng_state, set_deterministic, set_lr)

__all__ = [
    "AlexNet", "TwoTowerAlexNet", "LocalResponseNorm", "layer_output_shapes",
    "PaperSGD", "PlateauSchedule", "set_lr", "autocast_context", "set_deterministic",
    "rng_state", "load_rng_state",
    "CheckpointError", "save_checkpoint", "latest_checkpoint", "load_checkpoint",
    "load_latest_checkpoint", "checkpoint_bytes",
]
