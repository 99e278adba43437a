"""The 2012 network (Krizhevsky, Sutskever, Hinton, NIPS 2012, §3 and Figure 2).

Two forms of one function:

* ``AlexNet``: one device. The paper's two GPUs become ``groups=2`` in conv2, conv4 and
  conv5 (§3.2: "the kernels of layers 2, 4 and 5 are connected only to those kernel maps
  in the previous layer which reside on the same GPU").
* ``TwoTowerAlexNet``: the paper's model parallelism. Each tower lives on its own device
  and holds half the kernels of every layer; conv3, fc6, fc7 and fc8 read both towers,
  which is where activations cross devices ("communications in few layers", talk).

Both have the same ``state_dict`` (``conv1.weight`` is 96x3x11x11 in both), so a
checkpoint written by one loads into the other.

Input size. §3.5 says 224x224x3, but an 11x11 stride-4 convolution over 224 pixels gives
54.25 positions, not the 55 the paper reports. We keep the 224 crop the paper and the
pipeline use and pad conv1 by 2 pixels: (224 + 2*2 - 11) // 4 + 1 = 55. The other common
fix, a 227 crop, would change the data augmentation (§4.1) instead of the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AlexNet",
    "TwoTowerAlexNet",
    "LocalResponseNorm",
    "init_weights",
    "layer_output_shapes",
    "LAYERS",
    "PAPER_BIAS",
]

# The learned layers in order; the report and the checkpoint code key on these names.
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")

# §5: "We initialized the neuron biases in the second, fourth, and fifth convolutional
# layers, as well as in the fully-connected hidden layers, with the constant 1 ...
# We initialized the neuron biases in the remaining layers with the constant 0."
# Caffe's reference AlexNet uses 0.1 instead of 1: with 1 its authors saw a flat loss
# at the start of training. Both are offered; the paper's is the default.
PAPER_BIAS = {"conv1": 0.0, "conv2": 1.0, "conv3": 0.0, "conv4": 1.0, "conv5": 1.0,
              "fc6": 1.0, "fc7": 1.0, "fc8": 0.0}
_BIAS_ONE = {"paper": 1.0, "caffe": 0.1}


class LocalResponseNorm(nn.Module):
    """Local response normalization across channels, exactly as §3.3 writes it.

        b[i] = a[i] / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a[j]^2) ** beta

    with k=2, n=5, alpha=1e-4, beta=0.75. ``torch.nn.LocalResponseNorm`` divides alpha
    by n (it averages the squares instead of summing them), so with the paper's alpha it
    would normalize 5x more weakly; this module sums, so the paper's constants go in as
    printed.

    ``groups``: the window never crosses a group boundary. In the paper each GPU
    normalized the maps it held (48 after conv1, 128 after conv2), so the grouped
    single-device network normalizes per group too, and is then the same function as
    the two-tower one.
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                 k: float = 2.0, groups: int = 1):
        super().__init__()
        if size % 2 != 1:
            raise ValueError(f"LRN size must be odd (the paper's n is 5), got {size}")
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The denominator is computed in at least float32: in bf16, 2 + 1e-4 * sum(a^2)
        # rounds to 2 for typical sums and the layer would become a constant scale.
        dtype = torch.promote_types(x.dtype, torch.float32)
        a = x.to(dtype)
        c = a.shape[1]
        sq = a.square().unflatten(1, (self.groups, c // self.groups))
        # avg_pool3d over the channel axis (as depth) with zero padding n//2 on each
        # side gives sum/n over exactly the clipped window max(0,i-n/2)..min(N-1,i+n/2);
        # multiplying by n turns it back into the paper's sum.
        mean = F.avg_pool3d(sq, (self.size, 1, 1), stride=1, padding=(self.size // 2, 0, 0))
        window_sum = mean.flatten(1, 2) * self.size
        return (a * (self.k + self.alpha * window_sum).pow(-self.beta)).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, "
                f"groups={self.groups}")


class AlexNet(nn.Module):
    """The grouped single-device AlexNet (§3.5, Figure 2): 60,965,224 parameters.

    conv1 96@11x11/4 (pad 2) -> ReLU -> LRN -> maxpool 3/2
    conv2 256@5x5 (pad 2, 2 groups) -> ReLU -> LRN -> maxpool 3/2
    conv3 384@3x3 (pad 1, all 256 input maps) -> ReLU
    conv4 384@3x3 (pad 1, 2 groups) -> ReLU
    conv5 256@3x3 (pad 1, 2 groups) -> ReLU -> maxpool 3/2
    fc6 4096 -> ReLU -> dropout; fc7 4096 -> ReLU -> dropout; fc8 num_classes (logits).

    Input: N x 3 x 224 x 224 (mean-subtracted, §2). Output: N x num_classes logits; the
    1000-way softmax lives in the loss.

    Dropout (§4.2) is the inverted form: outputs are scaled by 1/(1-p) in training
    instead of by (1-p) at test time, which gives the same expected activations.
    Pooling windows overlap, 3 wide at stride 2 (§3.4). For channels-last execution
    call ``model.to(memory_format=torch.channels_last)``.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5,
                 bias_init: str = "paper"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4, padding=2)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
        self.fc6 = nn.Linear(256 * 6 * 6, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, num_classes)
        # No parameters below this line, so the state_dict holds exactly the 8 layers.
        self.lrn = LocalResponseNorm(groups=2)
        self.pool = nn.MaxPool2d(3, stride=2)
        self.drop = nn.Dropout(dropout)
        init_weights(self, bias_init)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The last 4096-d hidden layer (fc7 after ReLU), used for retrieval in §6.1."""
        x = self.pool(self.lrn(F.relu(self.conv1(x))))
        x = self.pool(self.lrn(F.relu(self.conv2(x))))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = self.pool(F.relu(self.conv5(x)))
        x = self.drop(F.relu(self.fc6(torch.flatten(x, 1))))
        return F.relu(self.fc7(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.drop(self.embed(x)))


def init_weights(model: nn.Module, bias_init: str = "paper") -> None:
    """§5 initialization: every weight from N(0, 0.01); biases per ``PAPER_BIAS``.

    ``bias_init="caffe"`` puts 0.1 where the paper puts 1. Works on either form: it
    initializes the grouped tensors, which ``TwoTowerAlexNet`` then splits.
    """
    if bias_init not in _BIAS_ONE:
        raise ValueError(f"bias_init must be one of {sorted(_BIAS_ONE)}, got {bias_init!r}")
    with torch.no_grad():
        for name in LAYERS:
            layer = getattr(model, name)
            layer.weight.normal_(0.0, 0.01)
            # PAPER_BIAS holds 0 or 1; the variant decides what "1" is.
            layer.bias.fill_(_BIAS_ONE[bias_init] if PAPER_BIAS[name] else 0.0)


class _TowerPair(nn.Module):
    """One layer held as two halves along its output axis, one half per device.

    ``weight_a``/``bias_a`` are output rows [0, h) on devices[0], ``weight_b``/``bias_b``
    rows [h, 2h) on devices[1]. In the state_dict the halves appear concatenated as
    ``weight``/``bias``, the layout of the grouped layer: rows [0, h) of a grouped conv
    are exactly the kernels that read group 0, so the split is a plain slice.
    """

    def __init__(self, weight_shape: Sequence[int], devices: Sequence[torch.device]):
        super().__init__()
        half = (weight_shape[0] // 2, *weight_shape[1:])
        self.weight_a = nn.Parameter(torch.empty(half, device=devices[0]))
        self.bias_a = nn.Parameter(torch.empty(half[0], device=devices[0]))
        self.weight_b = nn.Parameter(torch.empty(half, device=devices[1]))
        self.bias_b = nn.Parameter(torch.empty(half[0], device=devices[1]))
        self.register_state_dict_post_hook(_merge_halves)
        self.register_load_state_dict_pre_hook(_split_halves)


def _merge_halves(module, state_dict, prefix, local_metadata) -> None:
    for name in ("weight", "bias"):
        a = state_dict.pop(prefix + name + "_a")
        b = state_dict.pop(prefix + name + "_b")
        # The merged tensor lives on tower a's device, as the grouped model's would.
        state_dict[prefix + name] = torch.cat([a, b.to(a.device)])


def _split_halves(module, state_dict, prefix, local_metadata, strict,
                  missing_keys, unexpected_keys, error_msgs) -> None:
    for name in ("weight", "bias"):
        key = prefix + name
        if key in state_dict:
            full = state_dict.pop(key)
            h = full.shape[0] // 2
            state_dict[key + "_a"], state_dict[key + "_b"] = full[:h], full[h:]


class TwoTowerAlexNet(nn.Module):
    """AlexNet split across two devices as in §3.2: one tower per GPU.

    Tower t holds kernels [t*h, (t+1)*h) of every layer: conv1 48, conv2 128, conv3 192,
    conv4 192, conv5 128, fc6 2048, fc7 2048. conv2, conv4 and conv5 read only their own
    tower's maps; conv3, fc6 and fc7 read both towers' (the activations of the other
    tower are copied across); fc8 sits on devices[0] and reads both fc7 halves.

    Parameters are physically split (each device holds only its half, as on the paper's
    3 GB GPUs), but ``state_dict()`` and ``load_state_dict()`` speak the grouped
    ``AlexNet`` layout, so checkpoints are interchangeable. The optimizer's per-parameter
    state is split the same way; ``optimizer_state_to_grouped`` and
    ``optimizer_state_from_grouped`` convert it.

    A freshly built TwoTowerAlexNet draws its weights exactly as ``AlexNet`` would from
    the same RNG state (it initializes a grouped copy on the CPU and loads it).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5,
                 bias_init: str = "paper",
                 devices: Sequence[str | torch.device] = ("cuda:0", "cuda:1")):
        super().__init__()
        if len(devices) != 2:
            raise ValueError(f"TwoTowerAlexNet needs exactly two devices, got {devices!r}")
        # Drawn first, before any layer below touches the RNG, so that the same seed
        # gives the same weights as AlexNet.
        grouped = AlexNet(num_classes, dropout, bias_init).state_dict()
        self.devices = tuple(torch.device(d) for d in devices)
        d = self.devices
        self.conv1 = _TowerPair((96, 3, 11, 11), d)
        self.conv2 = _TowerPair((256, 48, 5, 5), d)
        self.conv3 = _TowerPair((384, 256, 3, 3), d)
        self.conv4 = _TowerPair((384, 192, 3, 3), d)
        self.conv5 = _TowerPair((256, 192, 3, 3), d)
        self.fc6 = _TowerPair((4096, 256 * 6 * 6), d)
        self.fc7 = _TowerPair((4096, 4096), d)
        self.fc8 = nn.Linear(4096, num_classes, device=d[0])
        self.lrn = LocalResponseNorm(groups=1)  # each tower normalizes its own maps
        self.pool = nn.MaxPool2d(3, stride=2)
        self.drop = nn.Dropout(dropout)
        self.load_state_dict(grouped)

    def _both(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers' maps on each device: the cross-GPU copy of §3.2."""
        da, db = self.devices
        return torch.cat([a, b.to(da)], 1), torch.cat([a.to(db), b], 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The last 4096-d hidden layer (fc7 after ReLU) on devices[0], as AlexNet.embed."""
        da, db = self.devices
        c1, c2, c3, c4, c5 = self.conv1, self.conv2, self.conv3, self.conv4, self.conv5
        # Both towers see the whole image.
        a, b = x.to(da), x.to(db)
        a = self.pool(self.lrn(F.relu(F.conv2d(a, c1.weight_a, c1.bias_a, 4, 2))))
        b = self.pool(self.lrn(F.relu(F.conv2d(b, c1.weight_b, c1.bias_b, 4, 2))))
        a = self.pool(self.lrn(F.relu(F.conv2d(a, c2.weight_a, c2.bias_a, 1, 2))))
        b = self.pool(self.lrn(F.relu(F.conv2d(b, c2.weight_b, c2.bias_b, 1, 2))))
        a, b = self._both(a, b)
        a = F.relu(F.conv2d(a, c3.weight_a, c3.bias_a, 1, 1))
        b = F.relu(F.conv2d(b, c3.weight_b, c3.bias_b, 1, 1))
        a = F.relu(F.conv2d(a, c4.weight_a, c4.bias_a, 1, 1))
        b = F.relu(F.conv2d(b, c4.weight_b, c4.bias_b, 1, 1))
        a = self.pool(F.relu(F.conv2d(a, c5.weight_a, c5.bias_a, 1, 1)))
        b = self.pool(F.relu(F.conv2d(b, c5.weight_b, c5.bias_b, 1, 1)))
        # Flattening tower a's 128x6x6 then tower b's is the grouped model's flatten of
        # 256x6x6, so fc6's columns line up with the single-device layout.
        a, b = self._both(torch.flatten(a, 1), torch.flatten(b, 1))
        a = self.drop(F.relu(F.linear(a, self.fc6.weight_a, self.fc6.bias_a)))
        b = self.drop(F.relu(F.linear(b, self.fc6.weight_b, self.fc6.bias_b)))
        a, b = self._both(a, b)
        a = F.relu(F.linear(a, self.fc7.weight_a, self.fc7.bias_a))
        b = F.relu(F.linear(b, self.fc7.weight_b, self.fc7.bias_b))
        return torch.cat([a, b.to(da)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.drop(self.embed(x)))

    def _grouped_index(self) -> list[tuple[int, int | None]]:
        """For each of our parameters: (index in AlexNet.parameters(), half or None)."""
        grouped = [f"{layer}.{p}" for layer in LAYERS for p in ("weight", "bias")]
        index = []
        for name, _ in self.named_parameters():
            if name.endswith(("_a", "_b")):
                index.append((grouped.index(name[:-2]), 0 if name.endswith("_a") else 1))
            else:
                index.append((grouped.index(name), None))
        return index

    def optimizer_state_to_grouped(self, state: dict) -> dict:
        """An optimizer state_dict over ``self.parameters()`` in AlexNet's layout.

        Per-parameter tensors shaped like the parameter's half are concatenated (on
        devices[0]); anything else (step counters) is taken from tower a.
        """
        groups = _single_group(state)
        halves: dict[int, list] = {}
        for ours, (g, half) in enumerate(self._grouped_index()):
            if ours in state["state"]:
                halves.setdefault(g, [None, None])[half or 0] = state["state"][ours]
        out = {}
        for g, (a, b) in halves.items():
            if b is None:
                out[g] = a
                continue
            out[g] = {k: torch.cat([v, b[k].to(v.device)]) if torch.is_tensor(v) and v.dim()
                      else v for k, v in a.items()}
        return {"state": out, "param_groups": [dict(groups[0], params=list(range(16)))]}

    def optimizer_state_from_grouped(self, state: dict) -> dict:
        """The inverse of ``optimizer_state_to_grouped``: split a grouped state for us."""
        groups = _single_group(state)
        params = list(self.parameters())
        out = {}
        for ours, (g, half) in enumerate(self._grouped_index()):
            if g not in state["state"]:
                continue
            entry = {}
            for k, v in state["state"][g].items():
                if torch.is_tensor(v) and v.dim():
                    h = v.shape[0] // 2
                    v = v if half is None else (v[:h] if half == 0 else v[h:])
                    v = v.to(params[ours].device)
                entry[k] = v
            out[ours] = entry
        return {"state": out,
                "param_groups": [dict(groups[0], params=list(range(len(params))))]}


def _single_group(state: dict) -> list[dict]:
    groups = state["param_groups"]
    if len(groups) != 1:
        raise ValueError("optimizer state conversion supports one parameter group, "
                         f"got {len(groups)}")
    return groups


def layer_output_shapes(model: nn.Module, input_size: int = 224) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of each learned layer of an ``AlexNet``.

    For AlexNet: conv1 (96, 55, 55), conv2 (256, 27, 27), conv3 (384, 13, 13),
    conv4 (384, 13, 13), conv5 (256, 13, 13), fc6 (4096,), fc7 (4096,), fc8 (1000,).
    Runs one forward pass on the CPU under ``torch.no_grad``.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [getattr(model, name).register_forward_hook(
        lambda mod, inp, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
        for name in LAYERS]
    try:
        with torch.no_grad():
            param = next(model.parameters())
            model(torch.zeros(1, 3, input_size, input_size, device=param.device,
                              dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
    return shapes
