"""`alexnetd status` as a person reads it."""

from __future__ import annotations

from alexnetd.pipeline.decoders import status_lines as decoder_status_lines

__all__ = ["render_status"]


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _num(value, fmt="{:.4g}") -> str:
    return "-" if value is None else fmt.format(value)


def render_status(s: dict) -> str:
    lines = [
        f"alexnetd {s['state']}  (pid {s['pid']}, up {_duration(s['uptime_seconds'])}, {s['device']})",
    ] + ([f"  degraded    {s['degraded_reason']}"] if s.get("degraded_reason") else []) + [
        f"  run dir     {s['run_dir']}",
        f"  data        {s['data']}",
        f"  epoch       {s['epoch'] + 1}/{s['max_epochs']}  {s['epoch_progress']:.0%} of epoch, "
        f"step {s['step']} ({s['steps_per_epoch']} per epoch), ETA {_duration(s['eta_seconds'])}",
        f"  training    {s['images_per_second']:.1f} images/s, loss {_num(s['loss'])}, "
        f"learning rate {_num(s['learning_rate'])}",
    ]
    group = s.get("group")
    if group:
        missing = group.get("lost") or (f"missing node{'s' if len(group['missing']) > 1 else ''} "
                                        f"{', '.join(map(str, group['missing']))}" if group["missing"] else "all present")
        lines.append(f"  group       node {group['node_rank']} of {group['nodes']} (ranks "
                     f"{group['ranks'][0]}-{group['ranks'][-1]} of {group['world_size']}), rendezvous "
                     f"{group['rendezvous']}, round {group['round']}; {missing}")
    val = s.get("validation")
    lines.append("  validation  " + ("none yet" if not val else
                 f"top-1 error {val['top1_error']:.2%}, top-5 error {val['top5_error']:.2%} "
                 f"(epoch {val['epoch'] + 1}, {val['crops']} crop{'s' if val['crops'] > 1 else ''})"))
    lines.append("")
    lines.append(f"  {'stage':<10} {'procs':>5} {'images/s':>9} {'busy':>6} {'starved':>8} {'blocked':>8} {'restarts':>9}")
    for stage, row in s["stages"].items():
        mark = "  <- bottleneck" if stage == s.get("bottleneck") else ""
        lines.append(f"  {stage:<10} {row['processes']:>5} {row['images_per_second']:>9.1f} {row['busy']:>6.0%} "
                     f"{row['starved']:>8.0%} {row['blocked']:>8.0%} {row['restarts']:>9}{mark}")
    ranks = s.get("ranks") or []
    if len(ranks) > 1:
        # Data-parallel ranks step together; the slow one makes the others wait for it.
        stages = list(s["stages"])
        lines.append("")
        lines.append("  ranks       busy share of each stage; starved: the trainer waiting for its own input")
        lines.append(f"  {'rank':<6} {'step':>6} {'images/s':>9} " + " ".join(f"{st:>9}" for st in stages)
                     + f" {'starved':>8} {'slots':>6} {'reorder':>7}")
        for r in ranks:
            mark = "  <- slowest" if r["rank"] == s.get("slowest_rank") else ""
            busy = " ".join(f"{r['stages'][st]['busy']:>9.0%}" for st in stages)
            lines.append(f"  {r['rank']:<6} {r['step']:>6} {r['images_per_second']:>9.1f} {busy} "
                         f"{r['stages']['trainer']['starved']:>8.0%} {r['ring_slots_in_use']:>6} "
                         f"{r['reorder_buffer']:>7}{mark}")
    q = s["queues"]
    lines.append("")
    inline = q.get("inline_jobs") or 0
    lines.append(f"  queues      ring {q['ring_slots_in_use']}/{q['ring_slots']} slots in use, "
                 f"{q['reorder_buffer']} batches waiting in order"
                 + (f", {inline} batches' bytes sent in the job message (shared memory short)" if inline else ""))
    skipped = s.get("skipped") or {}
    lines.append("  skipped     " + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"))
    for row in s.get("skipped_recent") or []:  # the last few bad files, each named once
        lines.append(f"              {row['split']} {row['key']} ({row['reason']})")
    ck = s.get("checkpoint")
    lines.append("  checkpoint  " + ("none yet" if not ck else
                 f"{ck['path']} (step {ck['step']}, {_duration(ck['age_seconds'])} ago)"))
    lines += decoder_status_lines(s)  # the decoder's own rows: remote hosts
    lines.append(f"  metrics     {s['metrics_url']}")
    return "\n".join(lines)
