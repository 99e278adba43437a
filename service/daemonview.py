"""What `status` answers and what /metrics exports, computed from the supervisor's parts.

Both are plain dicts built from the run layout, the beat ledger, the process table and
the restart policy; `render_status` (service/statusview.py) draws the first for a
person, `DaemonCollector` (service/metrics.py) turns the second into metric families.
The decoder adds its own rows (pipeline/decoders.py: `status`).
"""

from __future__ import annotations

import logging
import os
import time

from alexnetd.pipeline.stage import STAGES
from alexnetd.service.beats import sum_ranks

__all__ = ["status_view", "metrics_view", "progress_line", "slowest_rank", "shown_state"]

log = logging.getLogger("alexnetd.supervisor")

DEGRADED_FOR = 60.0  # a restart leaves the daemon "degraded" this long


def _process_counts(sv, stages: dict, local: int | None = None) -> None:
    """Processes (or threads) up per stage: the copier, and a decoder that runs in the
    trainer, count the trainer processes that host them."""
    alive = sv.stages.table.alive()
    for stage in STAGES:
        host = sv.layout.decoding.host_of(stage)
        stages[stage]["processes"] = sum(1 for n in alive if n.stage == host and (local is None or n.local == local))


def degraded_reason(sv) -> str | None:
    if sv.stages.pending:
        pending = sv.stages.pending
        wait = max(0.0, pending.at - time.monotonic())
        return f"restarting the {_what(pending)}" + (f" in {wait:.0f} s" if wait >= 0.5 else "") + f" ({pending.why})"
    down = [n for n, p in sv.stages.table.processes.items() if not p.is_alive()]
    if down:
        return f"{down[0]} is down"
    if sv.stages.policy.last and time.monotonic() - sv.stages.policy.last < DEGRADED_FOR:
        return "a stage restarted in the last minute"
    # Cleared by the next checkpoint that is written.
    return sv.trainer_beat().get("checkpoint_error")


def _what(pending) -> str:
    if pending.stage == "trainer":
        return "trainers from their checkpoint"
    return "input side" + (f" of rank {pending.locals[0]}" if len(pending.locals) == 1 and pending.locals[0] else "")


def _inline_jobs(sv) -> int:
    """Batches whose JPEG bytes the loaders sent in the job message, not through their
    slot's shared memory (pipeline/jobbytes.py: over the bound, or /dev/shm full): not
    zero says shared memory is short. Counted by the running loaders, every rank's."""
    return sum(sv.ledger.latest(sv.layout.name("loader", rank.local)).get("inline_jobs", 0)
               for rank in sv.layout.ranks)


def _ranks(sv) -> list[dict]:
    """Each rank's own view: its stages' rates and shares, its ring and reorder buffer."""
    out = []
    for rank in sv.layout.ranks:
        beat = sv.ledger.latest(sv.layout.name("trainer", rank.local))
        stages = sv.ledger.stage_rates(rank.local)
        _process_counts(sv, stages, rank.local)
        out.append({"rank": rank.rank, "step": beat.get("step", 0),
                    "images_per_second": stages["trainer"]["images_per_second"], "stages": stages,
                    "ring_slots_in_use": beat.get("slots_in_use", 0), "reorder_buffer": beat.get("reorder", 0)})
    return out


def slowest_rank(ranks: list[dict]) -> int | None:
    """The rank that holds the group back. Data-parallel ranks step together (every step
    all-reduces the gradients), so their images/s are equal; the slow one is the rank
    whose trainer waits longest for its own input while the others wait for it inside
    the all-reduce (which counts as their busy time). Ties: the lower images/s. None
    with a single rank: there is nothing to compare."""
    if len(ranks) < 2:
        return None
    return max(ranks, key=lambda r: (r["stages"]["trainer"]["starved"], -r["images_per_second"]))["rank"]


def _eta(sv, trainer: dict) -> float | None:
    rate_steps = sv.ledger.step_rate()
    steps_per_epoch = trainer.get("steps_per_epoch") or 0
    if rate_steps <= 0 or not steps_per_epoch:
        return None
    remaining = (trainer.get("max_epochs", sv.config.max_epochs) - trainer.get("epoch", 0)) * steps_per_epoch \
        - min(trainer.get("seq", 0), steps_per_epoch)
    if trainer.get("max_steps"):
        remaining = min(remaining, trainer["max_steps"] - trainer.get("step", 0))
    return round(max(0, remaining) / rate_steps, 1)


def shown_state(state: str, trainer: dict) -> str:
    """The supervisor's state, or "compiling" while rank 0's trainer prepares its step
    (torch.compile, or a CUDA graph's capture: service/trainstep.py), which takes from
    seconds to minutes at the first step; a degraded or stopping daemon says so instead."""
    if state in ("starting", "training", "validating") and trainer.get("state") == "compiling":
        return "compiling"
    return state


def status_view(sv) -> dict:
    config, trainer = sv.config, sv.trainer_beat()
    stages = sv.ledger.stage_rates()
    _process_counts(sv, stages)
    for stage in STAGES:
        stages[stage]["restarts"] = sv.stages.policy.counts[stage]
    # The bottleneck: the stage with the highest busy share.
    bottleneck = max(STAGES, key=lambda s: stages[s]["busy"]) if any(stages[s]["busy"] for s in STAGES) else None
    batches_in_epoch = trainer.get("batches_in_epoch") or 0
    seq = trainer.get("seq", 0)
    ranks = _ranks(sv)
    checkpoint = trainer.get("checkpoint")
    state = shown_state(sv.current_state(), trainer)
    return {
        "state": state,
        "pid": os.getpid(),
        "uptime_seconds": round(time.time() - sv.started, 1),
        "run_dir": str(sv.layout.run_dir),
        "data": config.data,
        "device": config.device,
        "epoch": trainer.get("epoch", 0),
        "step": trainer.get("step", 0),
        "steps_per_epoch": trainer.get("steps_per_epoch") or 0,
        "epoch_progress": round(min(seq, batches_in_epoch) / batches_in_epoch, 4) if batches_in_epoch else 0.0,
        "max_epochs": config.max_epochs,
        "eta_seconds": _eta(sv, trainer),
        "images_per_second": stages["trainer"]["images_per_second"],
        "stages": stages,
        "bottleneck": bottleneck,
        "queues": {"ring_slots": sv.layout.slots, "ring_slots_in_use": trainer.get("slots_in_use", 0),
                   "reorder_buffer": trainer.get("reorder", 0), "inline_jobs": _inline_jobs(sv)},
        "loss": trainer.get("loss"),
        "learning_rate": trainer.get("lr"),
        "validation": trainer.get("val"),
        "restarts": dict(sv.stages.policy.counts),
        "restarting": None if not sv.stages.pending else {
            "stage": sv.stages.pending.stage, "why": sv.stages.pending.why,
            "in_seconds": round(max(0.0, sv.stages.pending.at - time.monotonic()), 1)},
        "skipped": sv.ledger.skipped(trainer),
        "degraded_reason": degraded_reason(sv) if sv.state != "starting" else None,
        "checkpoint_failures": sv.ledger.checkpoint_failures(trainer),
        "skipped_recent": trainer.get("skipped_recent") or [],
        "malformed": dict(sv.malformed, ready=trainer.get("malformed", 0), credits=sv.ledger.counted("loader"),
                          jobs=sv.ledger.counted("augmenter"), beats=sv.ledger.malformed),
        "checkpoint": None if not checkpoint else {
            "path": checkpoint["path"], "step": checkpoint["step"],
            "age_seconds": round(time.time() - checkpoint["t"], 1)},
        "metrics_url": f"http://{config.metrics_addr}/metrics",
        "generation": max(sv.stages.generations),
        "world_size": sv.layout.world_size,
        "group": sv.group_view(),
        "ranks": ranks,
        "slowest_rank": slowest_rank(ranks),
        "processes": {str(name): proc.pid for name, proc in sv.stages.table.processes.items() if proc.is_alive()},
        "halt_reason": sv.halt_reason,
        **sv.layout.decoding.status(sv.ledger.beats),
    }


def metrics_view(sv) -> dict:
    trainer = sv.trainer_beat()
    rank_totals = sv.ledger.rank_totals()
    totals = sum_ranks(rank_totals)
    status = status_view(sv)
    stages = {s: dict(totals[s], processes=status["stages"][s]["processes"], restarts=sv.stages.policy.counts[s])
              for s in STAGES}
    ranks = [{"rank": r["rank"],
              "stages": {s: dict(rank_totals[local][s], processes=r["stages"][s]["processes"]) for s in STAGES},
              "ring_slots_in_use": r["ring_slots_in_use"], "reorder": r["reorder_buffer"]}
             for local, r in enumerate(status["ranks"])]
    memory = {}
    for rank in sv.layout.ranks:  # each rank reports the devices it uses
        memory.update(sv.ledger.latest(sv.layout.name("trainer", rank.local)).get("memory") or {})
    return {
        "stages": stages, "ranks": ranks, "ring_slots": sv.layout.slots,
        "ring_slots_in_use": status["queues"]["ring_slots_in_use"], "reorder": status["queues"]["reorder_buffer"],
        "inline_jobs": status["queues"]["inline_jobs"],
        "train_images": totals["trainer"]["images"], "steps": trainer.get("step", 0),
        "epoch": trainer.get("epoch", 0), "loss": trainer.get("loss"), "lr": trainer.get("lr"),
        "val": trainer.get("val"), "skipped": status["skipped"], "checkpoint": trainer.get("checkpoint"),
        "memory": memory or None, "state": status["state"], "device": sv.config.device,
        "checkpoint_failures": status["checkpoint_failures"],
        "remote": status["remote_augmenters"],
        "decoder": status.get("decoder"),  # --decoder dali's images by path; absent for cpu
    }


def progress_line(sv, history) -> None:
    """Every 10 s: per-stage rates into the history, and one progress line into the log."""
    status = status_view(sv)
    stages = status["stages"]
    log.info("%s: epoch %d step %d (%.0f%% of epoch) %.1f img/s loss %s lr %s bottleneck %s",
             status["state"], status["epoch"], status["step"], 100 * status["epoch_progress"],
             status["images_per_second"], _fmt(status["loss"]), _fmt(status["learning_rate"]),
             status["bottleneck"] or "-")
    history.write("stages", step=status["step"], rates={s: stages[s]["images_per_second"] for s in STAGES},
                  busy={s: stages[s]["busy"] for s in STAGES})


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"
