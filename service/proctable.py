"""The supervisor's process table and its restart policy. Nothing here blocks.

- `StageProcesses`: every stage process of this node, spawned from the run layout,
  and what to do when one exits or goes silent:
  - a dead or silent input stage: that rank's input side (loader + the decoder's
    processes) is stopped and started again as a new generation at the trainer's
    position. Batches are rebuilt from their seq: nothing is lost or trained twice, and
    no process of the old generation can still write into a slot the new one uses (the
    new ones start only once every old one is gone);
  - a dead trainer: every rank's trainer restarts from the last checkpoint, with fresh
    input sides; with several nodes the group restarts together (service/group.py);
  - a stage that exits by itself before its first heartbeat cannot boot: the daemon
    halts with the reason instead of restarting it in a loop.

- `ProcessTable`: the stage processes by name (service/layout.py ProcName), when each
  last beat, which have booted (sent a beat since their start), and the ones being
  stopped: a stop is TERM now and KILL at a deadline that the supervisor's poll wakes
  for, never a long join.
- `RestartPolicy`: restarts of a stage within RESTART_WINDOW seconds are counted; past
  the limit the daemon halts with the reason instead of looping, and repeated restarts
  of one stage wait 1 s, 2 s, 4 s ... (at most 8 s) before the new processes start.
  The wait is a time the loop is told, so `status` answers meanwhile.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from alexnetd.pipeline.launch import input_stages
from alexnetd.pipeline.stage import EXIT_BOOT, EXIT_HALT, STAGES, spawn_context

__all__ = ["ProcessTable", "RestartPolicy", "PendingRestart", "StageProcesses", "Halt"]

log = logging.getLogger("alexnetd.supervisor")

RESTART_WINDOW = 600.0  # restart_limit counts restarts within this many seconds
MAX_BACKOFF = 8.0
STOP_TIMEOUT = 120.0    # a trainer gets this long to finish its step and checkpoint
INPUT_STOP = 5.0        # an input stage gets this long to exit after TERM


class Halt(Exception):
    """Stop the daemon with a reason, without restarting anything."""


@dataclass
class PendingRestart:
    """A restart under way: its old processes are stopping; the new ones start at `at`
    (after the back-off) once every old one is gone."""
    stage: str                 # "trainer": every rank's trainers and input sides; else one rank's input side
    locals: tuple              # the ranks whose input side restarts
    why: str
    at: float                  # monotonic time the back-off ends
    old: list = field(default_factory=list)   # names still stopping


class RestartPolicy:
    def __init__(self, limit: int, window: float = RESTART_WINDOW):
        self.limit, self.window = limit, window
        self.times: dict[str, deque] = {s: deque() for s in STAGES}
        self.counts = dict.fromkeys(STAGES, 0)
        self.last = 0.0

    def admit(self, stage: str, why: str, now: float) -> float:
        """Count one restart of `stage`; the back-off before its new processes start.
        RestartRefused past the limit."""
        times = self.times[stage]
        while times and now - times[0] > self.window:
            times.popleft()
        if len(times) >= self.limit:
            raise Halt(f"{why}; {stage} restarted {len(times)} times in {self.window / 60:.0f} minutes, "
                                 "giving up")
        backoff = min(MAX_BACKOFF, 0.5 * 2 ** len(times)) if times else 0.0
        times.append(now)
        self.counts[stage] += 1
        self.last = now
        return backoff


class ProcessTable:
    def __init__(self):
        self.processes: dict = {}       # name -> multiprocessing Process
        self.booted: set = set()        # names that have sent a beat since their start
        self.last_beat: dict = {}       # name -> monotonic time of its last beat
        self.stopping: dict = {}        # name -> (process, monotonic KILL deadline)

    def spawn(self, name, target, *args) -> None:
        proc = spawn_context.Process(target=target, args=args, name=f"alexnetd-{name}", daemon=False)
        proc.start()
        self.processes[name] = proc
        self.booted.discard(name)
        self.last_beat[name] = time.monotonic()
        log.info("started %s (pid %d)", name, proc.pid)

    def beat(self, name, pid: int | None, now: float) -> bool:
        """A beat from `name`'s process `pid`: False if that process was already replaced."""
        proc = self.processes.get(name)
        if proc is None or proc.pid != pid:
            return False
        self.last_beat[name] = now
        self.booted.add(name)
        return True

    def alive(self, match=lambda n: True) -> list:
        return [n for n, p in self.processes.items() if p.is_alive() and match(n)]

    def exited(self, names) -> list:
        """(name, exit code) of the named processes that have exited, still in the table."""
        return [(n, self.processes[n].exitcode) for n in names if self.processes[n].exitcode is not None]

    def names(self, match=lambda n: True) -> list:
        return [n for n in self.processes if match(n)]

    def stop(self, names, timeout: float) -> list:
        """TERM the named processes now; they leave the table at once and are KILLed if
        still alive `timeout` seconds from now. Returns the names."""
        deadline = time.monotonic() + timeout
        names = [n for n in names if n in self.processes]
        for name in names:
            proc = self.processes.pop(name)
            if proc.is_alive():
                proc.terminate()
            self.stopping[name] = (proc, deadline)
        return names

    def kill(self, name) -> None:
        """A hung process: KILL it; the next reap sees it exit."""
        self.processes[name].kill()

    def reap_stopping(self, now: float) -> list:
        """Names of stopped processes that are gone now; KILL the ones past their deadline."""
        gone = []
        for name, (proc, deadline) in list(self.stopping.items()):
            if proc.exitcode is None and now >= deadline:
                log.warning("%s did not stop within its deadline: killing it", name)
                proc.kill()
            if proc.exitcode is not None:
                proc.join()
                del self.stopping[name]
                gone.append(name)
        return gone

    def next_deadline(self) -> float | None:
        return min((d for _, d in self.stopping.values()), default=None)

    def kill_all(self) -> list:
        """At exit: KILL everything and reap it (a few seconds at most). The names."""
        everyone = dict(self.processes)
        everyone.update({n: p for n, (p, _) in self.stopping.items()})
        for proc in everyone.values():
            if proc.is_alive():
                proc.kill()
        for proc in everyone.values():
            proc.join(5)
        self.processes.clear()
        self.stopping.clear()
        return list(everyone)


class StageProcesses:
    """This node's stage processes, spawned from the layout, restarted by the policy.

    `group_args(local)` gives a trainer its place in the node group (None on one node);
    `end_round(why)` is called before a trainer restart, for the group to restart with
    it, and returns the reason to log."""

    def __init__(self, layout, ledger, history, group_args=lambda local: None, end_round=lambda why: why):
        self.layout, self.config, self.ledger, self.history = layout, layout.config, ledger, history
        self.group_args, self.end_round = group_args, end_round
        self.table = ProcessTable()
        self.policy = RestartPolicy(self.config.restart_limit)
        self.generations = [0] * layout.local_ranks
        self.pending: PendingRestart | None = None
        self.finishing = False   # a trainer finished: the rest stop, then the daemon exits 0

    # -- spawning ------------------------------------------------------------------

    def launch(self, resume: bool) -> None:
        self._spawn_trainers(resume)
        for rank in self.layout.ranks:
            self._spawn_input(rank.local)

    def _spawn_trainers(self, resume: bool) -> None:
        # Imported here: spawned children re-import this module, and the loader and
        # augmenters must not pay for torch.
        from alexnetd.service.trainer import run_trainer

        (self.layout.run_dir / "halt.json").unlink(missing_ok=True)
        for rank in self.layout.ranks:
            self.table.spawn(self.layout.name("trainer", rank.local), run_trainer, self.config.to_dict(),
                             rank.local, resume, self.group_args(rank.local))

    def _spawn_input(self, local: int) -> None:
        rank = self.layout.ranks[local]
        stages = input_stages(self.config.data, rank.endpoints.as_dict(), rank.plan, self.layout.slots, rank.ring,
                              self.layout.decoding, self.generations[local])
        for (stage, index), (target, cfg) in stages.items():
            self.table.spawn(self.layout.name(stage, local, index), target, cfg)

    def retire(self, name) -> None:
        """Fold a finished process's counters, and those of the threads it hosted, into the totals."""
        hosted = [name] + ([n for n in self.ledger.beats if n.local == name.local and n != name
                            and self.layout.decoding.host_of(n.stage) == "trainer"] if name.stage == "trainer" else [])
        for each in hosted:
            beat = self.ledger.retire(each)
            if beat is not None:
                self.layout.decoding.retire(beat)

    def kill_all(self) -> None:
        for name in self.table.kill_all():
            self.retire(name)

    # -- exits, hangs, restarts ------------------------------------------------------

    def tick(self, stopping: bool) -> int | None:
        """One pass of the loop: reap what stopped, react to exits, carry restarts on.
        The daemon's exit code once it is done; Halt to stop with a reason."""
        for name in self.table.reap_stopping(time.monotonic()):
            self.retire(name)
        code = self._reap(stopping)
        if code is None and not stopping and not self.finishing:
            self._advance_restart()
            self._check_silent()
        return code

    def next_timer(self) -> float | None:
        """When the loop must look again: a stop deadline, or the end of a back-off still
        ahead (one already over waits for the old processes, which the poll sees go)."""
        now = time.monotonic()
        times = [self.table.next_deadline()] + ([self.pending.at] if self.pending and self.pending.at > now else [])
        return min((t for t in times if t is not None), default=None)

    def _reap(self, stopping: bool) -> int | None:
        trainers = self.table.names(lambda n: n.stage == "trainer")
        if self.finishing:
            return 0 if not trainers and not self.table.stopping else None
        exited = self.table.exited(trainers)
        if exited:
            name, code = exited[0]
            if code == 0:
                # Ranks stop together (they agree on it every step): the others finish too.
                self.finishing, self.pending = True, None
                self.table.stop(trainers, STOP_TIMEOUT)
                self.table.stop(self.table.names(lambda n: n.stage != "trainer"), INPUT_STOP)
                return None
            if code in (EXIT_BOOT, EXIT_HALT):
                raise Halt(self._halt_file() or f"trainer exited with code {code}")
            if stopping:
                return 1
            if self._could_not_boot(name, code):
                raise Halt(self._halt_file() or f"{name} could not start (exit code {code}); "
                           f"see {self.layout.run_dir / 'alexnetd.log'}")
            self.restart("trainer", f"{name} exited with code {code}")
            return None
        dead = self.table.exited(self.table.names(lambda n: n.stage != "trainer"))
        if dead and not stopping:
            name, code = dead[0]
            why = f"{name} exited with code {code}"
            if self._could_not_boot(name, code):
                raise Halt(f"{name} could not start ({why}); see {self.layout.run_dir / 'alexnetd.log'}")
            self.restart(name.stage, why, name.local)
        return None

    def _could_not_boot(self, name, code: int) -> bool:
        """Exiting by itself before its first beat is a stage that cannot boot (bad data, a
        broken install): halt with the reason rather than loop. Killed by a signal while
        booting (SIGKILL, the OOM killer) is a crash like any other."""
        return name not in self.table.booted and code >= 0

    def _check_silent(self) -> None:
        now = time.monotonic()
        for name in self.table.alive():
            if self.ledger.latest(name).get("state") == "checkpointing":
                continue  # a big checkpoint on a slow disk is not a hang
            silent = now - self.table.last_beat.get(name, now)
            if name in self.table.booted and silent > self.config.heartbeat_timeout:
                log.error("%s sent no heartbeat for %.0f s: killing it", name, silent)
                self.table.kill(name)
                return  # the next reap restarts it

    def restart(self, stage: str, why: str, local: int | None = None) -> None:
        """Begin a restart: the old processes stop now; the new ones start after the
        back-off, once every old one is gone (`_advance_restart`)."""
        backoff = self.policy.admit(stage, why, time.monotonic())
        if stage == "trainer":
            why = self.end_round(why)
        log.warning("%s: restarting the %s", why, "trainers from their checkpoint" if stage == "trainer" else "input side")
        self.history.write("event", event="restart", stage=stage, reason=why)
        # A dead trainer takes every rank with it (a collective cannot go on with one
        # member gone); a dead input stage only its own rank's input side.
        locals_ = tuple(range(self.layout.local_ranks)) if local is None else (local,)
        old = self.table.stop([n for n in self.table.names() if n.local in locals_ and n.stage != "trainer"], INPUT_STOP)
        if stage == "trainer":
            old += self.table.stop(self.table.names(lambda n: n.stage == "trainer"), INPUT_STOP)
        if self.pending is not None:  # a restart during another: one restart, the wider of the two
            locals_ = tuple(sorted(set(locals_) | set(self.pending.locals)))
            stage = "trainer" if "trainer" in (stage, self.pending.stage) else stage
            old += self.pending.old
        self.pending = PendingRestart(stage, locals_, why, time.monotonic() + backoff, old)

    def _advance_restart(self) -> None:
        pending = self.pending
        if pending is None:
            return
        pending.old = [n for n in pending.old if n in self.table.stopping]
        if pending.old or time.monotonic() < pending.at:
            return
        self.pending = None
        for local in pending.locals:
            self.generations[local] += 1
        if pending.stage == "trainer":
            self._spawn_trainers(resume=True)
        for local in pending.locals:
            self._spawn_input(local)

    def _halt_file(self) -> str | None:
        try:
            return json.loads((self.layout.run_dir / "halt.json").read_text())["reason"]
        except (OSError, ValueError, KeyError):
            return None
