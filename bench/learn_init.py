"""Does the paper's initialisation train at small scale? Loss and accuracy over steps.

    python bench/learn_init.py paper 0.003 32 60
    python bench/learn_init.py caffe 0.003 32 100

Trains AlexNet in-process through the real input pipeline on a 4-class fake-data set
(cached under bench/.cache) with PaperSGD, printing 10-step means of the training loss
and accuracy. Used to choose the learning test's settings (BENCHMARKS.md).
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from alexnetd.model import AlexNet, PaperSGD
from alexnetd.pipeline.fakedata import make_fake_data
from alexnetd.pipeline.launch import InputPipeline
from alexnetd.pipeline.transform import InputTransform

CACHE = Path(__file__).resolve().parent / ".cache"


def main(bias_init: str, lr: float, batch: int, steps: int) -> None:
    data = CACHE / "fake-4x64"
    if not (data / "manifest.json").exists():
        make_fake_data(data, classes=4, train_per_class=64, val_per_class=16, shards=2, seed=0)
    torch.manual_seed(0)
    with InputPipeline(data, CACHE / f"run-learn-{bias_init}", batch=batch, augmenters=1, val_every=0) as pipe:
        transform = InputTransform(*pipe.dataset.stats())
        model = AlexNet(len(pipe.dataset.classes), bias_init=bias_init)
        optimizer = PaperSGD(model.parameters(), lr=lr)
        losses, hits = [], []
        print("step  loss(10-step mean)  train accuracy")
        for step in range(1, steps + 1):
            batch_ = pipe.copier.next_batch(60_000)
            logits = model(transform.train(batch_.images, batch_.crops, batch_.flips, batch_.alphas))
            loss = F.cross_entropy(logits, batch_.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pipe.copier.release(batch_)
            losses.append(loss.item())
            hits.append((logits.argmax(1) == batch_.labels).float().mean().item())
            if step % 10 == 0:
                print(f"{step:4d}  {sum(losses[-10:]) / 10:18.3f}  {sum(hits[-10:]) / 10:14.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
