"""The run layout: everything about a run's shape, built once from the config.

Ranks (global and this node's), the name of every process, each rank's directory,
sockets, batch plan and ring, the decoder, the slot count and the /dev/shm it needs.
`start`'s preflight, the supervisor, the trainer and the input assembly all read this;
none of them works any of it out again.

Words used everywhere: `world_size` is the number of data-parallel ranks of the whole
group (every node's); `local_ranks` is this node's; a rank's `rank` is global, its
`local` index is this node's. Nothing else is called "world".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.decoders import default_augmenters, make_decoding
from alexnetd.pipeline.plan import BatchPlan
from alexnetd.pipeline.ring import IMAGE, ring_name
from alexnetd.pipeline.stage import STAGES, Endpoints
from alexnetd.service.config import Config

__all__ = ["ProcName", "RankLayout", "RunLayout", "local_ranks"]


def local_ranks(config: Config) -> int:
    """This node's data-parallel ranks: one per device with parallel data, else one."""
    return config.gpus if config.parallel == "data" else 1


@dataclass(frozen=True, order=True)
class ProcName:
    """A stage process (or thread) of one rank: "trainer", "augmenter-1"; with several
    ranks on this node "trainer@1", "augmenter-0@1"."""
    local: int           # this node's rank index
    stage: str           # one of STAGES
    index: int = 0       # the augmenter's number (the gateway is numbered after the local ones)
    ranked: bool = False  # several ranks on this node: the name says which

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"{self.stage!r} is not a stage ({', '.join(STAGES)})")

    def __str__(self) -> str:
        base = f"augmenter-{self.index}" if self.stage == "augmenter" else self.stage
        return f"{base}@{self.local}" if self.ranked else base


@dataclass(frozen=True)
class RankLayout:
    local: int             # this node's index of the rank
    rank: int              # global rank
    dir: Path              # its sockets and ring name live here
    endpoints: Endpoints   # beats: the node's one beats socket
    plan: BatchPlan        # every world_size-th batch of the permutation, from `rank`
    ring: str              # name of its shared-memory ring


@dataclass(frozen=True)
class RunLayout:
    config: Config
    run_dir: Path
    world_size: int        # data-parallel ranks of the whole group
    local_ranks: int       # of this node
    first_rank: int        # global rank of this node's local rank 0
    ranks: tuple           # RankLayout per local rank
    decoding: object       # pipeline/decoders.py: CpuDecoding | DaliDecoding
    slots: int             # ring slots per rank
    beats: str             # the endpoint every stage of this node beats to
    fingerprint: str       # of the dataset, as the group's nodes compare it
    classes: int

    @classmethod
    def from_config(cls, config: Config, dataset=None) -> "RunLayout":
        """ValueError (one line) when the config cannot be laid out: too few images for a
        batch per rank, a run directory too deep for socket paths, a decoder combination
        that is refused."""
        dataset = dataset or open_dataset(config.data)
        per_node = local_ranks(config)
        world_size = config.nodes * per_node
        first_rank = config.node_rank * per_node
        n_train = len(dataset.split("train"))
        if n_train < config.batch_size * world_size:
            raise ValueError(f"{config.data}: {n_train} training images, fewer than one batch of {config.batch_size}"
                             + (f" for each of {world_size} ranks" if world_size > 1 else ""))
        run_dir = Path(config.run_dir)
        remote = {"addr": config.remote_augmenters, "keys_dir": str(run_dir), "first_rank": first_rank} \
            if config.remote_augmenters else None
        decoding = make_decoding(config.decoder, config.augmenters or default_augmenters(per_node), remote)
        beats = Endpoints.in_dir(run_dir).beats
        ranks = []
        for local in range(per_node):
            rank_dir = run_dir if per_node == 1 else run_dir / f"rank{local}"
            endpoints = dataclasses.replace(Endpoints.in_dir(rank_dir), beats=beats)
            plan = BatchPlan.for_dataset(dataset, config.batch_size, config.seed, config.val_every,
                                         first_rank + local, world_size)
            ranks.append(RankLayout(local, first_rank + local, rank_dir, endpoints, plan, ring_name(rank_dir)))
        return cls(config, run_dir, world_size, per_node, first_rank, tuple(ranks), decoding,
                   config.slots or decoding.default_slots(), beats, dataset.fingerprint, len(dataset.classes))

    # -- names ---------------------------------------------------------------------

    def name(self, stage: str, local: int = 0, index: int = 0) -> ProcName:
        return ProcName(local, stage, index, self.local_ranks > 1)

    # -- resources -----------------------------------------------------------------

    @property
    def ring_batch(self) -> int:
        """Images a ring slot holds: a batch, or none where the decoder hands the copier
        device batches and the slots are only credits."""
        return self.config.batch_size if self.decoding.fills_ring else 0

    @property
    def shm_bytes(self) -> int:
        """What the rings take in /dev/shm, every rank's together."""
        return self.local_ranks * self.slots * self.ring_batch * IMAGE * IMAGE * 3

    def make_dirs(self) -> None:
        for rank in self.ranks:
            rank.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def remove_sockets(self) -> None:
        """ZeroMQ leaves a bound ipc:// file behind: remove every rank's, once no stage runs."""
        for rank in self.ranks:
            for address in rank.endpoints.as_dict().values():
                if address.startswith("ipc://"):
                    Path(address[len("ipc://"):]).unlink(missing_ok=True)
