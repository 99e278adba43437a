"""The daemon's main process: spawns the stages, watches them, restarts them, answers.

- Spawns the trainer (copier thread inside), the loader and the augmenters with the
  spawn context, around one shared-memory ring it creates and removes.
- Receives every stage's heartbeat (counters) on `beats`; keeps cumulative totals, so
  Prometheus counters stay monotonic across restarts.
- A dead or silent loader/augmenter: the input side (loader + all augmenters) is
  stopped and started again as a new generation at the trainer's position. Batches are
  rebuilt from their seq: nothing is lost or trained twice, and no process of the old
  generation can still write into a slot the new one uses.
- A dead trainer: restarted from its last checkpoint, with a fresh input side.
- A stage that dies before its first heartbeat cannot boot: the daemon halts with the
  reason instead of restarting it in a loop; so does one that needs more than
  `restart_limit` restarts in ten minutes.
- SIGTERM / SIGINT / `stop`: the trainer finishes its step and checkpoints, every stage
  stops, exit 0. A second signal or `stop --now`: everything is killed at once.
- Answers `status` and `stop` on RUN_DIR/control.sock and serves /metrics.

Signal handlers only record the signal; the main loop acts on it (gunicorn's rule).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path

import zmq
from prometheus_client import CollectorRegistry, start_http_server

from alexnetd.pipeline import wire
from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.launch import default_augmenters, default_slots, input_stages, spawn_context
from alexnetd.pipeline.plan import BatchPlan
from alexnetd.pipeline.ring import Ring, ring_name
from alexnetd.pipeline.stage import EXIT_BOOT, EXIT_HALT, STAGES, Endpoints, adopt_children
from alexnetd.service.config import Config, group_size, parse_addr, resolve_device, world_size
from alexnetd.service.control import PidFile, control_endpoint
from alexnetd.service.group import GroupError, GroupLost, NodeGroup
from alexnetd.service.history import History
from alexnetd.service.metrics import DaemonCollector

__all__ = ["Supervisor", "main"]

log = logging.getLogger("alexnetd.supervisor")

POLL_MS = 250
STOP_TIMEOUT = 120.0       # a trainer gets this long to finish its step and checkpoint
RESTART_WINDOW = 600.0     # restart_limit counts restarts within this many seconds
DEGRADED_FOR = 60.0        # a restart leaves the daemon "degraded" this long
RATE_WINDOW = 10.0         # seconds over which status rates are computed
COUNTER_KEYS = ("images", "busy", "starved", "blocked")


class Halt(Exception):
    """Stop the daemon with a reason, without restarting anything."""


class Supervisor:
    def __init__(self, config: Config, fresh: bool = False):
        config = resolve_device(config)  # `alexnetd start` resolved it already; a hand-written config.json may not
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.fresh = fresh
        self.started = time.time()
        dataset = open_dataset(config.data)
        # Data parallel: one trainer per device, each with its own input side (ring,
        # sockets, loader, augmenters) reading every world-th batch.
        self.world = world_size(config)          # this node's ranks
        # Many machines (service/group.py): this node's ranks are global ranks
        # first_rank .. first_rank + world - 1 of every node's ranks together.
        self.first_rank = config.node_rank * self.world
        self.group_world = group_size(config)
        self.plans = [BatchPlan.for_dataset(dataset, config.batch_size, config.seed, config.val_every,
                                            self.first_rank + rank, self.group_world) for rank in range(self.world)]
        self.group = None
        if self.group_world > 1:
            # One node with several ranks is a group of one, met on a free loopback port.
            addr = config.rendezvous if config.nodes > 1 else f"127.0.0.1:{_free_port()}"
            self.group = NodeGroup(addr, config.nodes, config.node_rank, self.world, config.rendezvous_timeout,
                                   {"host": socket.gethostname(), "pid": os.getpid(), "fingerprint": dataset.fingerprint,
                                    "batch": config.batch_size, "seed": config.seed, "dtype": config.dtype})
        self.round = 0              # the group's round this node's trainers belong to
        self.group_lost: str | None = None
        # --decoder dali: no augmenter processes; DALI decodes in each trainer process.
        self.n_augmenters = 0 if config.decoder == "dali" else config.augmenters or default_augmenters(self.world)  # per rank
        self.slots = config.slots or default_slots(max(1, self.n_augmenters), bool(config.remote_augmenters))
        self.endpoints = Endpoints.in_dir(self.run_dir)
        self.rank_endpoints = [self.endpoints] if self.world == 1 else [
            dataclasses.replace(Endpoints.in_dir(self._rank_dir(r)), beats=self.endpoints.beats) for r in range(self.world)]
        self.rings: list[Ring] = []
        self.generations = [0] * self.world
        self.processes: dict[str, spawn_context.Process] = {}
        self.booted: set[str] = set()           # names that have sent a beat since their start
        self.last_beat: dict[str, float] = {}   # name -> monotonic time of its last beat
        self.beats: dict[str, dict] = {}        # name -> its latest beat
        # Totals of dead processes, per rank and stage.
        self.retired = [{s: dict.fromkeys(COUNTER_KEYS, 0.0) for s in STAGES} for _ in range(self.world)]
        self.restarts = dict.fromkeys(STAGES, 0)
        self.restart_times: dict[str, deque] = {s: deque() for s in STAGES}
        self.last_restart = 0.0
        self.skipped_retired: dict[str, int] = {}
        self.checkpoint_failures_retired = 0
        self.malformed = {"beats": 0, "control": 0}  # frames refused on the supervisor's own sockets
        self.remote_retired = {"images": {}, "refused": 0, "reissued": 0}  # of gateways that were replaced
        self.state = "starting"
        self.halt_reason: str | None = None
        self.stopping_since: float | None = None
        self.signals: list[int] = []
        self.stop_now = False
        self.rates = deque()                    # (monotonic, [{stage: counters}] per rank, step)
        self.history = None

    # -- lifecycle -----------------------------------------------------------------

    def run(self) -> int:
        ctx = zmq.Context.instance()
        self.control = ctx.socket(zmq.REP)
        self.control.setsockopt(zmq.LINGER, 0)
        self.beat_socket = ctx.socket(zmq.PULL)
        self.beat_socket.setsockopt(zmq.LINGER, 0)
        self.history = History(self.run_dir)
        self.history.write("event", event="daemon-start", pid=os.getpid(), fresh=self.fresh)
        adopt_children()
        wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda s, f: self.signals.append(s))
        self.http = None
        code = 0
        try:
            self.control.bind(control_endpoint(self.run_dir))
            self.beat_socket.bind(self.endpoints.beats)
            # Scrapes run in the HTTP server's thread: they read a snapshot the main loop
            # refreshes, never the dicts it is changing.
            self.latest_metrics = self.metrics_snapshot()
            registry = CollectorRegistry()
            registry.register(DaemonCollector(lambda: self.latest_metrics))
            host, port = parse_addr(self.config.metrics_addr)
            try:
                self.http, _thread = start_http_server(port, addr=host, registry=registry)
            except OSError as exc:
                raise Halt(f"cannot serve metrics on {self.config.metrics_addr}: {exc.strerror}") from None
            for rank in range(self.world):
                try:
                    self.rings.append(Ring(ring_name(self._rank_dir(rank)), self.slots, self.config.batch_size,
                                           create=True))
                except OSError as exc:
                    raise Halt(f"cannot create the batch ring in /dev/shm: {exc.strerror}; "
                               "use fewer --slots or a smaller --batch-size") from None
            log.info("training on %s, %s", self.config.device,
                     "decoding with DALI in the trainer" if self.config.decoder == "dali"
                     else f"{self.n_augmenters} augmenter(s) per rank")
            if self.group is None:
                self._launch()
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
            if self.group is not None and not str(exc).startswith("the group stopped"):
                self.group.post_halt(str(exc))
            self.history.write("event", event="halt", reason=str(exc))
            code = 1
        finally:
            self._kill_all()
            if self.http is not None:
                self.http.shutdown()
            for ring in self.rings:
                ring.close()
                ring.unlink()
            for sock in (self.control, self.beat_socket):
                sock.close(linger=0)
            Path(control_endpoint(self.run_dir)[len("ipc://"):]).unlink(missing_ok=True)
            # ZeroMQ leaves a bound ipc:// file behind; every stage is gone now, so none is in use.
            for ends in self.rank_endpoints:
                for address in ends.as_dict().values():
                    if address.startswith("ipc://"):
                        Path(address[len("ipc://"):]).unlink(missing_ok=True)
            if self.group is not None:
                self.group.close()
            self.history.write("event", event="daemon-stop", code=code)
            self.history.close()
            os.close(wakeup_r)
        return code

    def _loop(self, wakeup_r: int) -> int:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.beat_socket, zmq.POLLIN)
        poller.register(wakeup_r, zmq.POLLIN)
        last_stage_line = time.monotonic()
        while True:
            events = dict(poller.poll(POLL_MS))
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
            finished = self._reap()
            if finished is not None:
                return finished
            self._check_silent()
            self._sample_rates()
            self.latest_metrics = self.metrics_snapshot()
            if time.monotonic() - last_stage_line >= 10.0:
                self._stage_history_line()
                last_stage_line = time.monotonic()
            if self.stopping_since is not None and time.monotonic() - self.stopping_since > STOP_TIMEOUT:
                log.error("trainer did not stop within %.0f s; killing it", STOP_TIMEOUT)
                return 1

    def _launch(self) -> None:
        self._spawn_trainers(resume=not self.fresh)
        for rank in range(self.world):
            self._spawn_input(rank)

    def _follow_group(self) -> None:
        """Form the group, then follow it: another node ending the round restarts ours;
        a node that gave up stops us too."""
        if self.group is None or self.stopping_since is not None or self.group_lost:
            return
        try:
            if not self.group.formed:
                if self.group.poll_formation():
                    self.round = self.group.round()
                    log.info("group formed: %d node(s), %d ranks; this node has ranks %d-%d (round %d)",
                             self.config.nodes, self.group_world, self.first_rank, self.first_rank + self.world - 1,
                             self.round)
                    self.history.write("event", event="group-formed", round=self.round, nodes=self.config.nodes)
                    self._launch()
                return
            trainer = self.beats.get(self._name("trainer", 0), {})
            self.group.beat(self.state, trainer.get("step", 0))
            current = self.group.round()
            if current > self.round:
                self._restart("trainer", f"the group restarts ({self.group.reason(current - 1)})", follow=current)
        except GroupLost as exc:
            # Node 0 is gone. At the end of a run that is just its exit; otherwise this
            # node's trainers fail in their next collective, and the restart says why.
            self.group_lost = str(exc)
            log.warning("%s", exc)
        except GroupError as exc:
            raise Halt(str(exc)) from None

    def _begin_stop(self, why: str) -> None:
        if self.stopping_since is not None:
            return
        log.info("stopping (%s): the trainer finishes its step and checkpoints", why)
        self.history.write("event", event="stop", reason=why)
        self.stopping_since = time.monotonic()
        self.state = "stopping"
        for name in self._trainer_names():
            if self.processes[name].is_alive():
                os.kill(self.processes[name].pid, signal.SIGTERM)

    # -- processes -----------------------------------------------------------------

    def _spawn(self, name: str, target, *args) -> None:
        proc = spawn_context.Process(target=target, args=args, name=f"alexnetd-{name}", daemon=False)
        proc.start()
        self.processes[name] = proc
        self.booted.discard(name)
        self.last_beat[name] = time.monotonic()
        log.info("started %s (pid %d)", name, proc.pid)

    def _name(self, base: str, rank: int) -> str:
        """Process names: "trainer", "augmenter-1"; with several ranks "trainer@1"..."""
        return base if self.world == 1 else f"{base}@{rank}"

    def _rank_dir(self, rank: int) -> Path:
        if self.world == 1:
            return self.run_dir
        path = self.run_dir / f"rank{rank}"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def _spawn_trainers(self, resume: bool) -> None:
        # Imported here: spawned children re-import this module, and the loader and
        # augmenters must not pay for torch.
        from alexnetd.service.trainer import run_trainer

        (self.run_dir / "halt.json").unlink(missing_ok=True)
        for rank in range(self.world):
            group = self.group.trainer_args(self.round, rank) if self.group is not None else None
            self._spawn(self._name("trainer", rank), run_trainer, self.config.to_dict(), self.rings[rank].name,
                        self.slots, self.rank_endpoints[rank].as_dict(), resume, group)

    def _spawn_input(self, rank: int) -> None:
        stages = input_stages(self.config.data, self.rank_endpoints[rank].as_dict(), self.plans[rank], self.slots,
                              self.rings[rank].name, self.n_augmenters, self.generations[rank],
                              remote=self._remote_cfg())
        for name, (target, cfg) in stages.items():
            self._spawn(self._name(name, rank), target, cfg)

    def _stop_processes(self, names, timeout: float = 5.0) -> None:
        procs = [(n, self.processes.pop(n)) for n in names if n in self.processes]
        for _, proc in procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout
        for name, proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
            self._retire(name)

    def _kill_all(self) -> None:
        for proc in self.processes.values():
            if proc.is_alive():
                proc.kill()
        for name, proc in list(self.processes.items()):
            proc.join(5)
            self._retire(name)
        self.processes.clear()

    def _retire(self, name: str) -> None:
        """Fold a finished process's counters into its stage's totals."""
        beat = self.beats.pop(name, None)
        if beat is None:
            return
        stage, retired = _stage_of(name), self.retired[_rank_of(name)]
        for key in COUNTER_KEYS:
            retired[stage][key] += beat["counters"][key]
        self._retire_remote(beat.get("remote"))
        if stage == "trainer":
            for reason, count in (beat.get("skipped") or {}).items():
                self.skipped_retired[reason] = self.skipped_retired.get(reason, 0) + count
            self.checkpoint_failures_retired += beat.get("checkpoint_failures") or 0
            copier = self.beats.pop(name.replace("trainer", "copier"), None)
            if copier is not None:
                for key in COUNTER_KEYS:
                    retired["copier"][key] += copier["counters"][key]

    def _trainer_names(self) -> list[str]:
        return [n for n in self.processes if _stage_of(n) == "trainer"]

    def _input_names(self, rank: int | None = None) -> list[str]:
        return [n for n in self.processes if _stage_of(n) != "trainer" and (rank is None or _rank_of(n) == rank)]

    def _reap(self) -> int | None:
        """React to exited processes. Returns the daemon's exit code when it is done."""
        exited = [n for n in self._trainer_names() if self.processes[n].exitcode is not None]
        if exited:
            code = self.processes[exited[0]].exitcode
            if code == 0:
                # Ranks stop together (they agree on it every step): let the others finish.
                self._stop_processes(self._trainer_names(), timeout=STOP_TIMEOUT)
                log.info("trainer finished (%s)", "stop requested" if self.stopping_since else
                         "training done, or another node stopped the group" if self.config.nodes > 1 else "training done")
                self._stop_processes(self._input_names())
                return 0
            if code in (EXIT_BOOT, EXIT_HALT):
                raise Halt(self._halt_file() or f"trainer exited with code {code}")
            if self.stopping_since is not None:
                return 1
            if self._could_not_boot(exited[0], code):
                raise Halt(self._halt_file() or f"{exited[0]} could not start (exit code {code}); "
                           f"see {self.run_dir / 'alexnetd.log'}")
            self._restart("trainer", f"{exited[0]} exited with code {code}")
            return None
        dead = [n for n in self._input_names() if self.processes[n].exitcode is not None]
        if dead and self.stopping_since is None:
            name = dead[0]
            why = f"{name} exited with code {self.processes[name].exitcode}"
            if self._could_not_boot(name, self.processes[name].exitcode):
                raise Halt(f"{name} could not start ({why}); see {self.run_dir / 'alexnetd.log'}")
            self._restart(_stage_of(name), why, name)
        return None

    def _could_not_boot(self, name: str, code: int) -> bool:
        """Exiting by itself before its first beat is a stage that cannot boot (bad data, a
        broken install): halt with the reason rather than loop. Killed by a signal while
        booting (SIGKILL, the OOM killer) is a crash like any other."""
        return name not in self.booted and code >= 0

    def _check_silent(self) -> None:
        if self.stopping_since is not None:
            return
        now = time.monotonic()
        for name, proc in list(self.processes.items()):
            if self.beats.get(name, {}).get("state") == "checkpointing":
                continue  # a big checkpoint on a slow disk is not a hang
            if name in self.booted and now - self.last_beat.get(name, now) > self.config.heartbeat_timeout:
                log.error("%s sent no heartbeat for %.0f s: killing it", name, now - self.last_beat[name])
                proc.kill()
                proc.join()
                return  # the next _reap restarts it

    def _restart(self, stage: str, why: str, name: str | None = None, follow: int | None = None) -> None:
        """Restart a stage's processes. A trainer restart with several nodes is the
        group's: this node ends the round (or `follow`s the round another node began)."""
        now = time.monotonic()
        times = self.restart_times[stage]
        while times and now - times[0] > RESTART_WINDOW:
            times.popleft()
        if len(times) >= self.config.restart_limit:
            raise Halt(f"{why}; {stage} restarted {len(times)} times in {RESTART_WINDOW / 60:.0f} minutes, giving up")
        # Back off: 0.5 s, 1 s, 2 s ... between repeated restarts of one stage.
        time.sleep(min(8.0, 0.5 * 2 ** len(times)) if times else 0.0)
        times.append(now)
        self.restarts[stage] += 1
        self.last_restart = now
        if stage == "trainer" and self.group is not None:
            if self.group_lost:
                raise Halt(self.group_lost)
            try:
                self.round = follow if follow is not None else self.group.end_round(
                    self.round, f"node {self.config.node_rank}: {why}")
            except GroupError as exc:
                raise Halt(str(exc)) from None
            why += f"; round {self.round}"
        log.warning("%s: restarting the %s", why, "trainers from their checkpoint" if stage == "trainer" else "input side")
        self.history.write("event", event="restart", stage=stage, reason=why)
        # A dead trainer takes every rank with it (a collective cannot go on with one
        # member gone); a dead input stage only its own rank's input side.
        ranks = range(self.world) if name is None else [_rank_of(name)]
        if stage == "trainer":
            self._stop_processes(self._trainer_names())
        for rank in ranks:
            self._stop_processes(self._input_names(rank))
            self.generations[rank] += 1
        if stage == "trainer":
            self._spawn_trainers(resume=True)
        for rank in ranks:
            self._spawn_input(rank)

    def _halt_file(self) -> str | None:
        path = self.run_dir / "halt.json"
        try:
            return json.loads(path.read_text())["reason"]
        except (OSError, ValueError, KeyError):
            return None

    # -- heartbeats and status -----------------------------------------------------

    def _drain_beats(self) -> None:
        for msg in wire.drain(self.beat_socket, self._count_malformed_beat):
            stage, index, rank = msg.get("stage"), msg.get("index", 0), msg.get("rank", self.first_rank)
            if not isinstance(rank, int) or not 0 <= rank - self.first_rank < self.world:
                self._count_malformed_beat()
                continue
            rank -= self.first_rank  # stages say their global rank; names use this node's index
            name = self._name(stage if stage in ("loader", "trainer", "copier") else f"augmenter-{index}", rank)
            # The copier, and DALI's decoding thread (reported as the augmenter stage), live
            # in the trainer process.
            pid_owner = self._name("trainer", rank) if stage == "copier" or msg.get("in_trainer") else name
            proc = self.processes.get(pid_owner)
            if proc is None or proc.pid != msg.get("pid"):
                continue  # a beat from a process already replaced
            if stage == "loader" and msg.get("generation") != self.generations[rank]:
                continue
            self.beats[name] = msg.header
            self.last_beat[pid_owner] = time.monotonic()
            self.booted.add(pid_owner)
            if stage == "trainer" and rank == 0 and self.stopping_since is None:
                moving = msg.get("step", 0) > 0 or msg.get("state") == "validating"
                if msg.get("state") in ("training", "validating") and (moving or self.state != "starting"):
                    self.state = msg["state"]

    def _count_malformed_beat(self, _error=None) -> None:
        self.malformed["beats"] += 1

    def _malformed(self) -> dict:
        """Frames refused per socket: ours, and those the stages count on theirs."""
        def counted(stage):
            return sum((b.get("counters") or {}).get("malformed", 0) for n, b in self.beats.items() if _stage_of(n) == stage)
        trainer = self.beats.get(self._name("trainer", 0), {})
        return dict(self.malformed, ready=trainer.get("malformed", 0), credits=counted("loader"), jobs=counted("augmenter"))

    def _rank_totals(self) -> list[dict]:
        """Per rank, per stage: cumulative counters (dead processes' included)."""
        totals = [{s: dict(retired[s]) for s in STAGES} for retired in self.retired]
        for name, beat in self.beats.items():
            for key in COUNTER_KEYS:
                totals[_rank_of(name)][_stage_of(name)][key] += beat["counters"][key]
        return totals

    def _sample_rates(self) -> None:
        now = time.monotonic()
        if self.rates and now - self.rates[-1][0] < 1.0:
            return
        trainer = self.beats.get(self._name("trainer", 0), {})
        self.rates.append((now, self._rank_totals(), trainer.get("step", 0)))
        while len(self.rates) > 2 and now - self.rates[0][0] > RATE_WINDOW:
            self.rates.popleft()

    def _stage_rates(self, rank: int | None = None) -> dict:
        """Per stage: images/s and busy/starved/blocked shares over the last few seconds,
        of one rank or (rank None) of all of them together."""
        if len(self.rates) < 2:
            return {s: {"images_per_second": 0.0, "busy": 0.0, "starved": 0.0, "blocked": 0.0} for s in STAGES}
        (t0, a, _), (t1, b, _) = self.rates[0], self.rates[-1]
        a, b = (_sum_ranks(x) if rank is None else x[rank] for x in (a, b))
        out = {}
        for stage in STAGES:
            delta = {k: max(0.0, b[stage][k] - a[stage][k]) for k in COUNTER_KEYS}
            spent = delta["busy"] + delta["starved"] + delta["blocked"]
            out[stage] = {"images_per_second": round(delta["images"] / (t1 - t0), 1)}
            for key in ("busy", "starved", "blocked"):
                out[stage][key] = round(delta[key] / spent, 3) if spent > 0 else 0.0
        return out

    def _current_state(self) -> str:
        if self.stopping_since is not None:
            return "stopping"
        if self.group is not None and not self.group.formed:
            return "rendezvous"
        return "degraded" if self.state != "starting" and self._degraded_reason() else self.state

    def _degraded_reason(self) -> str | None:
        down = [n for n, p in self.processes.items() if not p.is_alive()]
        if down:
            return f"{down[0]} is down"
        if self.last_restart and time.monotonic() - self.last_restart < DEGRADED_FOR:
            return "a stage restarted in the last minute"
        # Cleared by the next checkpoint that is written.
        return self.beats.get(self._name("trainer", 0), {}).get("checkpoint_error")

    def status(self) -> dict:
        trainer = self.beats.get(self._name("trainer", 0), {})
        stages = self._stage_rates()
        for stage in STAGES:
            # The copier is a thread of each trainer; so is the DALI decoder (the augmenter stage).
            in_trainer = stage == "copier" or (stage == "augmenter" and self.config.decoder == "dali")
            owner = "trainer" if in_trainer else stage
            stages[stage]["processes"] = sum(1 for n, p in self.processes.items() if _stage_of(n) == owner and p.is_alive())
            stages[stage]["restarts"] = self.restarts[stage]
        # The bottleneck: the stage with the highest busy share.
        bottleneck = max(STAGES, key=lambda s: stages[s]["busy"]) if any(stages[s]["busy"] for s in STAGES) else None
        steps_per_epoch = trainer.get("steps_per_epoch") or 0
        batches_in_epoch = trainer.get("batches_in_epoch") or 0
        seq, epoch = trainer.get("seq", 0), trainer.get("epoch", 0)
        rate_steps = self._step_rate()
        eta = None
        if rate_steps > 0 and steps_per_epoch:
            remaining_epochs = trainer.get("max_epochs", self.config.max_epochs) - epoch
            remaining = remaining_epochs * steps_per_epoch - min(seq, steps_per_epoch)
            if trainer.get("max_steps"):
                remaining = min(remaining, trainer["max_steps"] - trainer.get("step", 0))
            eta = round(max(0, remaining) / rate_steps, 1)
        ranks = self._ranks()
        checkpoint = trainer.get("checkpoint")
        skipped = dict(self.skipped_retired)
        for reason, count in (trainer.get("skipped") or {}).items():
            skipped[reason] = skipped.get(reason, 0) + count
        return {
            "state": self._current_state(),
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "run_dir": str(self.run_dir),
            "data": self.config.data,
            "device": self.config.device,
            "epoch": epoch,
            "step": trainer.get("step", 0),
            "steps_per_epoch": steps_per_epoch,
            "epoch_progress": round(min(seq, batches_in_epoch) / batches_in_epoch, 4) if batches_in_epoch else 0.0,
            "max_epochs": self.config.max_epochs,
            "eta_seconds": eta,
            "images_per_second": stages["trainer"]["images_per_second"],
            "stages": stages,
            "bottleneck": bottleneck,
            "queues": {"ring_slots": self.slots, "ring_slots_in_use": trainer.get("slots_in_use", 0),
                       "reorder_buffer": trainer.get("reorder", 0)},
            "loss": trainer.get("loss"),
            "learning_rate": trainer.get("lr"),
            "validation": trainer.get("val"),
            "restarts": dict(self.restarts),
            "skipped": skipped,
            "degraded_reason": self._degraded_reason() if self.state != "starting" else None,
            "checkpoint_failures": self.checkpoint_failures_retired + (trainer.get("checkpoint_failures") or 0),
            "skipped_recent": trainer.get("skipped_recent") or [],
            "malformed": self._malformed(),
            "checkpoint": None if not checkpoint else {
                "path": checkpoint["path"], "step": checkpoint["step"],
                "age_seconds": round(time.time() - checkpoint["t"], 1)},
            "metrics_url": f"http://{self.config.metrics_addr}/metrics",
            "generation": max(self.generations),
            "world_size": self.group_world,
            "group": self._group_status(),
            "ranks": ranks,
            "slowest_rank": _slowest(ranks),
            "processes": {name: proc.pid for name, proc in self.processes.items() if proc.is_alive()},
            "halt_reason": self.halt_reason,
            "remote_augmenters": self._remote_status(),
        }

    def _ranks(self) -> list[dict]:
        """Each rank's own view: its stages' rates and shares, its ring and reorder buffer."""
        out = []
        for rank in range(self.world):
            beat = self.beats.get(self._name("trainer", rank), {})
            stages = self._stage_rates(rank)
            for stage in STAGES:
                in_trainer = stage == "copier" or (stage == "augmenter" and self.config.decoder == "dali")
                owner = "trainer" if in_trainer else stage
                stages[stage]["processes"] = sum(1 for n, p in self.processes.items()
                                                 if _stage_of(n) == owner and _rank_of(n) == rank and p.is_alive())
            out.append({"rank": self.first_rank + rank, "step": beat.get("step", 0),
                        "images_per_second": stages["trainer"]["images_per_second"], "stages": stages,
                        "ring_slots_in_use": beat.get("slots_in_use", 0), "reorder_buffer": beat.get("reorder", 0)})
        return out

    def _group_status(self) -> dict | None:
        """Several nodes: the group as this node sees it (one node's ranks: None)."""
        if self.group is None or self.config.nodes == 1:
            return None
        view = self.group.status(self.round)
        view["lost"] = self.group_lost
        return view

    def _step_rate(self) -> float:
        if len(self.rates) < 2:
            return 0.0
        (t0, _, s0), (t1, _, s1) = self.rates[0], self.rates[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

    def metrics_snapshot(self) -> dict:
        trainer = self.beats.get(self._name("trainer", 0), {})
        rank_totals = self._rank_totals()
        totals = _sum_ranks(rank_totals)
        status = self.status()
        stages = {s: dict(totals[s], processes=status["stages"][s]["processes"], restarts=self.restarts[s])
                  for s in STAGES}
        ranks = [{"rank": r["rank"],
                  "stages": {s: dict(rank_totals[local][s], processes=r["stages"][s]["processes"]) for s in STAGES},
                  "ring_slots_in_use": r["ring_slots_in_use"], "reorder": r["reorder_buffer"]}
                 for local, r in enumerate(status["ranks"])]
        memory = {}
        for rank in range(self.world):  # each rank reports the devices it uses
            memory.update(self.beats.get(self._name("trainer", rank), {}).get("memory") or {})
        return {
            "stages": stages, "ranks": ranks, "ring_slots": self.slots,
            "ring_slots_in_use": status["queues"]["ring_slots_in_use"], "reorder": status["queues"]["reorder_buffer"],
            "train_images": totals["trainer"]["images"], "steps": trainer.get("step", 0),
            "epoch": trainer.get("epoch", 0), "loss": trainer.get("loss"), "lr": trainer.get("lr"),
            "val": trainer.get("val"), "skipped": status["skipped"], "checkpoint": trainer.get("checkpoint"),
            "memory": memory or None, "state": status["state"], "device": self.config.device,
            "checkpoint_failures": status["checkpoint_failures"],
            "remote": status["remote_augmenters"],
        }

    # -- remote augmenters (pipeline/remote.py): one gateway per rank, an augmenter to us

    def _remote_cfg(self) -> dict | None:
        if not self.config.remote_augmenters:
            return None
        # Rank r of this node listens on PORT + r (its local index, on every node).
        return {"addr": self.config.remote_augmenters, "keys_dir": str(self.run_dir), "first_rank": self.first_rank}

    def _retire_remote(self, remote: dict | None) -> None:
        if remote:
            for host, images in remote["images"].items():
                self.remote_retired["images"][host] = self.remote_retired["images"].get(host, 0) + images
            self.remote_retired["refused"] += remote["refused"]
            self.remote_retired["reissued"] += remote["reissued"]

    def _remote_status(self) -> dict | None:
        """Connected hosts of every rank's gateway; counters summed over gateways past and present."""
        if not self.config.remote_augmenters:
            return None
        out = {"hosts": [], "images": dict(self.remote_retired["images"]),
               "refused": self.remote_retired["refused"], "reissued": self.remote_retired["reissued"]}
        for name, beat in sorted(self.beats.items()):
            remote = beat.get("remote")
            if not remote:
                continue
            out["hosts"] += [dict(h, rank=_rank_of(name)) for h in remote["hosts"]]
            for host, images in remote["images"].items():
                out["images"][host] = out["images"].get(host, 0) + images
            out["refused"] += remote["refused"]
            out["reissued"] += remote["reissued"]
        return out

    def _stage_history_line(self) -> None:
        """Every 10 s: per-stage rates into the history, and one progress line into the log."""
        stages = self._stage_rates()
        status = self.status()
        log.info("%s: epoch %d step %d (%.0f%% of epoch) %.1f img/s loss %s lr %s bottleneck %s",
                 status["state"], status["epoch"], status["step"], 100 * status["epoch_progress"],
                 status["images_per_second"], _fmt(status["loss"]), _fmt(status["learning_rate"]),
                 status["bottleneck"] or "-")
        self.history.write("stages", step=self.beats.get(self._name("trainer", 0), {}).get("step", 0),
                           rates={s: stages[s]["images_per_second"] for s in STAGES},
                           busy={s: stages[s]["busy"] for s in STAGES})

    def _answer(self) -> None:
        try:
            msg = wire.recv(self.control)
            command = msg.get("cmd")
        except wire.WireError as exc:
            self.malformed["control"] += 1
            wire.send(self.control, "reply", ok=False, error=str(exc))
            return
        if command == "status":
            wire.send(self.control, "reply", ok=True, status=self.status())
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


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _sum_ranks(rank_totals: list[dict]) -> dict:
    """{stage: counters} of all ranks together."""
    return {s: {k: sum(r[s][k] for r in rank_totals) for k in COUNTER_KEYS} for s in STAGES}


def _slowest(ranks: list[dict]) -> int | None:
    """The rank that holds the group back. Data-parallel ranks step together (every step
    all-reduces the gradients), so their images/s are equal; the slow one is the rank
    whose trainer waits longest for its own input while the others wait for it inside
    the all-reduce (which counts as their busy time). Ties: the lower images/s. None
    with a single rank: there is nothing to compare."""
    if len(ranks) < 2:
        return None
    return max(ranks, key=lambda r: (r["stages"]["trainer"]["starved"], -r["images_per_second"]))["rank"]


def _stage_of(name: str) -> str:
    base = name.split("@")[0]
    return "augmenter" if base.startswith("augmenter") else base


def _rank_of(name: str) -> int:
    return int(name.split("@")[1]) if "@" in name else 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
