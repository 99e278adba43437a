"""``alexnetd report``: figures and a one-page summary of a run directory.

Reads what the daemon leaves in its run directory:

* ``history.jsonl``, one JSON object a line, appended while training::

    {"t": 1700000000.0, "kind": "step", "step": 400, "epoch": 0, "loss": 6.1,
     "lr": 0.01, "images_per_second": 2510.0}
    {"t": ..., "kind": "val", "epoch": 3, "step": 40000, "top1_error": 0.61,
     "top5_error": 0.36, "crops": 1}
    {"t": ..., "kind": "stages", "step": 400, "rates": {"loader": 2600.0, ...},
     "busy": {"loader": 0.12, ...}}

  Unknown kinds are ignored, and so is a line the daemon was writing when it stopped.
  A resumed run repeats the steps since its checkpoint: the last record of a step wins.
* the newest ``checkpoints/ckpt-<step>.pt``, loaded with ``weights_only=True``; its
  ``state["model"]["conv1.weight"]`` (96x3x11x11) gives the kernels of Figure 3.

and writes into ``--out`` (default ``RUN_DIR/report``): ``loss.png``,
``val_error.png``, ``stage_rates.png``, ``conv1_kernels.png`` and ``index.html``.
What the run has no data for yet is left out and named on the page; a report without
history or without a checkpoint is still written, and the command then exits non-zero
saying which one was missing.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import click

from alexnetd.service.paths import default_run_dir

__all__ = ["report", "read_history", "History", "render"]

STAGES = ("loader", "augmenter", "copier", "trainer")
# Every chart is FIG_SIZE inches at DPI: 1000x500 pixels, the same in every report.
FIG_SIZE = (10.0, 5.0)
KERNEL_FIG_SIZE = (12.0, 5.5)
DPI = 100
# §6, ILSVRC-2012 validation set, one network.
PAPER_VAL_ERROR = {"top1_error": 0.407, "top5_error": 0.182}


# ---------------------------------------------------------------- reading the history

@dataclass
class History:
    """The usable records of a history.jsonl, each kind in step (or time) order."""

    steps: list[dict] = field(default_factory=list)
    vals: list[dict] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    malformed: int = 0  # complete lines that were not a JSON object

    @property
    def empty(self) -> bool:
        return not (self.steps or self.vals or self.stages)

    @property
    def t0(self) -> float | None:
        ts = [r["t"] for r in (*self.steps, *self.vals, *self.stages) if r["t"] is not None]
        return min(ts) if ts else None


def _num(value) -> float | None:
    """A finite number from a JSON value, else None (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _int(value) -> int | None:
    v = _num(value)
    return int(v) if v is not None and v == int(v) else None


def read_history(path: Path) -> History:
    """Parse history.jsonl, keeping what can be plotted and skipping the rest."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    # A last line without its newline is one the daemon was still writing.
    truncated_tail = not data.endswith(b"\n")
    hist = History()
    steps: dict[int, dict] = {}
    vals: dict[tuple[int, int], dict] = {}
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            if not (truncated_tail and i == len(lines) - 1):
                hist.malformed += 1
            continue
        if not isinstance(rec, dict):
            hist.malformed += 1
            continue
        kind, t = rec.get("kind"), _num(rec.get("t"))
        if kind == "step":
            step, loss = _int(rec.get("step")), _num(rec.get("loss"))
            if step is None or loss is None:
                continue
            steps[step] = {"t": t, "step": step, "epoch": _int(rec.get("epoch")),
                           "loss": loss, "lr": _num(rec.get("lr")),
                           "images_per_second": _num(rec.get("images_per_second"))}
        elif kind == "val":
            epoch = _int(rec.get("epoch"))
            top1, top5 = _num(rec.get("top1_error")), _num(rec.get("top5_error"))
            if epoch is None or top1 is None or top5 is None:
                continue
            crops = _int(rec.get("crops")) or 1
            vals[(epoch, crops)] = {"t": t, "epoch": epoch, "step": _int(rec.get("step")),
                                    "top1_error": top1, "top5_error": top5, "crops": crops}
        elif kind == "stages":
            rates = rec.get("rates")
            if t is None or not isinstance(rates, dict):
                continue
            busy = rec.get("busy") if isinstance(rec.get("busy"), dict) else {}
            hist.stages.append({
                "t": t, "step": _int(rec.get("step")),
                "rates": {str(k): v for k, v in rates.items() if _num(v) is not None},
                "busy": {str(k): v for k, v in busy.items() if _num(v) is not None},
            })
    hist.steps = [steps[k] for k in sorted(steps)]
    hist.vals = [vals[k] for k in sorted(vals)]
    hist.stages.sort(key=lambda r: r["t"])
    return hist


# ---------------------------------------------------------------- the checkpoint

def conv1_weight(state):
    """The conv1 kernels of a loaded checkpoint as a float32 numpy array (N, 3, k, k)."""
    import torch

    model = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(model, dict):
        raise ValueError("no model state dict in the checkpoint")
    w = model.get("conv1.weight")
    if w is None:
        # Wrapped models prefix their keys ("module.", "_orig_mod.").
        w = next((v for k, v in model.items() if k.endswith("conv1.weight")), None)
    if not isinstance(w, torch.Tensor) or w.dim() != 4 or w.shape[1] != 3:
        raise ValueError("no conv1.weight of shape (N, 3, k, k) in the checkpoint's model")
    return w.detach().to(torch.float32).cpu().numpy()


def load_newest_checkpoint(run_dir: Path):
    """(path, state, conv1 kernels, skipped) for the newest checkpoint that loads.

    "Newest" is the daemon's own rule (alexnetd.model.checkpoint): the highest step in
    a ``ckpt-<step>.pt`` name. An older checkpoint stands in for a newer one that does
    not load; ``skipped`` lists those, with the reason.
    """
    from alexnetd.model.checkpoint import list_checkpoints, load_checkpoint

    skipped = []
    for _step, path in reversed(list_checkpoints(run_dir / "checkpoints")):
        try:
            state = load_checkpoint(path)  # weights_only=True, one-line errors
            return path, state, conv1_weight(state), skipped
        except Exception as e:  # noqa: BLE001 - any unusable file: try the next one
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if path.name not in reason:
                reason = f"{path.name}: {reason}"
            skipped.append(reason if len(reason) <= 200 else reason[:199] + "\u2026")
    return None, None, None, skipped


# ---------------------------------------------------------------- figures

def _figure(figsize=FIG_SIZE, **kw):
    # Figure without pyplot: no global state and no GUI backend; PNGs go through Agg.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=DPI, layout="constrained", **kw)


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, format="png")


def _smooth(values, window: int):
    """Centred moving average (no lag, unlike an EMA); the window shrinks at the ends."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    half = window // 2
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(len(v))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(v))
    return (c[hi] - c[lo]) / (hi - lo)


def plot_loss(steps: list[dict], path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    x = [r["step"] for r in steps]
    loss = [r["loss"] for r in steps]
    marker = "o" if len(x) < 3 else None
    lines = ax.plot(x, loss, color="C0", lw=0.8, alpha=0.4 if len(x) > 50 else 1.0,
                    marker=marker, label="loss")
    if len(x) > 50:
        lines += ax.plot(x, _smooth(loss, max(5, len(x) // 40)), color="C0", lw=1.8,
                         label="loss (moving average)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.grid(alpha=0.3)
    lr = [(r["step"], r["lr"]) for r in steps if r["lr"] is not None and r["lr"] > 0]
    if lr:
        ax2 = ax.twinx()
        lines += ax2.step([s for s, _ in lr], [v for _, v in lr], where="post",
                          color="C3", lw=1.4, marker=marker, label="learning rate")
        ax2.set_yscale("log")
        ax2.set_ylabel("learning rate (log scale)")
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    ax.set_title("Training loss and learning rate")
    _save(fig, path)


def plot_val(vals: list[dict], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig = _figure()
    ax = fig.add_subplot()
    for i, crops in enumerate(sorted({r["crops"] for r in vals})):
        rs = [r for r in vals if r["crops"] == crops]
        x = [r["epoch"] for r in rs]
        what = "1 crop" if crops == 1 else f"{crops} crops"
        style = {"marker": "o", "ms": 3, "color": f"C{i}"}
        ax.plot(x, [r["top1_error"] for r in rs], ls="-", label=f"top-1 ({what})", **style)
        ax.plot(x, [r["top5_error"] for r in rs], ls="--", label=f"top-5 ({what})", **style)
    for key, label in (("top1_error", "top-1"), ("top5_error", "top-5")):
        ax.axhline(PAPER_VAL_ERROR[key], color="0.5", lw=0.8, ls=":")
        ax.annotate(f"paper {label}, 1 CNN (ILSVRC-2012 val)",
                    (0.01, PAPER_VAL_ERROR[key]), xycoords=("axes fraction", "data"),
                    va="bottom", fontsize=8, color="0.4")
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation error")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title("Validation error")
    _save(fig, path)


def _time_axis(ts: list[float], t0: float):
    span = (max(ts) - t0) if ts else 0.0
    unit, scale = (("s", 1.0) if span < 120 else ("min", 60.0) if span < 7200
                   else ("h", 3600.0))
    return [(t - t0) / scale for t in ts], f"time since the first record ({unit})"


def _stage_order(names) -> list[str]:
    return [s for s in STAGES if s in names] + sorted(set(names) - set(STAGES))


def plot_stages(stages: list[dict], t0: float, path: Path) -> None:
    from matplotlib.ticker import PercentFormatter

    has_busy = any(r["busy"] for r in stages)
    fig = _figure()
    axes = fig.subplots(2 if has_busy else 1, 1, sharex=True, squeeze=False)[:, 0]
    x, xlabel = _time_axis([r["t"] for r in stages], t0)
    marker = "o" if len(x) < 3 else None
    for name in _stage_order({k for r in stages for k in r["rates"]}):
        pts = [(xi, r["rates"][name]) for xi, r in zip(x, stages) if name in r["rates"]]
        axes[0].plot(*zip(*pts), marker=marker, label=name)
    axes[0].set_ylabel("images/s")
    axes[0].set_ylim(bottom=0)
    axes[0].legend(loc="lower right", ncol=4)
    axes[0].set_title("Pipeline stages: throughput" + (" and busy share" if has_busy else ""))
    if has_busy:
        for name in _stage_order({k for r in stages for k in r["busy"]}):
            pts = [(xi, r["busy"][name]) for xi, r in zip(x, stages) if name in r["busy"]]
            axes[1].plot(*zip(*pts), marker=marker, label=name)
        axes[1].set_ylim(0, 1.05)
        axes[1].yaxis.set_major_formatter(PercentFormatter(1.0))
        axes[1].set_ylabel("busy share")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(xlabel)
    _save(fig, path)


def kernel_grid(w, cols: int = 8, gap: int = 1):
    """Kernels (N, 3, k, k) as one RGB image (H, W, 3) in [0, 1], ``cols`` a row.

    Each kernel is min-max normalised on its own, over all three colours at once so
    that its colour balance survives; a constant kernel shows as mid grey.
    """
    import numpy as np

    n, _, kh, kw = w.shape
    rows = -(-n // cols)
    grid = np.ones((rows * (kh + gap) + gap, cols * (kw + gap) + gap, 3), np.float32)
    for i in range(n):
        k = w[i].transpose(1, 2, 0)  # CHW -> HWC
        lo, hi = float(k.min()), float(k.max())
        k = (k - lo) / (hi - lo) if hi > lo else np.full_like(k, 0.5)
        r, c = divmod(i, cols)
        y, x = gap + r * (kh + gap), gap + c * (kw + gap)
        grid[y:y + kh, x:x + kw] = k
    return grid


def plot_kernels(w, path: Path) -> None:
    """Figure 3 of the paper: the first tower's kernels beside the second's."""
    n = w.shape[0]
    towers = 2 if n % 2 == 0 else 1
    half = n // towers
    fig = _figure(KERNEL_FIG_SIZE)
    axes = fig.subplots(1, towers, squeeze=False)[0]
    for t, ax in enumerate(axes):
        ax.imshow(kernel_grid(w[t * half:(t + 1) * half]), interpolation="nearest")
        ax.set_axis_off()
        if towers == 2:
            ax.set_title(f"tower {t + 1}: kernels {t * half}\u2013{(t + 1) * half - 1}")
    k = w.shape[2]
    fig.suptitle(f"conv1: {n} kernels of {k}\u00d7{k}\u00d73, each min-max normalised")
    _save(fig, path)


# ---------------------------------------------------------------- the page

FIGURES = {
    "loss.png": "Training loss and learning rate",
    "val_error.png": "Validation error",
    "stage_rates.png": "Pipeline stages",
    "conv1_kernels.png": "conv1 kernels (cf. the paper's Figure 3)",
}


def _fmt(v, spec: str = ".4g") -> str:
    return "\u2014" if v is None else format(v, spec)


def summary_rows(run_dir: Path, hist: History | None, ckpt: Path | None, state) -> list:
    rows = [("Run directory", str(run_dir))]
    if hist is not None:
        if hist.steps:
            first, last = hist.steps[0], hist.steps[-1]
            rows += [
                ("Steps", f"{first['step']} \u2013 {last['step']} ({len(hist.steps)} records)"),
                ("Epoch", _fmt(last["epoch"], "d")),
                ("Loss (last)", _fmt(last["loss"])),
                ("Learning rate (last)", _fmt(last["lr"])),
            ]
            ips = sorted(r["images_per_second"] for r in hist.steps[-20:]
                         if r["images_per_second"] is not None)
            if ips:
                rows.append(("Images/s (median of the last records)",
                             _fmt(ips[len(ips) // 2], ".1f")))
        for crops in sorted({r["crops"] for r in hist.vals}):
            rs = [r for r in hist.vals if r["crops"] == crops]
            best = min(rs, key=lambda r: r["top1_error"])
            rows.append((f"Best validation error ({crops} crop{'s' if crops > 1 else ''})",
                         f"top-1 {best['top1_error']:.2%}, top-5 {best['top5_error']:.2%}"
                         f" (epoch {best['epoch']})"))
        busy = next((r["busy"] for r in reversed(hist.stages) if r["busy"]), None)
        if busy:
            name = max(busy, key=busy.get)
            rows.append(("Busiest stage (last record)", f"{name} ({busy[name]:.0%} busy)"))
        if hist.malformed:
            rows.append(("Malformed history lines skipped", str(hist.malformed)))
    if ckpt is not None:
        info = ckpt.name
        if isinstance(state, dict):
            where = [f"{k} {state[k]}" for k in ("epoch", "step") if _int(state.get(k)) is not None]
            if where:
                info += f" ({', '.join(where)})"
        rows.append(("Checkpoint", info))
    rows.append(("Generated", _dt.datetime.now().astimezone().isoformat(timespec="seconds")))
    return rows


def write_index(out: Path, rows, rendered: list[str], notes: list[str]) -> Path:
    e = html.escape
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>alexnetd report</title>",
        "<style>body{font-family:sans-serif;max-width:1240px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;"
        "text-align:left}img{max-width:100%;border:1px solid #eee}"
        ".note{color:#a40}</style>",
        "</head><body>", "<h1>alexnetd report</h1>", "<table>",
    ]
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows]
    parts.append("</table>")
    if notes:
        parts.append('<ul class="note">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    for name in rendered:
        parts += [f"<h2>{e(FIGURES[name])}</h2>",
                  f'<p><img src="{e(name)}" alt="{e(FIGURES[name])}"></p>']
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def render(run_dir: Path, out: Path) -> tuple[Path, list[str], list[str], list[str]]:
    """Write the report; returns (index.html, figures written, notes, what was missing).

    Raises click.ClickException when the run directory holds nothing to report.
    """
    if not run_dir.is_dir():
        raise click.ClickException(f"{run_dir}: no such run directory")
    history_path = run_dir / "history.jsonl"
    hist = read_history(history_path) if history_path.is_file() else None
    ckpt, state, w, skipped = load_newest_checkpoint(run_dir)

    missing, notes = [], []
    if hist is None:
        missing.append(f"no history ({history_path} not found)")
    elif hist.empty:
        missing.append(f"no history ({history_path} has no records)")
    if ckpt is None:
        if skipped:
            missing.append("no checkpoint that loads (" + "; ".join(skipped) + ")")
        else:
            missing.append(f"no checkpoint ({run_dir / 'checkpoints'}/ckpt-<step>.pt)")
    elif skipped:
        notes.append(f"newer checkpoints that did not load: {'; '.join(skipped)}")
    if len(missing) == 2:
        raise click.ClickException(f"nothing to report in {run_dir}: " + "; ".join(missing))

    out.mkdir(parents=True, exist_ok=True)
    rendered = []
    if hist is not None and not hist.empty:
        if hist.steps:
            plot_loss(hist.steps, out / "loss.png")
            rendered.append("loss.png")
        else:
            notes.append("no training steps in the history yet: loss.png not drawn")
        if hist.vals:
            plot_val(hist.vals, out / "val_error.png")
            rendered.append("val_error.png")
        else:
            notes.append("no validation in the history yet: val_error.png not drawn")
        if hist.stages:
            plot_stages(hist.stages, hist.t0, out / "stage_rates.png")
            rendered.append("stage_rates.png")
        else:
            notes.append("no stage records in the history yet: stage_rates.png not drawn")
    if w is not None:
        plot_kernels(w, out / "conv1_kernels.png")
        rendered.append("conv1_kernels.png")
    index = write_index(out, summary_rows(run_dir, hist, ckpt, state), rendered,
                        missing + notes)
    return index, rendered, notes, missing


@click.command()
@click.argument("run_dir", required=False,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the PNGs and index.html  [default: RUN_DIR/report]")
def report(run_dir: Path | None, out_dir: Path | None) -> None:
    """Draw a run's loss, validation error, stage rates and conv1 kernels.

    RUN_DIR is the daemon's run directory (default: $ALEXNETD_RUN_DIR, else
    ~/.local/state/alexnetd/run); it is only read. Writes loss.png, val_error.png,
    stage_rates.png, conv1_kernels.png and index.html into --out.
    """
    run_dir = run_dir if run_dir is not None else default_run_dir()
    out = out_dir if out_dir is not None else run_dir / "report"
    index, rendered, notes, missing = render(run_dir, out)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    if missing:
        raise click.ClickException(
            f"incomplete report {index} ({', '.join(rendered) or 'no figures'}): "
            + "; ".join(missing))
    click.echo(f"wrote {index} ({', '.join(rendered)})")
