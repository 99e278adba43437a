"""Many machines: the group that one alexnetd per node forms through torch.distributed's
own TCPStore, and the restarts its nodes make together.

`alexnetd start --nodes N --node-rank R --rendezvous HOST:PORT` on every node, each with
its local `--gpus K --parallel data`: the world is N x K ranks, and rank l of node R is
global rank R x K + l. Node 0's supervisor hosts a c10d TCPStore on HOST:PORT, bound to
that address only, for as long as it runs; every node's supervisor and every trainer is a
client of it. A daemon on one machine with several ranks is a group of one node, on a
free loopback port: the same code, nothing listening beyond 127.0.0.1.

Keys in the store (values are JSON text, never pickle):

    node/R     what node R brings: its host, pid, ranks, dataset fingerprint, batch, seed
    formed     node 0 sets it once every node has joined and their runs agree
    round      the trainers' generation: round r's trainers meet under the prefix "round<r>/"
    reason/r   why round r ended
    beat/R     node R's supervisor, every BEAT_SECONDS: a counter, its state and step
    halt       the first node that gives up says why; every other node stops with it

Restarts follow torchelastic: any failure restarts every rank of every node, from the
last checkpoint. A supervisor whose trainer died or hung ends the round with
compare_set(round, r, r + 1) -- whoever is first wins, the others find the round moved --
and every supervisor, seeing the round move, stops its trainers and starts new ones in
the new round. A node that restarts (`alexnetd start` after a crash) joins a formed group
by ending the current round, so the running nodes come to meet it. Node 0 holds the
store: when it is gone the others stop with that reason, and the group is started again.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import time
from datetime import timedelta

from alexnetd.pipeline.netaddr import bind_socket, parse_addr

__all__ = ["GroupError", "GroupLost", "NodeGroup", "join_trainers", "local_address", "interface_of"]

BEAT_SECONDS = 2.0
MISSING_AFTER = 15.0   # seconds without a new beat/R before node R counts as missing
CONNECT_SLICE = 1.0    # seconds one attempt to reach node 0's store may block the supervisor


class GroupError(Exception):
    """The group cannot form or go on; the message is one line naming the node."""


class GroupLost(GroupError):
    """Node 0's store cannot be reached any more."""


def _store_op(func):
    """Store calls raise RuntimeError/DistStoreError when node 0 is gone: say it in one line."""
    def wrapper(self, *args, **kwargs):
        try:
            return func(self, *args, **kwargs)
        except GroupError:
            raise
        except Exception as exc:  # torch raises RuntimeError and DistStoreError subclasses here
            raise GroupLost(f"lost the rendezvous at {self.addr} (node 0 stopped or is unreachable): "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return wrapper


class NodeGroup:
    """A supervisor's membership of the group. Nothing here blocks the supervisor's loop
    for more than CONNECT_SLICE seconds: it keeps answering `status` while it waits."""

    def __init__(self, addr: str, nodes: int, node_rank: int, ranks_per_node: int, timeout: float, info: dict):
        self.addr, self.nodes, self.node_rank = addr, nodes, node_rank
        self.ranks_per_node, self.timeout = ranks_per_node, timeout
        self.info = dict(info, ranks=ranks_per_node)
        self.store = None
        self.formed = False
        self.rejoined = False
        self.since = time.monotonic()
        self.beats_sent = 0
        self.last_beat = 0.0
        self.seen: dict[int, tuple] = {}   # node -> (its beat counter, monotonic time it last changed)
        self.views: dict[int, dict] = {}   # node -> its latest beat

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_addr(self.addr, "rendezvous")

    @property
    def first_rank(self) -> int:
        return self.node_rank * self.ranks_per_node

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    # -- joining -------------------------------------------------------------------

    def listen(self) -> None:
        """Node 0: bind HOST:PORT (that address only; ZeroMQ's rule for every socket we
        open) and serve the store on it. One line if the address cannot be had."""
        from torch.distributed import TCPStore

        host, port = self.host_port
        try:
            listener = bind_socket(host, port)
        except OSError as exc:
            raise GroupError(f"cannot listen for the rendezvous on {self.addr}: {exc.strerror} "
                             "(node 0's --rendezvous must be one of its own addresses, and the port free)") from None
        listener.listen(128)
        self.store = TCPStore(host, port, None, True, timedelta(seconds=self.timeout), wait_for_workers=False,
                              master_listen_fd=listener.fileno())
        listener.detach()  # the store owns the descriptor now, and closes it
        self._join()

    def try_connect(self) -> bool:
        """Other nodes: one short attempt to reach node 0's store. GroupError once the
        rendezvous timeout has passed without it."""
        from torch.distributed import TCPStore

        if self.store is not None:
            return True
        host, port = self.host_port
        try:
            self.store = TCPStore(host, port, None, False, timedelta(seconds=CONNECT_SLICE))
        except Exception:  # not up yet: refused, or the attempt timed out
            if time.monotonic() - self.since > self.timeout:
                raise GroupError(f"no rendezvous at {self.addr} within {self.timeout:.0f} s: is node 0 started "
                                 "with the same --rendezvous, and is its port reachable from here?") from None
            return False
        self.store.set_timeout(timedelta(seconds=max(self.timeout, 30.0)))
        self._join()
        return True

    @_store_op
    def _join(self) -> None:
        self.rejoined = self.store.check(["formed"])
        self.store.set(f"node/{self.node_rank}", json.dumps(self.info))

    @_store_op
    def poll_formation(self) -> bool:
        """True once the group has formed. Node 0 forms it when every node has joined and
        their runs agree; a node joining a formed group ends its round (see above)."""
        if self.formed:
            return True
        if self.store is None and not self.try_connect():
            return False
        self._check_halt()
        if self.rejoined:
            current = self.round()
            self.end_round(current, f"node {self.node_rank} rejoined")
            self.formed = True
            return True
        joined = [n for n in range(self.nodes) if self.store.check([f"node/{n}"])]
        if self.node_rank == 0 and len(joined) == self.nodes:
            self._check_agreement()
            self.store.set("round", "0")
            self.store.set("formed", "1")
        if self.store.check(["formed"]):
            self.formed = True
            return True
        if time.monotonic() - self.since > self.timeout:
            missing = [n for n in range(self.nodes) if n not in joined]
            raise GroupError(f"node{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {self.nodes} "
                             f"did not join the rendezvous at {self.addr} within {self.timeout:.0f} s")
        return False

    def _check_agreement(self) -> None:
        """Every node must train the same run: a different dataset, batch or seed would
        shard another permutation, and a different rank count another world."""
        infos = {n: json.loads(self.store.get(f"node/{n}")) for n in range(self.nodes)}
        for key, what in (("ranks", "ranks (--gpus)"), ("fingerprint", "dataset"), ("batch", "--batch-size"),
                          ("seed", "--seed"), ("dtype", "dtype")):
            values = {n: info.get(key) for n, info in infos.items()}
            if len(set(map(json.dumps, values.values()))) > 1:
                odd = next(n for n, v in values.items() if v != values[0])
                reason = (f"node {odd} has a different {what} from node 0 ({values[odd]!r} against {values[0]!r}): "
                          "every node must start the same run")
                self.post_halt(reason)
                raise GroupError(reason)

    # -- rounds --------------------------------------------------------------------

    @_store_op
    def round(self) -> int:
        return int(self.store.get("round"))

    @_store_op
    def end_round(self, current: int, why: str) -> int:
        """Ask for round current + 1; returns the round now in force (someone may have
        ended `current` first, or a later one)."""
        now = int(self.store.compare_set("round", str(current), str(current + 1)))
        if now == current + 1:
            self.store.compare_set(f"reason/{current}", "", why)  # only the first reason is kept
        return now

    @_store_op
    def reason(self, ended: int) -> str:
        key = f"reason/{ended}"
        return self.store.get(key).decode() if self.store.check([key]) else "a node restarted"

    # -- halting -------------------------------------------------------------------

    def post_halt(self, reason: str) -> None:
        """Tell the other nodes why this one gives up (best effort: the store may be gone)."""
        if self.store is None:
            return
        try:
            self.store.compare_set("halt", "", f"node {self.node_rank}: {reason}")
        except Exception:
            pass

    def _check_halt(self) -> None:
        if self.store.check(["halt"]):
            raise GroupError(f"the group stopped: {self.store.get('halt').decode()}")

    # -- beats and status ----------------------------------------------------------

    @_store_op
    def beat(self, state: str, step: int) -> None:
        """Every BEAT_SECONDS: this node's beat out, the others' in; GroupError on a halt."""
        if self.store is None or time.monotonic() - self.last_beat < BEAT_SECONDS:
            return
        self.last_beat = time.monotonic()
        self.beats_sent += 1
        self.store.set(f"beat/{self.node_rank}", json.dumps({"n": self.beats_sent, "state": state, "step": step}))
        now = time.monotonic()
        for node in range(self.nodes):
            key = f"beat/{node}"
            if not self.store.check([key]):
                continue
            view = json.loads(self.store.get(key))
            if self.seen.get(node, (None,))[0] != view["n"]:
                self.seen[node] = (view["n"], now)
            self.views[node] = view
        if self.formed:
            self._check_halt()

    def missing(self) -> list[int]:
        """Nodes whose supervisor has not beaten for MISSING_AFTER seconds (or never)."""
        now = time.monotonic()
        out = []
        for node in range(self.nodes):
            if node == self.node_rank:
                continue
            seen = self.seen.get(node)
            if seen is None or now - seen[1] > MISSING_AFTER:
                out.append(node)
        return out

    def status(self, current_round: int) -> dict:
        return {"nodes": self.nodes, "node_rank": self.node_rank, "world_size": self.world,
                "ranks": list(range(self.first_rank, self.first_rank + self.ranks_per_node)),
                "rendezvous": self.addr, "formed": self.formed, "round": current_round,
                "missing": self.missing() if self.formed else [n for n in range(self.nodes) if n not in self.seen],
                "steps": {str(n): v.get("step") for n, v in sorted(self.views.items())}}

    def trainer_args(self, round_: int, local_rank: int) -> dict:
        """What a trainer needs to meet the others of its round."""
        return {"store": self.addr, "round": round_, "rank": self.first_rank + local_rank, "world": self.world,
                "local_rank": local_rank, "ranks_per_node": self.ranks_per_node, "timeout": self.timeout}

    def close(self) -> None:
        self.store = None  # node 0: the store's server stops with the object


# ---------------------------------------------------------------------- the trainers' side

def join_trainers(group: dict, device: str):
    """In a trainer: meet the other ranks of this round, then init torch.distributed on
    them (NCCL on CUDA, gloo on the CPU), with every collective under the timeout.
    A rank that does not arrive is a GroupError naming it and its node."""
    import torch.distributed as dist
    from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

    host, port = parse_addr(group["store"], "rendezvous")
    timeout = timedelta(seconds=group["timeout"])
    store = PrefixStore(f"round{group['round']}/", TCPStore(host, port, None, False, timeout))
    rank, world = group["rank"], group["world"]
    store.set(f"arrived/{rank}", "1")
    deadline = time.monotonic() + group["timeout"]
    while True:
        missing = [r for r in range(world) if not store.check([f"arrived/{r}"])]
        if not missing:
            break
        if time.monotonic() > deadline:
            nodes = sorted({r // group["ranks_per_node"] for r in missing})
            raise GroupError(f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} (node "
                             f"{', '.join(map(str, nodes))}) did not join round {group['round']} within "
                             f"{group['timeout']:.0f} s")
        time.sleep(0.2)
    address = local_address(host)
    if device == "cuda":
        import os

        # NCCL's own bootstrap sockets: on the interface that reaches node 0, unless told.
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface_of(address) or "lo")
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        # gloo listens on the address that reaches node 0 (127.0.0.1 on one machine),
        # not on whatever the host name resolves to.
        options = ProcessGroupGloo._Options()
        options._devices = [ProcessGroupGloo.create_device(hostname=address)]
        options._timeout = timeout
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout,
                                pg_options=options)


def local_address(peer: str) -> str:
    """This machine's address on the route to `peer` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((peer, 9))
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def interface_of(address: str) -> str | None:
    """The network interface that holds an IPv4 address (NCCL_SOCKET_IFNAME wants a name)."""
    SIOCGIFADDR = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None
