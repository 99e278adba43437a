"""bench/gpu.py --dry-run: every row of the GPU measurement runs on the CPU with tiny
sizes, so the script a GPU host runs once cannot rot. A real subprocess, as a user
runs it; the JSON and the markdown it writes are what is checked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"
STAGES = {"loader", "augmenter", "copier", "trainer"}
FORMS = ["daemon-cudagraphs-128", "daemon-cudagraphs-256", "daemon-compile-128", "daemon-compile-256"]
CUDA_ONLY = {"synthetic-bf16", "synthetic-bf16_cl", "synthetic-compile", "synthetic-cudagraph", *FORMS}


def bench(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_dry_run_runs_every_row_and_writes_json_and_markdown(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the dry run is the CPU path; a GPU host runs the real thing")
    done = bench("--dry-run", "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["matmul", "synthetic-fp32", "synthetic-bf16", "synthetic-bf16_cl", "synthetic-cudagraph",
                          "daemon", "daemon-cudagraphs-128", "dali", "full-size-cpu", "full-size-dali", "dataloader",
                          "towers", "daemon-cudagraphs-256", "gpu-tests", "synthetic-compile", "daemon-compile-128",
                          "daemon-compile-256"]
    assert not [name for name, row in rows.items() if row["status"] == "failed"]
    for name in CUDA_ONLY:
        assert rows[name]["status"] == "skipped" and rows[name]["reason"], name
    for name in FORMS[:2]:  # the flag reaches `alexnetd start`, which refuses it off CUDA in one line
        assert "--cuda-graphs captures the step on a CUDA device" in rows[name]["reason"], rows[name]

    matmul = rows["matmul"]  # the measured peak: every later row's MFU is against it
    assert matmul["status"] == "ok" and matmul["tflops"] > 0
    step = rows["synthetic-fp32"]
    assert step["mfu"] == pytest.approx(step["tflops"] / matmul["tflops"], rel=0.01)
    assert step["status"] == "ok" and step["ms_per_step"] > 0 and step["batch"] == report["batch"]
    # images/s is rounded to 0.1, ms/step to 0.001
    assert step["images_per_second"] == pytest.approx(step["batch"] / step["ms_per_step"] * 1e3, rel=0.01, abs=0.051)
    assert step["ratio_to_synthetic"] == 1.0

    daemon = rows["daemon"]
    assert daemon["status"] == "ok" and daemon["steps"] > 0 and daemon["images_per_second"] > 0
    assert set(daemon["stages"]) == STAGES and daemon["bottleneck"] in STAGES
    for shares in daemon["stages"].values():
        assert 0 <= shares["busy"] <= 1 and 0 <= shares["starved"] <= 1
    assert daemon["ratio_to_synthetic"] > 0 and daemon["full_size"] is False
    # From full-size JPEGs (an ImageFolder tree): the same daemon, every sample decoded and down-sampled.
    full = rows["full-size-cpu"]
    assert full["status"] == "ok" and full["full_size"] is True and full["steps"] > 0, full
    assert full["decoder"] == "cpu" and full["ratio_to_synthetic"] > 0
    assert rows["full-size-dali"]["status"] in ("ok", "skipped")

    from alexnetd.service.daemoncmds import start

    if not any(p.name == "decoder" for p in start.params):
        assert rows["dali"] == {**rows["dali"], "status": "skipped", "reason": "alexnetd has no --decoder dali yet"}
    assert rows["dataloader"]["status"] == "ok" and rows["dataloader"]["images_per_second"] > 0
    assert rows["towers"]["status"] == "ok" and rows["towers"]["equal"] is True
    assert rows["towers"]["gradient_relative_error"] <= rows["towers"]["bound"]
    tests = rows["gpu-tests"]
    assert tests["tests"] >= 1 and tests["skipped"] == tests["tests"]  # collected, and skipped without CUDA
    assert tests["failures"] == tests["errors"] == 0

    assert report["flops_per_image"] > 1e9 and report["device"] == "cpu"
    # Targets are reported, but judged only on CUDA.
    assert len(report["targets"]) == 4 and all(t["met"] is None for t in report["targets"])

    markdown = (tmp_path / "gpu.md").read_text()
    assert markdown == done.stdout
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| row | status | ms/step | images/s")
    assert [line.split(" | ")[0][2:] for line in table[1:]] == [row["label"] for row in report["rows"]]
    assert "alexnetd has no --decoder dali yet" in markdown or "--decoder dali" in markdown


@pytest.mark.parametrize("args, words", [
    (["--wheels", "/nonexistent/wheels"], "no such directory"),
    (["--only", "synthetic-fp32,warp-drive"], "unknown rows: warp-drive"),
])
def test_mistakes_are_one_line(tmp_path, args, words):
    done = bench("--dry-run", "--out", tmp_path, *args, timeout=120)
    assert done.returncode != 0
    assert words in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "gpu.json").exists()


def test_the_bench_names_the_library_variable_alexnetd_reads():
    """bench/gpu.py spells the variable out (it is set before alexnetd can import)."""
    from alexnetd.pipeline.jpeg import TURBOJPEG_LIB_ENV

    assert f'TURBOJPEG_LIB_ENV = "{TURBOJPEG_LIB_ENV}"' in (ROOT / "bench" / "gpuhost.py").read_text()


def test_a_wheel_split_into_parts_is_joined_only_when_every_part_arrived_intact(tmp_path):
    """DALI's wheel travels to a GPU host in parts over consecutive calls: the parts are
    joined and checked there, and a part that did not arrive (a fresh machine between
    calls) or arrived damaged is named, never installed."""
    import hashlib
    import os

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpuhost
    finally:
        sys.path.remove(str(ROOT / "bench"))
    wheel = tmp_path / "nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl"
    data = os.urandom(5 * (1 << 20) + 123)
    wheel.write_bytes(data)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpuhost.py"), "split", str(wheel),
                           str(tmp_path / "first"), "--part-mib", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    parts = [Path(line) for line in done.stdout.split()]
    wheel.unlink()  # the GPU host has only the parts
    assert [p.name[len(wheel.name):] for p in parts] == [".part-1-of-3", ".part-2-of-3", ".part-3-of-3"]
    assert all(p.stat().st_size <= 2 << 20 for p in parts)
    # One sub-folder per call, as they are carried; the last part not there yet.
    for k, part in enumerate(parts[1:], 2):
        (tmp_path / f"call{k}").mkdir()
        part.rename(tmp_path / f"call{k}" / part.name)
    (tmp_path / "call3" / parts[2].name).rename(tmp_path / parts[2].name)
    held = (tmp_path / parts[2].name).read_bytes()
    (tmp_path / parts[2].name).unlink()
    missing = gpuhost.join_parts(tmp_path)
    assert parts[2].name in missing["nvidia-dali-cuda130"] and "not carried" in missing["nvidia-dali-cuda130"]
    assert not list(tmp_path.rglob("*.whl"))
    (tmp_path / "call3" / parts[2].name).write_bytes(held[:-1] + bytes([held[-1] ^ 1]))  # damaged on the way
    assert "sha256" in gpuhost.join_parts(tmp_path)["nvidia-dali-cuda130"]
    assert not list(tmp_path.rglob("*.whl"))
    (tmp_path / "call3" / parts[2].name).write_bytes(held)
    assert gpuhost.join_parts(tmp_path) == {}
    joined = tmp_path / "first" / wheel.name
    assert hashlib.sha256(joined.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert gpuhost.join_parts(tmp_path) == {}  # a later call finds it joined
