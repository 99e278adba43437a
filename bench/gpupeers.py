"""bench/gpu.py's other rows: the DataLoader a torchvision user would write feeding the
same step, the two-tower code path on one device, and the GPU tests."""

from __future__ import annotations

import shlex
import subprocess
import sys

from gpuhost import ROOT, ok, skipped
from gpustep import make_step, time_rate

class TorchvisionStyle:
    """What a torchvision user writes: one sample at a time, PIL decode, RandomCrop(224),
    RandomHorizontalFlip, PILToTensor; default_collate stacks the batch (torchvision's
    transforms spelled out, so the row needs no torchvision)."""

    def __init__(self, data: str):
        from alexnetd.pipeline.dataset import open_dataset

        self.split = open_dataset(data).split("train")
        self.rng = None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i):
        import io

        import numpy as np
        import torch
        from PIL import Image

        if self.rng is None:  # per worker: torch seeds each one differently
            self.rng = np.random.default_rng(torch.initial_seed())
        image = Image.open(io.BytesIO(self.split.read(i))).convert("RGB")
        left, top = (int(self.rng.integers(0, side - 224 + 1)) for side in image.size)
        image = image.crop((left, top, left + 224, top + 224))
        if self.rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # CHW uint8, as PILToTensor
        return pixels, int(self.split.labels[i])


def run_dataloader(ctx) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from alexnetd.model.alexnet import AlexNet

    dataset = TorchvisionStyle(ctx.data)
    loader = DataLoader(dataset, batch_size=ctx.batch, sampler=RandomSampler(dataset, num_samples=10**9),
                        num_workers=ctx.cores, pin_memory=ctx.device.type == "cuda", drop_last=True,
                        persistent_workers=True, prefetch_factor=4)
    device = ctx.device
    bf16 = channels_last = device.type == "cuda"  # the daemon's configuration on each device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = AlexNet(ctx.num_classes).to(device).train().to(memory_format=fmt)
    step = make_step(model, device, bf16)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    batches = iter(loader)

    def run_once():
        pixels, labels = next(batches)
        x = ((pixels.to(device, non_blocking=True).float() - mean) / std).contiguous(memory_format=fmt)
        step(x, (labels % ctx.num_classes).to(device, non_blocking=True))

    try:
        per_step, steps = time_rate(run_once, device, ctx.warmup + 1, ctx.steps, ctx.seconds)
    finally:
        batches._shutdown_workers()  # now, not whenever the collector gets to it
    rate = ctx.batch / per_step
    row = {"images_per_second": round(rate, 1), "ms_per_step": round(per_step * 1e3, 3), "steps": steps,
           "batch": ctx.batch, "workers": ctx.cores}
    row.update(ctx.peak_share(rate))
    return ok(row)


# -- the two-tower code path on one device ------------------------------------------------


def run_towers(ctx) -> dict:
    import torch
    import torch.nn.functional as F

    from alexnetd.model.alexnet import AlexNet, TwoTowerAlexNet

    device = ctx.device
    # float64 on CUDA, so TF32 convolutions do not blur the comparison; float32 on the CPU,
    # where float64 convolutions are slow (tests/test_model.py uses the same bounds).
    dtype, rtol, atol = (torch.float64, 1e-7, 1e-7) if device.type == "cuda" else (torch.float32, 1e-4, 2e-5)
    torch.manual_seed(0)
    grouped = AlexNet(num_classes=10).eval().to(device, dtype)
    towers = TwoTowerAlexNet(num_classes=10, devices=(str(device), str(device))).eval()
    towers.load_state_dict(grouped.state_dict())
    towers = towers.to(dtype)
    x = torch.randn(2, 3, 224, 224, dtype=dtype, device=device) * 50
    y = torch.tensor([3, 7], device=device)
    out_g, out_t = grouped(x), towers(x)
    F.cross_entropy(out_g, y).backward()
    F.cross_entropy(out_t, y).backward()
    output_error = float((out_t - out_g).detach().abs().max() / out_g.detach().abs().max())
    towers_grads = dict(towers.named_parameters())
    worst = 0.0
    for name, p in grouped.named_parameters():
        if name in towers_grads:
            grad = towers_grads[name].grad
        else:  # split into the towers' halves along the output dimension
            grad = torch.cat([towers_grads[name.replace(".weight", ".weight_a").replace(".bias", ".bias_a")].grad,
                              towers_grads[name.replace(".weight", ".weight_b").replace(".bias", ".bias_b")].grad])
        scale = float(p.grad.abs().max())
        worst = max(worst, float((grad - p.grad).abs().max()) / scale)
    equal = output_error <= rtol + atol and worst <= rtol + atol
    row = {"dtype": str(dtype).replace("torch.", ""), "output_relative_error": output_error,
           "gradient_relative_error": worst, "bound": rtol + atol, "equal": equal}
    if not equal:
        return {"status": "failed", "reason": f"towers differ from AlexNet beyond {rtol + atol:g}", **row}
    return ok(row)


# -- the GPU tests that exist --------------------------------------------------------------


def run_gpu_tests(ctx) -> dict:
    import xml.etree.ElementTree as ET

    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return skipped("pytest is not installed here (put its wheels in the --wheels directory)")
    report = ctx.out / "gpu-tests.xml"
    # Only the files that hold GPU tests: the others may need the dev extras to import.
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}",
               *files]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=ctx.tests_timeout)
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    row = {"command": shlex.join(command), **counts, "exit_code": done.returncode}
    if counts["failures"] or counts["errors"]:
        return {"status": "failed", "reason": done.stdout.strip().splitlines()[-1], **row}
    if ctx.device.type != "cuda":
        return {"status": "skipped", "reason": f"no CUDA here: the {counts['skipped']} GPU tests skip", **row}
    return ok(row)

