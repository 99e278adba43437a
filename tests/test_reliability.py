"""Faults found by bench/chaos.py, fixed, and the short version of each chaos scenario.

Real daemons, real JPEGs, real sockets; the figures bench/chaos.py prints are asserted
here at a size CI can afford (a few kills, 100 fuzzed files, a 1-minute soak)."""

import json
import sys
from pathlib import Path

import pytest

from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.jpeg import Decoder, SkipSample
from daemon_helpers import alive, cli, free_port, start_args, status, wait_exit, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import chaos  # noqa: E402  (bench/ is not a package)

pytestmark = pytest.mark.slow


def _bad_keys(data) -> dict:
    split, decoder, bad = open_dataset(data).split("train"), Decoder(), {}
    for i in range(len(split)):
        try:
            decoder.decode_rgb(split.read(i), min_side=256)
        except SkipSample as exc:
            bad[split.key(i)] = exc.reason
    return bad


def test_the_last_checkpoint_is_written_once(trained):
    """The last epoch's checkpoint and the final one are the same state: one write. (The
    shared trained run ends at its last epoch, as --max-epochs runs do.)"""
    rows = [json.loads(line) for line in (trained.run_dir / "history.jsonl").read_text().splitlines()]
    writes = [r for r in rows if r.get("event") == "checkpoint"]
    assert [r["reason"] for r in writes] == ["epoch"] * trained.epochs
    assert len({r["step"] for r in writes}) == len(writes)


def test_skipped_files_are_named_once_per_run_and_shown(raw_data, tmp_path):
    bad = _bad_keys(raw_data)
    run_dir = tmp_path / "run"
    args = start_args(raw_data, run_dir, free_port(), "--batch-size", 4, "--augmenters", 1, "--skip-budget", 1.0,
                      "--max-epochs", 100, "--val-every", 0)
    cli(*args, check=True)
    try:
        shown = wait_for(lambda: (s := status(run_dir)) and s["epoch"] >= 1 and s["skipped_recent"] and s,
                         what="an epoch with named skips")
        assert {row["key"] for row in shown["skipped_recent"]} <= set(bad)
        text = cli("status", "--run-dir", run_dir).stdout
        assert shown["skipped_recent"][-1]["key"] in text
    finally:
        cli("stop", "--run-dir", run_dir, check=True)
    first = (run_dir / "skipped.jsonl").read_text().splitlines()
    # A restart meets the same bad files again and writes nothing new for them.
    cli(*args, check=True)
    try:
        wait_for(lambda: (s := status(run_dir)) and s["epoch"] >= shown["epoch"] + 1, what="another epoch")
    finally:
        cli("stop", "--run-dir", run_dir, check=True)
    rows = [json.loads(line) for line in (run_dir / "skipped.jsonl").read_text().splitlines()]
    keys = [(r["split"], r["key"]) for r in rows]
    assert len(keys) == len(set(keys)), "a file was named twice"
    assert {r["key"]: r["reason"] for r in rows} == {k: bad[k] for _, k in keys}
    assert [json.loads(line)["key"] for line in first] == [r["key"] for r in rows[:len(first)]]
    assert all(Path(r["path"]).is_file() for r in rows)  # an ImageFolder's file, to go and fix


def test_sigkills_lose_nothing_train_nothing_twice_and_change_no_weight(prepared_data, tmp_path):
    """One kill of each kind through the real daemon: the supervisor's restart of the
    input side (an augmenter or the loader killed) and of the trainer, and a restarted
    daemon, each lose no batch and train none twice (the seq ledger). 24 steps leave room
    for the four kills and their restarts on a fast machine too."""
    result = chaos.sigkill(tmp_path, kills_per_kind=1, steps=24, data=prepared_data)
    assert result["kills"] == {"loader": 1, "augmenter": 1, "trainer": 1, "daemon": 1}, result
    assert result["lost"] == 0 and result["trained_twice"] == 0 and result["ledger_in_order"], result
    assert result["max_abs_dw"] == 0.0, result


def test_fuzzed_jpegs_never_crash_and_are_each_named_once(tmp_path):
    result = chaos.bad_files(tmp_path, 100)
    assert result["decoder_crashes"] == 0 and result["prepare_exit"] == 0 and not result["prepare_traceback"]
    assert result["prepare_skipped"] == sum(result["bad_by_reason"].values())
    assert result["bombs_too_large"] == result["bombs"] > 0
    assert result["daemon_restarts"] == 0 and result["daemon_named_twice"] == 0
    assert result["daemon_matches_truth"] and result["daemon_named"] == result["daemon_expected"] > 0


def test_hostile_frames_are_refused_and_nothing_is_unpickled(prepared_data, tmp_path):
    result = chaos.hostile(tmp_path, 2000, data=prepared_data)
    assert not result["canary_appeared"]
    assert result["kept_training"] and result["restarts"] == 0 and result["metrics_still_served"]
    assert result["control_answered"] == result["sent"]["control"] == result["counted"]["control"]
    for name in ("ready", "credits", "beats"):
        assert result["counted"][name] > 0.9 * result["sent"][name], result
    assert result["sent"]["jobs"] > 0  # raw bytes on the loader's PUSH socket, below ZeroMQ
    assert result["tcp_loopback_only"] and result["unix_in_run_dir"] and result["run_dir_mode"] == "0o700"


def test_tar_members_that_are_not_plain_relative_files_are_refused(prepared_data, tmp_path):
    assert chaos.tar_shards(tmp_path, data=prepared_data) == {k: "refused" for k in ("dotdot", "symlink", "device", "absolute")}


def test_truncated_checkpoints_never_load(tmp_path):
    import torch

    from alexnetd.model import AlexNet, PaperSGD, save_checkpoint

    model = AlexNet(4)
    optimizer = PaperSGD(model.parameters())
    for step in (1, 2):
        model(torch.randn(2, 3, 224, 224)).sum().backward()
        optimizer.step()
        save_checkpoint(tmp_path, {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()})
    assert chaos.truncated_checkpoints(tmp_path, 10)["partial_loads"] == 0


def test_small_and_read_only_run_dirs_are_refused_in_one_line(prepared_data, tmp_path):
    result = chaos.refusals(tmp_path, prepared_data)
    if not result:
        pytest.skip("cannot mount a tmpfs here")
    assert result == {"full_disk_refused_one_line": True, "read_only_refused_one_line": True}


def test_short_soak_leaves_nothing_behind(prepared_data, tmp_path):
    result = chaos.soak(tmp_path, minutes=0.5, sample_every=10, data=prepared_data)
    assert result["batches"] > 0
    assert result["left_after_stop"] == [] and result["left_after_kill_start_stop"] == []
    assert all(change <= 2 for change in result["fd_change"].values()), result


ORPHAN = """
import os, select, sys, time
from alexnetd.pipeline.launch import spawn_context
from alexnetd.pipeline.stage import adopt_children

def stage(marker, parent):
    # Still booting when its parent dies: it makes its StopFlag only after that exit
    # (a pidfd turns readable once the process has ended).
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        pass  # gone already
    else:
        select.select([fd], [], [], 60)
    from alexnetd.pipeline.stage import StopFlag
    stop = StopFlag()
    open(marker, "w").write(str(os.getpid()))
    deadline = time.monotonic() + 60  # a stage that never notices is still gone in a minute
    while not stop.stopping and time.monotonic() < deadline:
        time.sleep(0.1)  # polls its flag, as a stage's loop does

if __name__ == "__main__":
    adopt_children()
    child = spawn_context.Process(target=stage, args=(sys.argv[1], os.getpid()))
    child.start()
    print(child.pid, flush=True)
    os._exit(0)  # the parent dies before the stage has made its StopFlag
"""


def test_a_stage_whose_parent_died_while_it_booted_still_exits(tmp_path):
    """Found by the full chaos run: a daemon killed just after it restarted the input
    side left the new augmenters running for ever (they took init for their parent)."""
    import os
    import subprocess

    script, marker = tmp_path / "orphan.py", tmp_path / "started"
    script.write_text(ORPHAN)
    out = subprocess.run([sys.executable, str(script), str(marker)], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])
    wait_for(lambda: marker.exists(), timeout=60, every=0.1, what="the stage to boot")

    wait_for(lambda: not alive(pid), timeout=30, every=0.1, what="the orphaned stage to exit")


def test_a_stage_killed_while_it_boots_is_restarted_not_a_halt(prepared_data, tmp_path):
    """Found by the full chaos run: the loader SIGKILLed a moment after an input restart,
    before its first heartbeat, halted the daemon as if it could not boot."""
    import os
    import signal

    run_dir = tmp_path / "run"
    cli(*start_args(prepared_data, run_dir, free_port(), "--val-every", 0), check=True)
    try:
        first = wait_for(lambda: (s := status(run_dir)) and s["step"] >= 1 and s, what="training")
        os.kill(first["processes"]["augmenter-0"], signal.SIGKILL)
        # The input side's new loader, killed at once: it cannot have beaten yet.
        new = wait_for(lambda: (s := status(run_dir)) and s["processes"].get("loader")
                       not in (None, first["processes"]["loader"]) and s["processes"], every=0.01, what="a new loader")
        os.kill(new["loader"], signal.SIGKILL)
        later = wait_for(lambda: (s := status(run_dir)) and s["step"] >= first["step"] + 3 and s,
                         what="training to go on")
        assert later["halt_reason"] is None
        assert later["restarts"]["augmenter"] == 1 and later["restarts"]["loader"] == 1
    finally:
        cli("stop", "--run-dir", run_dir, "--now")
