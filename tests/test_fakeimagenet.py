"""fake-data --layout ilsvrc2012|kaggle: ImageNet's download layouts in miniature, with
its traps, reproducible, and read back only through the label files a user's tools read."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner
from PIL import Image

from alexnetd.pipeline.fakedata import wnid
from alexnetd.pipeline.fakeimagenet import SYNSET_FIELDS, make_fake_imagenet
from alexnetd.service.cli import main

SMALL = dict(classes=3, train_per_class=3, val_per_class=2, seed=0)
N_TRAIN, N_VAL = 9, 6
WNIDS = [wnid(c) for c in range(3)]
CLS_LOC = "ILSVRC/Data/CLS-LOC"


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ilsvrc") / "imagenet"
    return out, make_fake_imagenet(out, "ilsvrc2012", **SMALL)


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("kaggle") / "imagenet"
    return out, make_fake_imagenet(out, "kaggle", **SMALL)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of every file member, in archive order."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def read_devkit(out: Path):
    """meta.mat's synsets and the ground-truth lines, straight from the tarball."""
    members = dict(tar_members((out / "ILSVRC2012_devkit_t12.tar.gz").read_bytes()))
    meta = scipy.io.loadmat(io.BytesIO(members["ILSVRC2012_devkit_t12/data/meta.mat"]), squeeze_me=True)["synsets"]
    truth = members["ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"].decode().splitlines()
    return meta, truth, members


def kaggle_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "PredictionString"]
    return rows[1:]


def image_format(data: bytes) -> tuple[str, str, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as im:
        return im.format, im.mode, im.size


# -- reproducibility ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["ilsvrc2012", "kaggle"])
def test_same_arguments_give_byte_identical_output(tmp_path, ilsvrc, kaggle, layout):
    first, summary = ilsvrc if layout == "ilsvrc2012" else kaggle
    again = make_fake_imagenet(tmp_path / "again", layout, **SMALL)
    assert tree_digest(tmp_path / "again") == tree_digest(first)
    assert again == summary | {"out": str(tmp_path / "again")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp dir left


def test_a_different_seed_gives_different_images(tmp_path, ilsvrc):
    make_fake_imagenet(tmp_path / "other", "ilsvrc2012", **(SMALL | {"seed": 1}))
    a, b = tree_digest(ilsvrc[0]), tree_digest(tmp_path / "other")
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)


def test_tar_headers_carry_nothing_from_the_host(ilsvrc):
    out = ilsvrc[0]
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        with tarfile.open(out / name) as tar:
            for m in tar.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
    gz = (out / "ILSVRC2012_devkit_t12.tar.gz").read_bytes()
    assert gz[4:8] == b"\0\0\0\0" and not gz[3] & 0x08  # gzip mtime 0, no file name stored


# -- ilsvrc2012 ----------------------------------------------------------------------


def test_ilsvrc2012_is_three_files_with_a_tar_of_per_class_tars(ilsvrc):
    out, summary = ilsvrc
    assert sorted(p.name for p in out.iterdir()) == summary["files"] == [
        "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]
    outer = tar_members((out / "ILSVRC2012_img_train.tar").read_bytes())
    names = [n for n, _ in outer]
    assert sorted(names) == [f"{w}.tar" for w in WNIDS] and names != sorted(names)
    numbers = set()
    for name, data in outer:
        w = name.removesuffix(".tar")
        inner = [n for n, _ in tar_members(data)]
        assert len(inner) == SMALL["train_per_class"] and inner != sorted(inner)
        assert all(re.fullmatch(rf"{w}_\d+\.JPEG", n) for n in inner)
        numbers |= {int(n.split("_")[1].split(".")[0]) for n in inner}
    assert len(numbers) == N_TRAIN and max(numbers) - min(numbers) > N_TRAIN  # not 0..n-1
    assert summary["train"] == N_TRAIN and summary["val"] == N_VAL and summary["test"] == 0


def test_ilsvrc2012_val_is_flat_shuffled_and_labelled_by_the_ground_truth(ilsvrc):
    out, _ = ilsvrc
    names = [n for n, _ in tar_members((out / "ILSVRC2012_img_val.tar").read_bytes())]
    assert sorted(names) == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, N_VAL + 1)] and names != sorted(names)
    meta, truth, members = read_devkit(out)
    assert len(truth) == N_VAL and all(line.isdigit() for line in truth)
    leaf_ids = {int(s["ILSVRC2012_ID"]) for s in meta if int(s["num_children"]) == 0}
    assert {int(line) for line in truth} == leaf_ids  # every class in val
    assert [int(line) for line in truth] != sorted(int(line) for line in truth)  # classes mixed
    assert "ILSVRC2012_devkit_t12/readme.txt" in members


def test_devkit_reads_the_way_torchvision_reads_it(ilsvrc):
    out, _ = ilsvrc
    members = dict(tar_members((out / "ILSVRC2012_devkit_t12.tar.gz").read_bytes()))
    path = out.parent / "meta.mat"
    path.write_bytes(members["ILSVRC2012_devkit_t12/data/meta.mat"])
    # torchvision.datasets.imagenet.parse_meta_mat, verbatim
    meta = scipy.io.loadmat(path, squeeze_me=True)["synsets"]
    nums_children = list(zip(*meta))[4]
    leaves = [meta[i] for i, n in enumerate(nums_children) if n == 0]
    ids, wnids, words = list(zip(*leaves))[:3]
    assert sorted(ids) == [1, 2, 3] and sorted(wnids) == WNIDS
    assert meta.dtype.names == SYNSET_FIELDS
    by_id = dict(zip(ids, wnids))
    assert by_id[1] != min(wnids)  # IDs are not the sorted-WNID order
    assert all(", " in w for w in words) and len(set(words)) == len(words)
    classes = [tuple(w.split(", ")) for w in words]  # what torchvision makes of them
    assert all(len(c) == 2 for c in classes)


def test_devkit_holds_ancestors_above_the_classes(ilsvrc):
    meta, _, _ = read_devkit(ilsvrc[0])
    rows = {int(s["ILSVRC2012_ID"]): s for s in meta}
    assert sorted(rows) == list(range(1, len(meta) + 1))
    inner = [s for s in meta if int(s["num_children"]) > 0]
    assert 2 <= len(inner) <= 3
    reached = set()
    for s in inner:
        assert int(s["ILSVRC2012_ID"]) > 3 and str(s["WNID"]).startswith("n8") and int(s["wordnet_height"]) > 0
        children = np.atleast_1d(s["children"]).astype(int).tolist()
        assert len(children) == int(s["num_children"]) and all(c in rows for c in children)
        reached |= set(children)
    assert {1, 2, 3} <= reached  # every class hangs under an ancestor
    for s in meta:
        if int(s["num_children"]) == 0:
            assert np.size(s["children"]) == 0 and int(s["num_train_images"]) == SMALL["train_per_class"]


def test_train_holds_one_cmyk_jpeg_and_one_png_named_jpeg(ilsvrc):
    out, summary = ilsvrc
    found = {}
    for _, data in tar_members((out / "ILSVRC2012_img_train.tar").read_bytes()):
        for name, image in tar_members(data):
            fmt, mode, _ = image_format(image)
            if (fmt, mode) != ("JPEG", "RGB"):
                found.setdefault((fmt, mode), []).append(name.removesuffix(".JPEG"))
    assert found == {("JPEG", "CMYK"): summary["cmyk"], ("PNG", "RGB"): summary["png"]}
    assert len(summary["cmyk"]) == len(summary["png"]) == 1
    assert summary["cmyk"][0].split("_")[0] != summary["png"][0].split("_")[0]  # different classes


# -- kaggle ---------------------------------------------------------------------------


def test_kaggle_tree_and_csvs(kaggle):
    out, summary = kaggle
    data = out / CLS_LOC
    assert sorted(p.name for p in (data / "train").iterdir()) == WNIDS
    train = {p.stem: p for p in (data / "train").rglob("*.JPEG")}
    assert len(train) == N_TRAIN and all(p.stem.startswith(p.parent.name + "_") for p in train.values())
    val = {p.stem: p for p in (data / "val").iterdir()}
    assert sorted(val) == [f"ILSVRC2012_val_{i:08d}" for i in range(1, N_VAL + 1)]
    assert sorted(p.name for p in (data / "test").iterdir()) == [
        "ILSVRC2012_test_00000001.JPEG", "ILSVRC2012_test_00000002.JPEG"]
    assert (out / "ILSVRC/Annotations/CLS-LOC").is_dir() and (out / "ILSVRC/ImageSets/CLS-LOC").is_dir()

    mapping = (out / "LOC_synset_mapping.txt").read_text().splitlines()
    assert [line.split(" ")[0] for line in mapping] == WNIDS and all(", " in line for line in mapping)

    val_rows = kaggle_rows(out / "LOC_val_solution.csv")
    assert sorted(r[0] for r in val_rows) == sorted(val) and [r[0] for r in val_rows] != sorted(val)
    for image_id, boxes in val_rows + kaggle_rows(out / "LOC_train_solution.csv"):
        words = boxes.split()
        assert len(words) in (5, 10) and len(set(words[::5])) == 1
        width, height = image_format((val.get(image_id) or train[image_id]).read_bytes())[2]
        for k in range(0, len(words), 5):
            x0, y0, x1, y1 = map(int, words[k + 1:k + 5])
            assert 0 <= x0 < x1 < width and 0 <= y0 < y1 < height
    train_ids = [r[0] for r in kaggle_rows(out / "LOC_train_solution.csv")]
    assert 0 < len(train_ids) <= N_TRAIN and set(train_ids) <= set(train)
    assert all(r[1].split()[0] == r[0].split("_")[0] for r in kaggle_rows(out / "LOC_train_solution.csv"))
    sample = kaggle_rows(out / "LOC_sample_submission.csv")
    assert [r[0] for r in sample] == ["ILSVRC2012_test_00000001", "ILSVRC2012_test_00000002"]

    kinds = {p.stem: image_format(p.read_bytes())[:2] for p in train.values()}
    assert [s for s, k in kinds.items() if k == ("JPEG", "CMYK")] == summary["cmyk"]
    assert [s for s, k in kinds.items() if k[0] == "PNG"] == summary["png"]
    assert sum(k == ("JPEG", "RGB") for k in kinds.values()) == N_TRAIN - 2


def test_both_layouts_tell_the_same_truth(ilsvrc, kaggle):
    """Same arguments: the same classes, names, validation labels and pixels, whichever
    layout they are read from."""
    meta, truth, _ = read_devkit(ilsvrc[0])
    leaves = [s for s in meta if int(s["num_children"]) == 0]
    wnid_of_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
    devkit_val = {f"ILSVRC2012_val_{n:08d}": wnid_of_id[int(i)] for n, i in enumerate(truth, start=1)}
    kaggle_val = {r[0]: r[1].split()[0] for r in kaggle_rows(kaggle[0] / "LOC_val_solution.csv")}
    assert devkit_val == kaggle_val
    names = dict(line.split(" ", 1) for line in (kaggle[0] / "LOC_synset_mapping.txt").read_text().splitlines())
    assert names == {str(s["WNID"]): str(s["words"]) for s in leaves}
    val_tar = dict(tar_members((ilsvrc[0] / "ILSVRC2012_img_val.tar").read_bytes()))
    for name, data in val_tar.items():
        assert (kaggle[0] / CLS_LOC / "val" / name).read_bytes() == data
    assert ilsvrc[1]["cmyk"] == kaggle[1]["cmyk"] and ilsvrc[1]["png"] == kaggle[1]["png"]


# -- CLI -------------------------------------------------------------------------------

ARGS = ["--classes", "2", "--train-per-class", "2", "--val-per-class", "1"]


@pytest.mark.parametrize("layout,first", [("ilsvrc2012", "ILSVRC2012_devkit_t12.tar.gz"),
                                          ("kaggle", "LOC_synset_mapping.txt")])
def test_cli_writes_each_layout_and_refuses_to_overwrite_without_force(tmp_path, layout, first):
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(main, ["fake-data", str(out), "--layout", layout, *ARGS])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote the {layout} layout: 2 classes, train 4 (1 CMYK, 1 PNG named .JPEG), val 2")
    assert result.output.rstrip().endswith(f"-> {out}") and (out / first).is_file()
    before = tree_digest(out)
    result = runner.invoke(main, ["fake-data", str(out), "--layout", layout, *ARGS])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "already exists" in result.output and "Traceback" not in result.output
    assert tree_digest(out) == before
    other = "kaggle" if layout == "ilsvrc2012" else "ilsvrc2012"
    result = runner.invoke(main, ["fake-data", str(out), "--layout", other, *ARGS, "--force"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_never_replaces_a_real_download(tmp_path, ilsvrc):
    real = tmp_path / "imagenet"
    real.mkdir()
    (real / "ILSVRC2012_img_val.tar").write_bytes(b"six gigabytes")
    result = CliRunner().invoke(main, ["fake-data", str(real), "--layout", "ilsvrc2012", *ARGS, "--force"])
    assert result.exit_code == 1 and "not an alexnetd dataset" in result.output
    assert (real / "ILSVRC2012_img_val.tar").read_bytes() == b"six gigabytes"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--raw", "--layout", "kaggle"], "--raw"),
        (["--layout", "ilsvrc2012", "--shards", "2"], "--shards"),
        (["--layout", "kaggle", "--size", "64"], "--size"),
        (["--layout", "kaggle", "--corrupt", "1"], "--corrupt"),
        (["--layout", "tfrecords"], "--layout"),
    ],
)
def test_cli_rejects_options_that_do_not_apply(tmp_path, args, message):
    result = CliRunner().invoke(main, ["fake-data", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
