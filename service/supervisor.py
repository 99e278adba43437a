"""The daemon's main process: the loop that spawns the stages, watches them and answers.

It creates one shared-memory ring per rank, serves /metrics and the control socket
(`status`, `stop`), follows the node group, and hands everything else to its parts:
the run layout (service/layout.py: what exists), the stage processes and their restart
policy (service/proctable.py), the beat ledger (service/beats.py) and the status and
metrics views (service/daemonview.py). It never asks which decoder runs.

SIGTERM / SIGINT / `stop`: the trainer finishes its step and checkpoints, every stage
stops, exit 0. A second signal or `stop --now`: everything is killed at once. Signal
handlers only record the signal (gunicorn's rule). Nothing in the loop sleeps or
joins: back-offs and stop deadlines are times its poll wakes for, so `status` answers
during a restart ("restarting the input side in 4 s").
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import zmq
from prometheus_client import CollectorRegistry, start_http_server

from alexnetd.pipeline import wire
from alexnetd.pipeline.launch import open_ring
from alexnetd.pipeline.netaddr import free_port
from alexnetd.pipeline.stage import STAGES, adopt_children
from alexnetd.service.beats import BeatLedger
from alexnetd.service.config import Config, parse_addr, resolve_device
from alexnetd.service.control import PidFile, control_endpoint
from alexnetd.service.daemonview import degraded_reason, metrics_view, progress_line, status_view
from alexnetd.service.group import GroupError, GroupLost, NodeGroup
from alexnetd.service.history import History
from alexnetd.service.layout import RunLayout
from alexnetd.service.metrics import DaemonCollector
from alexnetd.service.proctable import STOP_TIMEOUT, Halt, StageProcesses

__all__ = ["Supervisor", "main"]

log = logging.getLogger("alexnetd.supervisor")

POLL_MS = 250


class Supervisor:
    def __init__(self, config: Config, fresh: bool = False):
        self.config = config = resolve_device(config)  # a hand-written config.json may say auto
        self.layout = RunLayout.from_config(config)
        self.fresh, self.started = fresh, time.time()
        self.ledger = BeatLedger(self.layout.local_ranks)
        self.group = None
        if self.layout.world_size > 1:
            # One node with several ranks is a group of one, met on a free loopback port.
            addr = config.rendezvous if config.nodes > 1 else f"127.0.0.1:{free_port()}"
            self.group = NodeGroup(addr, config.nodes, config.node_rank, self.layout.local_ranks,
                                   config.rendezvous_timeout,
                                   {"host": socket.gethostname(), "pid": os.getpid(), "batch": config.batch_size,
                                    "fingerprint": self.layout.fingerprint, "seed": config.seed, "dtype": config.dtype})
        self.round, self.group_lost, self.following = 0, None, None
        self.state, self.halt_reason = "starting", None
        self.stopping_since: float | None = None
        self.signals: list[int] = []
        self.stop_now = False
        self.malformed = {"control": 0}
        self.rings = []

    # -- lifecycle -----------------------------------------------------------------

    def run(self) -> int:
        ctx = zmq.Context.instance()
        self.control, self.beat_socket = ctx.socket(zmq.REP), ctx.socket(zmq.PULL)
        for sock in (self.control, self.beat_socket):
            sock.setsockopt(zmq.LINGER, 0)
        (self.layout.run_dir / "halt.json").unlink(missing_ok=True)  # a reason left by an earlier run
        self.history = History(self.layout.run_dir)
        self.history.write("event", event="daemon-start", pid=os.getpid(), fresh=self.fresh)
        self.stages = StageProcesses(self.layout, self.ledger, self.history, self._group_args, self._end_round)
        adopt_children()
        wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda s, f: self.signals.append(s))
        self.http, code = None, 0
        try:
            self.control.bind(control_endpoint(self.layout.run_dir))
            self.beat_socket.bind(self.layout.beats)
            # Scrapes run in the HTTP server's thread: they read a snapshot the loop refreshes.
            self.latest_metrics = metrics_view(self)
            registry = CollectorRegistry()
            registry.register(DaemonCollector(lambda: self.latest_metrics))
            host, port = parse_addr(self.config.metrics_addr)
            try:
                self.http, _thread = start_http_server(port, addr=host, registry=registry)
            except OSError as exc:
                raise Halt(f"cannot serve metrics on {self.config.metrics_addr}: {exc.strerror}") from None
            self.layout.make_dirs()
            for rank in self.layout.ranks:
                try:
                    self.rings.append(open_ring(rank.ring, self.layout.slots, self.config.batch_size,
                                                self.layout.decoding, create=True))
                except OSError as exc:
                    raise Halt(f"cannot create the batch ring in /dev/shm: {exc.strerror}; "
                               "use fewer --slots or a smaller --batch-size") from None
            log.info("training on %s, %s", self.config.device, self.layout.decoding.describe())
            if self.group is None:
                self.stages.launch(resume=not self.fresh)
            elif self.config.node_rank == 0:
                try:
                    self.group.listen()
                except GroupError as exc:
                    raise Halt(str(exc)) from None
                log.info("waiting for %d node(s) at the rendezvous %s", self.config.nodes, self.group.addr)
            code = self._loop(wakeup_r)
        except Halt as exc:
            self.halt_reason = str(exc)
            log.error("halting: %s", exc)
            # Where `start` looks for why the daemon stopped (a trainer's own reason stays).
            halt_file = self.layout.run_dir / "halt.json"
            if not halt_file.exists():
                halt_file.write_text(json.dumps({"reason": str(exc)}))
            if self.group is not None and not str(exc).startswith("the group stopped"):
                self.group.post_halt(str(exc))
            self.history.write("event", event="halt", reason=str(exc))
            code = 1
        finally:
            self._teardown(wakeup_r)
            self.history.write("event", event="daemon-stop", code=code)
            self.history.close()
        return code

    def _teardown(self, wakeup_r: int) -> None:
        self.stages.kill_all()
        if self.http is not None:
            self.http.shutdown()
        for ring in self.rings:
            ring.close()
            ring.unlink()
        for sock in (self.control, self.beat_socket):
            sock.close(linger=0)
        Path(control_endpoint(self.layout.run_dir)[len("ipc://"):]).unlink(missing_ok=True)
        self.layout.remove_sockets()
        if self.group is not None:
            self.group.close()
        os.close(wakeup_r)

    def _loop(self, wakeup_r: int) -> int:
        poller = zmq.Poller()
        for sock in (self.control, self.beat_socket, wakeup_r):
            poller.register(sock, zmq.POLLIN)
        last_stage_line = time.monotonic()
        while True:
            events = dict(poller.poll(self._poll_ms()))
            if wakeup_r in events:
                os.read(wakeup_r, 512)
            self._drain_beats()
            self._follow_group()
            if self.control in events:
                self._answer()
            if self.stop_now:
                log.warning("stop --now: killing every stage")
                return 0
            while self.signals:
                signum = self.signals.pop(0)
                if self.stopping_since is not None:
                    log.warning("second %s: stopping now", signal.Signals(signum).name)
                    return 0
                self._begin_stop(f"signal {signal.Signals(signum).name}")
            finished = self.stages.tick(stopping=self.stopping_since is not None)
            if finished is not None:
                return finished
            self.ledger.sample(time.monotonic(), self.trainer_beat().get("step", 0))
            self.latest_metrics = metrics_view(self)
            if time.monotonic() - last_stage_line >= 10.0:
                progress_line(self, self.history)
                last_stage_line = time.monotonic()
            if self.stopping_since is not None and time.monotonic() - self.stopping_since > STOP_TIMEOUT:
                log.error("trainer did not stop within %.0f s; killing it", STOP_TIMEOUT)
                return 1

    def _poll_ms(self) -> int:
        """Wake for the next timer (a back-off's end, a stop deadline), at most every POLL_MS."""
        now, soonest = time.monotonic(), self.stages.next_timer()
        soonest = now + 1.0 if soonest is None else soonest
        return max(10, min(POLL_MS, int(1000 * (soonest - now))))

    def _begin_stop(self, why: str) -> None:
        if self.stopping_since is not None:
            return
        log.info("stopping (%s): the trainer finishes its step and checkpoints", why)
        self.history.write("event", event="stop", reason=why)
        self.stopping_since, self.state = time.monotonic(), "stopping"
        for name in self.stages.table.alive(lambda n: n.stage == "trainer"):
            os.kill(self.stages.table.processes[name].pid, signal.SIGTERM)

    def _follow_group(self) -> None:
        """Form the group, then follow it: another node ending the round restarts ours;
        a node that gave up stops us too."""
        if self.group is None or self.stopping_since is not None or self.group_lost or self.stages.finishing:
            return
        try:
            if not self.group.formed:
                if self.group.poll_formation():
                    self.round = self.group.round()
                    first = self.layout.first_rank
                    log.info("group formed: %d node(s), %d ranks; this node has ranks %d-%d (round %d)",
                             self.config.nodes, self.layout.world_size, first, first + self.layout.local_ranks - 1,
                             self.round)
                    self.history.write("event", event="group-formed", round=self.round, nodes=self.config.nodes)
                    self.stages.launch(resume=not self.fresh)
                return
            self.group.beat(self.state, self.trainer_beat().get("step", 0))
            current = self.group.round()
            if current > self.round:
                self.following = current
                self.stages.restart("trainer", f"the group restarts ({self.group.reason(current - 1)})")
        except GroupLost as exc:
            if not self.group.formed:  # node 0 gave up (or died) before the group formed
                raise Halt(f"{exc}; the group did not form") from None
            # Node 0 is gone. At the end of a run that is just its exit; otherwise this
            # node's trainers fail in their next collective, and the restart says why.
            self.group_lost = str(exc)
            log.warning("%s", exc)
        except GroupError as exc:
            raise Halt(str(exc)) from None

    def _group_args(self, local: int) -> dict | None:
        return self.group.trainer_args(self.round, local) if self.group is not None else None

    def _end_round(self, why: str) -> str:
        """A trainer restart with several nodes is the group's: this node ends the round,
        or follows the round another node began."""
        if self.group is None:
            return why
        if self.group_lost:
            raise Halt(self.group_lost)
        following, self.following = self.following, None
        try:
            self.round = following if following is not None else self.group.end_round(
                self.round, f"node {self.config.node_rank}: {why}")
        except GroupError as exc:
            raise Halt(str(exc)) from None
        return f"{why}; round {self.round}"

    # -- heartbeats, status, control -----------------------------------------------

    def _drain_beats(self) -> None:
        now = time.monotonic()
        for msg in wire.drain(self.beat_socket, self._count_malformed_beat):
            stage, rank = msg.get("stage"), msg.get("rank", self.layout.first_rank)
            local = rank - self.layout.first_rank if isinstance(rank, int) else -1
            if stage not in STAGES or not 0 <= local < self.layout.local_ranks or not isinstance(msg.get("index", 0), int):
                self._count_malformed_beat()
                continue
            name = self.layout.name(stage, local, msg.get("index", 0) if stage == "augmenter" else 0)
            host = self.layout.name(self.layout.decoding.host_of(stage), local, name.index)
            if not self.stages.table.beat(host, msg.get("pid"), now):
                continue  # a beat from a process already replaced
            if stage == "loader" and msg.get("generation") != self.stages.generations[local]:
                continue
            self.ledger.record(name, msg.header)
            if stage == "trainer" and local == 0 and self.stopping_since is None:
                moving = msg.get("step", 0) > 0 or msg.get("state") == "validating"
                if msg.get("state") in ("training", "validating") and (moving or self.state != "starting"):
                    self.state = msg["state"]

    def _count_malformed_beat(self, _error=None) -> None:
        self.ledger.malformed += 1

    def trainer_beat(self) -> dict:
        return self.ledger.latest(self.layout.name("trainer", 0))

    def current_state(self) -> str:
        if self.stopping_since is not None:
            return "stopping"
        if self.group is not None and not self.group.formed:
            return "rendezvous"
        return "degraded" if self.state != "starting" and degraded_reason(self) else self.state

    def group_view(self) -> dict | None:
        """Several nodes: the group as this node sees it (one node's ranks: None)."""
        if self.group is None or self.config.nodes == 1:
            return None
        return dict(self.group.status(self.round), lost=self.group_lost)

    def _answer(self) -> None:
        try:
            msg = wire.recv(self.control)
            command = msg.get("cmd")
        except wire.WireError as exc:
            self.malformed["control"] += 1
            wire.send(self.control, "reply", ok=False, error=str(exc))
            return
        if command == "status":
            wire.send(self.control, "reply", ok=True, status=status_view(self))
        elif command == "stop":
            wire.send(self.control, "reply", ok=True)
            if msg.get("now"):
                self.history.write("event", event="stop", reason="alexnetd stop --now")
                self.stop_now = True
            else:
                self._begin_stop("alexnetd stop")
        else:
            self.malformed["control"] += 1
            wire.send(self.control, "reply", ok=False, error=f"unknown command {command!r}")


def main(argv=None) -> int:
    """`python -m alexnetd.service.supervisor RUN_DIR [--fresh]`: what `alexnetd start` runs
    detached. The resolved config is RUN_DIR/config.json."""
    import argparse

    parser = argparse.ArgumentParser(prog="alexnetd-supervisor")
    parser.add_argument("run_dir")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    config = Config(**json.loads((Path(args.run_dir) / "config.json").read_text()))
    pidfile = PidFile(config.run_dir)
    if not pidfile.acquire():
        log.error("another alexnetd holds %s", pidfile.path)
        return 1
    try:
        return Supervisor(config, fresh=args.fresh).run()
    finally:
        pidfile.release()


if __name__ == "__main__":
    sys.exit(main())
