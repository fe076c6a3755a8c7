"""RepLKNet: official key layout, the reference outputs of the official code, training features."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

import lkpatch
from lkpatch.models import REPLKNET_CONFIGS, RepLKNet
from lkpatch.models.replknet import ReparamLargeKernelConv


@pytest.fixture(scope="module")
def reference(request):
    from conftest import shared_data_dir
    path = shared_data_dir() / "replknet_tiny_reference.pt"
    if not path.is_file():
        pytest.skip(f"{path} not found (the official code's reference outputs)")
    return torch.load(path, weights_only=True)


def tiny(reference, **kwargs):
    torch.manual_seed(0)
    return RepLKNet(**reference["config"], **kwargs)


def max_err(a, b):
    return (a - b).abs().max().item()


def test_reference_output(reference):
    model = tiny(reference)
    model.load_state_dict(reference["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        assert max_err(model(reference["input"]), reference["output"]) <= 1e-4
        lkpatch.convert_model(model)
        assert lkpatch.conversion_report(model).converted and not lkpatch.conversion_report(model).skipped
        assert max_err(model(reference["input"]), reference["output"]) <= 1e-4


@pytest.mark.parametrize("convert_first", [False, True])
def test_structural_reparam_gives_the_deploy_model(reference, convert_first):
    model = tiny(reference)
    model.load_state_dict(reference["state_dict"], strict=True)
    with pytest.raises(ValueError, match=r"call model.eval\(\) first"):  # BN in training mode: not what eval computes
        model.structural_reparam()
    model.eval()
    if convert_first:
        lkpatch.convert_model(model)
    assert model.structural_reparam() is model
    sd = model.state_dict()
    assert sd.keys() == reference["deploy_state_dict"].keys()
    for k, v in reference["deploy_state_dict"].items():
        assert sd[k].shape == v.shape and max_err(sd[k], v) <= 1e-5, k
    with torch.no_grad():
        assert max_err(model(reference["input"]), reference["output_deploy"]) <= 1e-4
    merged = [m.lkb_reparam for m in model.modules() if isinstance(m, ReparamLargeKernelConv)]
    assert merged and all(isinstance(c, lkpatch.DepthwiseConv2d) == convert_first for c in merged)
    model.structural_reparam()  # idempotent
    assert model.state_dict().keys() == reference["deploy_state_dict"].keys()


def test_structural_reparam_after_fuse_conv_bn(reference):
    """fuse_conv_bn folds the branches' BatchNorms into their convs first: merging takes those."""
    model = tiny(reference)
    model.load_state_dict(reference["state_dict"], strict=True)
    lkpatch.fuse_conv_bn(model.eval())
    assert isinstance(model.stages[0].blocks[0].large_kernel.lkb_origin.bn, nn.Identity)
    model.structural_reparam()
    keys = model.state_dict().keys()
    assert not any(".lkb_origin." in k or ".small_conv." in k for k in keys)
    assert {k for k in keys if ".lkb_reparam." in k} == {k for k in reference["deploy_state_dict"] if ".lkb_reparam." in k}
    with torch.no_grad():
        assert max_err(model(reference["input"]), reference["output_deploy"]) <= 1e-4


def test_deploy_structure_loads_the_deploy_state_dict(reference):
    model = tiny(reference, small_kernel_merged=True)
    model.load_state_dict(reference["deploy_state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        assert max_err(model(reference["input"]), reference["output_deploy"]) <= 1e-4
        lkpatch.convert_model(model)
        assert max_err(model(reference["input"]), reference["output_deploy"]) <= 1e-4


def official_keys(path):
    rows = [line.rstrip("\n").split("\t") for line in open(path) if line.strip() and not line.startswith("#")]
    return {k: v for k, v in rows}


@pytest.mark.parametrize("name,file", [("replknet_31b", "RepLKNet-31B"), ("replknet_31l", "RepLKNet-31L"),
                                       ("replknet_xl", "RepLKNet-XL")])
@pytest.mark.parametrize("deploy", [False, True])
def test_state_dict_keys_and_shapes_are_the_official_ones(shared_data, name, file, deploy):
    with torch.device("meta"):  # shapes only: no memory for the 335M-parameter XL
        model = timm.create_model(name, small_kernel_merged=deploy)
    ours = {k: str(tuple(v.shape)) for k, v in model.state_dict().items()}
    assert ours == official_keys(shared_data / f"{file}{'.deploy' if deploy else ''}.keys.txt")


def test_timm_registration_and_arguments():
    for name in REPLKNET_CONFIGS:
        assert name in timm.list_models("replknet*")
    model = timm.create_model("replknet_31b", num_classes=7, in_chans=1, drop_path_rate=0.2,
                              large_kernel_sizes=[7, 7, 5, 5], layers=[1, 1, 1, 1], channels=[8, 8, 16, 16])
    assert model.head.out_features == 7 and model.stem[0].conv.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert rates == sorted(rates) and rates[-1] == pytest.approx(0.2) and len(rates) == 2 * 3  # first is 0
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("replknet_31b", pretrained=True)
    # num_classes=0: the pooled features, as timm's models (and reset_classifier(0)) give them
    features = timm.create_model("replknet_31b", num_classes=0, layers=[1, 1, 1, 1], channels=[8, 8, 16, 16])
    assert isinstance(features.head, torch.nn.Identity) and features(torch.randn(2, 3, 32, 32)).shape == (2, 16)


SMALL = dict(large_kernel_sizes=[7, 7, 5, 5], layers=[1, 2, 1, 1], channels=[8, 16, 16, 24], small_kernel=3)


def test_timm_classifier_interface():
    """What timm's training script and feature code call: drop_rate, forward_head(pre_logits),
    reset_classifier(n, global_pool)."""
    model = timm.create_model("replknet_31b", drop_rate=0.25, num_classes=5, **SMALL).eval()
    assert model.head_drop.p == 0.25 and model.state_dict().keys() == RepLKNet(**SMALL, num_classes=5).state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, 24) and torch.equal(model.head(pooled), model(x))
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 24, 1, 1)
    model.reset_classifier(3, "avg")
    assert model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="num_classes must be 0"):
        model.reset_classifier(3, "")
    with pytest.raises(ValueError, match="pools by 'avg'"):
        model.reset_classifier(0, "max")
    model.reset_classifier(0, "")
    with pytest.raises(ValueError, match="num_classes must be 0"):  # the pooling in effect: none
        model.reset_classifier(3)
    unpooled = timm.create_model("replknet_31b", num_classes=0, global_pool="", **SMALL).eval()
    assert unpooled(x).shape == (2, 24, 1, 1)


@pytest.mark.parametrize("out_indices,stages", [((-1,), [3]), (2, [2, 3]), ((3, 1), [1, 3]), ([0, -3], [0, 1]),
                                                (torch.tensor(2).item(), [2, 3]), (__import__("numpy").int64(1), [3])])
def test_out_indices_as_timm_takes_them(out_indices, stages):
    """Negative stages count from the end, an int n is the last n stages; the features come out in
    stage order, and feature_info lists them in that order too."""
    backbone = timm.create_model("replknet_31b", features_only=True, out_indices=out_indices, **SMALL).eval()
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert backbone.out_indices == stages
    assert backbone.feature_info.channels() == [f.shape[1] for f in feats] == [SMALL["channels"][i] for i in stages]


def test_feature_outputs_for_dense_prediction():
    model = RepLKNet(**SMALL, num_classes=None, out_indices=[0, 2, 3], norm_intermediate_features=True).eval()
    feats = model(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 16, 16), (2, 16, 4, 4), (2, 24, 2, 2)]
    assert isinstance(model.stages[0].norm, nn.BatchNorm2d) and "stages.0.norm.weight" in model.state_dict()
    assert not hasattr(model, "head")
    backbone = timm.create_model("replknet_31b", out_indices=[1, 3], **{k: v for k, v in SMALL.items()})
    assert [f.shape[1] for f in backbone.eval()(torch.randn(1, 3, 64, 64))] == [16, 24]


@pytest.mark.parametrize("out_indices", [None, (1, 3)])
def test_timm_features_only(out_indices):
    """timm's backbone form, as detection and segmentation code asks for it: the stages' maps, and
    feature_info with their channels and strides; the classifier's weights load into it."""
    kwargs = {} if out_indices is None else {"out_indices": out_indices}
    backbone = timm.create_model("replknet_31b", features_only=True, **SMALL, **kwargs).eval()
    classifier = timm.create_model("replknet_31b", num_classes=10, **SMALL).eval()
    missing, unexpected = backbone.load_state_dict(classifier.state_dict(), strict=False)
    assert not missing and all(k.startswith(("head.", "norm.")) for k in unexpected)
    x = torch.randn(2, 3, 64, 64)
    feats = backbone(x)
    stages = out_indices or (0, 1, 2, 3)
    info = backbone.feature_info
    assert info.channels() == [SMALL["channels"][i] for i in stages] and info.reduction() == [4 * 2 ** i for i in stages]
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // r, 64 // r) for c, r in zip(info.channels(), info.reduction())]
    # the classifier's own stage outputs, taken by hooks
    seen = {}
    for i, stage in enumerate(classifier.stages):
        stage.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    classifier(x)
    assert all(torch.equal(f, seen[i]) for f, i in zip(feats, stages))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=None), "num_classes"),
    (dict(num_classes=10, out_indices=[0]), "not both"),
    (dict(num_classes=10, norm_intermediate_features=True), "backbone"),
    (dict(num_classes=None, out_indices=[4]), "out_indices"),
    (dict(num_classes=None, out_indices=[-5]), "out_indices"),
    (dict(num_classes=None, out_indices=[1, -3]), "twice"),
    (dict(num_classes=None, out_indices=0), "last n stages"),
    (dict(small_kernel=4), "small_kernel"),
])
def test_bad_configurations_say_what_is_wrong(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RepLKNet(**{**SMALL, **kwargs})


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = RepLKNet(**SMALL, num_classes=5)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 48, 48)
    for m in (plain, ckpt):
        m.eval()  # BN statistics fixed: the recomputation sees the same normalization
        m(x).square().sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6), n
    assert RepLKNet(**SMALL, num_classes=5, use_checkpoint=True).stages[0].use_checkpoint


def test_drop_path_is_active_in_training_only():
    torch.manual_seed(0)
    model = RepLKNet(**SMALL, num_classes=5, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(x), model(x))


def test_sync_batchnorm_option_keeps_keys_and_outputs():
    torch.manual_seed(0)
    plain = RepLKNet(**SMALL, num_classes=5).eval()
    sync = RepLKNet(**SMALL, num_classes=5, use_sync_bn=True).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in sync.modules())
    sync.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), sync(x), atol=1e-6)


def test_converted_replknet_trains_like_the_original():
    torch.manual_seed(0)
    model = RepLKNet(**SMALL, num_classes=5).train()
    converted = lkpatch.convert_model(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32)
    for m in (model, converted):
        m(x).square().sum().backward()
    for (n, a), (_, b) in zip(model.named_parameters(), converted.named_parameters()):
        assert torch.equal(a.grad, b.grad), n
    assert lkpatch.revert_model(converted).state_dict().keys() == model.state_dict().keys()
    assert not any(isinstance(m, lkpatch.DepthwiseConv2d) for m in converted.modules())
