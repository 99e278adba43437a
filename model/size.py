"""How big a checkpoint of the network is, without torch: `alexnetd start` checks the
run directory's free space before it forks, and importing torch for it (about 2 s of
CPU) would double the command's time. tests/test_model.py holds the numbers equal to
the parameters of the built network."""

from __future__ import annotations

# (in, out, kernel, groups) of the five convolutions and (in, out) of the three fully
# connected layers, as in alexnet.AlexNet (§3.5); the last one's out is the class count.
CONVS = [(3, 96, 11, 1), (96, 256, 5, 2), (256, 384, 3, 1), (384, 384, 3, 2), (384, 256, 3, 2)]
HIDDEN = [(256 * 6 * 6, 4096), (4096, 4096)]

# Beyond the tensors: the zip container's per-record padding, the pickled structure,
# RNG states, the config. Measured at under 1 MiB; 8 MiB keeps the estimate on the safe side.
CHECKPOINT_SLACK = 8 << 20


def parameter_count(num_classes: int) -> int:
    convs = sum(c_out * (c_in // groups) * k * k + c_out for c_in, c_out, k, groups in CONVS)
    fcs = sum(n_in * n_out + n_out for n_in, n_out in HIDDEN + [(4096, num_classes)])
    return convs + fcs


def checkpoint_bytes(num_classes: int, dtype: str = "float32") -> int:
    """Bytes one checkpoint of AlexNet(num_classes) takes on disk: the weights plus the
    optimizer's velocity (one more value per weight) in the run's dtype, plus slack."""
    itemsize = {"float32": 4, "float64": 8}[dtype]
    return 2 * itemsize * parameter_count(num_classes) + CHECKPOINT_SLACK
