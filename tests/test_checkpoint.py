"""Checkpoints: atomic writes, keep-last-K, the "latest" rule, data-only loading."""

import os
import zipfile

import pytest
import torch

from alexnetd.model import checkpoint as ckpt_mod
from alexnetd.model.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints,
                                       load_checkpoint, load_latest_checkpoint,
                                       save_checkpoint)
from alexnetd.model.recipe import PaperSGD, PlateauSchedule, rng_state


class Payload:
    """Any class at all: weights_only loading must refuse to rebuild it."""

    def __reduce__(self):
        return (os.getcwd, ())


def _state(step, fingerprint="fp-A"):
    torch.manual_seed(step)
    model = torch.nn.Linear(4, 3)
    opt = PaperSGD(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    schedule = PlateauSchedule()
    schedule.step(0.7)
    return {
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "schedule": schedule.state_dict(), "epoch": 2, "next_seq": 17, "step": step,
        "rng": rng_state(),
        "config": {"batch_size": 128, "lr": 0.01, "bf16": False, "devices": ["cpu"],
                   "data": {"root": "/data", "limit": None}},
        "dataset_fingerprint": fingerprint, "classes": ["cat", "dog", "eel"],
    }


def test_round_trip_of_a_trainer_state(tmp_path):
    state = _state(12)
    path = save_checkpoint(tmp_path, state)
    assert path == tmp_path / "ckpt-000000012.pt"
    loaded = load_checkpoint(path, expect_fingerprint="fp-A")
    assert set(loaded) == set(state)
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert torch.equal(loaded["optimizer"]["state"][0]["velocity"],
                       state["optimizer"]["state"][0]["velocity"])
    assert torch.equal(loaded["rng"]["cpu"], state["rng"]["cpu"])
    for key in ("schedule", "epoch", "next_seq", "step", "config", "classes"):
        assert loaded[key] == state[key], key
    # The resumed optimizer and schedule accept what came back.
    model = torch.nn.Linear(4, 3)
    model.load_state_dict(loaded["model"])
    PaperSGD(model.parameters()).load_state_dict(loaded["optimizer"])
    PlateauSchedule().load_state_dict(loaded["schedule"])


def test_keeps_the_last_k_by_step(tmp_path):
    for step in (1, 2, 30, 4, 5):
        save_checkpoint(tmp_path, {"step": step}, keep=3)
    # Ordered by step, not by write order: 30 is newest, then 5, then 4.
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5, 30]
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-000000030.pt"


def test_the_file_just_written_is_never_pruned(tmp_path):
    save_checkpoint(tmp_path, {"step": 9}, keep=1)
    path = save_checkpoint(tmp_path, {"step": 3}, keep=1)
    assert path.exists()


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(1000)})

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt_mod.torch, "save", dies_halfway)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(1000)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]
    assert latest_checkpoint(tmp_path) == good
    assert torch.equal(load_checkpoint(good)["w"], torch.ones(1000))


def test_leftover_temp_files_are_invisible_and_cleaned_by_the_next_save(tmp_path):
    good = save_checkpoint(tmp_path, {"step": 1})
    # What a process killed between write and rename leaves behind.
    stale = tmp_path / ".ckpt-000000002.pt.tmp-99999"
    stale.write_bytes(b"PK\x03\x04 partial")
    assert latest_checkpoint(tmp_path) == good
    assert load_latest_checkpoint(tmp_path)[0] == good
    save_checkpoint(tmp_path, {"step": 3})
    assert not stale.exists()


def test_a_truncated_newest_file_does_not_hide_the_previous_one(tmp_path):
    good = save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(1000)})
    newest = save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(1000)})
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    assert latest_checkpoint(tmp_path) == good
    path, state = load_latest_checkpoint(tmp_path)
    assert path == good and torch.equal(state["w"], torch.ones(1000))
    with pytest.raises(CheckpointError, match="unreadable or truncated") as e:
        load_checkpoint(newest)
    assert "\n" not in str(e.value) and str(newest) in str(e.value)


def test_a_complete_but_unloadable_newest_file_is_skipped_on_load(tmp_path):
    good = save_checkpoint(tmp_path, {"step": 1})
    # A whole zip container that is not a torch checkpoint: passes the cheap check,
    # fails to load, and load_latest_checkpoint goes back past it.
    with zipfile.ZipFile(tmp_path / "ckpt-000000002.pt", "w") as z:
        z.writestr("junk/data.pkl", b"not a pickle")
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-000000002.pt"
    assert load_latest_checkpoint(tmp_path)[0] == good


def test_no_checkpoint_means_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    assert load_latest_checkpoint(tmp_path) is None


def test_fingerprint_mismatch_names_both_fingerprints(tmp_path):
    path = save_checkpoint(tmp_path, _state(5, fingerprint="aaa111"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, expect_fingerprint="bbb222", data_dir="/data/imagenet")
    assert str(e.value) == (f"checkpoint {path} was trained on dataset fingerprint aaa111, "
                            "but /data/imagenet has bbb222")
    # Going back in time cannot fix a mismatch: it is raised, not skipped.
    with pytest.raises(CheckpointError, match="aaa111"):
        load_latest_checkpoint(tmp_path, expect_fingerprint="bbb222")
    assert load_checkpoint(path, expect_fingerprint="aaa111")["step"] == 5


def test_a_checkpoint_without_fingerprint_fails_when_one_is_expected(tmp_path):
    path = save_checkpoint(tmp_path, {"step": 1})
    with pytest.raises(CheckpointError, match="records no dataset fingerprint"):
        load_checkpoint(path, expect_fingerprint="abc")


def test_loading_refuses_pickled_objects(tmp_path):
    path = tmp_path / "ckpt-000000001.pt"
    torch.save({"step": 1, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="not plain data") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_saving_refuses_values_that_would_not_load(tmp_path):
    with pytest.raises(CheckpointError, match=r"state\['config'\]\['when'\]"):
        save_checkpoint(tmp_path, {"step": 1, "config": {"when": object()}})
    with pytest.raises(CheckpointError, match="'step'"):
        save_checkpoint(tmp_path, {"epoch": 1})
    assert list(tmp_path.iterdir()) == []
