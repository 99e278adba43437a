"""The beat ledger: what the stages' heartbeats add up to. Pure bookkeeping, no processes.

Every stage sends its cumulative counters (images, busy/starved/blocked seconds) about
twice a second. The ledger keeps each current process's latest beat and the totals of
the processes that are gone, so that per-stage totals, and the Prometheus counters made
from them, never go backwards across restarts. From samples of those totals it gives
rates and shares over the last RATE_WINDOW seconds.
"""

from __future__ import annotations

from collections import deque

from alexnetd.pipeline.stage import STAGES

__all__ = ["BeatLedger", "COUNTER_KEYS", "RATE_WINDOW", "sum_ranks"]

COUNTER_KEYS = ("images", "busy", "starved", "blocked")
RATE_WINDOW = 10.0   # seconds over which status rates are computed
SAMPLE_EVERY = 1.0


def _zero() -> dict:
    return {s: dict.fromkeys(COUNTER_KEYS, 0.0) for s in STAGES}


def sum_ranks(rank_totals: list[dict]) -> dict:
    """{stage: counters} of all ranks together."""
    return {s: {k: sum(r[s][k] for r in rank_totals) for k in COUNTER_KEYS} for s in STAGES}


class BeatLedger:
    """Beats are keyed by ProcName (service/layout.py): its `local` rank and `stage`."""

    def __init__(self, local_ranks: int):
        self.beats: dict = {}                   # ProcName -> its latest beat header
        self.retired = [_zero() for _ in range(local_ranks)]   # totals of processes gone, per rank
        self.skipped_retired: dict[str, int] = {}
        self.checkpoint_failures_retired = 0
        self.malformed = 0                      # beats refused (bad frame, unknown rank)
        self.samples = deque()                  # (monotonic, rank totals, step of rank 0)

    def record(self, name, header: dict) -> None:
        self.beats[name] = header

    def latest(self, name) -> dict:
        return self.beats.get(name, {})

    def retire(self, name) -> dict | None:
        """Fold a finished process's counters into its stage's totals; its last beat."""
        beat = self.beats.pop(name, None)
        if beat is None:
            return None
        retired = self.retired[name.local]
        for key in COUNTER_KEYS:
            retired[name.stage][key] += beat["counters"][key]
        if name.stage == "trainer":
            for reason, count in (beat.get("skipped") or {}).items():
                self.skipped_retired[reason] = self.skipped_retired.get(reason, 0) + count
            self.checkpoint_failures_retired += beat.get("checkpoint_failures") or 0
        return beat

    # -- totals --------------------------------------------------------------------

    def rank_totals(self) -> list[dict]:
        """Per rank, per stage: cumulative counters (dead processes' included)."""
        totals = [{s: dict(r[s]) for s in STAGES} for r in self.retired]
        for name, beat in self.beats.items():
            for key in COUNTER_KEYS:
                totals[name.local][name.stage][key] += beat["counters"][key]
        return totals

    def skipped(self, trainer: dict) -> dict:
        out = dict(self.skipped_retired)
        for reason, count in (trainer.get("skipped") or {}).items():
            out[reason] = out.get(reason, 0) + count
        return out

    def checkpoint_failures(self, trainer: dict) -> int:
        return self.checkpoint_failures_retired + (trainer.get("checkpoint_failures") or 0)

    def counted(self, stage: str, key: str = "malformed") -> int:
        """A counter that every process of `stage` keeps, summed over those alive."""
        return sum((b.get("counters") or {}).get(key, 0) for n, b in self.beats.items() if n.stage == stage)

    # -- rates ---------------------------------------------------------------------

    def sample(self, now: float, step: int) -> None:
        if self.samples and now - self.samples[-1][0] < SAMPLE_EVERY:
            return
        self.samples.append((now, self.rank_totals(), step))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()

    def stage_rates(self, local: int | None = None) -> dict:
        """Per stage: images/s and busy/starved/blocked shares over the last few seconds,
        of one rank or (None) of all of them together."""
        if len(self.samples) < 2:
            return {s: {"images_per_second": 0.0, "busy": 0.0, "starved": 0.0, "blocked": 0.0} for s in STAGES}
        (t0, a, _), (t1, b, _) = self.samples[0], self.samples[-1]
        a, b = (sum_ranks(x) if local is None else x[local] for x in (a, b))
        out = {}
        for stage in STAGES:
            delta = {k: max(0.0, b[stage][k] - a[stage][k]) for k in COUNTER_KEYS}
            spent = delta["busy"] + delta["starved"] + delta["blocked"]
            out[stage] = {"images_per_second": round(delta["images"] / (t1 - t0), 1)}
            for key in ("busy", "starved", "blocked"):
                out[stage][key] = round(delta[key] / spent, 3) if spent > 0 else 0.0
        return out

    def step_rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, _, s0), (t1, _, s1) = self.samples[0], self.samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
