"""The whole recipe learns: the daemon trains AlexNet on a small learnable fake-data set
on the CPU (conftest.py's `trained` run, shared with the other tests that read a finished
run), and validation error falls well below chance. The trained run then feeds `eval`,
`predict` and `report`, as a user would use them."""

import json

import pytest
from PIL import Image

from alexnetd.pipeline.dataset import open_dataset
from alexnetd.service.history import read_history
from daemon_helpers import cli

pytestmark = pytest.mark.slow


def test_validation_error_falls_well_below_chance(trained):
    history = read_history(trained.run_dir)
    errors = [row["top1_error"] for row in history if row["kind"] == "val"]
    assert len(errors) == trained.epochs == 8
    assert min(errors) < 0.4 < 1 - 1 / trained.classes  # chance
    assert errors[-1] < 0.5
    losses = [row["loss"] for row in history if row["kind"] == "step"]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8
    stop = [row for row in history if row["kind"] == "event" and row["event"] == "trainer-stop"]
    assert stop and stop[-1]["reason"] == "finished"


def test_eval_agrees_the_network_learned(trained):
    result = cli("eval", "--checkpoint", trained.run_dir / "checkpoints", "--data", trained.data, "--crops", 10,
                 "--json", check=True)
    scores = json.loads(result.stdout)
    assert scores["images"] == trained.val_images and scores["crops"] == 10 and scores["models"] == 1
    assert scores["top1_error"] < 0.5


def test_predict_names_classes_of_the_dataset(trained, tmp_path):
    dataset = open_dataset(trained.data)
    image = tmp_path / "one.jpg"
    image.write_bytes(dataset.split("val").read(0))
    result = cli("predict", "--checkpoint", trained.run_dir / "checkpoints", "--json", image, check=True)
    (prediction,) = json.loads(result.stdout)
    classes = [p["class"] for p in prediction["predictions"]]
    assert set(classes) <= set(dataset.classes) and len(classes) == trained.classes


def test_report_of_a_real_run(trained, tmp_path):
    out = tmp_path / "report"
    cli("report", trained.run_dir, "--out", out, check=True)
    for name in ("loss.png", "val_error.png", "stage_rates.png", "conv1_kernels.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.width > 200 and png.height > 100
            extrema = png.convert("L").getextrema()
            assert extrema[0] < extrema[1], f"{name} is blank"
        assert name in (out / "index.html").read_text()
