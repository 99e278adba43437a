"""The §5 recipe: the paper's SGD update, the plateau schedule, device helpers."""

import io
import random
import warnings

import numpy as np
import pytest
import torch

from alexnetd.model.recipe import (PaperSGD, PlateauSchedule, autocast_context,
                                   load_rng_state, rng_state, set_deterministic, set_lr)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))]


def _grads(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(4, 3, generator=g, dtype=torch.float64),
             torch.randn(5, generator=g, dtype=torch.float64)] for _ in range(steps)]


def _run(opt, params, grads, lrs):
    for step_grads, lr in zip(grads, lrs):
        set_lr(opt, lr)
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


LRS = [0.01] * 4 + [0.001] * 3  # one 10x drop after four steps


def test_paper_sgd_matches_the_hand_computation():
    params = _params()
    w = [p.detach().numpy().copy() for p in params]
    grads = _grads(len(LRS))
    got = _run(PaperSGD(params), params, grads, LRS)
    v = [np.zeros_like(x) for x in w]
    for step_grads, eps in zip(grads, LRS):
        for i, g in enumerate(step_grads):
            v[i] = 0.9 * v[i] - 0.0005 * eps * w[i] - eps * g.numpy()
            w[i] = w[i] + v[i]
    for p, expected in zip(got, w):
        np.testing.assert_allclose(p.numpy(), expected, rtol=0, atol=1e-14)


def test_paper_sgd_equals_torch_sgd_while_lr_is_constant():
    grads = _grads(5)
    ours, theirs = _params(), _params()
    opt = PaperSGD(ours)
    ref = torch.optim.SGD(theirs, lr=0.01, momentum=0.9, weight_decay=5e-4)
    a = _run(opt, ours, grads, [0.01] * 5)
    b = _run(ref, theirs, grads, [0.01] * 5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-14)
    # The reparametrisation: the paper's velocity is -lr times torch's momentum buffer.
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(opt.state[p]["velocity"],
                                   -0.01 * ref.state[q]["momentum_buffer"],
                                   rtol=0, atol=1e-15)


def test_paper_sgd_differs_from_torch_sgd_after_an_lr_drop():
    grads = _grads(len(LRS))
    ours, theirs = _params(), _params()
    a = _run(PaperSGD(ours), ours, grads, LRS)
    b = _run(torch.optim.SGD(theirs, lr=0.01, momentum=0.9, weight_decay=5e-4),
             theirs, grads, LRS)
    # Torch rescales the accumulated momentum by the new lr; the paper does not, so the
    # first step after the drop still moves with ~0.9x the old, 10x larger velocity.
    diff = max((x - y).abs().max().item() for x, y in zip(a, b))
    assert diff > 1e-3


def test_paper_sgd_skips_parameters_without_gradients():
    params = _params()
    before = params[1].detach().clone()
    opt = PaperSGD(params)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert torch.equal(params[1].detach(), before)
    assert params[1] not in opt.state and "velocity" in opt.state[params[0]]


def test_paper_sgd_state_dict_round_trips():
    grads = _grads(6)
    params = _params()
    opt = PaperSGD(params, lr=0.02, momentum=0.8, weight_decay=1e-3)
    _run(opt, params, grads[:3], [0.02] * 3)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = PaperSGD(resumed)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["momentum"] == 0.8
    assert opt2.param_groups[0]["weight_decay"] == 1e-3
    a = _run(opt, params, grads[3:], [0.002] * 3)
    b = _run(opt2, resumed, grads[3:], [0.002] * 3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_paper_sgd_rejects_negative_hyperparameters():
    with pytest.raises(ValueError):
        PaperSGD(_params(), lr=-0.1)


def test_schedule_keeps_lr_while_error_improves():
    s = PlateauSchedule(patience=2)
    for err in [0.9, 0.8, 0.7, 0.6, 0.5]:
        assert s.step(err) == 0.01
    assert s.drops == 0 and not s.should_stop


def test_schedule_divides_lr_by_10_after_patience_evaluations_without_improvement():
    s = PlateauSchedule(patience=3)
    s.step(0.5)
    assert s.step(0.5) == 0.01   # equal is not an improvement
    assert s.step(0.6) == 0.01
    assert s.step(0.55) == pytest.approx(0.001)
    assert s.drops == 1
    # The new lr gets a full patience window before the next drop.
    assert s.step(0.51) == pytest.approx(0.001)
    assert s.step(0.52) == pytest.approx(0.001)
    assert s.step(0.49) == pytest.approx(0.001)  # improvement resets the count


def test_schedule_drops_three_times_then_stops_at_the_next_plateau():
    s = PlateauSchedule(patience=2)
    s.step(0.5)
    lrs = []
    for _ in range(3):
        lrs += [s.step(0.5), s.step(0.5)]
        assert not s.should_stop
    assert lrs[1::2] == pytest.approx([1e-3, 1e-4, 1e-5])
    assert s.drops == 3
    s.step(0.5)
    assert not s.should_stop
    assert s.step(0.5) == pytest.approx(1e-5)  # no fourth drop: it stops instead
    assert s.should_stop and s.drops == 3


def test_schedule_stops_at_max_epochs():
    s = PlateauSchedule(max_epochs=4)
    for i, err in enumerate([0.9, 0.8, 0.7]):
        s.step(err)
        assert not s.should_stop
    s.step(0.6)
    assert s.should_stop and s.drops == 0
    s2 = PlateauSchedule(max_epochs=90)
    s2.step(0.9, epoch=90)  # validating every few epochs: the caller passes the epoch
    assert s2.should_stop


def test_schedule_state_dict_is_plain_and_resumes_identically():
    errors = [0.9, 0.8, 0.8, 0.8, 0.7, 0.75, 0.75, 0.75, 0.74, 0.74, 0.74, 0.74]
    whole = PlateauSchedule(patience=2)
    first = PlateauSchedule(patience=2)
    lrs_whole = [whole.step(e) for e in errors]
    lrs_split = [first.step(e) for e in errors[:5]]
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert all(isinstance(v, (int, float, bool, type(None))) for v in state.values())
    second = PlateauSchedule(patience=2)
    second.load_state_dict(state)
    lrs_split += [second.step(e) for e in errors[5:]]
    assert lrs_split == lrs_whole
    assert second.state_dict() == whole.state_dict()
    assert whole.drops == 3 and whole.should_stop


def test_autocast_context_is_bf16_on_cuda_only():
    with autocast_context("cpu", bf16=True):
        assert not torch.is_autocast_enabled("cpu")
        x = torch.ones(2, 2) @ torch.ones(2, 2)
    assert x.dtype == torch.float32
    with warnings.catch_warnings():
        # On a machine without CUDA torch warns that it disables the context.
        warnings.simplefilter("ignore")
        ctx = autocast_context(torch.device("cuda:0"), bf16=True)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(autocast_context("cuda", bf16=False), torch.autocast)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_context_runs_matmuls_in_bf16_on_cuda():
    a = torch.ones(8, 8, device="cuda")
    with autocast_context("cuda", bf16=True):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_context("cuda", bf16=False):
        assert (a @ a).dtype == torch.float32


@pytest.fixture
def restore_determinism():
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2:]


def test_set_deterministic_seeds_every_generator(restore_determinism):
    def draw():
        return random.random(), np.random.rand(), torch.rand(3)
    set_deterministic(123)
    a = draw()
    set_deterministic(123)
    b = draw()
    set_deterministic(124)
    c = draw()
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])
    assert a[0] != c[0] and not torch.equal(a[2], c[2])
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_rng_state_round_trips_through_a_weights_only_checkpoint():
    torch.manual_seed(7)
    state = rng_state()
    assert all(torch.is_tensor(v) for v in state.values())
    expected = torch.rand(5)
    torch.rand(100)  # move on
    buf = io.BytesIO()
    torch.save({"rng": state}, buf)
    buf.seek(0)
    load_rng_state(torch.load(buf, weights_only=True)["rng"])
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_paper_sgd_foreach_is_the_per_tensor_update_to_the_bit(device):
    """One _foreach_* launch per operation for all of AlexNet's 16 tensors, in float32: the
    same bits as the loop over tensors, through an lr drop."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from alexnetd.model.alexnet import AlexNet

    torch.manual_seed(0)
    a = AlexNet(num_classes=10).to(device)
    b = AlexNet(num_classes=10).to(device)
    b.load_state_dict(a.state_dict())
    fast, slow = PaperSGD(a.parameters(), foreach=True), PaperSGD(b.parameters(), foreach=False)
    assert len(list(a.parameters())) == 16
    g = torch.Generator().manual_seed(1)
    for lr in LRS:
        set_lr(fast, lr)
        set_lr(slow, lr)
        for p, q in zip(a.parameters(), b.parameters()):
            grad = torch.randn(p.shape, generator=g).to(device)
            p.grad, q.grad = grad.clone(), grad.clone()
        fast.step()
        slow.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(fast.state[p]["velocity"], slow.state[q]["velocity"])
