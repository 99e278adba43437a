"""A miniature ImageNet exactly as it is downloaded, for testing the readers of the real thing.

Two layouts, with the structure, names and label files of the originals, only smaller:

    ilsvrc2012   ILSVRC2012_img_train.tar (a tar of per-class tars), ILSVRC2012_img_val.tar
                 (flat), ILSVRC2012_devkit_t12.tar.gz (meta.mat + validation ground truth)
    kaggle       the imagenet-object-localization-challenge root: LOC_*.csv, LOC_synset_mapping.txt
                 and ILSVRC/Data/CLS-LOC/{train/<wnid>,val,test}

The traps of the real data are kept: archive members are in no sorted order, the devkit's
ILSVRC2012_IDs are not the sorted-WNID order, the synset table holds ancestors as well as
the classes, the validation CSV's rows are shuffled, and train holds one CMYK JPEG and one
PNG named .JPEG. Nothing else is written (no sidecar): a reader must get the truth from
the label files, as it would from the real download.

Images come from fakedata (same classes, same renderer, ImageNet-like sizes), and the
output is byte-identical for the same arguments: seeded orders only, tar and gzip headers
without times or owners.

    make_fake_imagenet(out, "ilsvrc2012")
    make_fake_imagenet(out, "kaggle", classes=3, seed=1)
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np

from alexnetd.pipeline import fakedata
from alexnetd.pipeline.fakedata import OutputExists, class_spec, render, wnid
from alexnetd.pipeline.shards import remove_stale_temp_dirs, replace_dir, temp_dir_for

__all__ = ["LAYOUTS", "make_fake_imagenet", "OutputExists"]

LAYOUTS = ("ilsvrc2012", "kaggle")
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
_DEVKIT_DIR = "ILSVRC2012_devkit_t12"
KAGGLE_FILES = ("LOC_synset_mapping.txt", "LOC_val_solution.csv", "LOC_train_solution.csv",
                "LOC_sample_submission.csv")
_CLS_LOC = "ILSVRC/Data/CLS-LOC"
_TEST_IMAGES = 2
SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
                 "num_train_images")
# scipy stamps the creation time into the MAT header; a fixed text keeps the file reproducible.
_MAT_HEADER = b"MATLAB 5.0 MAT-file, written by alexnetd fake-data"


class _Plan:
    """Every name, label and order of the output, drawn from the seed before any pixel."""

    def __init__(self, classes: int, train_per_class: int, val_per_class: int, seed: int, quality: int):
        self.classes, self.seed, self.quality = classes, seed, quality
        self.specs = [class_spec(seed, c) for c in range(classes)]
        self.wnids = [wnid(c) for c in range(classes)]
        self.words = _unique_words(self.specs)
        rng = np.random.default_rng([seed, 101])
        # by_id[k] is the class whose ILSVRC2012_ID is k + 1. As in the devkit, ID 1 is not
        # the smallest WNID, so a reader that takes IDs for sorted positions is caught.
        by_id = [int(c) for c in rng.permutation(classes)]
        if classes >= 2 and by_id[0] == 0:
            by_id[0], by_id[1] = by_id[1], by_id[0]
        self.by_id = by_id
        self.id_of = {c: k + 1 for k, c in enumerate(by_id)}
        # Train numbers like n01440764_10026: distinct, not contiguous, seeded per class.
        hi = max(50_000, 4 * train_per_class)
        self.train_numbers = [
            sorted(int(n) + 1 for n in np.random.default_rng([seed, 102, c]).choice(hi, train_per_class, replace=False))
            for c in range(classes)
        ]
        # One CMYK JPEG and one PNG named .JPEG, in different classes where there are two.
        q = np.random.default_rng([seed, 103])
        c_cmyk = int(q.integers(classes))
        c_png = (c_cmyk + 1 + int(q.integers(classes - 1))) % classes if classes > 1 else c_cmyk
        i_cmyk, i_png = int(q.integers(train_per_class)), int(q.integers(train_per_class))
        if c_png == c_cmyk and i_png == i_cmyk:
            i_png = (i_cmyk + 1) % train_per_class
        self.quirks = {(c_cmyk, i_cmyk): "cmyk"}
        if (c_png, i_png) != (c_cmyk, i_cmyk):  # only a single training image: no PNG
            self.quirks[(c_png, i_png)] = "png"
        # Validation: val_per_class images of every class, mixed in a seeded order.
        labels = np.random.default_rng([seed, 104]).permutation(np.repeat(np.arange(classes), val_per_class))
        seen = [0] * classes
        self.val = []  # (number 1.., class, index within the class)
        for n, c in enumerate(labels.tolist(), start=1):
            self.val.append((n, c, seen[c]))
            seen[c] += 1
        self.train_per_class = train_per_class

    def train_stem(self, c: int, i: int) -> str:
        return f"{self.wnids[c]}_{self.train_numbers[c][i]}"

    def quirk_stems(self, kind: str) -> list[str]:
        return sorted(self.train_stem(c, i) for (c, i), k in self.quirks.items() if k == kind)

    def train_image(self, c: int, i: int) -> tuple[bytes, tuple[int, int]]:
        rng = fakedata._image_rng(self.seed, "train", c, i)
        size = fakedata._raw_size(rng)
        image = render(self.specs[c], rng, *size)
        kind = self.quirks.get((c, i))
        data = fakedata._corrupt_bytes(kind, image, self.quality, rng) if kind else _jpeg(image, self.quality)
        return data, size

    def val_image(self, c: int, k: int) -> tuple[bytes, tuple[int, int]]:
        rng = fakedata._image_rng(self.seed, "val", c, k)
        size = fakedata._raw_size(rng)
        return _jpeg(render(self.specs[c], rng, *size), self.quality), size

    def test_image(self, k: int) -> bytes:
        rng = np.random.default_rng([self.seed, 105, k])
        c = int(rng.integers(self.classes))
        return _jpeg(render(self.specs[c], rng, *fakedata._raw_size(rng)), self.quality)


def _unique_words(specs) -> list[str]:
    """Devkit-like `words` ("first name, other name"): unique, and with a comma, since
    readers split them on ", " as they do the real ones."""
    # Two classes can share a kind, colours and rounded angle; the class number cannot.
    return [f"{spec.name}, {spec.kind} class {c}" for c, spec in enumerate(specs)]


_turbo = None  # one TurboJPEG handle per process: loading the library is not free


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    from turbojpeg import TJPF_RGB, TJSAMP_420

    from alexnetd.pipeline.jpeg import open_turbojpeg

    global _turbo
    if _turbo is None:
        _turbo = open_turbojpeg()
    return _turbo.encode(np.ascontiguousarray(image), quality=quality, pixel_format=TJPF_RGB,
                         jpeg_subsample=TJSAMP_420)


def _shuffled(rng: np.random.Generator, items: list) -> list:
    """A seeded permutation that is never sorted, so a reader that relies on archive or
    file order being sorted fails here and not on the real data."""
    out = [items[int(j)] for j in rng.permutation(len(items))]
    if len(out) >= 2 and out == sorted(out):
        out[0], out[1] = out[1], out[0]
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with no time, owner or mode from the host."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of `members` in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)
    return buf.getvalue()


def _boxes(rng: np.random.Generator, w: str, size: tuple[int, int]) -> str:
    """1–2 'wnid xmin ymin xmax ymax' groups inside an image of (height, width), with the
    trailing space of Kaggle's files."""
    h, wd = size
    groups = []
    for _ in range(int(rng.integers(1, 3))):
        x0, y0 = int(rng.integers(0, wd // 2)), int(rng.integers(0, h // 2))
        x1, y1 = int(rng.integers(x0 + wd // 4, wd)), int(rng.integers(y0 + h // 4, h))
        groups.append(f"{w} {x0} {y0} {x1} {y1} ")
    return "".join(groups)


# -- the two layouts --------------------------------------------------------------------


def _synsets(plan: _Plan) -> np.ndarray:
    """The devkit's synset table: the classes (IDs 1..classes, num_children 0), then a
    small hierarchy of ancestors above them (IDs classes+1.., WNIDs n8...)."""
    i32 = np.int32
    rows = []
    for k, c in enumerate(plan.by_id, start=1):
        spec = plan.specs[c]
        gloss = f"a synthetic object: {spec.kind} in two colours, seen at about {np.degrees(spec.angle):.0f} degrees"
        rows.append((i32(k), plan.wnids[c], plan.words[c], gloss, i32(0), np.zeros((0,), np.uint8), i32(0),
                     i32(plan.train_per_class)))
    # Two mid-level groups (one with a single class) under one root, as ancestors of
    # height 1 and 2; real leaves sit at different depths too.
    ids = list(range(1, plan.classes + 1))
    groups = [g for g in (ids[::2], ids[1::2]) if g]
    mid = list(range(plan.classes + 1, plan.classes + 1 + len(groups)))
    names = ["synthetic pattern, even-numbered pattern", "synthetic pattern, odd-numbered pattern"]
    for k, group, name in zip(mid, groups, names):
        rows.append((i32(k), f"n8{k - plan.classes:07d}", name, "a group of synthetic objects", i32(len(group)),
                     np.array(group, i32), i32(1), i32(0)))
    root = plan.classes + 1 + len(groups)
    rows.append((i32(root), "n80000000", "entity, synthetic entity", "everything synthetic", i32(len(mid)),
                 np.array(mid, i32), i32(2), i32(0)))
    # A struct array for savemat: an (N, 1) array of records whose fields are objects,
    # so every cell keeps its own MATLAB type and shape (strings become char arrays,
    # `children` a vector of any length, empty for the classes).
    table = np.empty((len(rows), 1), dtype=[(f, object) for f in SYNSET_FIELDS])
    for n, row in enumerate(rows):
        for field, value in zip(SYNSET_FIELDS, row):
            table[n, 0][field] = value
    return table


def _meta_mat(plan: _Plan) -> bytes:
    import scipy.io

    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": _synsets(plan)})
    data = bytearray(buf.getvalue())
    data[:116] = _MAT_HEADER.ljust(116, b" ")
    return bytes(data)


def _write_ilsvrc2012(tmp: Path, plan: _Plan, seed: int) -> None:
    rng = np.random.default_rng([seed, 106])
    with open(tmp / TRAIN_TAR, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as outer:
        for c in _shuffled(rng, list(range(plan.classes))):  # class order is WNID order
            names = _shuffled(rng, [(f"{plan.train_stem(c, i)}.JPEG", i) for i in range(plan.train_per_class)])
            inner = _tar_bytes([(name, plan.train_image(c, i)[0]) for name, i in names])
            _add(outer, f"{plan.wnids[c]}.tar", inner)
    val = [(f"ILSVRC2012_val_{n:08d}.JPEG", plan.val_image(c, k)[0]) for n, c, k in plan.val]
    (tmp / VAL_TAR).write_bytes(_tar_bytes(_shuffled(rng, val)))
    truth = "".join(f"{plan.id_of[c]}\n" for _, c, _ in plan.val)
    readme = (f"Development kit of a synthetic ILSVRC2012 miniature: {plan.classes} classes.\n"
              "data/meta.mat holds the synsets; data/ILSVRC2012_validation_ground_truth.txt the\n"
              "ILSVRC2012_ID of validation image i on line i.\n")
    devkit = _tar_bytes([
        (f"{_DEVKIT_DIR}/readme.txt", readme.encode()),
        (f"{_DEVKIT_DIR}/data/meta.mat", _meta_mat(plan)),
        (f"{_DEVKIT_DIR}/data/ILSVRC2012_validation_ground_truth.txt", truth.encode()),
    ])
    # gzip.compress with mtime=0 and no file name: tarfile's own "w:gz" stamps both.
    (tmp / DEVKIT).write_bytes(gzip.compress(devkit, compresslevel=9, mtime=0))


def _write_kaggle(tmp: Path, plan: _Plan, seed: int) -> None:
    rng = np.random.default_rng([seed, 107])
    data = tmp / _CLS_LOC
    train_rows = []
    for c in range(plan.classes):
        folder = data / "train" / plan.wnids[c]
        folder.mkdir(parents=True)
        for i in range(plan.train_per_class):
            image, size = plan.train_image(c, i)
            stem = plan.train_stem(c, i)
            (folder / f"{stem}.JPEG").write_bytes(image)
            if rng.uniform() < 0.5 or i == 0:  # Kaggle has boxes for some training images only
                train_rows.append(f"{stem},{_boxes(rng, plan.wnids[c], size)}")
    (data / "val").mkdir()
    val_rows = []
    for n, c, k in plan.val:
        image, size = plan.val_image(c, k)
        stem = f"ILSVRC2012_val_{n:08d}"
        (data / "val" / f"{stem}.JPEG").write_bytes(image)
        val_rows.append(f"{stem},{_boxes(rng, plan.wnids[c], size)}")
    (data / "test").mkdir()
    test_stems = [f"ILSVRC2012_test_{k:08d}" for k in range(1, _TEST_IMAGES + 1)]
    for k, stem in enumerate(test_stems, start=1):
        (data / "test" / f"{stem}.JPEG").write_bytes(plan.test_image(k))
    for folder in ("ILSVRC/Annotations/CLS-LOC", "ILSVRC/ImageSets/CLS-LOC"):
        (tmp / folder).mkdir(parents=True)
    header = "ImageId,PredictionString\n"
    (tmp / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in sorted(zip(plan.wnids, plan.words))))
    (tmp / "LOC_val_solution.csv").write_text(header + "".join(f"{r}\n" for r in _shuffled(rng, val_rows)))
    (tmp / "LOC_train_solution.csv").write_text(header + "".join(f"{r}\n" for r in _shuffled(rng, train_rows)))
    # Like Kaggle's, the sample submission is for the unlabelled test images.
    guess = " ".join(f"{w} 0 0 10 10" for w in plan.wnids[:5])
    (tmp / "LOC_sample_submission.csv").write_text(header + "".join(f"{s},{guess}\n" for s in test_stems))


# -- entry point ------------------------------------------------------------------------


def _is_fake_imagenet(out: Path) -> bool:
    """A layout this module wrote: only layout files, and every class an n9 WNID, which no
    real synset has (so --force never replaces a real download)."""
    try:
        names = {p.name for p in out.iterdir()}
        if names and names <= {TRAIN_TAR, VAL_TAR, DEVKIT} and DEVKIT in names:
            import scipy.io

            with tarfile.open(out / DEVKIT, "r:gz") as tar:
                meta = tar.extractfile(f"{_DEVKIT_DIR}/data/meta.mat").read()
            synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
            return all(str(s["WNID"]).startswith(("n8", "n9")) for s in synsets)
        if names and names <= set(KAGGLE_FILES) | {"ILSVRC"} and KAGGLE_FILES[0] in names:
            lines = (out / KAGGLE_FILES[0]).read_text().split("\n")
            return all(line.startswith("n9") for line in lines if line)
    except Exception:  # anything unreadable is not ours
        return False
    return False


def make_fake_imagenet(out: Path, layout: str, classes: int = 5, train_per_class: int = 6, val_per_class: int = 3,
                       seed: int = 0, quality: int = 90, force: bool = False) -> dict:
    """Write the `layout` miniature to `out` (atomically) and return a summary:
    layout, out, classes, train, val, test (image counts), files (OUT's top-level names),
    and cmyk / png: the stems of the quirky training files."""
    out = Path(out)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if classes < 1 or train_per_class < 1 or val_per_class < 0 or not 1 <= quality <= 100:
        raise ValueError("classes and train-per-class must be >= 1, val-per-class >= 0, quality 1..100")
    if not (force and out.is_dir() and _is_fake_imagenet(out)):
        fakedata._check_out(out, force)
    plan = _Plan(classes, train_per_class, val_per_class, seed, quality)
    remove_stale_temp_dirs(out)
    tmp = temp_dir_for(out)
    tmp.mkdir(parents=True)
    try:
        (_write_ilsvrc2012 if layout == "ilsvrc2012" else _write_kaggle)(tmp, plan, seed)
        files = sorted(p.name for p in tmp.iterdir())
        replace_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "layout": layout, "out": str(out), "classes": classes, "train": classes * train_per_class,
        "val": len(plan.val), "test": _TEST_IMAGES if layout == "kaggle" else 0, "files": files,
        "cmyk": plan.quirk_stems("cmyk"), "png": plan.quirk_stems("png"),
    }
