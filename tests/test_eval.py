"""Evaluation and prediction: 10-patch averaging (§4.1), ensembles (§6), the CLI.

The networks are real AlexNets saved as real checkpoints, with weights chosen so the
right answer is known without the code under test:

* ``random``: He-initialised weights, fc8 rescaled so its logits are O(1) and spread
  over the classes. Its expected probabilities come from a direct computation: the ten
  patches cut from each val image with numpy, the mean image subtracted, fc7 features
  from the network, fc8 and softmax in float64, averaged per image.
* ``const_a``, ``const_b``: every weight and bias zero except fc8's bias, so the network
  outputs softmax(fc8.bias) for every image: the probabilities are known in closed form.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from alexnetd.model import AlexNet, CheckpointError, save_checkpoint
from alexnetd.model.alexnet import LAYERS
from alexnetd.pipeline.dataset import open_dataset
from alexnetd.pipeline.jpeg import Decoder
from alexnetd.service.cli import main
from alexnetd.service.evaluate import (EvalError, ensemble_probabilities, eval_transform,
                                       evaluate, load_model, predict, val_probabilities)

ALEXNETD = str(Path(sys.executable).with_name("alexnetd"))
C = 4  # classes in the prepared_data fixture
# fc8 biases of the two constant networks: alone they pick class 1 and class 3, but
# both give class 2 a good share, so their average picks class 2.
BIAS_A = [0.0, 2.0, 1.5, 0.0]
BIAS_B = [0.0, 0.0, 1.5, 2.0]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ten_patches(image: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """§4.1 by hand: four corners, the centre, and their mirrors; (10, 224, 224, 3)."""
    x = image.astype(np.float32) - mean
    five = [x[t:t + 224, l:l + 224] for t, l in ((0, 0), (0, 32), (32, 0), (32, 32), (16, 16))]
    return np.stack(five + [p[:, ::-1] for p in five])


CENTRE = 4  # index of the centre patch in ten_patches()


def _state(model_state: dict, ds, step: int, **extra) -> dict:
    return {"model": model_state, "step": step, "epoch": 0, "next_seq": 0,
            "config": {"num_classes": C, "data": str(ds.root)},
            "dataset_fingerprint": ds.fingerprint, "classes": list(ds.classes),
            "class_names": list(ds.class_names)} | extra


def _constant(bias) -> dict:
    with torch.device("meta"):  # shapes only
        shapes = {k: v.shape for k, v in AlexNet(num_classes=len(bias)).state_dict().items()}
    sd = {k: torch.zeros(shape) for k, shape in shapes.items()}
    sd["fc8.bias"] = torch.tensor(bias, dtype=torch.float32)
    return sd


@pytest.fixture(scope="module")
def setup(prepared_data, tmp_path_factory):
    """Checkpoints and the directly computed expectations, built once for the module."""
    ds = open_dataset(prepared_data)
    val = ds.split("val")
    decoder = Decoder()
    images = np.stack([decoder.decode_square(val.read(i), 256) for i in range(len(val))])
    labels = val.labels.copy()
    mean = np.load(prepared_data / "mean.npy")

    torch.manual_seed(0)
    net = AlexNet(num_classes=C).eval()
    with torch.no_grad():
        for name in LAYERS:
            layer = getattr(net, name)
            layer.weight.normal_(0.0, math.sqrt(2.0 / layer.weight[0].numel()))
            layer.bias.zero_()
        patches = np.concatenate([ten_patches(im, mean) for im in images])
        x = torch.from_numpy(np.ascontiguousarray(patches.transpose(0, 3, 1, 2)))
        feats = net.embed(x).double().numpy().reshape(len(images), 10, -1)
    # Rescale fc8 so that centre-patch logits are centred over the val set with std 1.5:
    # the predictions then depend on the image instead of one class winning everywhere.
    w = net.fc8.weight.detach().double().numpy()
    raw = feats @ w.T                                              # (n, 10, C)
    mu = raw[:, CENTRE].mean(axis=0)
    scale = 1.5 / (raw[:, CENTRE] - mu).std()
    w, b = w * scale, -mu * scale
    net.fc8.weight.data = torch.from_numpy(w).float()
    net.fc8.bias.data = torch.from_numpy(b).float()
    probs10 = softmax(feats @ w.T + b)                             # (n, 10, C)

    tmp = tmp_path_factory.mktemp("ckpt")
    ckpt = {
        "random": save_checkpoint(tmp / "random", _state(net.state_dict(), ds, 1), keep=1),
        "const_a": save_checkpoint(tmp / "a", _state(_constant(BIAS_A), ds, 2), keep=1),
        "const_b": save_checkpoint(tmp / "b", _state(_constant(BIAS_B), ds, 3), keep=1),
    }
    return dict(ds=ds, data=prepared_data, images=images, labels=labels, ckpt=ckpt,
                centre=probs10[:, CENTRE], ten=probs10.mean(axis=1))


def errors(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.sum(probs.argmax(axis=1) != labels)) / len(labels)


# ---------------------------------------------------------------- the numbers


def test_ten_patch_error_equals_the_direct_computation(setup):
    result = evaluate([setup["ckpt"]["random"]], setup["data"], crops=10, progress=False)
    assert result["top1_error"] == errors(setup["ten"], setup["labels"])
    assert 0 < result["top1_error"] < 1
    # With 4 classes "top-5" is top-4: every image counts as correct.
    assert result["top5_k"] == C and result["top5_error"] == 0.0
    assert (result["images"], result["crops"], result["models"], result["skipped"]) == (16, 10, 1, 0)


def test_centre_patch_probabilities_equal_the_direct_computation(setup):
    # batch_size 5 over 16 images: the last batch is a partial one.
    probs, labels = val_probabilities([setup["ckpt"]["random"]], setup["data"], crops=1,
                                      batch_size=5)
    np.testing.assert_array_equal(labels, setup["labels"])
    np.testing.assert_allclose(probs, setup["centre"], atol=1e-5)


def test_ten_patches_average_more_than_the_centre(setup):
    model = load_model(setup["ckpt"]["random"], setup["ds"])
    transform = eval_transform(setup["ds"])
    images = setup["images"][:2]
    ten = ensemble_probabilities([model.model], transform, images, crops=10).numpy()
    one = ensemble_probabilities([model.model], transform, images, crops=1).numpy()
    np.testing.assert_allclose(ten, setup["ten"][:2], atol=1e-5)
    np.testing.assert_allclose(one, setup["centre"][:2], atol=1e-5)
    assert np.abs(ten - one).max() > 1e-2
    # Over the val set the two disagree on some images, so their errors differ.
    assert errors(setup["ten"], setup["labels"]) != errors(setup["centre"], setup["labels"])


def test_ensemble_of_two_constant_networks_is_their_averaged_softmax(setup):
    ck = setup["ckpt"]
    probs, labels = val_probabilities([ck["const_a"], ck["const_b"]], setup["data"])
    expected = (softmax(np.array(BIAS_A)) + softmax(np.array(BIAS_B))) / 2
    np.testing.assert_allclose(probs, np.broadcast_to(expected, probs.shape), atol=1e-6)
    assert (probs.argmax(1) == 2).all()  # neither network alone picks class 2


def test_imagefolder_val_is_downsampled_and_bad_files_are_skipped(raw_data, tmp_path):
    data = tmp_path / "raw"
    shutil.copytree(raw_data, data)
    first = sorted((data / "val").iterdir())[0]
    (first / "broken.JPEG").write_bytes(next(first.iterdir()).read_bytes()[:2000])
    ds = open_dataset(data)
    n = len(ds.split("val")) - 1
    bias = [0.0, 1.0, 0.0]  # always the second class
    ckpt = save_checkpoint(tmp_path / "ck", _state(_constant(bias), ds, 1, config={}), keep=1)
    result = evaluate([ckpt], data, progress=False)
    labels = ds.split("val").labels
    assert (result["images"], result["skipped"], result["skipped_by_reason"]) == (n, 1, {"truncated": 1})
    # The broken file is in the first class (label 0), which this network never picks.
    assert result["top1_error"] == float(np.sum(labels != 1) - 1) / n


# ---------------------------------------------------------------- refusals


def test_fingerprint_mismatch_names_both(setup, tmp_path):
    altered = tmp_path / "data"
    shutil.copytree(setup["data"], altered)
    manifest = json.loads((altered / "manifest.json").read_text())
    manifest["fingerprint"] = "sha256:" + "0" * 64
    (altered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="fingerprint") as info:
        evaluate([setup["ckpt"]["random"]], altered, progress=False)
    assert setup["ds"].fingerprint in str(info.value) and manifest["fingerprint"] in str(info.value)

    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(setup["ckpt"]["random"]),
                                       "--data", str(altered)])
    assert result.exit_code == 1
    line, = result.output.strip().splitlines()
    assert line.startswith("Error: ") and setup["ds"].fingerprint in line
    assert manifest["fingerprint"] in line and "Traceback" not in result.output


def test_checkpoints_must_share_the_dataset_class_list(setup, tmp_path):
    ds = setup["ds"]
    # Only fc8 is needed: the class list is checked before the network is built.
    small = {"fc8.weight": torch.zeros(C, 4096), "fc8.bias": torch.zeros(C)}
    other = save_checkpoint(tmp_path, _state(small, ds, 7, classes=list(reversed(ds.classes))))
    with pytest.raises(EvalError, match="classes"):
        evaluate([setup["ckpt"]["random"], other], setup["data"], progress=False)


@pytest.mark.parametrize("args, needle", [
    (["--checkpoint", "{tmp}/nope.pt"], "no such checkpoint"),
    (["--checkpoint", "{tmp}/broken.pt"], "truncated"),
    (["--checkpoint", "{tmp}/empty-dir"], "no checkpoint"),
    (["--checkpoint", "{random}", "--data", "{tmp}/no-data"], "no such directory"),
    (["--checkpoint", "{random}", "--split", "test"], "no 'test' split"),
])
def test_eval_refuses_in_one_line(setup, tmp_path, args, needle):
    (tmp_path / "broken.pt").write_bytes(setup["ckpt"]["random"].read_bytes()[:4096])
    (tmp_path / "empty-dir").mkdir()
    args = [a.format(tmp=tmp_path, random=setup["ckpt"]["random"]) for a in args]
    if "--data" not in args:
        args += ["--data", str(setup["data"])]
    result = CliRunner().invoke(main, ["eval", *args])
    assert result.exit_code == 1, result.output
    line, = result.output.strip().splitlines()
    assert line.startswith("Error: ") and needle in line


def test_eval_rejects_three_crops(setup):
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(setup["ckpt"]["random"]),
                                       "--data", str(setup["data"]), "--crops", "3"])
    assert result.exit_code == 2
    assert "'3' is not one of '1', '10'" in result.output and "Traceback" not in result.output
    with pytest.raises(EvalError, match="crops must be 1"):
        evaluate([setup["ckpt"]["random"]], setup["data"], crops=3)


# ---------------------------------------------------------------- the commands


def test_eval_json_of_an_ensemble_from_the_console_script(setup):
    # An image-dependent network and a constant one: the ensemble's expected
    # probabilities are the average of the direct computation and softmax(fc8.bias).
    # A checkpoint directory stands for its newest checkpoint.
    ck = setup["ckpt"]
    proc = subprocess.run([ALEXNETD, "eval", "--checkpoint", str(ck["random"].parent),
                           "--checkpoint", str(ck["const_b"]), "--data", str(setup["data"]),
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"top1_error", "top5_error", "images", "crops", "models"} <= set(out)
    assert 0 <= out["top1_error"] <= 1 and 0 <= out["top5_error"] <= 1
    expected = (setup["centre"] + softmax(np.array(BIAS_B))) / 2
    assert out["top1_error"] == errors(expected, setup["labels"])
    # ... which is neither network's error alone (B alone always says class 3).
    assert out["top1_error"] not in (errors(setup["centre"], setup["labels"]), 0.75)
    assert (out["images"], out["crops"], out["models"]) == (16, 1, 2)
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal


def test_eval_summary_is_readable(setup):
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(setup["ckpt"]["const_a"]),
                                       "--data", str(setup["data"])])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"1 network, the centre patch, 16 val images of {setup['data']}"
    assert lines[1].split() == ["top-1", "error", "75.00%"]  # always class 1: 4 of 16 right
    assert lines[2].split()[:3] == ["top-4", "error", "0.00%"] and "4 classes" in lines[2]


def _image_files(setup, tmp_path) -> list[Path]:
    val = setup["ds"].split("val")
    good = tmp_path / "val0.jpg"
    good.write_bytes(val.read(0))
    # Not square and not 256: predict down-samples it as §2 says.
    wide = tmp_path / "wide.jpg"
    Image.fromarray(setup["images"][5]).resize((400, 300)).save(wide, quality=95)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    return [good, bad, wide, tmp_path / "missing.jpg"]


def test_predict_lists_the_top_classes_and_reports_bad_images(setup, tmp_path):
    good, bad, wide, missing = _image_files(setup, tmp_path)
    result = CliRunner().invoke(
        main, ["predict", "--checkpoint", str(setup["ckpt"]["random"]),
               "--data", str(setup["data"]), str(good), str(bad), str(wide), str(missing)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == str(good) and lines[C + 1] == str(wide) and len(lines) == 2 * (C + 1)
    for block in (lines[1:C + 1], lines[C + 2:]):
        probs = [float(line.split()[0].rstrip("%")) / 100 for line in block]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-3
    errs = result.stderr.strip().splitlines()
    assert errs[0].startswith(f"error: {bad}: not a usable image")
    assert errs[1].startswith(f"error: {missing}: No such file")
    assert errs[2] == "Error: 2 of 4 images could not be read"


def test_predict_json_matches_the_evaluated_probabilities(setup, tmp_path):
    good, bad, wide, missing = _image_files(setup, tmp_path)
    # No --data: the checkpoint's config names the dataset with the mean image.
    result = CliRunner().invoke(
        main, ["predict", "--checkpoint", str(setup["ckpt"]["random"]), "--json", str(good), str(bad)])
    rows = json.loads(result.stdout)
    assert rows[1] == {"path": str(bad), "error": rows[1]["error"]} and "not a usable image" in rows[1]["error"]
    preds = rows[0]["predictions"]
    assert len(preds) == C
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
    ds = setup["ds"]
    expected = setup["centre"][0]
    for p in preds:
        i = ds.classes.index(p["class"])
        assert p["name"] == ds.class_names[i]
        assert p["probability"] == pytest.approx(expected[i], abs=1e-5)


def test_predict_api_keeps_going_past_a_bad_image(setup, tmp_path):
    good, bad, wide, missing = _image_files(setup, tmp_path)
    out = predict(setup["ckpt"]["const_a"], [missing, good], topk=2, data=setup["data"])
    assert out[0].top == [] and "No such file" in out[0].error
    (c1, _, p1), (c2, _, p2) = out[1].top
    expected = softmax(np.array(BIAS_A))
    assert (c1, c2) == (setup["ds"].classes[1], setup["ds"].classes[2])
    assert (p1, p2) == (pytest.approx(expected[1], abs=1e-6), pytest.approx(expected[2], abs=1e-6))
