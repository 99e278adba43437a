"""`alexnetd report`: figures and index.html from a run directory's history and checkpoint."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from alexnetd.service.report import kernel_grid, read_history, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (width, height) in pixels: charts are 10x5 inches at 100 dpi, the kernels 12x5.5.
SIZES = {
    "loss.png": (1000, 500),
    "val_error.png": (1000, 500),
    "stage_rates.png": (1000, 500),
    "conv1_kernels.png": (1200, 550),
}
HISTORY_PNGS = ("loss.png", "val_error.png", "stage_rates.png")


def history_records(epochs=4, steps_per_epoch=500, every=10, t0=1_760_000_000.0):
    """What a short run appends: steps, a val per epoch, stage rates, a resume."""
    rng = random.Random(0)
    recs, t, lr = [], t0, 0.01
    for epoch in range(epochs):
        if epoch == 3:
            lr = 0.001  # validation error stopped improving: divide by 10 (§5)
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch, every):
            t += every * 128 / 2500
            loss = 6.9 * math.exp(-step / 1500) + 1.8 + rng.gauss(0, 0.08)
            recs.append({"t": t, "kind": "step", "step": step, "epoch": epoch, "loss": loss,
                         "lr": lr, "images_per_second": 2500 + rng.gauss(0, 60)})
            if step % 100 == 0:
                trainer = 2500 + rng.gauss(0, 50)
                recs.append({"t": t, "kind": "stages", "step": step,
                             "rates": {"loader": trainer * 1.02, "augmenter": trainer * 1.01,
                                       "copier": trainer, "trainer": trainer},
                             "busy": {"loader": 0.1, "augmenter": 0.7 + rng.gauss(0, 0.02),
                                      "copier": 0.05, "trainer": 0.95}})
        top1 = 0.95 - 0.1 * epoch
        recs.append({"t": t, "kind": "val", "epoch": epoch, "step": step,
                     "top1_error": top1, "top5_error": top1 - 0.25, "crops": 1})
        recs.append({"t": t, "kind": "checkpoint", "epoch": epoch, "path": f"ckpt-{epoch}.pt"})
    recs.append({"t": t, "kind": "val", "epoch": epochs - 1, "step": step,
                 "top1_error": 0.6, "top5_error": 0.33, "crops": 10})
    return recs


def write_history(run: Path, records, tail: str = "") -> Path:
    path = run / "history.jsonl"
    with path.open("w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        f.write(tail)
    return path


def save_checkpoint(run: Path, name: str, conv1: torch.Tensor, **extra) -> Path:
    (run / "checkpoints").mkdir(exist_ok=True)
    path = run / "checkpoints" / name
    torch.save({"model": {"conv1.weight": conv1, "conv1.bias": torch.zeros(96)}, **extra},
               path)
    return path


@pytest.fixture
def full_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # The daemon was killed mid-line: the history ends in half a record.
    write_history(run, history_records(), tail='{"t": 1760009999.0, "kind": "st')
    save_checkpoint(run, "ckpt-000003.pt", torch.randn(96, 3, 11, 11), epoch=3, step=2000)
    return run


def check_png(path: Path, size) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size == size, f"{path.name}: {im.size} pixels, expected {size}"
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 1, f"{path.name} is a blank image"
    return pixels


def test_report_cli_writes_every_figure_and_the_index(full_run, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "alexnetd", "report", str(full_run),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert str(out / "index.html") in proc.stdout
    page = (out / "index.html").read_text()
    for name, size in SIZES.items():
        check_png(out / name, size)
        assert f'src="{name}"' in page
    assert "ckpt-000003.pt (epoch 3, step 2000)" in page
    assert "top-1 60.00%, top-5 33.00% (epoch 3)" in page  # the 10-crop evaluation
    assert "trainer (95% busy)" in page


def test_report_draws_the_towers_side_by_side(tmp_path):
    """Tower 1 (kernels 0-47) on the left, tower 2 (48-95) on the right, as in Figure 3:
    grey kernels in tower 1 and coloured ones in tower 2 must land on those sides."""
    run = tmp_path / "run"
    run.mkdir()
    grey = torch.randn(48, 1, 11, 11).expand(48, 3, 11, 11)
    colour = torch.randn(48, 3, 11, 11)
    save_checkpoint(run, "ckpt-1.pt", torch.cat([grey, colour]))
    write_history(run, history_records(epochs=1))
    result = CliRunner().invoke(report, [str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    px = check_png(tmp_path / "out" / "conv1_kernels.png", SIZES["conv1_kernels.png"])
    chroma = px.max(axis=2).astype(int) - px.min(axis=2)
    half = px.shape[1] // 2
    assert chroma[:, :half].max() <= 2, "tower 1 (grey kernels) should be on the left"
    assert (chroma[:, half:] > 40).mean() > 0.1, "tower 2 (colour kernels) should be on the right"
    # Distinct colours: a real grid of kernels, not a few flat patches.
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 1000


def test_kernel_grid_normalises_each_kernel_and_keeps_the_order():
    w = np.stack([np.full((3, 11, 11), float(i)) for i in range(16)])
    w[:, :, 0, 0] += 5.0  # one bright pixel a kernel
    w[3] = 7.0  # a constant kernel
    grid = kernel_grid(w, cols=8, gap=1)
    assert grid.shape == (2 * 12 + 1, 8 * 12 + 1, 3)
    for i in range(16):
        r, c = divmod(i, 8)
        cell = grid[1 + 12 * r:12 * (r + 1), 1 + 12 * c:12 * (c + 1)]
        if i == 3:
            assert np.allclose(cell, 0.5)
        else:
            assert cell.min() == 0.0 and cell.max() == 1.0
            assert np.allclose(cell[0, 0], 1.0)  # the bright pixel stays top left


def test_report_without_checkpoint_renders_the_history_and_fails(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_history(run, history_records())
    out = tmp_path / "out"
    result = CliRunner().invoke(report, [str(run), "--out", str(out)])
    assert result.exit_code == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: incomplete report") and "no checkpoint" in error
    for name in HISTORY_PNGS:
        check_png(out / name, SIZES[name])
    assert not (out / "conv1_kernels.png").exists()
    page = (out / "index.html").read_text()
    assert "conv1_kernels.png" not in page and "no checkpoint" in page


def test_report_without_history_renders_the_kernels_and_fails(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, "ckpt-9.pt", torch.randn(96, 3, 11, 11))
    out = tmp_path / "out"
    result = CliRunner().invoke(report, [str(run), "--out", str(out)])
    assert result.exit_code == 1
    assert "no history" in result.stderr and "history.jsonl not found" in result.stderr
    check_png(out / "conv1_kernels.png", SIZES["conv1_kernels.png"])
    for name in HISTORY_PNGS:
        assert not (out / name).exists()


def test_report_on_an_empty_run_dir_says_there_is_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    result = CliRunner().invoke(report, [str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "nothing to report" in result.stderr
    assert not (tmp_path / "out").exists()


def test_report_on_a_missing_run_dir(tmp_path):
    result = CliRunner().invoke(report, [str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "no such run directory" in result.stderr


def test_report_notes_what_the_history_lacks_yet(tmp_path):
    """Early in a run there is no validation yet: that is a note, not an error."""
    run = tmp_path / "run"
    run.mkdir()
    write_history(run, [r for r in history_records(epochs=1) if r["kind"] == "step"])
    save_checkpoint(run, "ckpt-1.pt", torch.randn(96, 3, 11, 11))
    out = tmp_path / "out"
    result = CliRunner().invoke(report, [str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "no validation in the history yet" in result.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["conv1_kernels.png", "loss.png"]


def test_report_uses_the_newest_checkpoint(tmp_path):
    """The newest is the highest step in the name, as the daemon resumes, not the mtime."""
    run = tmp_path / "run"
    run.mkdir()
    write_history(run, history_records(epochs=1))
    old = save_checkpoint(run, "ckpt-000000009.pt", torch.zeros(96, 3, 11, 11))
    new = save_checkpoint(run, "ckpt-000000010.pt", torch.randn(96, 3, 11, 11))
    os.utime(old, (1_700_000_100, 1_700_000_100))
    os.utime(new, (1_700_000_000, 1_700_000_000))
    # The temp file of a checkpoint being written is never read.
    (run / "checkpoints" / ".ckpt-000000011.pt.tmp-123").write_bytes(b"partial")
    out = tmp_path / "out"
    result = CliRunner().invoke(report, [str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ckpt-000000010.pt" in (out / "index.html").read_text()


def test_report_falls_back_when_the_newest_checkpoint_is_damaged(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_history(run, history_records(epochs=1))
    save_checkpoint(run, "ckpt-1.pt", torch.randn(96, 3, 11, 11))
    (run / "checkpoints" / "ckpt-2.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    result = CliRunner().invoke(report, [str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ckpt-2.pt" in result.stderr  # named as skipped
    assert "ckpt-1.pt" in (out / "index.html").read_text()
    check_png(out / "conv1_kernels.png", SIZES["conv1_kernels.png"])


def test_report_defaults_to_the_daemons_run_dir(tmp_path):
    run = tmp_path / "state" / "run"
    run.mkdir(parents=True)
    write_history(run, history_records(epochs=1))
    save_checkpoint(run, "ckpt-1.pt", torch.randn(96, 3, 11, 11))
    result = CliRunner().invoke(report, [], env={"ALEXNETD_RUN_DIR": str(run)})
    assert result.exit_code == 0, result.output
    assert (run / "report" / "index.html").is_file()


def test_read_history_skips_what_it_cannot_use(tmp_path):
    recs = [
        {"t": 1.0, "kind": "step", "step": 0, "epoch": 0, "loss": 6.9, "lr": 0.01,
         "images_per_second": 100.0},
        {"t": 2.0, "kind": "step", "step": 10, "epoch": 0, "loss": 6.5, "lr": 0.01,
         "images_per_second": 100.0},
        {"t": 3.0, "kind": "hello", "who": "a kind this version does not know"},
        {"t": 4.0, "kind": "step", "step": 20, "epoch": 0, "loss": float("nan"), "lr": 0.01},
        # A resumed run repeats step 10: the later record is the one that counts.
        {"t": 5.0, "kind": "step", "step": 10, "epoch": 0, "loss": 6.4, "lr": 0.01},
        {"t": 6.0, "kind": "val", "epoch": 0, "step": 10, "top1_error": 0.9,
         "top5_error": 0.7, "crops": 1},
        {"t": 7.0, "kind": "stages", "step": 10, "rates": {"trainer": 99.0, "x": "fast"}},
    ]
    path = tmp_path / "history.jsonl"
    lines = [json.dumps(r) for r in recs]  # the NaN loss is written as NaN
    lines.insert(2, "{garbage")  # a damaged line in the middle
    path.write_text("\n".join(lines) + '\n{"t": 8.0, "kind": "ste')
    h = read_history(path)
    assert [(r["step"], r["loss"]) for r in h.steps] == [(0, 6.9), (10, 6.4)]
    assert [(r["epoch"], r["top1_error"]) for r in h.vals] == [(0, 0.9)]
    assert h.stages[0]["rates"] == {"trainer": 99.0} and h.stages[0]["busy"] == {}
    assert h.malformed == 1  # the damaged middle line; the unfinished last one is not
    assert h.t0 == 1.0
