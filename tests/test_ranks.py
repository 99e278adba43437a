"""N data-parallel ranks through the real daemon: `--device cpu --gpus 3 --parallel data`
runs three gloo replicas, each with its own loader, augmenters and ring. Three, not two,
so that nothing can assume a pair. The weights of a data-parallel run against one
process are compared in test_daemon.py; here everything asserted is exact: the plan,
steps, positions, processes, labels, who writes checkpoints."""

import json
import re
import urllib.request

import numpy as np
import pytest

from alexnetd.model import latest_checkpoint, load_checkpoint
from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.plan import BatchPlan
from daemon_helpers import cli, free_port, start_args, status, wait_exit, wait_for

WORLD, BATCH = 3, 4
# Two epochs of 5 steps a rank on the 64 training images: the ranks cross an epoch's end
# (its checkpoint, the next epoch's plan) and stop together at the next one.
STEPS = 10


def scrape(port) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def by_rank(text: str, name: str, stage: str) -> dict[str, float]:
    """rank -> value of `name{rank=...,stage=...}` in a scrape."""
    pattern = re.compile(rf'^{name}\{{rank="(\d+)",stage="{stage}"\}} (\S+)$', re.M)
    return {rank: float(value) for rank, value in pattern.findall(text)}


def test_ranks_of_the_plan_take_disjoint_batches(prepared_data):
    """The daemon's plan for rank r of 3 (the same BatchPlan each rank's loader and
    trainer build): disjoint samples, together the first 3 x T batches of the epoch's
    permutation, in order."""
    dataset = open_dataset(prepared_data)
    plans = [BatchPlan.for_dataset(dataset, BATCH, seed=5, val_every=0, rank=r, world=WORLD) for r in range(WORLD)]
    n_train = len(dataset.split("train"))
    assert {p.train_batches for p in plans} == {n_train // BATCH // WORLD}
    for epoch in (0, 1):
        taken = [p.samples(epoch, seq)[1] for seq in range(plans[0].train_batches) for p in plans]
        union = np.concatenate(taken)
        assert len(set(union.tolist())) == len(union)  # no sample trained twice
        single = BatchPlan.for_dataset(dataset, BATCH, seed=5, val_every=0)
        expected = np.concatenate([single.samples(epoch, s)[1] for s in range(len(taken))])
        assert np.array_equal(union, expected)  # global batch seq*3 + r is rank r's batch seq


@pytest.mark.slow
def test_three_cpu_replicas_train_through_the_daemon(prepared_data, tmp_path):
    """The run ends at --max-steps, where the ranks stop at the same step by themselves,
    so its end point is exact (a `stop` waits for the ranks' next vote on stopping)."""
    run_dir, port = tmp_path / "run", free_port()
    n_train = len(open_dataset(prepared_data).split("train"))
    steps_per_epoch = n_train // BATCH // WORLD
    assert STEPS % steps_per_epoch == 0
    cli(*start_args(prepared_data, run_dir, port, "--gpus", WORLD, "--parallel", "data", "--augmenters", 1, "--device", "cpu",
                    "--batch-size", BATCH, "--val-every", 0, "--seed", 5, "--max-steps", STEPS), check=True)
    try:
        # Until every rank has moved and its rates are in (rates need two samples).
        running = wait_for(lambda: (s := status(run_dir)) and all(r["step"] >= 2 for r in s["ranks"])
                           and all(r["images_per_second"] > 0 for r in s["ranks"]) and s,
                           what="all three ranks to train")
        assert running["world_size"] == WORLD
        assert [r["rank"] for r in running["ranks"]] == list(range(WORLD))
        assert running["steps_per_epoch"] == steps_per_epoch  # each rank a third of the batches
        assert running["slowest_rank"] in range(WORLD)
        for r in running["ranks"]:
            assert set(r["stages"]) == {"loader", "augmenter", "copier", "trainer"}
            assert r["stages"]["augmenter"]["processes"] == 1 and r["stages"]["trainer"]["processes"] == 1
            for share in ("busy", "starved", "blocked"):
                assert 0 <= r["stages"]["trainer"][share] <= 1
        names = set(running["processes"])
        for rank in range(WORLD):
            assert {f"trainer@{rank}", f"loader@{rank}", f"augmenter-0@{rank}"} <= names
        assert running["stages"]["trainer"]["processes"] == WORLD
        # The whole daemon's rate is the ranks' rates together.
        assert running["images_per_second"] == pytest.approx(
            sum(r["images_per_second"] for r in running["ranks"]), abs=0.11 * WORLD)

        text = cli("status", "--run-dir", run_dir).stdout
        rows = [line.split() for line in text.splitlines() if re.match(r"^  [0-9]+ ", line)]
        assert [row[0] for row in rows] == [str(r) for r in range(WORLD)]
        assert text.count("<- slowest") == 1

        metrics = scrape(port)
        trained = by_rank(metrics, "alexnetd_stage_images_total", "trainer")
        assert set(trained) == {str(r) for r in range(WORLD)}
        # Every rank trains whole batches of its own.
        assert all(v > 0 and v % BATCH == 0 for v in trained.values()), trained
        for stage in ("loader", "augmenter", "copier"):
            assert set(by_rank(metrics, "alexnetd_stage_images_total", stage)) == set(trained), stage
        in_use = re.findall(r'^alexnetd_ring_slots_in_use\{rank="(\d+)"\}', metrics, re.M)
        assert sorted(in_use) == [str(r) for r in range(WORLD)]
        wait_exit(run_dir)
    finally:
        cli("stop", "--run-dir", run_dir, "--now")  # only if an assertion left it running

    # One checkpoint writer, rank 0, at the position every rank reached.
    saved = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    step = saved["step"]
    assert step == STEPS
    assert (saved["epoch"], saved["next_seq"]) == (STEPS // steps_per_epoch, 0)
    assert "halt.json" not in {p.name for p in run_dir.iterdir()}
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history if row["kind"] == "step"] == list(range(1, step + 1))
    assert sum(1 for row in history if row.get("event") == "trainer-start") == 1
    assert [row["code"] for row in history if row.get("event") == "daemon-stop"] == [0]
    written = sum(1 for row in history if row.get("event") == "checkpoint")
    log = (run_dir / "alexnetd.log").read_text()
    assert log.count(" checkpoint ckpt-") == written >= 1
    for rank in range(WORLD):
        assert f"started trainer@{rank}" in log and f"started augmenter-0@{rank}" in log


@pytest.mark.parametrize("args, words", [
    (["--gpus", "3"], "needs parallel data"),
    (["--gpus", "3", "--parallel", "model"], "exactly 2"),
    (["--gpus", "all", "--parallel", "data"], "--gpus all counts CUDA devices"),
    (["--gpus", "0"], "not a positive number"),
    (["--gpus", "3", "--parallel", "data", "--device", "cuda"], "CUDA device"),
])
def test_gpu_counts_it_cannot_run_are_one_line(prepared_data, tmp_path, args, words):
    """On this CPU machine. (On a machine with 3 CUDA devices the last case would start.)"""
    import torch

    if "cuda" in args and torch.cuda.device_count() >= 3:
        pytest.skip("this machine has 3 CUDA devices")
    if "all" in args and torch.cuda.is_available():
        pytest.skip("--device auto finds CUDA here, so --gpus all can start")
    result = cli("start", "--data", prepared_data, "--run-dir", tmp_path / "run", "--batch-size", BATCH,
                 "--metrics-addr", f"127.0.0.1:{free_port()}", *args)
    assert result.returncode != 0
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "alexnetd.pid").exists()
