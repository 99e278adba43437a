"""Many machines on one: two real daemons as two nodes (two run dirs, a loopback
rendezvous, gloo), each with one rank. Everything here is exact except the comparison
with one process, whose tolerance is derived in test_daemon.py's data-parallel test."""

import os
import signal

import pytest
import torch

from alexnetd.model import latest_checkpoint, load_checkpoint
from alexnetd.service.daemoncmds import launcher_defaults
from alexnetd.service.history import read_history
from daemon_helpers import EXACT_STEPS, cli, exact_args, free_port, holder, start_args, status, wait_exit, wait_for

STEPS = EXACT_STEPS  # one epoch of 4 steps (64 images, 2 x 8 a step) and the first of the next


def node_args(data, run_dir, node, rendezvous, config, *extra):
    return exact_args(data, run_dir, config, "--nodes", 2, "--node-rank", node, "--rendezvous", rendezvous, *extra)


def start_two(data, tmp_path, name, config, *extra, timeout=120):
    rendezvous = f"127.0.0.1:{free_port()}"
    dirs = [tmp_path / f"{name}-node{n}" for n in (0, 1)]
    for node, run_dir in enumerate(dirs):
        started = cli(*node_args(data, run_dir, node, rendezvous, config, "--rendezvous-timeout", timeout, *extra),
                      check=True)
        assert "waiting for the other nodes" in started.stdout or "training" in started.stdout
    return dirs, rendezvous


def weights(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))


@pytest.fixture(scope="module")
def undisturbed(prepared_data, exact_config, tmp_path_factory):
    """A two-node run of STEPS steps, untouched: (node dirs, what status said mid-run)."""
    tmp_path = tmp_path_factory.mktemp("undisturbed")
    dirs, rendezvous = start_two(prepared_data, tmp_path, "run", exact_config)
    seen = wait_for(lambda: (s := status(dirs[1])) and s["step"] >= 1 and s, what="node 1 to train")
    seen["text"] = cli("status", "--run-dir", dirs[1]).stdout
    wait_exit(dirs[0])
    wait_exit(dirs[1])
    return dirs, seen, rendezvous


@pytest.mark.slow
def test_two_nodes_of_batch_8_equal_one_process_of_batch_16(exact_single, undisturbed):
    dirs, seen, rendezvous = undisturbed
    a, b = weights(exact_single.finished()), weights(dirs[0])
    assert a["step"] == b["step"] == STEPS
    assert (a["epoch"], a["next_seq"]) == (b["epoch"], b["next_seq"])
    for name, tensor in a["model"].items():
        assert tensor.dtype == torch.float64
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-9)
    # Global rank 0 writes the checkpoints; node 1 resumes from what rank 0 broadcasts.
    assert latest_checkpoint(dirs[1] / "checkpoints") is None
    # Node 1's status shows the group.
    group = seen["group"]
    assert group["nodes"] == 2 and group["node_rank"] == 1 and group["world_size"] == 2
    assert group["ranks"] == [1] and group["rendezvous"] == rendezvous and group["missing"] == []
    assert seen["world_size"] == 2 and [r["rank"] for r in seen["ranks"]] == [1]
    assert f"group       node 1 of 2 (ranks 1-1 of 2), rendezvous {rendezvous}, round 0; all present" in seen["text"]
    assert seen["steps_per_epoch"] == 4  # each rank a half of the 8 batches of 8 an epoch


@pytest.mark.slow
def test_a_killed_trainer_on_node_1_restarts_both_nodes_at_the_same_step(prepared_data, exact_config, tmp_path,
                                                                         undisturbed):
    dirs, rendezvous = start_two(prepared_data, tmp_path, "kill", exact_config)
    try:
        # Once the epoch's checkpoint (step 4) is written, so the restart resumes from it:
        # the kill lands in step 5, the run's last.
        wait_for(lambda: (s := status(dirs[0])) and (s["checkpoint"] or {}).get("step", 0) >= 4,
                 every=0.05, what="the checkpoint of step 4")
        victim = status(dirs[1])["processes"]["trainer"]
        os.kill(victim, signal.SIGKILL)
        wait_exit(dirs[0])
        wait_exit(dirs[1])
    finally:
        for run_dir in dirs:
            cli("stop", "--run-dir", run_dir, "--now")
    histories = [read_history(d) for d in dirs]
    for history in histories:
        restarts = [row for row in history if row.get("event") == "restart"]
        assert len(restarts) == 1 and restarts[0]["stage"] == "trainer" and "round 1" in restarts[0]["reason"]
    # Node 0 followed node 1's restart; both resumed at step 4, from node 0's checkpoint.
    assert "node 1: trainer exited with code -9" in [r for r in histories[0] if r.get("event") == "restart"][0]["reason"]
    starts = [[row["step"] for row in history if row.get("event") == "trainer-start"] for history in histories]
    assert starts[0] == starts[1] == [0, 4]
    # ... and finished where the undisturbed run did, with the same weights to the bit.
    done, reference = weights(dirs[0]), weights(undisturbed[0][0])
    assert done["step"] == reference["step"] == STEPS
    for name, tensor in reference["model"].items():
        assert torch.equal(done["model"][name], tensor), name


def test_a_node_that_never_starts_is_a_timeout_naming_it(prepared_data, exact_config, tmp_path):
    rendezvous = f"127.0.0.1:{free_port()}"
    args = node_args(prepared_data, tmp_path / "node0", 0, rendezvous, exact_config,
                     "--rendezvous-timeout", 3, "--foreground")
    result = cli(*args, timeout=120)
    assert result.returncode == 1
    assert f"node 1 of 2 did not join the rendezvous at {rendezvous} within 3 s" in result.stderr
    assert "Traceback" not in result.stderr
    halts = [row for row in read_history(tmp_path / "node0") if row.get("event") == "halt"]
    assert len(halts) == 1 and "node 1 of 2 did not join" in halts[0]["reason"]


def test_nodes_that_start_different_runs_are_refused_naming_the_odd_one(prepared_data, exact_config, tmp_path):
    rendezvous = f"127.0.0.1:{free_port()}"
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    reason = "node 1 has a different --seed from node 0 (5 against 4)"
    try:
        cli(*node_args(prepared_data, dirs[0], 0, rendezvous, exact_config), check=True)
        odd = cli(*node_args(prepared_data, dirs[1], 1, rendezvous, exact_config, "--seed", 5))
        # Node 0 compares the runs once node 1 has joined, names the odd node and stops
        # (group.py: _check_agreement posts the reason to the store for the other nodes,
        # then node 0's halt takes the store down with it).
        wait_exit(dirs[0], timeout=120)
        assert reason in (dirs[0] / "alexnetd.log").read_text()
        # Node 1 stops too. It learns the reason if it reads the store before the store is
        # gone; otherwise all it can say is that node 0 went before the group formed.
        wait_exit(dirs[1], timeout=120)
        log = (dirs[1] / "alexnetd.log").read_text()
        told = reason in log
        assert told or ("lost the rendezvous" in log and "the group did not form" in log), log[-3000:]
        if odd.returncode != 0:  # that came before node 1 was ready: its `start` failed
            assert odd.returncode == 1, odd.stderr
            if told:  # (a lost store is told by the log's last error line, often torch's own)
                assert reason in odd.stderr, odd.stderr
        assert "Traceback" not in odd.stderr
    finally:
        for run_dir in dirs:
            if holder(run_dir) is not None:  # an assertion left it running
                cli("stop", "--run-dir", run_dir, "--now")


def test_multi_node_mistakes_are_one_line(prepared_data, tmp_path):
    base = start_args(prepared_data, tmp_path / "run", free_port(), "--device", "cpu")
    cases = [
        (["--nodes", 2], "--nodes 2 needs --rendezvous HOST:PORT"),
        (["--nodes", 2, "--node-rank", 2, "--rendezvous", "127.0.0.1:1234"], "node_rank 2 is not in 0..1"),
        (["--nodes", 2, "--rendezvous", "nowhere"], "rendezvous 'nowhere' is not HOST:PORT"),
        # Node 0 serves the store: an address that is not its own cannot be listened on.
        (["--nodes", 2, "--rendezvous", "192.0.2.1:29500"], "node 0 cannot listen for the rendezvous on 192.0.2.1:29500"),
    ]
    for extra, message in cases:
        result = cli(*base, *extra)
        assert result.returncode != 0, extra
        assert message in result.stderr, (extra, result.stderr)
        assert "Traceback" not in result.stderr


def test_launcher_variables_are_the_defaults():
    slurm = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "MASTER_ADDR": "node-a", "MASTER_PORT": "29500"}
    assert launcher_defaults({"nodes": None, "node_rank": None, "rendezvous": None}, slurm) == \
        {"nodes": 4, "node_rank": 2, "rendezvous": "node-a:29500"}
    torchrun = {"NNODES": "2", "NODE_RANK": "1", "WORLD_SIZE": "16", "RANK": "9", "MASTER_ADDR": "::1",
                "MASTER_PORT": "1"}
    assert launcher_defaults({}, torchrun) == {"nodes": 2, "node_rank": 1, "rendezvous": "[::1]:1"}
    # One daemon a node under a launcher that only says WORLD_SIZE and RANK.
    assert launcher_defaults({}, {"WORLD_SIZE": "3", "RANK": "0"}) == {"nodes": 3, "node_rank": 0}
    # A flag wins.
    assert launcher_defaults({"nodes": 1, "node_rank": 0}, slurm)["nodes"] == 1
    assert launcher_defaults({}, {}) == {}
