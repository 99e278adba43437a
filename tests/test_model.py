"""The network pinned to the paper's numbers (§3, §4.2, §5) and the two-tower form (§3.2)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alexnetd.model.alexnet import (LAYERS, AlexNet, LocalResponseNorm, TwoTowerAlexNet,
                                    layer_output_shapes)
from alexnetd.model.recipe import PaperSGD

PAPER_LAYER_SHAPES = {
    "conv1": (96, 55, 55), "conv2": (256, 27, 27), "conv3": (384, 13, 13),
    "conv4": (384, 13, 13), "conv5": (256, 13, 13), "fc6": (4096,), "fc7": (4096,),
    "fc8": (1000,),
}


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return AlexNet()


def test_parameter_count_is_the_grouped_networks(paper_model):
    assert sum(p.numel() for p in paper_model.parameters()) == 60_965_224


def test_the_checkpoint_size_counts_the_built_networks_parameters(paper_model):
    """model/size.py counts without torch (for `start`'s disk check); it must agree with
    the network as built, for any class count and both dtypes."""
    from alexnetd.model.size import CHECKPOINT_SLACK, checkpoint_bytes, parameter_count

    assert parameter_count(1000) == sum(p.numel() for p in paper_model.parameters())
    assert parameter_count(4) == sum(p.numel() for p in AlexNet(4).parameters())
    assert checkpoint_bytes(4) == 2 * 4 * parameter_count(4) + CHECKPOINT_SLACK  # weights + velocity
    assert checkpoint_bytes(4, "float64") == 2 * 8 * parameter_count(4) + CHECKPOINT_SLACK


def test_state_dict_holds_exactly_the_eight_layers(paper_model):
    sd = paper_model.state_dict()
    assert list(sd) == [f"{layer}.{p}" for layer in LAYERS for p in ("weight", "bias")]
    assert sd["conv1.weight"].shape == (96, 3, 11, 11)
    # conv2, conv4, conv5 read 48/192/192 maps: half the layer below (two groups, §3.5).
    assert sd["conv2.weight"].shape == (256, 48, 5, 5)
    assert sd["conv3.weight"].shape == (384, 256, 3, 3)
    assert sd["conv4.weight"].shape == (384, 192, 3, 3)
    assert sd["conv5.weight"].shape == (256, 192, 3, 3)
    assert sd["fc6.weight"].shape == (4096, 9216)


def test_layer_output_sizes_and_neuron_count(paper_model):
    shapes = layer_output_shapes(paper_model)
    assert shapes == PAPER_LAYER_SHAPES
    neurons = [int(np.prod(s)) for s in shapes.values()]
    # The talk's list, with its first entry corrected to 55*55*96.
    assert neurons == [290400, 186624, 64896, 64896, 43264, 4096, 4096, 1000]
    assert sum(neurons) == 659_272


def test_forward_gives_logits_per_class(paper_model):
    model = paper_model.eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 224, 224))
        emb = model.embed(torch.randn(3, 3, 224, 224))
    assert out.shape == (3, 1000) and emb.shape == (3, 4096)
    assert torch.isfinite(out).all() and (emb >= 0).all()


def _lrn_numpy(a, k=2.0, n=5, alpha=1e-4, beta=0.75):
    """§3.3 term by term: a sum over channels max(0, i-n/2)..min(N-1, i+n/2)."""
    b = np.empty_like(a)
    N = a.shape[1]
    for i in range(N):
        lo, hi = max(0, i - n // 2), min(N - 1, i + n // 2)
        s = (a[:, lo:hi + 1] ** 2).sum(axis=1)
        b[:, i] = a[:, i] / (k + alpha * s) ** beta
    return b


def test_lrn_is_the_papers_formula():
    rng = np.random.default_rng(0)
    # Activations of a few hundred make alpha * sum(a^2) comparable to k, so the
    # normalization is far from a constant scale.
    a = rng.normal(0, 150, size=(2, 11, 4, 3))
    got = LocalResponseNorm()(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(got, _lrn_numpy(a), rtol=1e-12)
    assert not np.allclose(got, a / 2 ** 0.75, rtol=1e-2)
    # torch's module with the printed alpha averages instead of summing: not the paper.
    torch_lrn = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
    assert not np.allclose(torch_lrn(torch.from_numpy(a)).numpy(), got, rtol=1e-3)
    torch_lrn_n = nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0)
    np.testing.assert_allclose(torch_lrn_n(torch.from_numpy(a)).numpy(), got, rtol=1e-10)


def test_lrn_window_stays_inside_each_group():
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.normal(0, 150, size=(2, 12, 3, 3)))
    grouped = LocalResponseNorm(groups=2)(a)
    per_half = torch.cat([LocalResponseNorm()(a[:, :6]), LocalResponseNorm()(a[:, 6:])], 1)
    torch.testing.assert_close(grouped, per_half, rtol=1e-12, atol=0)
    # Channels at the group boundary differ from a window that crosses it.
    assert not torch.allclose(grouped[:, 5], LocalResponseNorm()(a)[:, 5], rtol=1e-3)


def test_lrn_keeps_channels_last_and_bf16():
    x = torch.randn(2, 96, 7, 7).to(memory_format=torch.channels_last) * 100
    out = LocalResponseNorm(groups=2)(x)
    ref = LocalResponseNorm(groups=2)(x.contiguous())
    torch.testing.assert_close(out, ref)
    assert LocalResponseNorm()(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("variant,one", [("paper", 1.0), ("caffe", 0.1)])
def test_bias_constants(variant, one):
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, bias_init=variant)
    # §5: 1 in conv2, conv4, conv5, fc6, fc7; 0 in conv1, conv3 and the output layer.
    expected = {"conv1": 0.0, "conv2": one, "conv3": 0.0, "conv4": one, "conv5": one,
                "fc6": one, "fc7": one, "fc8": 0.0}
    for name, value in expected.items():
        bias = getattr(model, name).bias
        assert torch.all(bias == torch.tensor(value)), name


def test_bias_init_rejects_unknown_variant():
    with pytest.raises(ValueError, match="bias_init"):
        AlexNet(bias_init="xavier")


def test_weight_init_is_normal_std_001(paper_model):
    for name in LAYERS:
        w = getattr(paper_model, name).weight.detach().double()
        # Standard errors: std 0.01/sqrt(2n), mean 0.01/sqrt(n); the smallest layer has
        # n = 34,848, so 3 % and 6e-4 are several standard errors wide.
        assert w.std().item() == pytest.approx(0.01, rel=0.03), name
        assert abs(w.mean().item()) < 6e-4, name
        # Normal, not uniform: ~68 % within one std.
        inside = (w.abs() < 0.01).double().mean().item()
        assert inside == pytest.approx(0.6827, abs=0.02), name


def test_dropout_is_off_in_eval_and_on_in_training(paper_model):
    model = paper_model
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        t1, t2 = model(x), model(x)
        model.eval()
    assert not torch.allclose(t1, t2)


def _merged_grads(model: TwoTowerAlexNet) -> dict:
    grads = {}
    for name, p in model.named_parameters():
        if name.endswith("_a"):
            other = model.get_parameter(name[:-2] + "_b")
            grads[name[:-2]] = torch.cat([p.grad, other.grad.to(p.device)])
        elif not name.endswith("_b"):
            grads[name] = p.grad
    return grads


@pytest.fixture(scope="module")
def two_forms():
    """A grouped AlexNet and a CPU TwoTowerAlexNet built from the same seed."""
    torch.manual_seed(3)
    grouped = AlexNet(num_classes=10)
    torch.manual_seed(3)
    towers = TwoTowerAlexNet(num_classes=10, devices=("cpu", "cpu"))
    return grouped, towers


@pytest.fixture
def forms(two_forms):
    """``two_forms`` with equal weights and no gradients, whatever ran before."""
    grouped, towers = two_forms
    towers.load_state_dict(grouped.state_dict())
    for p in (*grouped.parameters(), *towers.parameters()):
        p.grad = None
    return grouped.eval(), towers.eval()


def test_two_towers_share_the_grouped_state_dict_layout(two_forms):
    grouped, towers = two_forms
    sd_g, sd_t = grouped.state_dict(), towers.state_dict()
    # Same seed, same weights: the towers are initialized as the grouped net would be.
    assert list(sd_t) == list(sd_g)
    for k in sd_g:
        assert torch.equal(sd_t[k], sd_g[k]), k
    # Tower a holds the first half of conv1's kernels, tower b the second.
    assert torch.equal(towers.conv1.weight_a, grouped.conv1.weight[:48])
    assert torch.equal(towers.fc6.weight_b, grouped.fc6.weight[2048:])
    assert towers.conv1.weight_a.shape == (48, 3, 11, 11)
    assert towers.fc7.weight_b.shape == (2048, 4096)
    # A grouped state_dict loads strictly into the towers, and theirs back.
    other = {k: v + i for i, (k, v) in enumerate(sd_g.items())}
    towers.load_state_dict(other)
    assert torch.equal(towers.conv3.weight_b, other["conv3.weight"][192:])
    assert torch.equal(towers.fc8.bias, other["fc8.bias"])
    grouped.load_state_dict(towers.state_dict())
    assert torch.equal(grouped.conv5.bias, other["conv5.bias"])
    grouped.load_state_dict(sd_g)


def _compare_forms(grouped, towers, dtype, rtol, atol):
    grouped, towers = grouped.to(dtype), towers.to(dtype)
    x = torch.randn(2, 3, 224, 224, dtype=dtype) * 50
    y = torch.tensor([3, 7])
    out_g = grouped(x)
    out_t = towers(x)
    torch.testing.assert_close(out_t.cpu(), out_g, rtol=rtol, atol=atol)
    F.cross_entropy(out_g, y).backward()
    F.cross_entropy(out_t, y.to(out_t.device)).backward()
    grads_t = _merged_grads(towers)
    for name, p in grouped.named_parameters():
        # Gradients span many scales across layers, so the tolerance is relative to
        # each gradient's own magnitude.
        scale = p.grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads_t[name].cpu(), p.grad, rtol=rtol,
                                   atol=atol * scale, msg=name)


def test_two_towers_compute_the_grouped_function(forms):
    # float32 (float64 convolutions are slow on the CPU): the forms agree to ~3e-6 of
    # each gradient's scale; a wrong slice or a crossed LRN window is off by far more.
    _compare_forms(*forms, torch.float32, rtol=1e-4, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_towers_on_two_gpus_compute_the_grouped_function():
    torch.manual_seed(0)
    grouped = AlexNet(num_classes=10).eval()
    towers = TwoTowerAlexNet(num_classes=10, devices=("cuda:0", "cuda:1")).eval()
    towers.load_state_dict(grouped.state_dict())
    # float64, so TF32 convolutions (on by default in cuDNN) do not blur the comparison.
    _compare_forms(grouped, towers, torch.float64, rtol=1e-7, atol=1e-7)


def test_two_tower_optimizer_state_converts_to_grouped_and_back(forms):
    grouped, towers = forms
    # The same gradients on both forms (set directly: the forms' equality under
    # backprop is the test above), then one step each.
    for p in grouped.parameters():
        p.grad = torch.randn_like(p)
    for name, p in towers.named_parameters():
        full = grouped.get_parameter(name[:-2] if name.endswith(("_a", "_b")) else name)
        h = full.shape[0] // 2
        p.grad = {"_a": full.grad[:h], "_b": full.grad[h:]}.get(name[-2:], full.grad).clone()
    opt_g, opt_t = PaperSGD(grouped.parameters()), PaperSGD(towers.parameters())
    opt_g.step()
    opt_t.step()
    converted = towers.optimizer_state_to_grouped(opt_t.state_dict())
    reference = opt_g.state_dict()
    assert converted["param_groups"] == reference["param_groups"]
    assert set(converted["state"]) == set(reference["state"]) == set(range(16))
    for i, entry in reference["state"].items():
        assert torch.equal(converted["state"][i]["velocity"], entry["velocity"]), i
    # Back again: the split state is the tower optimizer's own, and it loads.
    back = towers.optimizer_state_from_grouped(converted)
    own = opt_t.state_dict()
    assert set(back["state"]) == set(own["state"])
    for i, entry in own["state"].items():
        assert torch.equal(back["state"][i]["velocity"], entry["velocity"]), i
    opt_t.load_state_dict(back)
