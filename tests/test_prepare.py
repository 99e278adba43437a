"""prepare: ImageFolder → shards, bad files skipped by reason, output only when complete."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from alexnetd.pipeline.dataset import DatasetError, open_dataset
from alexnetd.pipeline.fakedata import CONVERTIBLE_KINDS, CORRUPT_KINDS, CORRUPT_REASON
from alexnetd.pipeline.jpeg import Decoder
from alexnetd.pipeline.prepare import prepare
from alexnetd.service.cli import main
from daemon_helpers import wait_for

ALEXNETD = str(Path(sys.executable).with_name("alexnetd"))


def raw_counts(raw_data: Path) -> tuple[int, int]:
    params = json.loads((raw_data / "fake-data.json").read_text())
    return params["classes"] * params["train_per_class"], params["classes"] * params["val_per_class"]


@pytest.fixture(scope="module")
def prepared_raw(raw_data, tmp_path_factory):
    """raw_data prepared once, in-process, with one worker and small shards."""
    out = tmp_path_factory.mktemp("prepare") / "out"
    report = prepare(raw_data, out, workers=1, shard_size=256 << 10, progress=False)
    return out, report


def test_counts_converted_and_skipped_by_reason(raw_data, prepared_raw):
    out, report = prepared_raw
    good_train, good_val = raw_counts(raw_data)
    assert report.converted == {"train": good_train + len(CONVERTIBLE_KINDS), "val": good_val}
    assert report.skipped == Counter(CORRUPT_REASON.values())  # truncated 2, undecodable 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == dict(report.skipped)
    ds = open_dataset(out)
    assert (len(ds.split("train")), len(ds.split("val"))) == (good_train + 3, good_val)
    lines = (out / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[1] for line in lines) == sorted(CORRUPT_REASON.values())
    assert all(line.startswith("train/") and " at 0x" not in line for line in lines)


def test_every_image_is_a_256_square_labelled_by_its_folder(raw_data, prepared_raw):
    out, _ = prepared_raw
    ds = open_dataset(out)
    src = open_dataset(raw_data)
    assert ds.classes == src.classes and ds.class_names == src.class_names
    assert len(ds.manifest["splits"]["train"]["shards"]) > 1
    decoder = Decoder()
    for name in ds.splits:
        sp = ds.split(name)
        for i in range(len(sp)):
            assert decoder.decode_rgb(sp.read(i)).shape == (256, 256, 3)
        if name == "train":  # keys keep the ImageNet names, so the label can be checked
            for i in range(len(sp)):
                wnid = sp.key(i).split(":")[1].rsplit("_", 1)[0]
                assert ds.classes[sp.labels[i]] == wnid


def test_pixels_are_the_papers_central_256_crop_of_the_source(raw_data, prepared_raw):
    out, _ = prepared_raw
    sp = open_dataset(out).split("val")
    decoder = Decoder()
    for i in range(len(sp)):
        source = (raw_data / "val").glob(f"*/{sp.key(i).split(':')[1]}.JPEG")
        want = decoder.decode_square(next(source).read_bytes(), 256).astype(np.float32)
        got = decoder.decode_rgb(sp.read(i)).astype(np.float32)
        assert np.abs(got - want).mean() < 3.0  # only the q90 re-encoding differs


def test_convertible_files_are_kept_as_rgb(raw_data, prepared_raw):
    out, _ = prepared_raw
    sp = open_dataset(out).split("train")
    keys = {sp.key(i).split(":")[1] for i in range(len(sp))}
    good_train, _ = raw_counts(raw_data)
    per_class = good_train // 3
    bad_stems = {f"n9{k % 3:07d}_{per_class + k}": kind for k, kind in enumerate(CORRUPT_KINDS)}
    assert {stem for stem, kind in bad_stems.items() if stem in keys} == {
        stem for stem, kind in bad_stems.items() if kind in CONVERTIBLE_KINDS
    }


def test_stats_equal_a_direct_computation_over_the_prepared_images(prepared_raw):
    out, _ = prepared_raw
    ds = open_dataset(out)
    sp = ds.split("train")
    decoder = Decoder()
    images = np.stack([decoder.decode_rgb(sp.read(i)) for i in range(len(sp))]).astype(np.float64)
    mean, eigvals, eigvecs = ds.stats()
    np.testing.assert_allclose(mean, images.mean(axis=0), atol=1e-4)
    want_vals, want_vecs = np.linalg.eigh(np.cov(images.reshape(-1, 3), rowvar=False, bias=True))
    np.testing.assert_allclose(eigvals, want_vals[::-1], rtol=1e-9)
    np.testing.assert_allclose(np.abs(eigvecs.T @ want_vecs[:, ::-1]), np.eye(3), atol=1e-9)


def test_two_workers_write_the_same_bytes_as_one(raw_data, prepared_raw, tmp_path):
    one, _ = prepared_raw
    two = tmp_path / "two"
    prepare(raw_data, two, workers=2, shard_size=256 << 10, progress=False)

    def digest(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digest(two) == digest(one)


def test_cli_prints_a_summary_line(raw_data, tmp_path):
    good_train, good_val = raw_counts(raw_data)
    result = CliRunner().invoke(main, ["prepare", str(raw_data), str(tmp_path / "out"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    converted = good_train + len(CONVERTIBLE_KINDS) + good_val
    assert f"converted {converted} " in result.output
    assert "skipped 3 (truncated 2, undecodable 1)" in result.output and "images/s" in result.output


def test_existing_output_needs_force(raw_data, tmp_path):
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(main, ["prepare", str(raw_data), str(out), "--workers", "1"]).exit_code == 0
    result = runner.invoke(main, ["prepare", str(raw_data), str(out), "--workers", "1"])
    assert result.exit_code != 0 and f"{out}: already exists" in result.output
    result = runner.invoke(main, ["prepare", str(raw_data), str(out), "--workers", "1", "--force", "--quality", "50"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["source"]["quality"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _bad_cli_case(tmp_path: Path, raw_data: Path, prepared_data: Path, how: str) -> tuple[list[str], str]:
    out = str(tmp_path / "out")
    if how == "src missing":
        return [str(tmp_path / "nope"), out], f"{tmp_path / 'nope'}: no such directory"
    if how == "src not a dataset":
        (tmp_path / "empty").mkdir()
        return [str(tmp_path / "empty"), out], "not a dataset"
    if how == "src has no classes":
        (tmp_path / "src" / "train").mkdir(parents=True)
        return [str(tmp_path / "src"), out], "train: no classes"
    if how == "val class unknown to train":
        (tmp_path / "src" / "train" / "cat").mkdir(parents=True)
        (tmp_path / "src" / "train" / "cat" / "a.JPEG").write_bytes(b"x")
        (tmp_path / "src" / "val" / "dog").mkdir(parents=True)
        return [str(tmp_path / "src"), out], "class 'dog' not in train/"
    if how == "src already prepared":
        return [str(prepared_data), out], "already a prepared dataset"
    if how == "nothing decodes":
        (tmp_path / "src" / "train" / "cat").mkdir(parents=True)
        (tmp_path / "src" / "train" / "cat" / "a.JPEG").write_bytes(b"not a jpeg")
        return [str(tmp_path / "src"), out], "no training image could be decoded"
    if how == "out is a file":
        Path(out).write_text("x")
        return [str(raw_data), out, "--force"], "not a prepared dataset"
    if how == "bad shard size":
        return [str(raw_data), out, "--shard-size", "lots"], "is not a size"
    if how == "bad quality":
        return [str(raw_data), out, "--quality", "0"], "--quality"
    if how == "bad workers":
        return [str(raw_data), out, "--workers", "0"], "--workers"
    raise AssertionError(how)


BAD_CLI = ["src missing", "src not a dataset", "src has no classes", "val class unknown to train",
           "src already prepared", "nothing decodes", "out is a file", "bad shard size", "bad quality", "bad workers"]


@pytest.mark.parametrize("how", BAD_CLI)
def test_bad_input_gives_one_line_and_no_traceback(tmp_path, raw_data, prepared_data, how):
    args, message = _bad_cli_case(tmp_path, raw_data, prepared_data, how)
    result = CliRunner().invoke(main, ["prepare", "--workers", "1", *args])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert message in result.output and "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1
    assert not (tmp_path / "out").is_dir() and not (tmp_path / "out.partial").exists()


def test_bad_input_through_the_real_command(tmp_path):
    proc = subprocess.run([ALEXNETD, "prepare", str(tmp_path / "nope"), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"Error: {tmp_path / 'nope'}: no such directory"


def _start_and_catch_mid_way(src: Path, out: Path, *extra: str) -> subprocess.Popen:
    """Start a real prepare; return once its journal holds a finished shard (it is mid-way)."""
    proc = subprocess.Popen([ALEXNETD, "prepare", str(src), str(out), "--workers", "1", "--shard-size", "64K", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = out.parent / f"{out.name}.partial" / ".journal"
    wait_for(lambda: proc.poll() is not None or (journal.is_dir() and any(journal.glob("train-*.json"))),
             timeout=120, what="prepare's first finished shard", every=0.005)
    assert proc.poll() is None, "prepare finished before it could be interrupted"
    return proc


def _tree_bytes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_killed_prepare_is_not_a_dataset_and_the_same_command_continues_it(raw_data, prepared_raw, tmp_path):
    out = tmp_path / "out"
    proc = _start_and_catch_mid_way(raw_data, out)
    proc.kill()
    proc.wait()
    assert not out.exists()
    partial = tmp_path / "out.partial"
    with pytest.raises(DatasetError, match="no manifest.json"):
        open_dataset(partial)
    kept = {p.name: p.stat().st_ino for p in (partial / "train").iterdir()
            if (partial / ".journal" / (p.stem + ".json")).is_file()}
    assert kept, "the killed run had journaled no finished shard"
    report = prepare(raw_data, out, workers=1, shard_size=64 << 10, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert report.kept_shards == len(kept)
    # Kept means kept: the same files, not rewritten ones.
    assert {name: (out / "train" / name).stat().st_ino for name in kept} == kept
    whole = tmp_path / "whole"
    prepare(raw_data, whole, workers=1, shard_size=64 << 10, progress=False)
    assert _tree_bytes(out) == _tree_bytes(whole)


def test_terminated_prepare_keeps_its_work_and_says_how_to_continue(raw_data, tmp_path):
    out = tmp_path / "out"
    proc = _start_and_catch_mid_way(raw_data, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate()
    assert proc.returncode != 0 and b"Traceback" not in stderr
    assert "run the same command again to continue" in stderr.decode()
    assert sorted(os.listdir(tmp_path)) == ["out.partial"]


def test_a_partial_from_other_options_is_refused_unless_forced(raw_data, tmp_path):
    out = tmp_path / "out"
    proc = _start_and_catch_mid_way(raw_data, out)
    proc.kill()
    proc.wait()
    runner = CliRunner()
    same = ["prepare", str(raw_data), str(out), "--workers", "1", "--shard-size", "64K"]
    result = runner.invoke(main, [*same, "--quality", "50"])
    assert result.exit_code != 0 and "started with other options (changed: quality)" in result.output
    result = runner.invoke(main, [*same, "--quality", "50", "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["source"]["quality"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
