"""Folding BatchNorm into the depthwise convolution before it."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import lkpatch
from lkpatch import fuse
from lkpatch.fuse import find_conv_bn_pairs, fold_bn, fuse_conv_bn


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def test_fold_bn_matches_conv_then_bn():
    conv = nn.Conv2d(6, 12, 5, padding=2, groups=6, bias=True)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(12))).eval()[0]
    w, b = fold_bn(conv.weight, conv.bias, bn)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        ref = bn(conv(x))
        out = nn.functional.conv2d(x, w, b, padding=2, groups=6)
    assert torch.allclose(out, ref, atol=1e-5)


def test_sequential_pair_is_folded():
    model = randomize_bn(nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=False), nn.BatchNorm2d(8),
                                       nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))).eval()
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        ref = model(x)
        assert find_conv_bn_pairs(model) == [("0", "1")]  # the 1x1 conv is not depthwise
        assert fuse_conv_bn(model) is model
        assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.BatchNorm2d)
        assert model[0].bias is not None
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="eval"):
        fuse_conv_bn(model)


def test_a_batchnorm_in_training_mode_inside_an_eval_model_is_refused():
    """Its batch statistics are what it computes: no folded weight reproduces them."""
    for func in (fuse_conv_bn, lkpatch.reparameterize):
        model = randomize_bn(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4))).eval()
        model[1].train()
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match="BatchNorm '1' is in training mode"):
            func(model)
        assert type(model[1]) is nn.BatchNorm2d
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing changed


def test_pairs_with_hooks_are_not_folded():
    """A forward hook on the conv sees (or changes) its output, which folding would change; hooks on
    the BatchNorm would be dropped with it."""
    x = torch.randn(2, 4, 8, 8)
    for hooked in (0, 1):
        for register in ("register_forward_hook", "register_forward_pre_hook"):
            model = randomize_bn(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4))).eval()
            seen = []
            if register == "register_forward_hook":
                model[hooked].register_forward_hook(lambda m, i, o: seen.append(1) or o * 2)
            else:
                model[hooked].register_forward_pre_hook(lambda m, i: seen.append(1))
            want = model(x)
            assert find_conv_bn_pairs(model) == []
            fuse_conv_bn(model)
            assert type(model[1]) is nn.BatchNorm2d
            assert torch.equal(model(x), want) and len(seen) == 2


@pytest.mark.parametrize("func,name", [(fuse_conv_bn, "fuse_conv_bn"), (lkpatch.reparameterize, "reparameterize")])
def test_torchscript_and_non_modules_are_refused(func, name):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4)).eval()
    with pytest.raises(TypeError, match=f"lkpatch.{name}: the model is a TorchScript module"):
        func(torch.jit.script(model))
    with pytest.raises(TypeError, match=f"lkpatch.{name} expects an nn.Module, not OrderedDict"):
        func(model.state_dict())


@pytest.mark.parametrize("func,name,verb", [(fuse_conv_bn, "fuse_conv_bn", "Fold"),
                                             (lkpatch.reparameterize, "reparameterize", "Re-parameterize")])
def test_compiled_model_is_refused_and_left_unchanged(func, name, verb):
    """torch.compile captures the modules: folding through the wrapper used to change nothing, silently."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4))).eval()
    for wrapped, where in ((torch.compile(model), ""), (nn.ModuleDict({"net": torch.compile(model)}), r" \(at 'net'\)")):
        with pytest.raises(TypeError, match=rf"lkpatch.{name}: the model is wrapped by torch\.compile{where}\. "
                                            rf"{verb} the plain model first, then wrap it"):
            func(wrapped)
    assert type(model[1]) is nn.BatchNorm2d and model[0].bias is None
    func(model)  # the plain model folds
    assert type(model[1]) is nn.Identity and model[0].bias is not None


def test_conv_whose_output_is_also_used_elsewhere_is_not_folded():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = Branch().eval()
    assert find_conv_bn_pairs(model) == []


class _Pair(nn.Module):
    def __init__(self, forward):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.run = forward

    def forward(self, x):
        return self.run(self, x)


@pytest.mark.parametrize("forward", [
    lambda m, x: m.bn(m.conv(x)) + m.conv(x),                       # the conv called twice
    lambda m, x: m.bn(m.conv(x)) + m.bn(x),                         # the BatchNorm called twice
    lambda m, x: m.bn(m.conv(x)) + m.conv.weight.sum(),             # the conv's weight read itself
    lambda m, x: m.bn(m.conv(x)) * m.bn.running_var.mean(),         # the BatchNorm's statistics too
], ids=["conv-twice", "bn-twice", "conv-weight", "bn-buffer"])
def test_a_module_used_more_than_once_is_not_folded(forward):
    model = randomize_bn(_Pair(forward)).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ref = model(x)
        assert find_conv_bn_pairs(model) == []
        fuse_conv_bn(model)
        assert torch.equal(model(x), ref)


def test_a_module_repeated_in_a_sequential_is_not_folded():
    conv, bn = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4)
    act = nn.ReLU()
    repeated = nn.Sequential(conv, bn, act, conv, bn)
    between = nn.Sequential(act, nn.Conv2d(4, 4, 3, padding=1, groups=4), act, nn.BatchNorm2d(4))  # not adjacent
    for model in (repeated, between):
        model = randomize_bn(model).eval()
        x = torch.randn(2, 4, 8, 8)
        with torch.no_grad():
            ref = model(x)
            assert find_conv_bn_pairs(model) == []
            assert fuse._pairs_sequential(model) == ([("0", "1"), ("3", "4")] if model is repeated else [])
            fuse_conv_bn(model)
            assert torch.equal(model(x), ref)


def test_a_model_reading_a_buffer_as_a_number_still_traces():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.tensor(2.0))
            self.branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU())  # no pair there
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) * float(self.scale) + self.branch(x)

    model = randomize_bn(Scaled()).eval()
    assert find_conv_bn_pairs(model) == [("conv", "bn")]  # found by the trace; no Sequential holds it


def test_untraceable_model_folds_only_sequentials_that_run_their_children_in_order():
    class Skip(nn.Sequential):  # conv -> BN, and the conv's output added again
        def forward(self, x):
            y = self[0](x)
            return self[1](y) + y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.skip = Skip(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4))
            self.plain = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x + 1
            return self.plain(self.skip(x))

    model = randomize_bn(Net()).eval()
    x = torch.randn(1, 4, 8, 8)
    want = model(x)
    with pytest.warns(UserWarning, match="does not trace with torch.fx"):  # its forward is not seen
        assert find_conv_bn_pairs(model) == [("plain.0", "plain.1")]
    with pytest.warns(UserWarning, match="does not trace with torch.fx"):
        fuse_conv_bn(model)
    assert torch.allclose(model(x), want, atol=1e-5)


def test_convs_sharing_a_weight_are_not_folded():
    """Folding works in place: two BatchNorms folded into one shared weight would scale it twice."""
    first = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    second = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    second.weight = first.weight
    model = randomize_bn(nn.Sequential(first, nn.BatchNorm2d(4), nn.ReLU(), second, nn.BatchNorm2d(4),
                                       nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = model(x)
        assert find_conv_bn_pairs(model) == [("5", "6")]
        fuse_conv_bn(model)
        assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[4], nn.BatchNorm2d)
        assert torch.allclose(model(x), ref, atol=1e-5)


@pytest.mark.parametrize("build,expected", [
    (lambda: timm.create_model("efficientnet_b0"), 16),          # BatchNormAct2d after each depthwise conv
    (lambda: torchvision.models.mobilenet_v3_large(), 15),      # Conv2dNormActivation: Sequential(conv, bn, act)
])
def test_real_models_fold_every_depthwise_bn_and_compute_the_same(build, expected):
    torch.manual_seed(0)
    model = randomize_bn(build()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        lkpatch.convert_model(model)  # folding works on converted models too
        assert len(find_conv_bn_pairs(model)) == expected
        fuse_conv_bn(model)
        out = model(x)
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert not find_conv_bn_pairs(model)
    # the folded model's state_dict has no BN entries for those layers, and loads into a folded copy
    fresh = fuse_conv_bn(randomize_bn(build()).eval())
    fresh.load_state_dict(copy.deepcopy(model.state_dict()), strict=True)
