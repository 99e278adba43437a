"""service/trainstep.py: the train step's three forms behind make_train_step.

The eager form is the trainer's step as it always was, to the bit. The compiled and the
graphed forms compute the same step with other kernels (fused, reordered), so they are
held to the eager one within bounds derived from float32 rounding (`step_bounds`), on
a linear model small enough to compile in seconds on two cores: the code path, from
make_train_step to the update, is the one the trainer runs with AlexNet. Production
compiles with inductor; the tests that check only the plumbing pass a cheaper backend.
"""

from __future__ import annotations

import logging
import math
import threading

import pytest
import torch
import torch.nn.functional as F

from alexnetd.model.recipe import PaperSGD, autocast_context, set_lr
from alexnetd.service.trainstep import KINDS, KeepBeating, _Graphed, make_train_step

U = 2.0 ** -24  # float32's unit roundoff
LR, MOMENTUM, WD = 0.01, 0.9, 0.0005  # the paper's (§5)
B, SHAPE, CLASSES = 8, (3, 4, 4), 10


def gamma(n: int) -> float:
    """Higham's γ_n = n·u / (1 - n·u): a float32 sum of n terms (each a product rounded
    once, or fused), in any order and any blocking, is within γ_n·Σ|terms| of the exact
    sum (Accuracy and Stability of Numerical Algorithms, §3.1)."""
    return n * U / (1 - n * U)


def linear_net(seed: int, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Flatten()] + ([torch.nn.Dropout(dropout)] if dropout else [])
    return torch.nn.Sequential(*layers, torch.nn.Linear(math.prod(SHAPE), CLASSES)).train()


def batches(n: int, device="cpu", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, *SHAPE, generator=g).to(device), torch.randint(0, CLASSES, (B,), generator=g).to(device))
            for _ in range(n)]


def step_bounds(x, labels, weight, bias, v_weight, v_bias, lr) -> dict:
    """For one step of Flatten-Linear-cross-entropy-PaperSGD from the given float32 state:
    {name: (exact value, bound)} where any float32 evaluation of that step, whatever
    order its sums run in, is within `bound` of the exact value (computed in float64,
    whose own error, 2^29 times smaller, is left out). Two evaluations (eager and
    compiled, eager and graphed) then differ by at most twice the bound. First-order in
    u; each line is one stage of the step:

    logits   z = x·Wᵀ + b, d+1 terms:        e_z = γ_{d+1}·(|x|·|W|ᵀ + |b|); δ = max_i e_z per row
    softmax  moving every z by ≤ δ scales p's numerator and denominator by e^{±δ} each:
             |p(ẑ) - p(z)| ≤ p·(e^{2δ} - 1); evaluating it at ẑ (z - max, exp within 2 ulps,
             a sum of C terms, its log, a subtraction, exp again) adds a relative
             ρ = u·(2R + 2 ln C + C + 12), R = max_i |z_i - logsumexp z| + 2δ:
             e_p = p·(e^{2δ}(1 + ρ) - 1)
    dL/dz    G = (p - onehot)/B, three roundings relative to its pieces:
             e_G = (e_p + 3u·(p + e_p + onehot)) / B
    grads    ∇W = Gᵀx, ∇b = Σ_b G (B terms): e_∇W = e_Gᵀ|x| + γ_B·(|G| + e_G)ᵀ|x|, and with 1 for |x|
    loss     ℓ = logsumexp z - z_y: e_ℓ = 2δ + ρ + u·(|logsumexp z| + |ℓ|);
             L = mean ℓ: e_L = mean e_ℓ + γ_B·mean(|ℓ| + e_ℓ) + u·|L|
    update   v' = m·v - wd·lr·w - lr·g, w' = w + v' on the same w, v: the gradient's error
             times lr, and at most 8 roundings (m, wd·lr and lr to float32, three products,
             two sums), each relative to one of the three terms:
             e_v = lr·e_g + γ_8·(m|v| + wd·lr|w| + lr(|g| + e_g)); e_w = e_v + u·(|w'| + e_v)
    """
    x, W, b = x.double().flatten(1).cpu(), weight.double().cpu(), bias.double().cpu()
    v_W, v_b = v_weight.double().cpu(), v_bias.double().cpu()
    labels = labels.cpu()
    n, d = x.shape
    onehot = F.one_hot(labels, CLASSES).double()
    z = x @ W.T + b
    e_z = gamma(d + 1) * (x.abs() @ W.abs().T + b.abs())
    delta = e_z.amax(1, keepdim=True)
    lse = torch.logsumexp(z, 1, keepdim=True)
    p = torch.softmax(z, 1)
    R = (z - lse).abs().amax(1, keepdim=True) + 2 * delta
    rho = U * (2 * R + 2 * math.log(CLASSES) + CLASSES + 12)
    e_p = p * (torch.exp(2 * delta) * (1 + rho) - 1)
    G = (p - onehot) / n
    e_G = (e_p + 3 * U * (p + e_p + onehot)) / n
    grads = {"weight": (G.T @ x, e_G.T @ x.abs() + gamma(n) * (G.abs() + e_G).T @ x.abs()),
             "bias": (G.sum(0), e_G.sum(0) + gamma(n) * (G.abs() + e_G).sum(0))}
    ell = (lse - z.gather(1, labels[:, None])).squeeze(1)
    e_ell = (2 * delta + rho + U * (lse.abs() + ell.abs()[:, None])).squeeze(1)
    loss = ell.mean()
    out = {"loss": (loss, e_ell.mean() + gamma(n) * (ell.abs() + e_ell).mean() + U * loss.abs())}
    for name, w, v in (("weight", W, v_W), ("bias", b, v_b)):
        g, e_g = grads[name]
        v_new = MOMENTUM * v - WD * lr * w - lr * g
        e_v = lr * e_g + gamma(8) * (MOMENTUM * v.abs() + WD * lr * w.abs() + lr * (g.abs() + e_g))
        w_new = w + v_new
        out[f"{name}.grad"] = (g, e_g)
        out[f"{name}.velocity"] = (v_new, e_v)
        out[name] = (w_new, e_v + U * (w_new.abs() + e_v))
    return out


def results(net, optimizer, loss) -> dict:
    linear = net[-1]
    out = {"loss": loss.detach()}
    for name in ("weight", "bias"):
        p = getattr(linear, name)
        out[name], out[f"{name}.grad"] = p.detach(), p.grad
        out[f"{name}.velocity"] = optimizer.state[p]["velocity"]
    return {k: v.double().cpu() for k, v in out.items()}


def hold_to_eager(form, kind: str, device: str, steps: int, lrs=None) -> dict:
    """`steps` steps of `form` (a make_train_step keyword) against the eager step, each
    from the same state (the eager one's, copied over): every result within the derived
    bounds of the exact step, so within twice them of each other. The worst difference
    seen, as a share of the bound."""
    lrs = lrs or [LR] * steps
    eager_net, net = linear_net(0).to(device), linear_net(0).to(device)
    eager_opt = PaperSGD(eager_net.parameters(), LR, MOMENTUM, WD)
    opt = PaperSGD(net.parameters(), LR, MOMENTUM, WD)
    eager = make_train_step(eager_net, eager_opt, device, False)
    step = make_train_step(net, opt, device, False, **form)
    assert (eager.kind, step.kind) == ("eager", kind)
    worst = {}
    for (x, labels), lr in zip(batches(steps, device), lrs):
        set_lr(eager_opt, lr)
        set_lr(opt, lr)
        linear = eager_net[-1]
        zeros = [torch.zeros_like(linear.weight), torch.zeros_like(linear.bias)]
        state = [eager_opt.state.get(p, {}).get("velocity", z) for p, z in zip(linear.parameters(), zeros)]
        bounds = step_bounds(x, labels, linear.weight, linear.bias, *state, lr)
        a = results(eager_net, eager_opt, eager.run(x, labels))
        b = results(net, opt, step.run(x, labels))
        for name, (exact, bound) in bounds.items():
            assert ((a[name] - exact).abs() <= bound).all(), f"eager {name}: the bound's derivation is wrong"
            assert ((b[name] - exact).abs() <= bound).all(), f"{kind} {name} beyond the bound"
            assert ((a[name] - b[name]).abs() <= 2 * bound).all(), name
            share = float(((a[name] - b[name]).abs() / (2 * bound)).max().detach())
            worst[name] = max(worst.get(name, 0.0), share)
        with torch.no_grad():  # the next step from the same state: in place, as a graph needs
            for p, q in zip(eager_net.parameters(), net.parameters()):
                q.copy_(p)
                opt.state[q]["velocity"].copy_(eager_opt.state[p]["velocity"])
    assert step.kind == kind  # no fallback on the way
    return worst, step


@pytest.fixture
def fresh_dynamo():
    """Each test compiles its own step: dynamo's caches would otherwise fill across tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- eager -------------------------------------------------------------------------------------


def todays_step(net, optimizer, device, autocast, x, labels):
    """service/trainer.py's step before service/trainstep.py, as it was written there."""
    with autocast_context(device, autocast):
        logits = net(x)
    loss = F.cross_entropy(logits.float() if autocast else logits, labels)  # bf16 logits: the loss in fp32
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def test_the_eager_form_is_todays_step_to_the_bit():
    """AlexNet with its dropout, two steps with an lr drop between them: the same losses, weights
    and velocities, bit for bit, as the inline step the trainer had."""
    from alexnetd.model.alexnet import AlexNet

    def train(make):
        torch.manual_seed(0)
        model = AlexNet(num_classes=10).train()
        optimizer = PaperSGD(model.parameters())
        take = make(model, optimizer)
        g = torch.Generator().manual_seed(1)
        losses = []
        for lr in (0.01, 0.001):
            set_lr(optimizer, lr)
            x, labels = torch.randn(2, 3, 224, 224, generator=g), torch.randint(0, 10, (2,), generator=g)
            losses.append(take(x, labels))
        return losses, model, optimizer

    old = train(lambda m, o: lambda x, y: todays_step(m, o, torch.device("cpu"), False, x, y))
    steps = []
    new = train(lambda m, o: steps.append(make_train_step(m, o, "cpu", False)) or steps[-1].run)
    assert [s.kind for s in steps] == ["eager"]
    assert all(torch.equal(a, b) for a, b in zip(old[0], new[0]))
    for p, q in zip(old[1].parameters(), new[1].parameters()):
        assert torch.equal(p, q)
        assert torch.equal(old[2].state[p]["velocity"], new[2].state[q]["velocity"])


# -- compiled ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_steps_equal_eager_ones_within_the_derived_bound(fresh_dynamo, caplog):
    """Inductor, as in production: four steps (forward, loss, backward, update), each held
    to the eager step within the bounds of step_bounds."""
    caplog.set_level(logging.INFO, "alexnetd.trainer")
    worst, _ = hold_to_eager({"compile": True}, "compiled", "cpu", 4)
    compiled = [r.getMessage() for r in caplog.records if "compiled the train step" in r.getMessage()]
    assert len(compiled) == 1 and "inductor" in compiled[0], compiled
    print("compiled vs eager, worst difference as a share of the derived bound:",
          {k: f"{v:.2e}" for k, v in worst.items()})


def test_a_compile_that_fails_falls_back_to_eager_with_one_line(fresh_dynamo, caplog):
    """The run goes on: the step that failed to compile is taken eagerly, with the dropout
    mask an eager run draws, and so are all after it."""

    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    def train(**form):
        net = linear_net(0, dropout=0.5)
        optimizer = PaperSGD(net.parameters())
        step = make_train_step(net, optimizer, "cpu", False, **form)
        torch.manual_seed(5)
        losses = [step.run(x, labels) for x, labels in batches(3)]
        return step, losses, list(net.parameters())

    _, eager_losses, eager_params = train()
    caplog.set_level(logging.INFO, "alexnetd.trainer")
    step, losses, params = train(compile=True, backend=broken)
    lines = [r for r in caplog.records if r.name == "alexnetd.trainer"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "torch.compile" in lines[0].getMessage() and "no C++ compiler here" in lines[0].getMessage()
    assert "\n" not in lines[0].getMessage()
    assert step.kind == "eager"
    assert all(torch.equal(a, b) for a, b in zip(eager_losses, losses))
    assert all(torch.equal(p, q) for p, q in zip(eager_params, params))


def test_status_says_compiling_while_the_first_step_compiles(fresh_dynamo):
    """The trainer holds KeepBeating around the first compiled call: its first beat says
    compiling before the compiler runs, the thread goes on beating while it runs, and
    the state is back to training when it is done. Later steps compile nothing."""
    beats, compiles = [], []
    twice = threading.Event()

    def beat(state):
        beats.append(state)
        if beats.count("compiling") >= 2:
            twice.set()

    def watching(gm, example_inputs):
        compiles.append(list(beats))
        assert twice.wait(60), "no beat from the thread during the compile"
        return gm.forward

    net = linear_net(0)
    step = make_train_step(net, PaperSGD(net.parameters()), "cpu", False, compile=True, backend=watching,
                           preparing=lambda: KeepBeating(beat, lambda: "training", every=0.001))
    data = batches(3)
    step.run(*data[0])
    assert len(compiles) == 1 and compiles[0] and set(compiles[0]) == {"compiling"}
    assert beats[-1] == "training" and set(beats[:-1]) == {"compiling"}
    seen = len(beats)
    for x, labels in data[1:]:
        step.run(x, labels)
    assert len(beats) == seen and len(compiles) == 1 and step.kind == "compiled"


def test_a_batch_of_another_shape_steps_eagerly_without_a_recompile(fresh_dynamo):
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    net = linear_net(0)
    step = make_train_step(net, PaperSGD(net.parameters()), "cpu", False, compile=True, backend=counting)
    (x, labels), (x2, labels2) = batches(2)
    step.run(x, labels)
    step.run(x2[:5], labels2[:5])  # samples that failed to decode
    step.run(x2, labels2)
    assert len(compiles) == 1 and step.kind == "compiled"


def test_the_daemon_shows_compiling_in_status_and_metrics():
    from alexnetd.service.daemonview import shown_state
    from alexnetd.service.metrics import STATES

    assert "compiling" in STATES and set(KINDS) == {"eager", "compiled", "graphed"}
    assert shown_state("starting", {"state": "compiling"}) == "compiling"
    assert shown_state("training", {"state": "compiling"}) == "compiling"  # a restarted trainer
    assert shown_state("starting", {}) == "starting"
    assert shown_state("degraded", {"state": "compiling"}) == "degraded"
    assert shown_state("stopping", {"state": "compiling"}) == "stopping"


# -- graphed -----------------------------------------------------------------------------------


def test_paper_sgd_with_the_lr_in_a_tensor_follows_set_lr_within_the_rounding_bound():
    """lr_tensor (what a captured graph reads) against the float path, each step from the
    same state, through an lr drop: v' = m·v - wd·lr·w - lr·g within twice γ_8 of its three
    terms (8 roundings: see step_bounds), w' = w + v' within that and half an ulp each."""
    g = torch.Generator().manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(64, 48, generator=g)), torch.nn.Parameter(torch.randn(64, generator=g))]
    par = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    floats, tensors = PaperSGD(ref), PaperSGD(par, lr_tensor=True)
    for lr in (0.01, 0.01, 0.001, 0.001):
        set_lr(floats, lr)
        set_lr(tensors, lr)
        for p, q in zip(ref, par):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        v = [floats.state[p]["velocity"].clone() if p in floats.state else torch.zeros_like(p) for p in ref]
        w = [p.detach().clone() for p in ref]
        floats.step()
        tensors.step()
        for p, q, v0, w0 in zip(ref, par, v, w):
            e_v = 2 * gamma(8) * (0.9 * v0.abs() + 0.0005 * lr * w0.abs() + lr * p.grad.abs())
            assert ((floats.state[p]["velocity"] - tensors.state[q]["velocity"]).abs() <= e_v).all()
            assert ((p - q).abs() <= e_v + 2 * U * (p.abs() + q.abs())).all()
            with torch.no_grad():
                q.copy_(p)
                tensors.state[q]["velocity"].copy_(floats.state[p]["velocity"])


def test_cuda_graphs_on_the_cpu_are_a_logged_fallback_to_eager(caplog):
    caplog.set_level(logging.INFO, "alexnetd.trainer")
    net = linear_net(0)
    step = make_train_step(net, PaperSGD(net.parameters()), "cpu", False, cuda_graphs=True)
    assert step.kind == "eager"
    lines = [r.getMessage() for r in caplog.records if r.name == "alexnetd.trainer"]
    assert len(lines) == 1 and "CUDA device" in lines[0]


def test_start_refuses_cuda_graphs_on_the_cpu_and_on_several_devices(prepared_data, tmp_path):
    import click

    from alexnetd.pipeline.netaddr import free_port
    from alexnetd.service.config import Config, ConfigError, resolve_device
    from alexnetd.service.daemoncmds import preflight, resolve_config

    config = resolve_device(resolve_config(prepared_data, tmp_path / "run", None, batch_size=8, device="cpu",
                                           cuda_graphs=True, metrics_addr=f"127.0.0.1:{free_port()}"))
    with pytest.raises(click.ClickException, match="--cuda-graphs captures the step on a CUDA device"):
        preflight(config, False)
    with pytest.raises(ConfigError, match="one device's step"):
        Config(device="cuda", gpus=2, parallel="data", cuda_graphs=True)
    with pytest.raises(ConfigError, match="choose one"):
        Config(compile=True, cuda_graphs=True)


def test_the_warm_up_before_a_capture_leaves_no_trace():
    """The graphed form's warm-up steps train: what they change (weights, velocities, RNG)
    is put back in place, so its first step is the run's first step."""
    net = linear_net(0, dropout=0.5)
    optimizer = PaperSGD(net.parameters())
    step = _Graphed(net, optimizer, torch.device("cpu"), False, None)
    (x, labels), (x2, labels2) = batches(2)
    step._static_step(x, labels)  # a velocity to keep
    before = [p.detach().clone() for p in net.parameters()]
    velocities = [optimizer.state[p]["velocity"].clone() for p in net.parameters()]
    torch.manual_seed(3)
    saved = step._save()
    expected = torch.rand(4)
    for _ in range(3):
        step._static_step(x2, labels2)
    step._restore(saved)
    assert torch.equal(torch.rand(4), expected)
    for p, b, v in zip(net.parameters(), before, velocities):
        assert torch.equal(p, b) and torch.equal(optimizer.state[p]["velocity"], v)


@pytest.mark.gpu
def test_graphed_steps_equal_eager_ones_through_an_lr_drop_without_a_recapture(monkeypatch):
    """Ten steps replayed from one CUDA graph, each held to the eager step from the same
    state within step_bounds (float32 matmuls: no TF32), the lr divided by 10 between
    steps 5 and 6 through set_lr alone; one capture."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: a CUDA graph is captured on a CUDA device")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    worst, step = hold_to_eager({"cuda_graphs": True}, "graphed", "cuda", 10, lrs=[LR] * 5 + [LR / 10] * 5)
    assert step.captures == 1
    print("graphed vs eager, worst difference as a share of the derived bound:",
          {k: f"{v:.2e}" for k, v in worst.items()})


_STOPPED_WHILE_COMPILING = r"""
import os, signal, sys, threading, types
import torch
from alexnetd.model.recipe import PaperSGD
from alexnetd.pipeline.stage import StopFlag
from alexnetd.service.history import History
from alexnetd.service.trainer import Trainer
from alexnetd.service.trainstep import KeepBeating, make_train_step

run_dir, saved_step, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
beats, ticked = [], threading.Condition()

def beat(state, force=False):
    with ticked:
        beats.append(state)
        ticked.notify_all()

trainer = types.SimpleNamespace(stop=StopFlag(), world_size=1, step=step, history=History(run_dir),
                                saved_key=None if saved_step == "none" else (int(saved_step), 0, 0), _beat=beat)
leave = lambda: Trainer._leave_if_stopped_while_preparing(trainer)

def slow_compiler(gm, example_inputs):
    # The stop arrives while compiling; the compile ends only after five more ticks of
    # the beating thread, each of which has asked the trainer whether to leave.
    os.kill(os.getpid(), signal.SIGTERM)
    with ticked:
        asked = len(beats)
        ticked.wait_for(lambda: len(beats) >= asked + 5, timeout=120)
    print("compile finished", flush=True)
    return gm.forward

torch.manual_seed(0)
net = torch.nn.Linear(4, 3)
train_step = make_train_step(net, PaperSGD(net.parameters()), "cpu", False, compile=True, backend=slow_compiler,
                             preparing=lambda: KeepBeating(lambda s: trainer._beat(s, True), lambda: "training",
                                                           every=0.01, on_tick=leave))
train_step.run(torch.randn(8, 4), torch.randint(0, 3, (8,)))
print("stepped", flush=True)
"""


@pytest.mark.parametrize("saved_step, step, leaves", [("none", 0, True), ("40", 40, True), ("40", 41, False)])
def test_a_stop_while_the_step_compiles_leaves_at_once_when_nothing_would_be_lost(tmp_path, saved_step, step,
                                                                                 leaves):
    """A real process compiles its first step and is sent SIGTERM meanwhile. With nothing
    trained since the checkpoint (a fresh run, or a resumed one at its checkpoint's step)
    it leaves at the beating thread's next tick, exit 0, with the history's trainer-stop
    event, the compile unfinished. With a trained step the checkpoint lacks it does not:
    the compile finishes (five ticks later) and the step is taken, for the trainer's loop
    to checkpoint it and stop as always."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _STOPPED_WHILE_COMPILING, str(tmp_path), saved_step, str(step)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    history = tmp_path / "history.jsonl"
    events = [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
    stops = [e for e in events if e.get("event") == "trainer-stop"]
    if leaves:
        assert "compile finished" not in done.stdout and "stepped" not in done.stdout
        assert len(stops) == 1 and stops[0]["reason"] == "stopped while compiling" and stops[0]["step"] == step
    else:
        assert "compile finished" in done.stdout and "stepped" in done.stdout
        assert stops == []
