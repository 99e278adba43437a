"""bench/gpu.py's training-step rows: the step itself, timed on data already on the
device (fp32, bf16, channels_last, torch.compile, CUDA graphs), and the bf16 matmul
rate the step's FLOPs are held against (MFU)."""

from __future__ import annotations

import time

from gpuhost import ok, skipped

def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: a CPU-GPU sync point, so the clock sees finished work


def make_step(model, device, bf16: bool, keep_grads: bool = False):
    """The daemon's training step (service/trainer.py) on a prepared input: forward under
    alexnetd's autocast, cross-entropy in fp32, backward, PaperSGD. `keep_grads`: zero the
    gradients in place instead of dropping them, as a captured CUDA graph needs."""
    import torch.nn.functional as F

    from alexnetd.model.recipe import PaperSGD, autocast_context

    optimizer = PaperSGD(model.parameters())

    def step(x, y):
        with autocast_context(device, bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=not keep_grads)
        loss.backward()
        optimizer.step()
        return loss

    return step


def time_rate(run_once, device, warmup: int, steps: int, seconds: float) -> tuple[float, int]:
    """Seconds per call of run_once over at least `steps` calls (more while under
    `seconds`), after `warmup` untimed ones. Throughput: one sync at each end, not one per
    step, so the device queue stays full as in training."""
    for _ in range(warmup):
        run_once()
    sync(device)
    done, start = 0, time.perf_counter()
    while done < steps or (time.perf_counter() - start < seconds and done < 50 * steps):
        run_once()
        done += 1
        if done % 10 == 0 or done >= steps:
            sync(device)
    sync(device)
    return (time.perf_counter() - start) / done, done


def flops_per_image() -> float:
    """FLOPs of one trained image (forward + backward, not the update), counted by torch
    on the real network at batch 1 on the CPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from alexnetd.model.alexnet import AlexNet

    model = AlexNet()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224)).sum().backward()
    return float(counter.get_total_flops())


SYNTHETIC = {  # name -> (label, bf16, channels_last, how)
    "fp32": ("fp32", False, False, "eager"),
    "bf16": ("bf16 autocast", True, False, "eager"),
    "bf16_cl": ("bf16 + channels_last", True, True, "eager"),
    "compile": ("torch.compile (bf16 + channels_last)", True, True, "compile"),
    "cudagraph": ("CUDA graphs (bf16 + channels_last)", True, True, "graph"),
}


def run_synthetic(ctx, name: str) -> dict:
    label, bf16, channels_last, how = SYNTHETIC[name]
    device = ctx.device
    if device.type != "cuda" and how == "graph":
        return skipped("CUDA graphs need CUDA")
    if device.type != "cuda" and how == "compile":
        return skipped("measured on CUDA only: on the CPU, torch.compile's minutes of C++ compiling "
                       "would swamp a dry run")
    if device.type != "cuda" and bf16:
        return skipped("alexnetd's bf16 autocast is CUDA only (it trains fp32 on the CPU)")
    try:
        return _synthetic_row(ctx, bf16, channels_last, how)
    except Exception as exc:
        if how == "eager":
            raise
        # "where it works": a compiler or capture that fails here is a finding, not a broken bench.
        return skipped(f"{label} does not run here: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")


def _synthetic_row(ctx, bf16: bool, channels_last: bool, how: str) -> dict:
    import torch

    from alexnetd.model.alexnet import AlexNet

    device, batch = ctx.device, ctx.batch
    torch.manual_seed(0)
    model = AlexNet(ctx.num_classes).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=fmt)
    y = torch.randint(0, ctx.num_classes, (batch,), device=device)
    extra = {}
    if how == "compile":
        # The network compiled, the optimizer eager: what a user turning it on would do.
        step = make_step(torch.compile(model), device, bf16)
        started = time.perf_counter()
        step(x, y)  # compiles here, outside the clock
        sync(device)
        extra["compile_seconds"] = round(time.perf_counter() - started, 1)
        run_once = lambda: step(x, y)  # noqa: E731
    elif how == "graph":
        # Warm up on a side stream (allocations, cuDNN choices), then capture the whole
        # step; replays reuse its input, gradient and optimizer buffers.
        step = make_step(model, device, bf16, keep_grads=True)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step(x, y)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(x, y)
        run_once = graph.replay
    else:
        step = make_step(model, device, bf16)
        run_once = lambda: step(x, y)  # noqa: E731
    per_step, steps = time_rate(run_once, device, ctx.warmup, ctx.steps, ctx.seconds)
    row = {"ms_per_step": round(per_step * 1e3, 3), "images_per_second": round(batch / per_step, 1),
           "steps": steps, "batch": batch, "bf16": bf16, "channels_last": channels_last, **extra}
    row.update(ctx.peak_share(batch / per_step))
    return ok(row)



def run_matmul_peak(ctx) -> dict:
    """The bf16 matmul rate this device reaches (a large square product, timed as the
    step is): what the rows' MFU is held against, beside the datasheet peak. Sets
    ctx.measured_peak for the rows after it."""
    import torch

    n = 256 if ctx.dry_run else 8192
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=ctx.device, dtype=torch.bfloat16)
    per_call, calls = time_rate(lambda: torch.mm(a, b, out=out), ctx.device, 3 if ctx.dry_run else 20,
                                ctx.steps, ctx.seconds)
    flops = 2 * n**3 / per_call
    ctx.measured_peak = flops
    share = round(flops / ctx.peak, 4) if ctx.peak else None
    return ok({"n": n, "calls": calls, "tflops": round(flops / 1e12, 3), "share_of_bf16_peak": share,
               "ms_per_step": round(per_call * 1e3, 3)})
