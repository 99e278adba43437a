"""Remote augmenters on the loopback: real `alexnetd augment` processes, real CURVE over TCP."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import zmq

from alexnetd.pipeline import wire
from alexnetd.pipeline.launch import InputPipeline
from alexnetd.pipeline.plan import BatchPlan
from alexnetd.service.keys import add_client, read_client_key
from daemon_helpers import ALEXNETD, cli, free_port, start_args, status, wait_exit, wait_for
from test_pipeline import BATCH, collect

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


@pytest.fixture
def keyed(tmp_path):
    """A run directory, one allowed key file ("h1") and a free port for the gateway."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    key = add_client(run_dir, "h1", tmp_path / "h1.key")
    return run_dir, key, free_port()


def worker(port, key, *extra, log=None) -> subprocess.Popen:
    return subprocess.Popen(ALEXNETD + ["augment", "--connect", f"127.0.0.1:{port}", "--key", str(key), *extra],
                            stdout=subprocess.DEVNULL, stderr=log or subprocess.DEVNULL)


def gateway_summary(pipe) -> dict:
    """The gateway's latest view of its remote hosts (from its heartbeat)."""
    return next((b["remote"] for b in pipe.poll_beats().values() if b.get("remote")), {})


def host_row(pipe, name):
    return next((h for h in gateway_summary(pipe).get("hosts", []) if h["host"] == name), None)


def remote_cfg(run_dir, port, host_timeout=3.0):
    return dict(addr=f"127.0.0.1:{port}", keys_dir=str(run_dir), host_timeout=host_timeout)


@pytest.mark.slow
def test_batches_are_identical_with_and_without_a_remote_augmenter(prepared_data, tmp_path, keyed):
    run_dir, key, port = keyed
    count = 3 * BatchPlan(64, 16, BATCH).batches_in_epoch(0)
    with InputPipeline(prepared_data, tmp_path / "local", batch=BATCH, augmenters=1, seed=7) as pipe:
        reference = collect(pipe, count)
    with InputPipeline(prepared_data, run_dir, batch=BATCH, augmenters=1, seed=7,
                       remote=remote_cfg(run_dir, port)) as pipe:
        proc = worker(port, key)
        try:
            wait_for(lambda: host_row(pipe, "h1"), timeout=120, every=0.2, what="the remote host to join")
            got = collect(pipe, count)
            # Its counts arrive with the gateway's next beat.
            decoded = wait_for(lambda: (gateway_summary(pipe).get("images") or {}).get("h1"), timeout=30,
                               what="the remote host's images in a beat")
        finally:
            proc.kill()
            proc.wait()
    assert got == reference
    assert decoded > 0  # the remote host did make some of those batches


def fresh_host_row(pipe, name, since):
    """The host's row from a gateway beat sent after `since` (unix time), else None."""
    for beat in pipe.poll_beats().values():
        if beat.get("remote") and beat.get("t", 0) > since:
            return next((h for h in beat["remote"]["hosts"] if h["host"] == name), {})
    return None


@pytest.mark.slow
def test_a_killed_remote_augmenter_loses_and_repeats_nothing(prepared_data, tmp_path, keyed):
    run_dir, key, port = keyed
    total = 40
    with InputPipeline(prepared_data, tmp_path / "local", batch=BATCH, augmenters=1, seed=5) as pipe:
        reference = collect(pipe, total)
    # The freeze below lasts about two beats; the host timeout is well above that, so
    # the frozen host is not dropped while the test looks at what it holds.
    with InputPipeline(prepared_data, run_dir, batch=BATCH, augmenters=1, seed=5,
                       remote=remote_cfg(run_dir, port, host_timeout=8.0)) as pipe:
        proc = worker(port, key)
        try:
            wait_for(lambda: host_row(pipe, "h1"), timeout=120, every=0.2, what="the remote host to join")
            got = collect(pipe, 6)
            # Freeze it and read a beat sent after the freeze: if it holds jobs then,
            # it will never finish them, so kill it; otherwise let it go on and retry.
            held = 0
            while not held and len(got) < total - 5:
                os.kill(proc.pid, signal.SIGSTOP)
                frozen_at = time.time()
                row = wait_for(lambda: fresh_host_row(pipe, "h1", frozen_at), timeout=30, every=0.1,
                               what="a gateway beat after the freeze")
                held = row.get("in_flight", 0)
                if not held:
                    os.kill(proc.pid, signal.SIGCONT)
                    got += collect(pipe, 1)
            assert held, "the remote host never held a job while the test ran"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            got += collect(pipe, total - len(got))
            summary = wait_for(lambda: (s := gateway_summary(pipe)) and s["reissued"] and s, timeout=30,
                               what="the re-issue in a beat")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # The seq ledger: every batch once, in order, with the same bytes as the local run.
    assert [g[:2] for g in got] == [r[:2] for r in reference]
    assert got == reference
    assert summary["reissued"] >= held
    assert summary["hosts"] == []


def test_keys_add_list_revoke(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    out = tmp_path / "a.key"
    assert cli("keys", "--run-dir", run_dir, "add", "cpu-a", "--out", out, check=True).returncode == 0
    assert out.stat().st_mode & 0o777 == 0o600
    assert (run_dir / "remote" / "server.key").stat().st_mode & 0o777 == 0o600
    key = read_client_key(out)
    assert key.name == "cpu-a" and len(key.secret) == 40
    assert b"secret" not in (run_dir / "remote" / "clients" / "cpu-a.pub").read_bytes()  # the daemon keeps no client secret
    again = cli("keys", "--run-dir", run_dir, "add", "cpu-a", "--out", tmp_path / "b.key")
    assert again.returncode != 0 and "exists" in again.stderr and "Traceback" not in again.stderr
    rows = json.loads(cli("keys", "--run-dir", run_dir, "list", "--json", check=True).stdout)
    assert [(r["name"], r["state"]) for r in rows] == [("cpu-a", "allowed")]
    cli("keys", "--run-dir", run_dir, "revoke", "cpu-a", check=True)
    rows = json.loads(cli("keys", "--run-dir", run_dir, "list", "--json", check=True).stdout)
    assert [(r["name"], r["state"]) for r in rows] == [("cpu-a", "revoked")]
    bad = cli("keys", "--run-dir", run_dir, "revoke", "nobody")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


def test_augment_mistakes_are_one_line(tmp_path):
    (tmp_path / "junk.key").write_text("not a key\n")
    for args in (["--connect", "nowhere", "--key", tmp_path / "junk.key"],
                 ["--connect", "127.0.0.1:1", "--key", tmp_path / "missing.key"],
                 ["--connect", "127.0.0.1:1", "--key", tmp_path / "junk.key"]):
        result = cli("augment", *args, timeout=60)
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def test_a_revoked_or_unknown_key_is_refused_and_counted(prepared_data, tmp_path, keyed):
    run_dir, key, port = keyed
    stranger = add_client(tmp_path / "elsewhere", "h2", tmp_path / "h2.key")  # allowed by another daemon only
    with InputPipeline(prepared_data, run_dir, batch=BATCH, augmenters=1, seed=1, val_every=0,
                       remote=remote_cfg(run_dir, port)) as pipe:
        refused = subprocess.run(ALEXNETD + ["augment", "--connect", f"127.0.0.1:{port}", "--key", str(stranger)],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "refused" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        cli("keys", "--run-dir", run_dir, "revoke", "h1", check=True)
        revoked = subprocess.run(ALEXNETD + ["augment", "--connect", f"127.0.0.1:{port}", "--key", str(key)],
                                 capture_output=True, text=True, timeout=120)
        assert revoked.returncode != 0 and "refused" in revoked.stderr
        summary = wait_for(lambda: (s := gateway_summary(pipe)) and s["refused"] >= 2 and s, timeout=30,
                           what="both refusals in a beat")
        collect(pipe, 5)  # the input side still delivers, in order
    assert summary["hosts"] == [] and summary["images"] == {}


def test_a_result_that_does_not_match_its_job_is_not_written(prepared_data, tmp_path, keyed):
    """An authenticated host that sends wrong shapes or indices cannot corrupt a batch."""
    run_dir, key_path, port = keyed
    key = read_client_key(key_path)
    count = 16
    with InputPipeline(prepared_data, tmp_path / "local", batch=BATCH, augmenters=1, seed=3, val_every=0) as pipe:
        reference = collect(pipe, count)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = key.server_public, key.public, key.secret
    sock.setsockopt(zmq.LINGER, 0)
    try:
        with InputPipeline(prepared_data, run_dir, batch=BATCH, augmenters=1, seed=3, val_every=0,
                           remote=remote_cfg(run_dir, port)) as pipe:
            sock.connect(f"tcp://127.0.0.1:{port}")
            answered, got = 0, []
            deadline = time.monotonic() + 60
            while answered < 3 and time.monotonic() < deadline:
                wire.send(sock, "beat", prefetch=1)
                msg = wire.recv(sock) if sock.poll(200) else None
                if msg is None or msg.kind != "job":
                    # No job for it (the gateway decodes on its own until a host joins,
                    # and the ring fills): train a batch, so the loader makes another.
                    if len(got) < count - 1:
                        got += collect(pipe, 1)
                    continue
                n = len(msg.arrays[3])
                # Claims one more sample than the job had, and garbage pixels.
                wire.send(sock, "pixels", [np.arange(n + 1, dtype=np.int64),
                                           np.full((n + 1, 256, 256, 3), 255, np.uint8)],
                          epoch=msg["epoch"], seq=msg["seq"], generation=msg["generation"], skipped=[])
                answered += 1
            assert answered == 3
            got += collect(pipe, count - len(got))
    finally:
        ctx.destroy(linger=0)
    assert got == reference


@pytest.mark.slow
def test_daemon_with_remote_augmenters_status_metrics_and_a_wrong_key(prepared_data, tmp_path):
    run_dir, port, rport = tmp_path / "run", free_port(), free_port()
    started = cli(*start_args(prepared_data, run_dir, port, "--augmenters", 1, "--remote-augmenters",
                              f"127.0.0.1:{rport}"), check=True)
    assert f"127.0.0.1:{rport}" in started.stdout
    good = None
    try:
        key = cli("keys", "--run-dir", run_dir, "add", "good", "--out", tmp_path / "good.key", check=True)
        assert key.returncode == 0
        wrong = add_client(tmp_path / "other", "good", tmp_path / "wrong.key")  # same name, another daemon's key
        refused = subprocess.run(ALEXNETD + ["augment", "--connect", f"127.0.0.1:{rport}", "--key", str(wrong)],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
        good = worker(rport, tmp_path / "good.key")
        s = wait_for(lambda: (s := status(run_dir)) and s["remote_augmenters"]["images"].get("good") and s,
                     timeout=300, what="the good host's images in status")
        remote = s["remote_augmenters"]
        assert remote["refused"] >= 1
        assert [h["host"] for h in remote["hosts"]] == ["good"] and remote["hosts"][0]["workers"] == 1
        assert s["restarts"] == {"loader": 0, "augmenter": 0, "copier": 0, "trainer": 0}  # training unaffected
        step = s["step"]
        wait_for(lambda: (s := status(run_dir)) and s["step"] > step + 2, timeout=300, what="more steps")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'alexnetd_remote_augmenter_images_total{host="good"}' in text
        assert 'alexnetd_remote_augmenter_workers{host="good"} 1.0' in text
        refused_line = next(l for l in text.splitlines() if l.startswith("alexnetd_remote_refused_connections_total"))
        assert float(refused_line.split()[-1]) >= 1
    finally:
        if good is not None:
            good.kill()
            good.wait()
        cli("stop", "--run-dir", run_dir)
        wait_exit(run_dir)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in history if row["kind"] == "step"]
    assert steps == list(range(1, len(steps) + 1))
