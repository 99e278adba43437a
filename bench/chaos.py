"""Reliability as figures: kill stages, fill disks, feed bad files and hostile frames,
soak, and read what listens. Prints one table; RELIABILITY.md records it.

    python bench/chaos.py --quick          # minutes: a few kills, 100 fuzzed files, a short soak
    python bench/chaos.py                  # the full suite: 20 kills of each kind, 1,000 files, 30-min soak
    python bench/chaos.py --only sigkill,hostile

Every scenario drives the real `alexnetd` command on generated data with real processes,
sockets and files. The seq ledger is history.jsonl: one "step" row per step (epoch,
seq), and a "trainer-start" event at each (re)start naming the step it resumed from; the
steps after it were rolled back with the weights, so they are dropped from the ledger
before the rows that retrain them. A batch is lost if the final ledger misses one of the
plan's (epoch, seq), trained twice if it holds one more than once.

tests/test_reliability.py runs the short versions of these functions. The waiting, the
status reads and the `alexnetd` calls are tests/daemon_helpers.py's, shared with the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq

# The waits and status reads the tests use (tests/ is not a package: found by path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from daemon_helpers import alive, cli, holder, status, wait_for  # noqa: E402

from alexnetd.pipeline.netaddr import free_port  # noqa: E402

# Fast, deterministic CPU runs: batches of 8, one log row per step (the ledger), a
# checkpoint every 3 s so that a killed trainer redoes little.
RUN = ["--batch-size", "8", "--augmenters", "2", "--log-every", "1", "--bias-init", "caffe",
       "--deterministic", "--seed", "7", "--val-every", "0", "--checkpoint-every", "0.05"]


# -- driving the daemon ----------------------------------------------------------------

def start(data, run_dir, *extra, port=None, check: bool = True) -> subprocess.CompletedProcess:
    """`alexnetd start` with RUN's flags. A start that fails raises, saying why, unless
    `check` is False: the scenario would otherwise wait for a daemon that never came."""
    port = port or free_port()
    return cli("start", "--data", data, "--run-dir", run_dir, "--metrics-addr", f"127.0.0.1:{port}", *RUN, *extra,
               check=check)


def history(run_dir) -> list[dict]:
    from alexnetd.service.history import read_history

    return read_history(run_dir)


def ledger(rows: list[dict]) -> list[tuple[int, int, int]]:
    """(step, epoch, seq) of every step in the final weights (see the module doc)."""
    kept: list[tuple[int, int, int]] = []
    for row in rows:
        if row.get("kind") == "event" and row.get("event") == "trainer-start":
            kept = [r for r in kept if r[0] <= row["step"]]
        elif row.get("kind") == "step" and "seq" in row:
            kept.append((row["step"], row["epoch"], row["seq"]))
    return kept


def final_weights(run_dir) -> dict:
    from alexnetd.model import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(Path(run_dir) / "checkpoints"))


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in a["model"])


# -- data ------------------------------------------------------------------------------

def prepared(work: Path) -> Path:
    """The scenarios' data set, made once in `work` (the tests pass their session's own,
    which is the same set: tests/conftest.py's PREPARED)."""
    from alexnetd.pipeline.fakedata import make_fake_data

    out = work / "prepared"
    if not (out / "manifest.json").exists():
        make_fake_data(out, classes=4, train_per_class=16, val_per_class=4, shards=2, seed=0, progress=False)
    return out


# -- scenario: SIGKILL chaos -----------------------------------------------------------

def sigkill(work: Path, kills_per_kind: int, steps: int, seed: int = 0, data: Path | None = None) -> dict:
    """Kill loader, augmenters, trainer and the daemon at random moments of a deterministic
    run; compare its final weights and ledger with an undisturbed run's."""
    data, rng = data or prepared(work), random.Random(seed)
    config = work / "chaos.toml"
    config.write_text(f"restart_limit = {10 * kills_per_kind + 10}\n")
    reference, chaos = work / "sigkill-ref", work / "sigkill-chaos"
    for d in (reference, chaos):
        shutil.rmtree(d, ignore_errors=True)
    args = ["--max-steps", steps, "--config", config]
    # A whole run's wait grows with its steps (about 1.5 s each on 2 busy cores).
    run_timeout = 120 + 10 * steps
    start(data, reference, *args)
    wait_for(lambda: holder(reference) is None, timeout=run_timeout, what="the reference run")
    kinds = ["loader", "augmenter", "trainer", "daemon"] * kills_per_kind
    rng.shuffle(kinds)
    kills = dict.fromkeys(("loader", "augmenter", "trainer", "daemon"), 0)
    start(data, chaos, *args)
    last_step = 0
    for kind in kinds:
        # Each kill lands in a live, moving run: wait for a step past the last kill's.
        s = _wait_moving(chaos, last_step)
        if s is None:
            break  # the run finished before every kill was made
        time.sleep(rng.uniform(0.0, 2.0))  # a random moment in the step: the kill's timing is the variable
        s = status(chaos)
        if s is None or s["state"] not in ("training", "degraded") or s["step"] >= steps:
            break  # it finished meanwhile: a kill now would not land in a moving run
        procs = s["processes"]
        if kind == "daemon":
            pid = holder(chaos)
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not any(alive(p) for p in procs.values()) and not alive(pid), timeout=120,
                     what="the stages to follow the daemon")
            start(data, chaos, *args)
        else:
            name = {"loader": "loader", "trainer": "trainer"}.get(kind) or rng.choice(
                [n for n in procs if n.startswith("augmenter")])
            if name not in procs:
                continue
            try:
                os.kill(procs[name], signal.SIGKILL)
            except ProcessLookupError:
                continue
        kills[kind] += 1
        last_step = s["step"]
    wait_for(lambda: holder(chaos) is None or (status(chaos) or {}).get("step") == steps, timeout=run_timeout,
             what="the chaos run")
    wait_for(lambda: holder(chaos) is None, what="the chaos run to exit")
    a, b = final_weights(reference), final_weights(chaos)
    kept = ledger(history(chaos))
    from alexnetd.pipeline.dataset import open_dataset
    from alexnetd.pipeline.plan import BatchPlan

    plan = BatchPlan.for_dataset(open_dataset(data), 8, 7, 0)
    want = [(i + 1, *divmod(i, plan.train_batches)) for i in range(steps)]
    got = {(e, q) for _, e, q in kept}
    rows = [r for r in history(chaos) if r.get("kind") == "step"]
    restarts = [r for r in history(chaos) if r.get("event") == "restart"]
    return {
        "kills": kills, "steps": b["step"],
        "lost": sum(1 for _, e, q in want if (e, q) not in got),
        "trained_twice": len(kept) - len(got),
        "ledger_in_order": [(e, q) for _, e, q in kept] == [(e, q) for _, e, q in want],
        "steps_redone": len(rows) - steps, "restarts": len(restarts),
        "max_abs_dw": max_abs_diff(a, b),
    }


def _wait_moving(run_dir, past_step: int) -> dict | None:
    """Status once the run is past `past_step` with every stage up; None if it has ended."""
    def moving():
        if holder(run_dir) is None:
            return "ended"
        s = status(run_dir)
        return s if s and s["step"] > past_step and s["state"] in ("training", "degraded") \
            and len(s["processes"]) >= 4 else None

    s = wait_for(moving, timeout=300, what="the chaos run to move")
    return None if s == "ended" else s


# -- scenario: storage faults ----------------------------------------------------------

def storage(work: Path, truncations: int, seed: int = 0) -> dict:
    """A run dir too small for two checkpoints is refused at start; a read-only one too;
    a checkpoint truncated at any length never loads, the previous one does."""
    data = prepared(work)
    out = refusals(work, data)
    out.update(full_disk(work, data))
    # Truncated checkpoints: two real checkpoints from a short run, the newest cut short.
    run = work / "storage-run"
    shutil.rmtree(run, ignore_errors=True)
    start(data, run, "--max-steps", 12, "--checkpoint-every", "0.01")
    wait_for(lambda: holder(run) is None, what="the storage run")
    out.update(truncated_checkpoints(run / "checkpoints", truncations, seed))
    return out


def refusals(work: Path, data: Path) -> dict:
    """`start` on a filesystem too small for two checkpoints, and on a read-only one."""
    from alexnetd.model import checkpoint_bytes

    out, small = {}, work / "small-fs"
    if _mount(small, int(1.5 * checkpoint_bytes(4)), ro=False):
        try:
            result = start(data, small / "run", "--keep-checkpoints", 1, check=False)
            out["full_disk_refused_one_line"] = (result.returncode != 0 and "MiB free" in result.stderr
                                                 and len(result.stderr.strip().splitlines()) == 1)
        finally:
            _umount(small)
    if _mount(small, 1 << 20, ro=False):
        try:
            (small / "run").mkdir(mode=0o700)
            subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
            result = start(data, small / "run", check=False)
            out["read_only_refused_one_line"] = (result.returncode != 0 and "Read-only" in result.stderr
                                                 and "Traceback" not in result.stderr)
        finally:
            _umount(small)
    return out


def truncated_checkpoints(directory: Path, truncations: int, seed: int = 0) -> dict:
    """The newest checkpoint cut at random lengths, as a crash mid-copy leaves it: the
    previous one must load every time, the partial one never."""
    from alexnetd.model import load_latest_checkpoint
    from alexnetd.model.checkpoint import list_checkpoints

    rng = random.Random(seed)
    (prev_step, _), (_, newest) = list_checkpoints(directory)[-2:]
    whole = newest.read_bytes()
    partial_loads = 0
    for _ in range(truncations):
        newest.write_bytes(whole[: rng.randrange(0, len(whole))])
        path, state = load_latest_checkpoint(directory)
        partial_loads += path == newest or state["step"] != prev_step
    newest.write_bytes(whole)
    return {"truncated_checkpoints": truncations, "partial_loads": partial_loads}


def full_disk(work: Path, data: Path) -> dict:
    """Room for two checkpoints at start, then another writer fills the disk: checkpoint
    writes fail and are reported, training goes on; room again: the retry succeeds; full
    again at stop: `stop` says the final checkpoint was not written."""
    from alexnetd.model import checkpoint_bytes, latest_checkpoint, load_checkpoint

    one, small = checkpoint_bytes(4), work / "full-fs"
    if not _mount(small, 2 * one + (40 << 20), ro=False):
        return {"full_disk": "skipped: cannot mount a tmpfs here"}
    run, fill = small / "run", small / "ballast"
    try:
        start(data, run, "--keep-checkpoints", 1, "--checkpoint-every", 0.02, "--augmenters", 1, "--max-epochs", 1000)
        wait_for(lambda: (s := status(run)) and s["checkpoint"], what="a first checkpoint")
        _fill(fill, one // 2)
        failing = wait_for(lambda: (s := status(run)) and s["checkpoint_failures"] >= 1 and s, what="a failed write")
        moving = wait_for(lambda: (s := status(run)) and s["step"] >= failing["step"] + 3 and s, what="training on")
        fill.unlink()
        healed = wait_for(lambda: (s := status(run)) and s["checkpoint"]["step"] > failing["step"]
                          and not s["degraded_reason"] and s, what="the retry")
        _fill(fill, one // 2)
        wait_for(lambda: (s := status(run)) and s["checkpoint_failures"] > healed["checkpoint_failures"], what="full again")
        stopped = cli("stop", "--run-dir", run)
        names = os.listdir(run / "checkpoints")
        return {"full_disk_state": failing["state"], "full_disk_reason": failing["degraded_reason"],
                "full_disk_training_went_on": moving["step"] > failing["step"],
                "full_disk_retry_succeeded": healed["checkpoint"]["step"] > failing["step"],
                "full_disk_stop_exit": stopped.returncode,
                "full_disk_stop_says": stopped.stdout.strip().splitlines()[0] if stopped.stdout.strip() else "",
                "full_disk_files_left": names,
                "full_disk_kept_loads": load_checkpoint(latest_checkpoint(run / "checkpoints"))["step"] > 0,
                "full_disk_tracebacks": (run / "alexnetd.log").read_text().count("Traceback")}
    finally:
        if holder(run) is not None:
            cli("stop", "--run-dir", run, "--now")
        _umount(small)


def _fill(path: Path, leave_free: int) -> None:
    st = os.statvfs(path.parent)
    with open(path, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, st.f_bavail * st.f_frsize - leave_free)


def _mount(path: Path, size: int, ro: bool) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 1024}k,mode=0700", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- scenario: bad files at scale ------------------------------------------------------

FUZZ_KINDS = ("bitflip", "truncate", "header", "empty", "random", "png", "cmyk", "grayscale", "bomb")


def fuzz_jpegs(base: list[bytes], n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """n (kind, bytes) mutations of real JPEGs, cycling through FUZZ_KINDS."""
    import io

    from PIL import Image

    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        kind, src = FUZZ_KINDS[i % len(FUZZ_KINDS)], bytearray(base[i % len(base)])
        if kind == "bitflip":
            for pos in rng.integers(2, len(src), size=int(rng.integers(1, 64))):
                src[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == "truncate":
            src = src[: int(rng.integers(0, len(src)))]
        elif kind == "header":
            for pos in rng.integers(2, min(len(src), 700), size=int(rng.integers(1, 16))):
                src[pos] = int(rng.integers(0, 256))
        elif kind == "empty":
            src = bytearray()
        elif kind == "random":
            src = bytearray(rng.integers(0, 256, size=int(rng.integers(1, 50_000)), dtype=np.uint8).tobytes())
        elif kind == "bomb":
            src = _sof_dims(src, 65500, 65500)  # a tiny file whose header claims 4 gigapixels
        else:
            image = Image.open(io.BytesIO(bytes(src)))
            image = {"png": image, "cmyk": image.convert("CMYK"), "grayscale": image.convert("L")}[kind]
            buf = io.BytesIO()
            image.save(buf, "PNG" if kind == "png" else "JPEG")
            src = bytearray(buf.getvalue())
        out.append((kind, bytes(src)))
    return out


def _sof_dims(data: bytearray, height: int, width: int) -> bytearray:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            break
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 7] = height.to_bytes(2, "big")
            data[i + 7:i + 9] = width.to_bytes(2, "big")
            return data
        i += 2 + length
    return data


def bad_files(work: Path, n: int) -> dict:
    """n fuzzed files in an ImageFolder: through `prepare`, and through the daemon for an
    epoch. Ground truth: the pipeline's decoder on each file, in this process."""
    from alexnetd.pipeline.fakedata import make_fake_data
    from alexnetd.pipeline.jpeg import Decoder, SkipSample

    src = work / "fuzz-src"
    shutil.rmtree(src, ignore_errors=True)
    make_fake_data(src, classes=2, train_per_class=8, val_per_class=2, raw=True, seed=1, progress=False)
    class_dirs = sorted((src / "train").iterdir())
    base = [p.read_bytes() for p in sorted(class_dirs[0].iterdir())][:4]
    for i, (kind, blob) in enumerate(fuzz_jpegs(base, n)):
        (class_dirs[i % 2] / f"fuzz-{i:05d}-{kind}.JPEG").write_bytes(blob)
    from alexnetd.pipeline.dataset import open_dataset

    decoder, truth, crashes = Decoder(), {}, 0
    split = open_dataset(src).split("train")
    for i in range(len(split)):  # keyed as the daemon names them
        try:
            decoder.decode_rgb(split.read(i), min_side=256)
            truth[split.key(i)] = None
        except SkipSample as exc:
            truth[split.key(i)] = exc.reason
        except Exception:  # noqa: BLE001 - a crash of the decoder is the figure we measure
            crashes += 1
            truth[split.key(i)] = "crash"
    bad = {k: v for k, v in truth.items() if v}
    out = {"files": n, "bad_by_reason": _by_reason(bad.values()), "decoder_crashes": crashes,
           "bombs_too_large": sum(1 for k, v in bad.items() if k.endswith("-bomb.JPEG") and v == "too_large"),
           "bombs": sum(1 for k in truth if k.endswith("-bomb.JPEG"))}
    prep = work / "fuzz-prepared"
    result = cli("prepare", src, prep, "--force")
    listed = (prep / "skipped.txt").read_text().splitlines() if (prep / "skipped.txt").exists() else []
    out.update(prepare_exit=result.returncode, prepare_traceback="Traceback" in result.stderr,
               prepare_skipped=len(listed))
    run = work / "fuzz-run"
    shutil.rmtree(run, ignore_errors=True)
    start(src, run, "--max-epochs", 1, "--skip-budget", 1.0, "--batch-size", 16, "--checkpoint-every", 30)
    wait_for(lambda: holder(run) is None, what="the fuzz run")
    rows = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    named = {r["key"]: r["reason"] for r in rows if r["split"] == "train"}
    from alexnetd.pipeline.plan import BatchPlan

    dataset = open_dataset(src)
    split = dataset.split("train")
    plan = BatchPlan.for_dataset(dataset, 16, 7, 0)
    trained = {split.key(int(i)) for q in range(plan.train_batches) for i in plan.samples(0, q)[1]}
    expect = {k: v for k, v in bad.items() if k in trained}
    out.update(daemon_restarts=sum(1 for r in history(run) if r.get("event") == "restart"),
               daemon_named=len(rows), daemon_named_twice=len(rows) - len({(r["split"], r["key"]) for r in rows}),
               daemon_expected=len(expect), daemon_matches_truth=named == expect)
    return out


def _by_reason(reasons) -> dict:
    out: dict = {}
    for r in reasons:
        out[r] = out.get(r, 0) + 1
    return dict(sorted(out.items()))


# -- scenario: hostile frames, exposure, tar shards ------------------------------------

def canary_payload(path: Path) -> bytes:
    """A pickle stream (protocol 0, written out by hand: no pickle module here) whose
    unpickling calls open(path, "w"), creating the canary file: proof that someone
    unpickled. Sending it runs nothing; only a loads() on the other side would."""
    return f"c__builtin__\nopen\n(V{path}\nVw\ntR.".encode()


def hostile_frames(n: int, canary: Path, seed: int = 0) -> list[list[bytes]]:
    rng = random.Random(seed)
    payload = canary_payload(canary)
    headers = [b"{", b"[]", b'"x"', b"null", b'{"v":2,"kind":"ready"}', b'{"v":1,"kind":"nope"}',
               b'{"v":1,"kind":"ready","generation":"x"}', b'{"v":1,"kind":"beat","arrays":[{"dtype":"O","shape":[1]}]}',
               b'{"v":1,"kind":"ready","arrays":[{"dtype":"<f8","shape":[1000000000]}]}',
               b'{"v":1,"kind":"credit","slot":-5,"generation":99}', b'{"v":1,"kind":"request","cmd":["status"]}',
               b"\xff\xfe not utf8", b'{"v":1,"kind":"hello","generation":1e309}']
    frames = []
    for i in range(n):
        pick = i % 5
        if pick == 0:
            frames.append([payload])
        elif pick == 1:
            frames.append([rng.choice(headers)])
        elif pick == 2:
            frames.append([rng.choice(headers), payload])
        elif pick == 3:
            frames.append([rng.randbytes(rng.randrange(0, 512)) for _ in range(rng.randrange(1, 4))])
        else:
            frames.append([b'{"v":1,"kind":"ready","arrays":[{"dtype":"<i8","shape":[4]}]}', rng.randbytes(7)])
    return frames


def hostile(work: Path, frames_per_socket: int, data: Path | None = None) -> dict:
    """Frames into every socket a peer can push into, garbage HTTP at /metrics; then
    /proc/net says what listens. The daemon must keep training and never unpickle."""
    from alexnetd.pipeline.stage import Endpoints
    from alexnetd.service.control import control_endpoint

    data, run, port = data or prepared(work), work / "hostile-run", free_port()
    shutil.rmtree(run, ignore_errors=True)
    canary = work / "canary"
    canary.unlink(missing_ok=True)
    start(data, run, "--max-epochs", 1000, port=port)
    out = {}
    try:
        before = wait_for(lambda: (s := status(run)) and s["step"] >= 1 and s, what="training")
        out.update(exposure(run, before["processes"], holder(run)))
        ends = Endpoints.in_dir(run)
        ctx = zmq.Context.instance()
        frames = hostile_frames(frames_per_socket, canary)
        sent = {}
        # ready (feed), credits (loader), beats (supervisor) are PULL sockets that bind.
        for name in ("ready", "credits", "beats"):
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(getattr(ends, name))
            for f in frames:
                sock.send_multipart(f)
            sock.close()
            sent[name] = len(frames)
        jobs_raw = _raw_garbage(ends.jobs.removeprefix("ipc://"), frames)
        sent["jobs"] = jobs_raw["frames_written"]
        answered = 0
        for f in frames:
            req = ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.setsockopt(zmq.RCVTIMEO, 5000)
            req.connect(control_endpoint(run))
            req.send_multipart(f)
            try:
                req.recv_multipart()
                answered += 1
            except zmq.Again:
                pass
            req.close()
        sent["control"] = len(frames)
        http_ok = 0
        for i in range(max(1, frames_per_socket // 10)):
            http_ok += _http_garbage(port, i)
        after = wait_for(lambda: (s := status(run)) and s["step"] > before["step"] + 2 and s, timeout=300,
                         what="training after the barrage")
        malformed = after.get("malformed") or {}
        metrics_ok = "alexnetd_train_steps_total" in urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        out.update(sent=sent, jobs_raw=jobs_raw, control_answered=answered, counted=malformed, http_requests=max(1, frames_per_socket // 10),
                   metrics_still_served=metrics_ok, kept_training=after["step"] > before["step"],
                   restarts=sum(after["restarts"].values()), canary_appeared=canary.exists())
    finally:
        cli("stop", "--run-dir", run, "--now")
        wait_for(lambda: holder(run) is None, what="the hostile run to exit")
    return out


def _raw_garbage(path: str, frames: list[list[bytes]]) -> dict:
    """The jobs socket is the loader's PUSH: a ZeroMQ peer can only take from it. What a
    writer can still do is speak garbage below ZeroMQ, on the unix socket itself, ten
    frames a connection; the ZMTP handshake refuses it before any alexnetd code reads,
    and hangs up (the frames after that cannot be written)."""
    out = dict(connections=0, frames_written=0, hung_up=0)
    for i in range(0, len(frames), 10):
        out["connections"] += 1
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.settimeout(5)
                raw.connect(path)
                for frame in frames[i:i + 10]:
                    raw.sendall(b"".join(frame))
                    out["frames_written"] += 1
        except OSError:
            out["hung_up"] += 1
    return out


def _http_garbage(port: int, i: int) -> int:
    requests = [b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\xff" * 300, b"POST /metrics HTTP/1.0\r\nContent-Length: 99999999\r\n\r\nab",
                b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"GET /metrics HTTP/9.9\r\n" + b"X: y\r\n" * 500 + b"\r\n"]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(requests[i % len(requests)])
            s.shutdown(socket.SHUT_WR)
            s.recv(1024)
        return 1
    except OSError:
        return 0


def exposure(run_dir: Path, processes: dict, daemon: int) -> dict:
    """Every listening socket of the daemon's processes, from /proc/net (not the config)."""
    inodes = set()
    for pid in [daemon, *processes.values()]:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    tcp, unix = [], []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes and cols[3] == "0A":  # LISTEN
                tcp.append(_addr(cols[1]))
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[6] in inodes and cols[3] == "00010000" and len(cols) > 7:  # __SO_ACCEPTCON: listening
            unix.append(cols[7])
    loopback = all(a.startswith(("127.", "[::1]", "[::ffff:127.")) for a in tcp)
    inside = all(Path(p).resolve().is_relative_to(run_dir.resolve()) for p in unix)
    return {"tcp_listeners": tcp, "unix_listeners": len(unix), "tcp_loopback_only": loopback,
            "unix_in_run_dir": inside, "run_dir_mode": oct(run_dir.stat().st_mode & 0o777)}


def _addr(hexaddr: str) -> str:
    host, port = hexaddr.split(":")
    if len(host) == 8:
        return ".".join(str(b) for b in bytes.fromhex(host)[::-1]) + f":{int(port, 16)}"
    words = [bytes.fromhex(host[i:i + 8])[::-1].hex() for i in range(0, 32, 8)]
    full = "".join(words)
    if full.startswith("00000000000000000000ffff"):
        return "[::ffff:" + ".".join(str(b) for b in bytes.fromhex(full[24:])) + f"]:{int(port, 16)}"
    return "[" + ":".join(full[i:i + 4] for i in range(0, 32, 4)) + f"]:{int(port, 16)}"


def tar_shards(work: Path, data: Path | None = None) -> dict:
    """Members the index points at that are not plain files under relative names are
    refused by the reader (read() raises; the loader sends them empty; they are skipped)."""
    import tarfile

    from alexnetd.pipeline.dataset import open_dataset

    src = data or prepared(work)
    out = {}
    for kind in ("dotdot", "symlink", "device", "absolute"):
        copy = work / f"tar-{kind}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(src, copy)
        split = open_dataset(copy).split("train")
        shard = copy / split._paths[int(split._shard[0])]
        offset = int(split._offset[0])
        with open(shard, "r+b") as fh:
            fh.seek(offset - 512)
            header = bytearray(fh.read(512))
            info = tarfile.TarInfo.frombuf(bytes(header), "ascii", "strict")
            if kind == "dotdot":
                info.name = "../../etc/" + info.name
            elif kind == "absolute":
                info.name = "/etc/" + info.name
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            else:
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            fh.seek(offset - 512)
            fh.write(info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict"))
        try:
            open_dataset(copy).split("train").read(0)
            out[kind] = "read"
        except OSError:
            out[kind] = "refused"
        shutil.rmtree(copy, ignore_errors=True)
    return out


# -- scenario: soak --------------------------------------------------------------------

def soak(work: Path, minutes: float, sample_every: float, data: Path | None = None) -> dict:
    """A long CPU run: RSS and open descriptors of every process sampled; then stop, and
    a SIGKILL of the daemon + start + stop, after which nothing may be left behind."""
    data, run = data or prepared(work), work / "soak-run"
    shutil.rmtree(run, ignore_errors=True)
    start(data, run, "--max-epochs", 100000, "--checkpoint-every", 5)
    samples = []  # (batches, {name: (rss bytes, fds)})
    deadline = time.monotonic() + 60 * minutes
    while time.monotonic() < deadline:
        s = status(run)
        if s:
            procs = dict(s["processes"], daemon=holder(run))
            samples.append((s["step"], {n: _rss_fds(p) for n, p in procs.items()}))
        time.sleep(sample_every)
    cli("stop", "--run-dir", run)
    left_stop = _leftovers(run)
    start(data, run, "--max-epochs", 100000)
    pid = holder(run)
    procs = status(run)["processes"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in procs.values()), timeout=60, what="stages to exit")
    start(data, run, "--max-epochs", 100000)
    cli("stop", "--run-dir", run)
    left_kill = _leftovers(run)
    warm = samples[len(samples) // 3:] if len(samples) >= 3 else samples
    growth, fds = {}, {}
    if len(warm) >= 2:
        (b0, first), (b1, last) = warm[0], warm[-1]
        for name in first:
            if name in last and first[name] and last[name] and b1 > b0:
                growth[name] = round((last[name][0] - first[name][0]) / 2**20 / ((b1 - b0) / 1000), 3)
                fds[name] = last[name][1] - first[name][1]
    return {"minutes": minutes, "batches": samples[-1][0] if samples else 0, "samples": len(samples),
            "rss_growth_mb_per_1000_batches": growth, "fd_change": fds,
            "left_after_stop": left_stop, "left_after_kill_start_stop": left_kill}


def _rss_fds(pid: int | None):
    if pid is None:
        return None
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _leftovers(run: Path) -> list[str]:
    """This run's ring segment and the loader's byte segments named after it (other runs on
    the machine have their own), and socket files."""
    from alexnetd.pipeline.ring import SHM_DIR, ring_name

    wait_for(lambda: holder(run) is None, what="the daemon to exit")
    ring = ring_name(run)
    shm = [f"/dev/shm/{n}" for n in os.listdir(SHM_DIR) if n == ring or n.startswith(ring + "-")]
    socks = [str(p.relative_to(run)) for p in run.rglob("*.sock")]
    return shm + socks


# -- the table -------------------------------------------------------------------------

FULL = dict(kills=20, steps=400, truncations=100, files=1000, frames=10000, soak_minutes=30, soak_every=60)
QUICK = dict(kills=2, steps=48, truncations=20, files=100, frames=10000, soak_minutes=2, soak_every=10)


def run_all(work: Path, p: dict, only: set) -> dict:
    scenarios = {
        "sigkill": lambda: sigkill(work, p["kills"], p["steps"]),
        "storage": lambda: storage(work, p["truncations"]),
        "bad_files": lambda: bad_files(work, p["files"]),
        "hostile": lambda: hostile(work, p["frames"]),
        "tar_shards": lambda: tar_shards(work),
        "soak": lambda: soak(work, p["soak_minutes"], p["soak_every"]),
    }
    results = {}
    for name, fn in scenarios.items():
        if only and name not in only:
            continue
        t = time.monotonic()
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - a scenario that breaks is a row, not the end
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["seconds"] = round(time.monotonic() - t, 1)
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    return results


def table(results: dict) -> str:
    lines = ["| scenario | figure | value |", "|---|---|---|"]
    for name, figures in results.items():
        for key, value in figures.items():
            lines.append(f"| {name} | {key} | {json.dumps(value) if not isinstance(value, str) else value} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few kills, 100 fuzzed files, a 2-minute soak")
    parser.add_argument("--only", default="", help="comma-separated scenarios: " + ",".join(
        ["sigkill", "storage", "bad_files", "hostile", "tar_shards", "soak"]))
    parser.add_argument("--work", help="working directory [a temporary one]")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="alexnetd-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    results = run_all(work, QUICK if args.quick else FULL, set(filter(None, args.only.split(","))))
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
