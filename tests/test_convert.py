"""``convert_model`` / ``revert_model`` / ``conversion_report`` on real timm and torchvision
models, on the CPU: the converted model is the same model (objects, Parameters, state_dict,
modes, dtypes) computing the same outputs, and what is not converted says why."""
import copy
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from timm.layers import CondConv2d, MixedConv2d
from timm.layers.conv2d_same import Conv2dSame

import lkpatch
from conftest import OpLog, rel_err
from lkpatch import DepthwiseConv2d, dispatch


# (source, name, input size, depthwise convs by the architecture, or None)
MODELS = [
    ("timm", "convnext_tiny", 64, 3 + 3 + 9 + 3),
    ("timm", "inception_next_tiny", 64, 3 * (3 + 3 + 9 + 3)),   # square, 1x11 and 11x1 per block
    ("timm", "convmixer_768_32", 32, 32),
    ("timm", "tf_efficientnet_b0", 64, 16),
    ("timm", "fastvit_t8", 64, None),
    ("timm", "efficientnet_b0", 64, 16),
    ("timm", "mobilenetv3_large_100", 64, 15),
    ("torchvision", "convnext_tiny", 64, 3 + 3 + 9 + 3),
    ("torchvision", "mobilenet_v3_large", 64, 15),
]
IDS = [f"{src}-{name}" for src, name, _, _ in MODELS]
OP_ROUTE_MODELS = {"convnext_tiny", "inception_next_tiny", "tf_efficientnet_b0", "fastvit_t8", "mobilenetv3_large_100"}


def build(src, name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    if src == "timm":
        model = timm.create_model(name, pretrained=False)
    else:
        model = getattr(torchvision.models, name)(weights=None)
    return model.to(dtype).eval()


def depthwise_names(model):
    """Depthwise convolutions found independently of lkpatch: groups == in, out a multiple."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == m.in_channels and m.out_channels % m.in_channels == 0]


def input_for(size, dtype=torch.float32, batch=2, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def op_eligible(m):
    return (m.out_channels == m.in_channels and tuple(m.stride) == (1, 1) and tuple(m.dilation) == (1, 1))


@pytest.mark.parametrize("src,name,size,arch_count", MODELS, ids=IDS)
def test_converted_model_is_the_same_model(src, name, size, arch_count):
    model = build(src, name)
    reference = copy.deepcopy(model)
    x = input_for(size)
    with torch.no_grad():
        expected = reference(x)

    for i, p in enumerate(model.parameters()):  # some frozen, some trainable
        p.requires_grad_(i % 3 != 0)
    classes = {n: type(m) for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    dw = depthwise_names(model)
    assert len(dw) > 0
    if arch_count is not None:
        assert len(dw) == arch_count

    assert lkpatch.convert_model(model) is model
    modules = dict(model.named_modules())
    assert list(modules) == list(classes)  # no module added, removed or renamed

    # every depthwise conv converted (these models have no exotic ones); nothing else touched
    for n, m in modules.items():
        if n in dw:
            assert type(m) is DepthwiseConv2d
            assert m.tf_same_padding == (classes[n] is Conv2dSame)
        else:
            assert type(m) is classes[n]

    # the very same Parameter objects, and a state_dict identical to the unconverted model's
    after = dict(model.named_parameters())
    assert list(after) == list(params) and all(after[k] is params[k] for k in params)
    assert {n: p.requires_grad for n, p in after.items()} == flags
    assert not any(m.training for m in model.modules())
    sd, ref_sd = model.state_dict(), reference.state_dict()
    assert list(sd) == list(ref_sd)
    for k in sd:
        assert sd[k].shape == ref_sd[k].shape and sd[k].dtype == ref_sd[k].dtype
        assert torch.equal(sd[k], ref_sd[k]), k

    # the report lists each depthwise conv once, all converted
    report = lkpatch.conversion_report(model)
    assert [layer.name for layer in report.layers] == dw
    assert len(report.converted) == len(dw) and not report.skipped
    assert all(layer.reason is None and layer.kind == "DepthwiseConv2d" for layer in report.layers)
    assert f"{len(dw)} of {len(dw)} depthwise convolutions converted" in str(report)

    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, expected)

    # idempotent: a second conversion changes nothing (and keeps the source classes for revert)
    attrs = {n: dict(m.__dict__) for n, m in model.named_modules() if n in dw}
    assert lkpatch.convert_model(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(modules[n]) for n in modules}
    for n, m in model.named_modules():
        if n in dw:
            assert m.__dict__ == attrs[n]
    assert lkpatch.conversion_report(model).layers == report.layers
    with torch.no_grad():
        assert torch.equal(model(x), expected)

    # revert: the original classes exactly, the same outputs
    assert lkpatch.revert_model(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(hasattr(m, "tf_same_padding") or hasattr(m, "_lkpatch_source_class") for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params.values()))
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    reverted_report = lkpatch.conversion_report(model)
    assert not reverted_report.converted and len(reverted_report.skipped) == len(dw)


@pytest.mark.parametrize("src,name,size,arch_count",
                         [m for m in MODELS if m[1] in OP_ROUTE_MODELS],
                         ids=[i for i, m in zip(IDS, MODELS) if m[1] in OP_ROUTE_MODELS])
def test_converted_model_through_the_op(src, name, size, arch_count):
    model = build(src, name)
    x = input_for(size)
    with torch.no_grad():
        expected = model(x)
    lkpatch.convert_model(model)
    through_op = sum(op_eligible(m) for m in model.modules() if isinstance(m, DepthwiseConv2d))
    assert through_op > 0
    with torch.no_grad(), dispatch.force("auto", cpu_through_op=True), OpLog() as log:
        out = model(x)
    assert log.names.count("lkpatch::dwconv2d") == through_op
    assert out.shape == expected.shape and rel_err(out, expected) <= 1e-5


def test_model_specific_layers_are_converted():
    inception = lkpatch.convert_model(build("timm", "inception_next_tiny"))
    kernels = {tuple(layer.kernel_size) for layer in lkpatch.conversion_report(inception).converted}
    assert {(1, 11), (11, 1)} <= kernels

    mixer = lkpatch.convert_model(build("timm", "convmixer_768_32"))
    assert all(layer.padding == "same" for layer in lkpatch.conversion_report(mixer).converted)

    tf = lkpatch.convert_model(build("timm", "tf_efficientnet_b0"))
    same = [m for m in tf.modules() if isinstance(m, DepthwiseConv2d) and m.tf_same_padding]
    assert same and all(m._lkpatch_source_class is Conv2dSame and m.stride != (1, 1) for m in same)

    fastvit = lkpatch.convert_model(build("timm", "fastvit_t8"))
    layers = lkpatch.conversion_report(fastvit).converted
    assert any(layer.out_channels == 2 * layer.in_channels and layer.stride == (2, 2) for layer in layers)
    assert any(layer.runs.startswith("PyTorch (channel multiplier 2") for layer in layers)


@pytest.mark.parametrize("src,name,size,dtype", [
    ("timm", "tf_efficientnet_b0", 64, torch.float64),
    ("timm", "convnext_tiny", 32, torch.bfloat16),
    ("torchvision", "mobilenet_v3_large", 64, torch.float64),
])
def test_dtype_is_kept(src, name, size, dtype):
    model = build(src, name, dtype)
    reference = copy.deepcopy(model)
    x = input_for(size, dtype, batch=1)
    lkpatch.convert_model(model)
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(isinstance(m, DepthwiseConv2d) for n, m in model.named_modules() if n in depthwise_names(reference))
    with torch.no_grad():
        out, expected = model(x), reference(x)
    assert out.dtype == dtype and torch.equal(out, expected)


def test_modes_requires_grad_and_hooks_are_kept():
    model = build("timm", "efficientnet_b0").train()
    model.blocks[1].eval()                       # a mixed train/eval model
    for i, p in enumerate(model.parameters()):   # freeze about half
        if i % 2 == 0:
            p.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    dw_name = depthwise_names(model)[3]
    dw = model.get_submodule(dw_name)
    seen = []
    dw.register_forward_hook(lambda mod, inp, out: seen.append(type(mod)))
    dw.register_forward_pre_hook(lambda mod, inp: seen.append("pre"))

    lkpatch.convert_model(model)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.get_submodule(dw_name) is dw and type(dw) is DepthwiseConv2d
    model(input_for(64, batch=2))
    assert seen == ["pre", DepthwiseConv2d]
    lkpatch.revert_model(model)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_train_mode_forward_and_backward_identical():
    model = build("timm", "tf_efficientnet_b0").train()
    reference = copy.deepcopy(model)
    lkpatch.convert_model(model)
    x = input_for(64)
    out, expected = model(x), reference(x)
    assert torch.equal(out, expected)
    out.square().mean().backward()
    expected.square().mean().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p.grad, q.grad), n
    for (n, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(b, c), n  # BatchNorm running stats


def test_checkpoint_loads_across_conversion():
    model = lkpatch.convert_model(build("timm", "tf_efficientnet_b0", seed=1))
    fresh = build("timm", "tf_efficientnet_b0", seed=2)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = input_for(64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    other = build("timm", "tf_efficientnet_b0", seed=3)
    lkpatch.convert_model(fresh).load_state_dict(other.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), other(x))


@pytest.mark.parametrize("src,name", [("timm", "mobilenetv3_large_100"), ("timm", "tf_efficientnet_b0")])
def test_optimizer_built_before_conversion_keeps_training(src, name):
    model = build(src, name).train()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    before = [p.detach().clone() for p in model.parameters()]

    lkpatch.convert_model(model)
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], model.parameters()))
    target = torch.randint(0, 1000, (2,), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        x = input_for(64, seed=10 + step)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), target).backward()
            o.step()
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    dw_params = {id(p) for m in model.modules() if isinstance(m, DepthwiseConv2d) for p in m.parameters()}
    assert all(c for c, p in zip(changed, model.parameters()) if id(p) in dw_params)
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), n


# --- what is refused, what is skipped -----------------------------------------------------------

def _tiny():
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(4, 8, 1))


def test_compiled_model_is_refused():
    model = _tiny()
    compiled = torch.compile(model)
    with pytest.raises(TypeError, match=r"convert_model: .*torch\.compile\. Convert the plain model first, then wrap"):
        lkpatch.convert_model(compiled)
    with pytest.raises(TypeError, match=r"revert_model: .*torch\.compile\. Revert the plain model first, then wrap"):
        lkpatch.revert_model(compiled)
    with pytest.raises(TypeError, match=r"torch\.compile \(at 'inner'\)"):
        lkpatch.convert_model(nn.ModuleDict({"inner": compiled}))
    assert type(model[0]) is nn.Conv2d  # nothing was converted on the way
    lkpatch.convert_model(model)         # the plain model converts
    assert type(model[0]) is DepthwiseConv2d


@pytest.mark.parametrize("capture", ["script", "trace", "submodule"])
def test_report_of_torchscript_is_refused(capture):
    """A TorchScript model holds no Python convolutions: the report would list none ("0 of 0")."""
    model, x = _tiny(), torch.randn(1, 4, 8, 8)
    captured = {"script": lambda: torch.jit.script(model), "trace": lambda: torch.jit.trace(model, x),
                "submodule": lambda: nn.Sequential(nn.Identity(), torch.jit.script(model))}[capture]()
    with pytest.raises(TypeError, match=r"lkpatch.conversion_report: the model is a TorchScript module.*"
                                        r"print\(lkpatch.conversion_report\(model\)\)"):
        lkpatch.conversion_report(captured)
    with pytest.raises(TypeError, match="conversion_report expects an nn.Module, not OrderedDict"):
        lkpatch.conversion_report(model.state_dict())
    assert len(lkpatch.conversion_report(model).layers) == 1


@pytest.fixture
def gloo_group(tmp_path):
    dist = torch.distributed
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    except Exception as e:  # noqa: BLE001 - e.g. no usable network interface for gloo
        pytest.skip(f"cannot start a one-process gloo group here: {e}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_model_is_refused(gloo_group):
    model = _tiny()
    ddp = nn.parallel.DistributedDataParallel(model)
    with pytest.raises(TypeError, match="DistributedDataParallel.*Convert the plain model first, then wrap"):
        lkpatch.convert_model(ddp)
    with pytest.raises(TypeError, match=r"DistributedDataParallel \(at '0'\)"):
        lkpatch.convert_model(nn.Sequential(ddp))
    with pytest.raises(TypeError, match="DistributedDataParallel. Revert the plain model first"):
        lkpatch.revert_model(ddp)
    assert type(model[0]) is nn.Conv2d
    # converting first, then wrapping, works
    ddp2 = nn.parallel.DistributedDataParallel(lkpatch.convert_model(_tiny()))
    assert ddp2(torch.randn(1, 4, 5, 5)).shape == (1, 8, 5, 5)


@pytest.mark.parametrize("fn", [lkpatch.convert_model, lkpatch.revert_model])
@pytest.mark.parametrize("obj", [None, "model", [nn.Conv2d(2, 2, 3, groups=2)], {"conv": nn.Conv2d(2, 2, 3)}])
def test_non_module_is_refused(fn, obj):
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fn(obj)


class OwnForwardConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class PlainSubclass(nn.Conv2d):
    pass


def _report_by_name(model):
    return {layer.name: layer for layer in lkpatch.conversion_report(model).layers}


def test_skipped_layers_say_why_and_compute_as_before():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4),                          # 0: converts
        OwnForwardConv(4, 4, 3, padding=1, groups=4),                     # 1: unknown subclass
        PlainSubclass(4, 4, 3, padding=1, groups=4),                      # 2: unknown subclass
        nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"),  # 3: reflect padding
        nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="circular"), # 4: circular padding
        torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3, padding=1, groups=4)),  # 5
        nn.Conv2d(4, 8, 1),                                               # 6: not depthwise
        nn.Conv2d(4, 4, 3, padding=1, groups=2),                          # 7: grouped, not depthwise
    )
    reference = copy.deepcopy(model)
    classes = [type(m) for m in model]
    lkpatch.convert_model(model)
    assert type(model[0]) is DepthwiseConv2d
    assert [type(m) for m in model][1:] == classes[1:]

    report = _report_by_name(model)
    assert set(report) == {"0", "1", "2", "3", "4", "5"}
    assert report["0"].converted and report["0"].reason is None
    assert not report["1"].converted and "OwnForwardConv" in report["1"].reason
    assert "overrides nn.Conv2d" in report["1"].reason
    assert "PlainSubclass" in report["2"].reason
    assert "padding_mode='reflect'" in report["3"].reason
    assert "padding_mode='circular'" in report["4"].reason
    assert "parametrized" in report["5"].reason
    assert all(f"skipped: {report[n].reason}" in str(lkpatch.conversion_report(model)) for n in "12345")

    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        for got, want in zip(model, reference):
            assert torch.equal(got(x), want(x))


def test_old_style_weight_norm_converts():
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 6, 5, padding=2, groups=6)
    twin = copy.deepcopy(plain)  # (a weight-normed module cannot be deep-copied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        conv = torch.nn.utils.weight_norm(plain)
        reference = torch.nn.utils.weight_norm(twin)
    keys = list(conv.state_dict())
    assert "weight_g" in keys and "weight_v" in keys
    lkpatch.convert_model(conv)
    assert type(conv) is DepthwiseConv2d and list(conv.state_dict()) == keys
    x = torch.randn(2, 6, 9, 9)
    assert torch.equal(conv(x), reference(x))
    with dispatch.force("auto", cpu_through_op=True):
        assert rel_err(conv(x), reference(x)) <= 1e-5
    # gradients reach weight_g and weight_v
    conv(x).sum().backward()
    reference(x).sum().backward()
    assert torch.allclose(conv.weight_g.grad, reference.weight_g.grad)
    assert torch.allclose(conv.weight_v.grad, reference.weight_v.grad)


def test_timm_mixed_conv_converts_its_inner_convs():
    torch.manual_seed(0)
    mixed = MixedConv2d(8, 8, kernel_size=[3, 5], dilation=1, depthwise=True)
    model = nn.Sequential(mixed, nn.ReLU())
    reference = copy.deepcopy(model)
    lkpatch.convert_model(model)
    assert type(mixed) is MixedConv2d
    inner = list(mixed.values())
    assert len(inner) == 2 and all(type(m) is DepthwiseConv2d for m in inner)
    report = lkpatch.conversion_report(model)
    assert [layer.name for layer in report.converted] == ["0.0", "0.1"] and not report.skipped
    x = torch.randn(2, 8, 9, 9)
    assert torch.equal(model(x), reference(x))
    with dispatch.force("auto", cpu_through_op=True):
        assert rel_err(model(x), reference(x)) <= 1e-5
    lkpatch.revert_model(model)
    assert all(type(m) is nn.Conv2d for m in mixed.values())


def test_timm_cond_conv_is_skipped_with_a_reason():
    torch.manual_seed(0)
    cond = CondConv2d(8, 8, 3, groups=8, padding="", num_experts=3)
    model = nn.ModuleDict({"cond": cond, "dw": nn.Conv2d(8, 8, 3, padding=1, groups=8)})
    reference = copy.deepcopy(model)
    lkpatch.convert_model(model)
    assert type(cond) is CondConv2d and type(model["dw"]) is DepthwiseConv2d
    report = _report_by_name(model)
    assert not report["cond"].converted and "CondConv2d is not an nn.Conv2d" in report["cond"].reason
    assert report["cond"].kernel_size == (3, 3)
    assert report["dw"].converted
    x, routing = torch.randn(2, 8, 7, 7), torch.rand(2, 3)
    assert torch.equal(cond(x, routing), reference["cond"](x, routing))
    str(lkpatch.conversion_report(model))  # the table renders CondConv2d's attributes


def test_timm_model_with_mixed_conv():
    """A whole MixNet (MixedConv2d blocks) converts and computes the same."""
    model = build("timm", "mixnet_s")
    reference = copy.deepcopy(model)
    dw = depthwise_names(model)
    lkpatch.convert_model(model)
    assert len(lkpatch.conversion_report(model).converted) == len(dw) > 0
    x = input_for(64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_converting_a_single_conv_returns_it():
    conv = Conv2dSame(6, 6, 3, stride=2, groups=6)
    reference = copy.deepcopy(conv)
    assert lkpatch.convert_model(conv) is conv and type(conv) is DepthwiseConv2d and conv.tf_same_padding
    x = torch.randn(1, 6, 10, 9)
    assert torch.equal(conv(x), reference(x))
    assert lkpatch.revert_model(conv) is conv and type(conv) is Conv2dSame


def test_a_layer_built_with_tf_same_padding_reverts_to_a_class_that_pads_the_same():
    built = lkpatch.DepthwiseConv2d(4, kernel_size=3, stride=2, tf_same_padding=True)
    plain = lkpatch.DepthwiseConv2d(4, kernel_size=3, padding=1)
    x = torch.randn(2, 4, 9, 10)
    expected = built(x), plain(x)
    lkpatch.revert_model(built)
    lkpatch.revert_model(plain)
    assert type(built) is Conv2dSame and type(plain) is nn.Conv2d
    assert torch.equal(built(x), expected[0]) and torch.equal(plain(x), expected[1])


def test_an_uninitialized_lazy_depthwise_conv_is_reported_then_converts_after_a_forward():
    model = nn.Sequential(nn.LazyConv2d(8, 3, groups=8), nn.LazyConv2d(8, 1))
    report = lkpatch.conversion_report(lkpatch.convert_model(model))
    assert [(r.name, r.converted) for r in report.layers] == [("0", False)]
    assert "run one forward first" in report.layers[0].reason
    x = torch.randn(1, 8, 9, 9)
    expected = model(x)
    report = lkpatch.conversion_report(lkpatch.convert_model(model))
    assert [(r.name, r.converted) for r in report.layers] == [("0", True)] and type(model[0]) is DepthwiseConv2d
    assert torch.equal(model(x), expected)


def test_lazy_convs_of_other_kinds_are_not_listed():
    model = nn.Sequential(nn.LazyConv1d(8, 3, groups=8), nn.LazyConv3d(8, 3, groups=8),
                          nn.LazyConvTranspose2d(8, 3, groups=8), nn.LazyConv2d(8, 3, groups=8))
    assert [r.name for r in lkpatch.conversion_report(model).layers] == ["3"]


def test_a_forward_set_on_the_instance_keeps_the_layer_unconverted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    halved = model[0]
    halved._conv_forward = lambda x, w, b: F.conv2d(x, w * 0.5, b, halved.stride, halved.padding, halved.dilation,
                                                    halved.groups)
    x = torch.randn(1, 8, 9, 9)
    expected = model(x)
    report = _report_by_name(lkpatch.convert_model(model))
    assert type(model[0]) is nn.Conv2d and type(model[1]) is DepthwiseConv2d
    assert not report["0"].converted and "_conv_forward is set on the instance" in report["0"].reason
    assert torch.equal(model(x), expected)


def test_the_report_takes_modules_with_int_sizes_and_names_tf_same_padding():
    class IntSizeConv2d(nn.Module):  # depthwise-shaped, not an nn.Conv2d, sizes kept as ints
        def __init__(self):
            super().__init__()
            self.in_channels = self.out_channels = self.groups = 4
            self.kernel_size, self.stride, self.padding = 3, 1, 1

        def forward(self, x):
            return x

    model = nn.ModuleDict({"own": IntSizeConv2d(), "same": Conv2dSame(4, 4, 3, stride=2, groups=4)})
    assert _report_by_name(model)["same"].padding == "TF 'SAME'"  # before conversion too
    report = _report_by_name(lkpatch.convert_model(model))
    assert report["own"].kernel_size == (3,) and not report["own"].converted
    assert report["same"].converted and report["same"].padding == "TF 'SAME'"
    table = str(lkpatch.conversion_report(model))
    assert "TF 'SAME'" in table and "1 of 2 depthwise convolutions converted" in table


def test_a_subclass_of_depthwise_conv2d_is_not_reverted():
    class Doubled(DepthwiseConv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Doubled(4, kernel_size=3, padding=1), DepthwiseConv2d(4, kernel_size=3, padding=1))
    x = torch.randn(1, 4, 9, 9)
    expected = model(x)
    lkpatch.revert_model(model)
    assert type(model[0]) is Doubled and type(model[1]) is nn.Conv2d
    assert torch.equal(model(x), expected)


def test_a_conv_with_a_padding_pytorch_cannot_run_is_not_converted():
    conv = nn.Conv2d(4, 4, 3, padding=(1, 2, 0, 0), groups=4)  # nn.Conv2d stores it, then raises in forward
    model = lkpatch.convert_model(nn.Sequential(conv))
    assert type(conv) is nn.Conv2d
    assert "padding=(1, 2, 0, 0) is none of nn.Conv2d's forms" in lkpatch.conversion_report(model).layers[0].reason
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 4, 9, 9))


def test_a_parametrization_added_after_conversion_survives_revert():
    class Symmetric(nn.Module):
        def forward(self, w):
            return w + w.flip(-1)

    conv = lkpatch.convert_model(nn.Conv2d(8, 8, 3, padding=1, groups=8))
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", Symmetric())
    x = torch.randn(1, 8, 9, 9)
    expected = conv(x)
    lkpatch.revert_model(conv)
    assert type(conv).__name__ == "ParametrizedConv2d" and type(conv).__bases__ == (nn.Conv2d,)
    assert torch.equal(conv(x), expected) and torch.equal(copy.deepcopy(conv)(x), expected)
    torch.nn.utils.parametrize.remove_parametrizations(conv, "weight")
    assert type(conv) is nn.Conv2d and torch.equal(conv(x), expected)


def test_verbose_prints_the_report(capsys):
    lkpatch.convert_model(_tiny(), verbose=True)
    assert "1 of 1 depthwise convolutions converted" in capsys.readouterr().out


def _tf_same_stack():
    torch.manual_seed(0)
    return nn.Sequential(Conv2dSame(6, 6, 3, stride=2, groups=6), nn.Conv2d(6, 6, 5, padding=2, groups=6),
                         Conv2dSame(6, 12, 4, stride=1, groups=6), nn.Conv2d(12, 12, 3, padding="same", groups=12))


@pytest.mark.parametrize("what,size", [("timm-convnext_tiny", 64), ("torchvision-mobilenet_v3_large", 64),
                                       ("tf_same_stack", 13)])
def test_fx_trace_of_a_converted_model(what, size):
    """torch.fx.symbolic_trace (FX quantization, feature extractors) sees each converted layer as
    one call: its padding and groups are computed from the real input when the graph runs."""
    model = _tf_same_stack() if what == "tf_same_stack" else build(*what.split("-"))
    reference = copy.deepcopy(model)
    lkpatch.convert_model(model)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 6, size, size) if what == "tf_same_stack" else input_for(size)
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(traced(x), expected)
        with dispatch.force("auto", cpu_through_op=True), OpLog() as log:
            out = traced(x)
    assert rel_err(out, expected) <= 1e-5
    assert log.names.count("lkpatch::dwconv2d") == sum(
        op_eligible(m) for m in model.modules() if isinstance(m, DepthwiseConv2d))


def test_timm_fx_feature_extractor_of_a_converted_model():
    from timm.models._features_fx import create_feature_extractor

    model = build("timm", "tf_efficientnet_b0")
    reference = copy.deepcopy(model)
    lkpatch.convert_model(model)
    nodes = {"blocks.2": "b2", "blocks.5": "b5"}
    ours, theirs = create_feature_extractor(model, nodes), create_feature_extractor(reference, nodes)
    x = input_for(65)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchvision_feature_extractor_of_a_converted_model():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = build("torchvision", "convnext_tiny")
    reference = copy.deepcopy(model)
    lkpatch.convert_model(model)
    nodes = {"features.3": "c3", "features.5": "c4"}
    ours, theirs = create_feature_extractor(model, nodes), create_feature_extractor(reference, nodes)
    x = input_for(64)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
