"""The run layout, the decoder seam, the beat ledger and the restart policy, without processes."""

from __future__ import annotations

import dataclasses

import pytest

from alexnetd.pipeline.decoders import CpuDecoding, DaliDecoding, make_decoding
from alexnetd.pipeline.ring import IMAGE
from alexnetd.service.beats import BeatLedger
from alexnetd.service.config import Config
from alexnetd.service.layout import ProcName, RunLayout
from alexnetd.service.proctable import Halt, RestartPolicy


def _config(prepared_data, tmp_path, **kw) -> Config:
    return Config(**{"data": str(prepared_data), "run_dir": str(tmp_path / "run"), "batch_size": 8, **kw})


def test_one_rank_names_and_directories(prepared_data, tmp_path):
    layout = RunLayout.from_config(_config(prepared_data, tmp_path, augmenters=2))
    assert (layout.world_size, layout.local_ranks, layout.first_rank) == (1, 1, 0)
    names = [str(layout.name(stage, 0, index)) for stage, index in layout.decoding.stages({}, "", 0)]
    assert names == ["augmenter-0", "augmenter-1"]
    assert str(layout.name("trainer")) == "trainer"
    assert layout.ranks[0].dir == tmp_path / "run"
    assert layout.ranks[0].endpoints.beats == layout.beats


def test_ranks_of_a_node_in_a_group(prepared_data, tmp_path):
    """Node 1 of 2 with 3 local ranks: global ranks 3..5, each reading every 6th batch,
    sockets in its own directory but one beats socket for the node."""
    config = _config(prepared_data, tmp_path, device="cpu", gpus=3, parallel="data", nodes=2, node_rank=1,
                     rendezvous="127.0.0.1:29500", batch_size=2, augmenters=1)
    layout = RunLayout.from_config(config)
    assert (layout.world_size, layout.local_ranks, layout.first_rank) == (6, 3, 3)
    assert [r.rank for r in layout.ranks] == [3, 4, 5]
    assert [(r.plan.rank, r.plan.world) for r in layout.ranks] == [(3, 6), (4, 6), (5, 6)]
    assert [r.dir.name for r in layout.ranks] == ["rank0", "rank1", "rank2"]
    assert len({r.endpoints.jobs for r in layout.ranks}) == 3 and len({r.ring for r in layout.ranks}) == 3
    assert {r.endpoints.beats for r in layout.ranks} == {layout.beats}
    assert str(layout.name("augmenter", 2, 0)) == "augmenter-0@2"
    assert str(layout.name("trainer", 1)) == "trainer@1"


def test_a_batch_per_rank_is_required_and_said_in_one_line(prepared_data, tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch of 40 for each of 2 ranks"):
        RunLayout.from_config(_config(prepared_data, tmp_path, device="cpu", gpus=2, parallel="data",
                                      batch_size=40))


def test_the_cpu_decoder_reserves_a_ring_of_pixels(prepared_data, tmp_path):
    layout = RunLayout.from_config(_config(prepared_data, tmp_path, augmenters=3))
    assert layout.slots == 2 * 3 + 2
    assert layout.shm_bytes == layout.slots * 8 * IMAGE * IMAGE * 3


def test_the_dali_decoder_asks_no_dev_shm_for_pixels(prepared_data, tmp_path):
    """DALI hands the copier device batches: its ring slots are only credits, so the
    /dev/shm need is none, whatever --augmenters says (they are its threads)."""
    layout = RunLayout.from_config(_config(prepared_data, tmp_path, decoder="dali", augmenters=16))
    assert layout.ring_batch == 0 and layout.shm_bytes == 0
    assert layout.slots == 4
    assert layout.decoding.stages({}, "", 0) == {}
    assert layout.decoding.host_of("augmenter") == "trainer"


def test_remote_hosts_are_one_more_augmenter_of_the_cpu_decoder(tmp_path):
    remote = {"addr": "127.0.0.1:5555", "keys_dir": str(tmp_path), "first_rank": 0}
    decoding = make_decoding("cpu", 2, remote)
    assert isinstance(decoding, CpuDecoding)
    stages = decoding.stages({"batch": 8}, "ring", 0)
    assert sorted(stages) == [("augmenter", 0), ("augmenter", 1), ("augmenter", 2)]
    assert stages[("augmenter", 2)][1]["remote"] == remote
    assert decoding.default_slots() == 2 * 2 + 2 + 4
    with pytest.raises(ValueError, match="remote augmenters"):
        make_decoding("dali", 2, remote)
    assert isinstance(make_decoding("dali", 2), DaliDecoding)


def test_the_ledger_keeps_totals_monotonic_across_a_restart():
    ledger = BeatLedger(local_ranks=1)
    aug = ProcName(0, "augmenter", 0)
    counters = dict(images=100, busy=3.0, starved=1.0, blocked=0.5)
    ledger.record(aug, {"counters": counters})
    ledger.sample(0.0, 0)
    ledger.retire(aug)                                        # it died
    ledger.record(aug, {"counters": dict(counters, images=20)})  # its replacement starts from 0
    ledger.sample(2.0, 0)
    totals = ledger.rank_totals()[0]["augmenter"]
    assert totals["images"] == 120 and totals["busy"] == 6.0
    assert ledger.stage_rates()["augmenter"]["images_per_second"] == 10.0  # (120 - 100) / 2 s


def test_the_ledger_folds_a_dead_trainers_skips_and_failures():
    ledger = BeatLedger(local_ranks=1)
    trainer = ProcName(0, "trainer")
    ledger.record(trainer, {"counters": dict(images=0, busy=0, starved=0, blocked=0), "skipped": {"truncated": 2},
                            "checkpoint_failures": 1})
    ledger.retire(trainer)
    assert ledger.skipped({"skipped": {"truncated": 1, "empty": 1}}) == {"truncated": 3, "empty": 1}
    assert ledger.checkpoint_failures({"checkpoint_failures": 2}) == 3


def test_restart_back_off_doubles_and_the_limit_halts():
    policy = RestartPolicy(limit=4, window=600.0)
    waits = [policy.admit("augmenter", "augmenter-0 died", float(t)) for t in range(4)]
    assert waits == [0.0, 1.0, 2.0, 4.0]
    with pytest.raises(Halt, match="augmenter restarted 4 times in 10 minutes"):
        policy.admit("augmenter", "augmenter-0 died", 5.0)
    assert policy.counts["augmenter"] == 4
    # Restarts older than the window no longer count.
    assert policy.admit("augmenter", "again", 700.0) == 0.0


def test_process_names_sort_and_hash_as_values():
    a, b = ProcName(0, "augmenter", 1, True), dataclasses.replace(ProcName(0, "augmenter", 1), ranked=True)
    assert a == b and len({a, b}) == 1
    with pytest.raises(ValueError):
        ProcName(0, "decoder")


def test_start_sizes_dev_shm_for_what_the_decoder_fills(prepared_data, tmp_path):
    """The preflight `alexnetd start` runs: a ring far larger than any /dev/shm is refused
    for the cpu decoder, whose augmenters write pixels into it, and asks nothing of
    /dev/shm for DALI, whose slots only count batches in flight."""
    import click

    from alexnetd.pipeline.decoders import DaliDecoding
    from alexnetd.pipeline.netaddr import free_port
    from alexnetd.service.daemoncmds import preflight

    huge = dict(batch_size=32, slots=100_000, augmenters=1, metrics_addr=f"127.0.0.1:{free_port()}")
    with pytest.raises(click.ClickException, match="batch ring needs .* MiB of /dev/shm"):
        preflight(_config(prepared_data, tmp_path, **huge), fresh=True)
    if DaliDecoding.missing():
        pytest.skip(DaliDecoding.missing())
    layout = preflight(_config(prepared_data, tmp_path, decoder="dali", **huge), fresh=True)
    assert layout.shm_bytes == 0 and layout.slots == 100_000
