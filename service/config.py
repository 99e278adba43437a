"""The daemon's configuration: defaults <- TOML file (--config) <- command-line flags.

One flat, frozen dataclass. Every field has the paper's value where the paper gives
one (section in the comment). Unknown keys are errors, so a typo in a config file
cannot silently train with a default. The resolved config is written to the run
directory and saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from alexnetd.pipeline import netaddr
from alexnetd.pipeline.decoders import DECODERS

__all__ = ["Config", "ConfigError", "load_config", "parse_addr", "resolve_device"]


class ConfigError(ValueError):
    """A configuration the daemon cannot run; the message is one line."""


@dataclass(frozen=True)
class Config:
    data: str = ""
    run_dir: str = ""
    # -- the recipe (§5) ---------------------------------------------------------------
    batch_size: int = 128            # §5
    lr: float = 0.01                 # §5: same for all layers, ÷10 on plateau
    momentum: float = 0.9            # §5
    weight_decay: float = 0.0005     # §5
    max_epochs: int = 90             # §5: "roughly 90 cycles"
    lr_patience: int = 5             # evaluations without improvement before ÷10 (paper gives none)
    bias_init: str = "paper"         # "paper" (1 in conv2/4/5, fc6/7) or "caffe" (0.1 there)
    dropout: float = 0.5             # §4.2
    lighting: bool = True            # §4.1 PCA colour augmentation
    seed: int = 0
    deterministic: bool = False      # exact reruns: deterministic kernels (slower on CUDA)
    # -- evaluation and checkpoints ----------------------------------------------------
    val_every: int = 1               # validate after every k-th epoch (0: never)
    val_crops: int = 1               # 1: centre crop; 10: the paper's 10 patches (§4.1)
    checkpoint_every: float = 30.0   # minutes between checkpoints (also at each epoch's end)
    keep_checkpoints: int = 3
    max_steps: int = 0               # stop after this many steps (0: no limit)
    skip_budget: float = 0.01        # stop when more than this share of samples fails to decode
    # -- the pipeline ------------------------------------------------------------------
    augmenters: int = 0              # per rank; 0: one per core (less one when there are many), shared by the ranks
    slots: int = 0                   # 0: the decoder's default (pipeline/decoders.py)
    decoder: str = "cpu"             # where JPEGs become pixels: a name in pipeline/decoders.py DECODERS
    device: str = "auto"             # auto (CUDA when a device is visible, else cpu) | cpu | cuda
    gpus: int = 1                    # devices; 2 as the paper's two GPUs, N >= 2 ranks with parallel data
    parallel: str = "model"          # with 2 GPUs: "model" (the paper's towers) or "data" (DDP, any N)
    # -- many machines (service/group.py): one daemon per node, each with its --gpus ----
    nodes: int = 1                   # daemons in the group; world = nodes x gpus
    node_rank: int = 0               # this node's place: global rank = node_rank x gpus + local rank
    rendezvous: str = ""             # HOST:PORT of node 0's c10d TCPStore; "" on one node (the loopback)
    rendezvous_timeout: float = 300.0  # seconds a node or rank waits for its peers: to join, and in a collective
    bf16: bool = True                # CUDA only: bf16 autocast (fp32 when off)
    # float64 is for exactness checks, not training: it makes the differences that
    # summation order alone causes (one process against all-reduced ranks, one CPU
    # against another) 2^29 times smaller than in float32. No autocast with it.
    dtype: str = "float32"           # float32 | float64: the weights' and inputs' type
    channels_last: bool = True       # CUDA only
    # The train step's form (service/trainstep.py); eager stays the default until
    # bench/gpu.py has measured the forms on a GPU.
    compile: bool = False            # torch.compile (inductor) of the step's forward and loss
    cuda_graphs: bool = False        # CUDA, one device: forward, backward and update as one CUDA graph
    metrics_addr: str = "127.0.0.1:9464"
    remote_augmenters: str = ""      # HOST:PORT for remote augmenter hosts (CURVE); "" listens nowhere
    log_every: int = 10              # steps between history/log lines
    heartbeat_timeout: float = 30.0  # seconds without a beat before a stage counts as hung
    restart_limit: int = 5           # restarts of one stage per 10 minutes before giving up

    def __post_init__(self):
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.max_epochs >= 1, "max_epochs must be >= 1"),
            (self.lr_patience >= 1, "lr_patience must be >= 1"),
            (self.bias_init in ("paper", "caffe"), "bias_init must be 'paper' or 'caffe'"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.val_every >= 0, "val_every must be >= 0"),
            (self.val_crops in (1, 10), "val_crops must be 1 or 10"),
            (self.checkpoint_every > 0, "checkpoint_every must be > 0 minutes"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.max_steps >= 0, "max_steps must be >= 0"),
            (0 <= self.skip_budget <= 1, "skip_budget must be in [0, 1]"),
            (self.augmenters >= 0, "augmenters must be >= 0"),
            (self.slots == 0 or self.slots >= 2, "slots must be >= 2"),
            (self.device in ("auto", "cpu", "cuda"), "device must be 'auto', 'cpu' or 'cuda'"),
            (self.dtype in ("float32", "float64"), "dtype must be 'float32' or 'float64'"),
            (self.decoder in DECODERS, f"decoder must be one of {', '.join(sorted(DECODERS))}"),
            (self.gpus >= 1, "gpus must be >= 1"),
            (self.parallel in ("model", "data"), "parallel must be 'model' or 'data'"),
            # The paper split the network into exactly two towers; more devices mean more ranks.
            (self.gpus in (1, 2) or self.parallel == "data",
             f"gpus {self.gpus} needs parallel data: parallel model is the paper's two towers, on exactly 2 GPUs"),
            # N CPU replicas (gloo) exercise the data-parallel path on a machine without GPUs.
            (self.gpus == 1 or self.device == "cuda" or self.parallel == "data",
             "gpus 2 with parallel model needs device cuda"),
            (self.nodes >= 1, "nodes must be >= 1"),
            (0 <= self.node_rank < self.nodes, f"node_rank {self.node_rank} is not in 0..{self.nodes - 1} (--nodes {self.nodes})"),
            (self.nodes == 1 or self.rendezvous, f"--nodes {self.nodes} needs --rendezvous HOST:PORT (node 0's address; "
                                                 "or MASTER_ADDR and MASTER_PORT)"),
            (self.nodes == 1 or self.parallel == "data" or self.gpus == 1,
             "several nodes train data parallel: use --parallel data (the paper's two towers live on one node)"),
            (self.rendezvous_timeout > 0, "rendezvous_timeout must be > 0"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (not (self.compile and self.cuda_graphs), "compile and cuda_graphs are two forms of the train step: choose one"),
            (not self.cuda_graphs or (self.gpus == 1 and self.nodes == 1),
             "cuda_graphs captures one device's step: not with several GPUs or nodes (gpus 1, nodes 1)"),
            (self.heartbeat_timeout > 0, "heartbeat_timeout must be > 0"),
            (self.restart_limit >= 0, "restart_limit must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        parse_addr(self.metrics_addr)
        if self.remote_augmenters:
            parse_addr(self.remote_augmenters, "remote_augmenters")
        if self.rendezvous:
            parse_addr(self.rendezvous, "rendezvous")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def parse_addr(addr: str, what: str = "metrics_addr") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port): netaddr's parse, failing as a ConfigError (which the
    CLI prints as one line)."""
    try:
        return netaddr.parse_addr(addr, what)
    except netaddr.AddressError as exc:
        raise ConfigError(str(exc)) from None


# NVIDIA's driver (its /proc entry and control device) and ROCm's kernel driver.
GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")


def resolve_device(config: Config) -> Config:
    """`auto` becomes `cuda` when torch sees a CUDA device, else `cpu`, once, here: the
    saved config, the stages, status and the metrics all carry the resolved device."""
    if config.device != "auto":
        return config
    if not any(os.path.exists(p) for p in GPU_DRIVER_FILES):
        # No GPU driver, so no torch build can see a device: say cpu without importing
        # torch, which would take `alexnetd start` about 2 s of CPU.
        return dataclasses.replace(config, device="cpu")
    import torch

    return dataclasses.replace(config, device="cuda" if torch.cuda.is_available() else "cpu")


def load_config(path: str | os.PathLike | None = None, **overrides) -> Config:
    """Defaults, then the TOML file's keys, then the non-None overrides (CLI flags)."""
    values: dict = {}
    known = {f.name: f for f in fields(Config)}
    if path:
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        table = {k.replace("-", "_"): v for k, v in table.items()}
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ConfigError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        for key, value in table.items():
            values[key] = _typed(key, value, known[key].type, path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config(**values)


def _typed(key, value, annotation, path):
    kind = {"int": int, "float": float, "bool": bool, "str": str}[annotation]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ConfigError(f"{path}: {key} must be {annotation}, not {type(value).__name__}")
    return value
