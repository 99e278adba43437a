"""The dataset reader: prepared shards and ImageFolder trees, and every way they can be wrong."""

from __future__ import annotations

import glob
import json
import pickle
import shutil

import numpy as np
import pytest

from alexnetd.pipeline.dataset import DatasetError, open_dataset
from alexnetd.pipeline.jpeg import Decoder, SkipSample
from alexnetd.pipeline.pixelstats import PixelStats
from alexnetd.pipeline.shards import INDEX_DTYPE, parse_size


def decode_all(split) -> np.ndarray:
    decoder = Decoder()
    return np.stack([decoder.decode_rgb(split.read(i)) for i in range(len(split))])


# -- prepared --------------------------------------------------------------------------


def test_prepared_dataset_exposes_classes_splits_and_labels(prepared_data):
    ds = open_dataset(prepared_data)
    assert ds.kind == "prepared" and ds.root == prepared_data
    assert ds.classes == ["n90000000", "n90000001", "n90000002", "n90000003"]
    assert len(ds.class_names) == 4 and ds.class_names != ds.classes
    assert ds.splits == ("train", "val")
    assert ds.fingerprint.startswith("sha256:") and ds.fingerprint == open_dataset(prepared_data).fingerprint
    train, val = ds.split("train"), ds.split("val")
    assert (len(train), len(val)) == (64, 16)
    assert train.labels.dtype == np.int64 and train.needs_resize is False
    assert train.labels.tolist() == [c for c in range(4) for _ in range(16)]
    assert np.bincount(val.labels).tolist() == [4, 4, 4, 4]


def test_every_prepared_jpeg_decodes_to_256_square(prepared_data):
    ds = open_dataset(prepared_data)
    for name in ds.splits:
        images = decode_all(ds.split(name))
        assert images.shape[1:] == (256, 256, 3) and images.dtype == np.uint8


def test_keys_name_the_shard_and_the_sample(prepared_data):
    sp = open_dataset(prepared_data).split("train")
    assert sp.key(0) == "train-000000.tar:n90000000_0"
    assert sp.key(len(sp) - 1) == "train-000001.tar:n90000003_15"
    assert len({sp.key(i) for i in range(len(sp))}) == len(sp)
    assert open_dataset(prepared_data).split("val").key(0) == "val-000000.tar:ILSVRC2012_val_00000001"


def test_mean_image_and_colour_pca_equal_a_direct_numpy_computation(prepared_data):
    ds = open_dataset(prepared_data)
    mean, eigvals, eigvecs = ds.stats()
    images = decode_all(ds.split("train")).astype(np.float64)
    assert mean.dtype == np.float32 and mean.shape == (256, 256, 3)
    np.testing.assert_allclose(mean, images.mean(axis=0), rtol=0, atol=1e-4)
    covariance = np.cov(images.reshape(-1, 3), rowvar=False, bias=True)
    want_vals, want_vecs = np.linalg.eigh(covariance)
    np.testing.assert_allclose(eigvals, want_vals[::-1], rtol=1e-9)
    # Same eigenvectors up to sign; columns are eigenvectors.
    np.testing.assert_allclose(np.abs(eigvecs.T @ want_vecs[:, ::-1]), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(covariance @ eigvecs, eigvecs * eigvals, rtol=1e-9, atol=1e-6)


def test_webdataset_reads_the_same_samples_as_our_reader(prepared_data):
    wds = pytest.importorskip("webdataset")
    ds = open_dataset(prepared_data)
    for name in ds.splits:
        sp = ds.split(name)
        urls = sorted(glob.glob(str(prepared_data / name / "*.tar")))
        theirs = [(s["__key__"], int(s["cls"]), s["jpg"]) for s in wds.WebDataset(urls, shardshuffle=False)]
        ours = [(sp.key(i).split(":", 1)[1], int(sp.labels[i]), sp.read(i)) for i in range(len(sp))]
        assert theirs == ours


def test_a_split_survives_pickling_and_reopens_its_files(prepared_data):
    sp = open_dataset(prepared_data).split("train")
    first = sp.read(3)
    copy = pickle.loads(pickle.dumps(sp))
    assert copy.read(3) == first and copy.key(3) == sp.key(3)
    copy.close()
    sp.close()


def test_missing_split_is_a_dataset_error(prepared_data):
    with pytest.raises(DatasetError, match="no 'test' split"):
        open_dataset(prepared_data).split("test")


# -- ImageFolder -----------------------------------------------------------------------


def test_imagefolder_lists_sorted_classes_and_files(raw_data):
    ds = open_dataset(raw_data)
    assert ds.kind == "imagefolder" and ds.splits == ("train", "val")
    assert ds.classes == ["n90000000", "n90000001", "n90000002"]
    assert ds.class_names[0].startswith("stripes")  # from synset_words.txt
    train, val = ds.split("train"), ds.split("val")
    # 6 good images per class plus the 6 bad ones, two per class.
    assert len(train) == 24 and len(val) == 6
    assert train.needs_resize is True
    keys = [train.key(i) for i in range(len(train))]
    assert keys == sorted(keys, key=lambda k: (k.split("/")[1], k.split("/")[2]))
    for i in range(len(train)):
        assert keys[i].startswith(f"train/{ds.classes[train.labels[i]]}/")
        assert train.read(i) == (raw_data / keys[i]).read_bytes()


def test_imagefolder_stats_are_deterministic_and_well_formed(raw_data):
    mean, eigvals, eigvecs = open_dataset(raw_data).stats()
    again = open_dataset(raw_data).stats()
    assert mean.shape == (256, 256, 3) and mean.dtype == np.float32
    assert np.all(np.diff(eigvals) <= 0) and np.all(eigvals > 0)
    np.testing.assert_allclose(eigvecs.T @ eigvecs, np.eye(3), atol=1e-9)
    for a, b in zip((mean, eigvals, eigvecs), again):
        np.testing.assert_array_equal(a, b)
    # Over the decodable training images (the sample covers all of a small tree).
    decoder, acc = Decoder(), PixelStats(256)
    for path in sorted((raw_data / "train").glob("*/*")):
        try:
            acc.add_image(decoder.decode_square(path.read_bytes(), 256))
        except SkipSample:
            pass
    np.testing.assert_allclose(mean, acc.mean_image(), atol=1e-4)


def test_imagefolder_fingerprint_follows_file_sizes(tmp_path, raw_data):
    tree = tmp_path / "tree"
    shutil.copytree(raw_data, tree)
    before = open_dataset(tree).fingerprint
    assert before == open_dataset(tree).fingerprint
    victim = next((tree / "train" / "n90000001").iterdir())
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert open_dataset(tree).fingerprint != before


# -- bad input: one line naming the path -----------------------------------------------


def _damage_prepared(root, how):
    manifest = json.loads((root / "manifest.json").read_text())
    if how == "no classes":
        (root / "classes.json").write_text("[]")
    elif how == "classes.json missing":
        (root / "classes.json").unlink()
    elif how == "truncated shard":
        shard = root / "train" / "train-000001.tar"
        shard.write_bytes(shard.read_bytes()[:-5000])
    elif how == "shard missing":
        (root / "train" / "train-000000.tar").unlink()
    elif how == "index past shard end":
        index = np.load(root / "train.index.npy")
        index["offset"][-1] += 10**6
        np.save(root / "train.index.npy", index)
    elif how == "index count differs":
        np.save(root / "val.index.npy", np.load(root / "val.index.npy")[:-1])
    elif how == "index not an index":
        np.save(root / "train.index.npy", np.arange(64))
    elif how == "no train split":
        shutil.rmtree(root / "train")
    elif how == "manifest not json":
        (root / "manifest.json").write_text("{not json")
    elif how == "newer format":
        manifest["version"] = 99
        (root / "manifest.json").write_text(json.dumps(manifest))
    else:
        raise AssertionError(how)


PREPARED_DAMAGE = {
    "no classes": "no classes",
    "classes.json missing": "classes.json: missing",
    "truncated shard": "train-000001.tar: .* bytes, manifest.json says",
    "shard missing": "train-000000.tar: shard missing",
    "index past shard end": "train.index.npy: sample 63 ends past the end of",
    "index count differs": "val.index.npy: 15 samples, manifest.json says 16",
    "index not an index": "train.index.npy: not a shard index",
    "no train split": "no train/ split",
    "manifest not json": "manifest.json: unreadable",
    "newer format": "format version 99",
}


@pytest.mark.parametrize("how", sorted(PREPARED_DAMAGE))
def test_damaged_prepared_dataset_is_refused_on_open(tmp_path, prepared_data, how):
    root = tmp_path / "data"
    shutil.copytree(prepared_data, root)
    _damage_prepared(root, how)
    with pytest.raises(DatasetError, match=PREPARED_DAMAGE[how]) as err:
        open_dataset(root)
    message = str(err.value)
    assert "\n" not in message and str(root) in message


def _imagefolder_case(root, how):
    if how == "missing":
        return root / "nowhere"
    if how == "a file":
        root.mkdir()
        (root / "f").write_text("x")
        return root / "f"
    root.mkdir()
    if how == "empty dir":
        return root
    (root / "train").mkdir()
    if how == "train without classes":
        return root
    (root / "train" / "cat").mkdir()
    if how == "class without images":
        (root / "train" / "cat" / "notes.txt").write_text("x")
        return root
    (root / "train" / "cat" / "a.JPEG").write_bytes(b"\xff\xd8")
    if how == "unknown val class":
        (root / "val" / "dog").mkdir(parents=True)
    elif how == "flat val":
        (root / "val").mkdir()
        (root / "val" / "x.JPEG").write_bytes(b"\xff\xd8")
    elif how == "unfinished prepare":
        (root / "train" / "train-000000.tar").write_bytes(b"")
    return root


IMAGEFOLDER_CASES = {
    "missing": "nowhere: no such directory",
    "a file": "f: not a directory",
    "empty dir": "not a dataset: no manifest.json",
    "train without classes": "train: no classes",
    "class without images": "train: no image files",
    "unknown val class": "class 'dog' not in train/",
    "flat val": "val: no class folders",
    "unfinished prepare": "tar shards but no manifest.json",
}


@pytest.mark.parametrize("how", sorted(IMAGEFOLDER_CASES))
def test_bad_imagefolder_trees_are_refused_on_open(tmp_path, how):
    path = _imagefolder_case(tmp_path / "data", how)
    with pytest.raises(DatasetError, match=IMAGEFOLDER_CASES[how]) as err:
        open_dataset(path)
    assert "\n" not in str(err.value) and str(tmp_path / "data") in str(err.value)


def test_index_rows_are_packed_twenty_bytes():
    assert INDEX_DTYPE.itemsize == 20


@pytest.mark.parametrize("text,want", [("256M", 256 << 20), ("64MB", 64 << 20), ("1G", 1 << 30), ("1.5k", 1536),
                                       ("500000", 500000), ("2MiB", 2 << 20)])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "M", "-1M", "12Q", "0"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ValueError):
        parse_size(text)
