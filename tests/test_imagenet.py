"""prepare from ImageNet as downloaded: the official archives, Kaggle's layout, a train/ of
class tars. The truth each test holds the output to is read here, from the devkit and
the CSVs, as a user's own script would, never from the code under test."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import scipy.io
import torch
from click.testing import CliRunner
from PIL import Image

from alexnetd.model.alexnet import AlexNet
from alexnetd.model.checkpoint import save_checkpoint
from alexnetd.pipeline.dataset import DatasetError, open_dataset
from alexnetd.pipeline.fakeimagenet import make_fake_imagenet
from alexnetd.pipeline.imagenetmeta import md5_mismatches
from alexnetd.pipeline.prepare import prepare
from alexnetd.service.cli import main
from daemon_helpers import wait_for

ALEXNETD = str(Path(sys.executable).with_name("alexnetd"))
CLASSES, TRAIN, VAL = 5, 6, 3


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("downloads")
    return {layout: make_fake_imagenet(root / layout, layout, CLASSES, TRAIN, VAL) and root / layout
            for layout in ("ilsvrc2012", "kaggle")}


@pytest.fixture(scope="module")
def prepared(downloads, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("prepared")
    return {layout: (root / layout, prepare(src, root / layout, workers=1, shard_size=64 << 10, progress=False))
            for layout, src in downloads.items()}


def truth_ilsvrc2012(src: Path) -> tuple[list[str], dict[str, str], dict[str, str], dict[str, str]]:
    """(sorted WNIDs, {train stem: wnid}, {val stem: wnid}, {wnid: words}) from the files."""
    with tarfile.open(src / "ILSVRC2012_devkit_t12.tar.gz") as devkit:
        meta = devkit.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()
        truth = devkit.extractfile("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read()
    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    leaves = [s for s in synsets if s["num_children"] == 0]
    wnid_of_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
    words = {str(s["WNID"]): str(s["words"]) for s in leaves}
    val = {f"ILSVRC2012_val_{n:08d}": wnid_of_id[int(i)] for n, i in enumerate(truth.split(), start=1)}
    train = {}
    with tarfile.open(src / "ILSVRC2012_img_train.tar") as outer:
        for member in outer.getmembers():
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                train.update({Path(m.name).stem: member.name[:-4] for m in inner.getmembers()})
    return sorted(words), train, val, words


def truth_kaggle(src: Path):
    data = src / "ILSVRC" / "Data" / "CLS-LOC"
    train = {p.stem: p.parent.name for p in (data / "train").glob("*/*.JPEG")}
    with open(src / "LOC_val_solution.csv", newline="") as f:
        val = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    words = dict(line.split(" ", 1) for line in (src / "LOC_synset_mapping.txt").read_text().splitlines())
    return sorted(words), train, val, words


TRUTH = {"ilsvrc2012": truth_ilsvrc2012, "kaggle": truth_kaggle}


def samples(out: Path, split: str) -> dict[str, int]:
    sp = open_dataset(out).split(split)
    return {sp.key(i).split(":", 1)[1]: int(sp.labels[i]) for i in range(len(sp))}


@pytest.mark.parametrize("layout", ["ilsvrc2012", "kaggle"])
def test_every_label_is_the_sorted_wnid_the_label_files_give(downloads, prepared, layout):
    wnids, train, val, words = TRUTH[layout](downloads[layout])
    out, report = prepared[layout]
    ds = open_dataset(out)
    assert ds.classes == wnids and ds.class_names == [words[w] for w in wnids]
    for split, truth in (("train", train), ("val", val)):
        got = samples(out, split)
        assert len(got) == len(truth) == {"train": CLASSES * TRAIN, "val": CLASSES * VAL}[split]
        assert got == {stem: wnids.index(w) for stem, w in truth.items()}
    assert report.converted == {"train": CLASSES * TRAIN, "val": CLASSES * VAL} and not report.skipped


def test_the_devkit_ids_are_not_the_labels(downloads):
    """The miniature keeps the trap of the real devkit: ILSVRC2012_ID order is not WNID order."""
    with tarfile.open(downloads["ilsvrc2012"] / "ILSVRC2012_devkit_t12.tar.gz") as devkit:
        meta = devkit.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()
    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    leaves = sorted((int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in synsets if s["num_children"] == 0)
    assert [w for _, w in leaves] != sorted(w for _, w in leaves)
    assert len(synsets) > len(leaves)  # ancestors too


@pytest.mark.parametrize("layout", ["ilsvrc2012", "kaggle"])
def test_the_cmyk_jpeg_and_the_png_are_converted_and_counted(downloads, prepared, layout):
    out, report = prepared[layout]
    assert report.kinds == {"cmyk": 1, "png": 1}
    assert "1 CMYK JPEG converted" in report.summary() and "1 PNG named .JPEG converted" in report.summary()
    # Which files they are, found here by opening the sources with Pillow.
    kinds = {}
    for stem, data in _train_files(downloads[layout]):
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "PNG" or im.mode == "CMYK":
                kinds[stem] = im.format if im.format == "PNG" else "CMYK"
    assert sorted(kinds.values()) == ["CMYK", "PNG"]
    sp = open_dataset(out).split("train")
    keys = {sp.key(i).split(":", 1)[1]: i for i in range(len(sp))}
    for stem in kinds:
        with Image.open(io.BytesIO(sp.read(keys[stem]))) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (256, 256))


def _train_files(src: Path):
    if (src / "ILSVRC2012_img_train.tar").is_file():
        with tarfile.open(src / "ILSVRC2012_img_train.tar") as outer:
            for member in outer.getmembers():
                with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                    for m in inner.getmembers():
                        yield Path(m.name).stem, inner.extractfile(m).read()
    else:
        for p in sorted((src / "ILSVRC" / "Data" / "CLS-LOC" / "train").glob("*/*.JPEG")):
            yield p.stem, p.read_bytes()


def test_predict_names_the_classes_with_the_devkits_words(downloads, prepared, tmp_path):
    out, _ = prepared["ilsvrc2012"]
    wnids, _, _, words = truth_ilsvrc2012(downloads["ilsvrc2012"])
    ds = open_dataset(out)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AlexNet(num_classes=CLASSES).state_dict().items()}
    weights = {k: torch.zeros(shape) for k, shape in shapes.items()}
    weights["fc8.bias"] = torch.arange(CLASSES, dtype=torch.float32)  # the last class wins
    state = {"model": weights, "step": 1, "epoch": 0, "next_seq": 0, "config": {"num_classes": CLASSES},
             "dataset_fingerprint": ds.fingerprint}  # no names: predict takes them from the dataset
    ckpt = save_checkpoint(tmp_path / "ckpt", state, keep=1)
    image = tmp_path / "x.jpg"
    Image.new("RGB", (300, 260), (120, 80, 40)).save(image)
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(ckpt), "--data", str(out), str(image)])
    assert result.exit_code == 0, result.output
    top = result.stdout.splitlines()[1]
    assert wnids[-1] in top and words[wnids[-1]] in top


def test_a_train_folder_of_class_tars_prepares_like_the_archives(downloads, prepared, tmp_path):
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    with tarfile.open(downloads["ilsvrc2012"] / "ILSVRC2012_img_train.tar") as outer:
        for member in outer.getmembers():
            (src / "train" / member.name).write_bytes(outer.extractfile(member).read())
    os.link(downloads["ilsvrc2012"] / "ILSVRC2012_devkit_t12.tar.gz", src / "ILSVRC2012_devkit_t12.tar.gz")
    result = CliRunner().invoke(main, ["prepare", str(src), str(tmp_path / "out"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("layout: a train/ of ILSVRC2012 class tars")
    assert "train only" in result.output
    assert samples(tmp_path / "out", "train") == samples(prepared["ilsvrc2012"][0], "train")


def test_train_only_is_allowed_and_says_so(downloads, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.link(downloads["ilsvrc2012"] / "ILSVRC2012_img_train.tar", src / "ILSVRC2012_img_train.tar")
    result = CliRunner().invoke(main, ["prepare", str(src), str(tmp_path / "out"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "train only: no ILSVRC2012_img_val.tar" in result.output
    ds = open_dataset(tmp_path / "out")
    assert ds.splits == ("train",) and ds.class_names == ds.classes  # no devkit: no words


def test_workers_do_not_change_a_byte(downloads, prepared, tmp_path):
    prepare(downloads["ilsvrc2012"], tmp_path / "two", workers=2, shard_size=64 << 10, progress=False)
    assert _tree(tmp_path / "two") == _tree(prepared["ilsvrc2012"][0])


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_sigkilled_prepare_continues_to_the_same_bytes(downloads, prepared, tmp_path):
    src, out = downloads["ilsvrc2012"], tmp_path / "out"
    for _ in range(2):  # killed twice, at two different places
        proc = subprocess.Popen([ALEXNETD, "prepare", str(src), str(out), "--workers", "1", "--shard-size", "64K"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        journal = tmp_path / "out.partial" / ".journal"
        before = len(list(journal.glob("*-*.json"))) if journal.is_dir() else 0
        wait_for(lambda: proc.poll() is not None or len(list(journal.glob("*-*.json"))) > before,
                 timeout=120, what="one more finished shard", every=0.005)
        assert proc.poll() is None, "prepare finished before it could be killed"
        proc.kill()
        proc.wait()
        assert not out.exists()
    result = CliRunner().invoke(main, ["prepare", str(src), str(out), "--workers", "1", "--shard-size", "64K"])
    assert result.exit_code == 0, result.output
    assert "finished shards kept" in result.output
    assert _tree(out) == _tree(prepared["ilsvrc2012"][0])


def test_verify_names_the_file_whose_md5_is_not_the_published_one(downloads, tmp_path):
    src = downloads["ilsvrc2012"]
    files = sorted(src.iterdir())
    own = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in files}
    assert md5_mismatches(files, own) == []
    damaged = tmp_path / "ILSVRC2012_img_val.tar"
    damaged.write_bytes((src / "ILSVRC2012_img_val.tar").read_bytes()[:-1024])  # a truncated download
    (bad,) = md5_mismatches([damaged], own)
    assert bad.startswith(f"{damaged}: MD5 ") and "truncated" in bad
    # The miniature is not the real download: --verify stops before any work, naming a file.
    result = CliRunner().invoke(main, ["prepare", str(src), str(tmp_path / "out"), "--verify"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "ILSVRC2012_devkit_t12.tar.gz: MD5" in result.output and not (tmp_path / "out.partial").exists()


def _bad_layout(how: str, downloads: dict, tmp: Path) -> tuple[Path, str]:
    official, kaggle = downloads["ilsvrc2012"], downloads["kaggle"]
    src = tmp / "src"
    src.mkdir()
    if how == "the train tar itself":
        return official / "ILSVRC2012_img_train.tar", "ILSVRC2012_img_train.tar itself; give the folder"
    if how == "val tar without the devkit":
        for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
            os.link(official / name, src / name)
        return src, "ILSVRC2012_devkit_t12.tar.gz: missing; ILSVRC2012_img_val.tar's labels"
    if how == "val tar without the train tar":
        os.link(official / "ILSVRC2012_img_val.tar", src / "ILSVRC2012_img_val.tar")
        return src, "ILSVRC2012_img_train.tar: missing"
    if how == "a flat val/ with no labels":
        (src / "train" / "n90000000").mkdir(parents=True)
        (src / "val").mkdir()
        for name in ("train/n90000000/n90000000_1.JPEG", "val/ILSVRC2012_val_00000001.JPEG"):
            Image.new("RGB", (64, 64)).save(src / name, "JPEG")
        return src, "the labels of"
    if how == "Kaggle's CLS-LOC without its CSVs":
        import shutil

        shutil.copytree(kaggle / "ILSVRC", src / "ILSVRC")
        return src / "ILSVRC" / "Data" / "CLS-LOC", "the labels of"
    raise AssertionError(how)


BAD = ["the train tar itself", "val tar without the devkit", "val tar without the train tar",
       "a flat val/ with no labels", "Kaggle's CLS-LOC without its CSVs"]


@pytest.mark.parametrize("how", BAD)
def test_an_incomplete_download_is_one_line_naming_what_is_missing(downloads, tmp_path, how):
    src, message = _bad_layout(how, downloads, tmp_path)
    result = CliRunner().invoke(main, ["prepare", str(src), str(tmp_path / "out"), "--workers", "1"])
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not (tmp_path / "out").exists()


def test_kaggles_cls_loc_folder_finds_its_labels_above_it(downloads, prepared, tmp_path):
    src = downloads["kaggle"] / "ILSVRC" / "Data" / "CLS-LOC"
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["prepare", str(src), str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    for split in ("train", "val"):
        assert samples(out, split) == samples(prepared["kaggle"][0], split)


@pytest.mark.parametrize("where", ["archives", "kaggle", "class tars"])
def test_start_on_a_raw_download_names_it_and_the_prepare_command(downloads, tmp_path, where):
    if where == "class tars":
        data = tmp_path / "imagenet"
        (data / "train").mkdir(parents=True)
        (data / "train" / "n01440764.tar").write_bytes(b"\0" * 1024)
    else:
        data = downloads["ilsvrc2012" if where == "archives" else "kaggle"]
    with pytest.raises(DatasetError) as caught:
        open_dataset(data)
    assert f"alexnetd prepare {data} {data}-prepared" in str(caught.value)
    proc = subprocess.run([ALEXNETD, "start", "--data", str(data), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "not a dataset yet" in line and f"alexnetd prepare {data}" in line


def test_progress_off_a_terminal_is_a_line_now_and_then_with_rate_and_time_left(monkeypatch):
    import alexnetd.pipeline.progress as progress

    class Log(io.StringIO):
        def isatty(self):
            return False

    log = Log()
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)  # every update prints: the line itself is under test
    bar = progress.Progress("train", total=1000, done=100, stream=log)
    bar.update(50)
    bar.close()
    (line,) = log.getvalue().splitlines()
    assert line.startswith("prepare train: 150/1000 images, ") and " images/s" in line and "left" in line
    assert "\r" not in log.getvalue()
