"""Time one training step of the 2012 network: forward, backward, PaperSGD update.

    python bench/step.py                       # CPU at batch 32 and 128, CUDA if present
    python bench/step.py --batches 32 --steps 3

Each row is the median of ``--steps`` timed steps after ``--warmup`` untimed ones (the
first steps pay for allocation and, on CUDA, cuDNN autotuning). On CUDA it times fp32
and bf16 autocast, both channels-last, and the two-tower form when two GPUs are present.

The last column compares with the paper: about 90 passes over 1.2 M images in five to
six days on two GTX 580s (§5), i.e. 90 * 1.2e6 / (5.5 * 86400) = ~227 images/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from alexnetd.model.alexnet import AlexNet, TwoTowerAlexNet
from alexnetd.model.recipe import PaperSGD, autocast_context

PAPER_IMAGES_PER_S = 90 * 1.2e6 / (5.5 * 86400)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        # note: a CPU-GPU sync point, so the clock measures finished work; every GPU,
        # since the two-tower form's last updates run on the second one.
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def time_steps(model: torch.nn.Module, device: torch.device, batch: int, bf16: bool,
               channels_last: bool, steps: int, warmup: int) -> list[float]:
    """Seconds per step for ``steps`` timed steps on synthetic data already on device."""
    opt = PaperSGD(model.parameters())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    out_device = next(model.fc8.parameters()).device
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with autocast_context(device, bf16):
            loss = F.cross_entropy(model(x), y.to(out_device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="32,128", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per row")
    ap.add_argument("--cuda-steps", type=int, default=20)
    ap.add_argument("--cuda-warmup", type=int, default=5)
    ap.add_argument("--no-cuda", action="store_true", help="CPU rows only")
    ap.add_argument("--no-cpu", action="store_true", help="CUDA rows only")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    rows = []  # (device, precision, layout, batch, median seconds)
    if not args.no_cpu:
        cpu = torch.device("cpu")
        model = AlexNet().train()
        for b in batches:
            t = time_steps(model, cpu, b, False, False, args.steps, args.warmup)
            rows.append((f"cpu ({torch.get_num_threads()} threads)", "fp32", "NCHW", b,
                         statistics.median(t)))
        del model
    if torch.cuda.is_available() and not args.no_cuda:
        torch.backends.cudnn.benchmark = True
        gpu = torch.device("cuda:0")
        name = torch.cuda.get_device_name(gpu)
        model = AlexNet().to(gpu).to(memory_format=torch.channels_last).train()
        for b in batches:
            for bf16 in (False, True):
                t = time_steps(model, gpu, b, bf16, True, args.cuda_steps, args.cuda_warmup)
                rows.append((name, "bf16" if bf16 else "fp32", "NHWC", b, statistics.median(t)))
        del model
        if torch.cuda.device_count() >= 2:
            towers = TwoTowerAlexNet(devices=("cuda:0", "cuda:1"))
            towers = towers.to(memory_format=torch.channels_last).train()
            for b in batches:
                t = time_steps(towers, gpu, b, True, True, args.cuda_steps, args.cuda_warmup)
                rows.append((f"2 towers x {name}", "bf16", "NHWC", b, statistics.median(t)))

    header = ("device", "precision", "layout", "batch", "ms/step", "images/s", "x paper")
    table = [header] + [
        (dev, prec, layout, str(b), f"{s * 1e3:.1f}", f"{b / s:.0f}",
         f"{b / s / PAPER_IMAGES_PER_S:.2f}")
        for dev, prec, layout, b, s in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))
    print(f"paper: ~{PAPER_IMAGES_PER_S:.0f} images/s on two GTX 580 (90 epochs of 1.2 M "
          "images in 5-6 days, §5)")


if __name__ == "__main__":
    main()
