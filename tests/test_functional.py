"""``lkpatch.depthwise_conv2d`` and ``lkpatch.DepthwiseConv2d`` against PyTorch, on the CPU.

Two routes: the default one (CPU tensors go to ``F.conv2d``) and the op route
(``dispatch.force("auto", cpu_through_op=True)``), where every call the op can take goes through
``torch.ops.lkpatch.dwconv2d`` and its autograd -- the machinery the CUDA kernels plug into.
"""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lkpatch
from conftest import OpLog, op_route, rel_err
from lkpatch import dispatch


def reference_pad_conv(x, w, b, stride, padding, dilation):
    """F.conv2d, with a 4-tuple padding computed as F.pad + conv."""
    if isinstance(padding, tuple) and len(padding) == 4:
        pt, pb, pl, pr = padding
        return F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, b, stride, 0, dilation, x.shape[1])
    return F.conv2d(x, w, b, stride, padding, dilation, x.shape[1])


# (N, C, H, W), (kh, kw), multiplier, bias, stride, padding, dilation, op route eligible
CASES = [
    ((2, 4, 9, 11), (3, 3), 1, True, 1, 1, 1, True),
    ((1, 3, 10, 8), (7, 7), 1, True, 1, 3, 1, True),
    ((2, 5, 12, 13), (3, 5), 1, False, 1, (1, 2), 1, True),
    ((1, 4, 9, 14), (1, 11), 1, True, (1, 1), (0, 5), (1, 1), True),
    ((1, 4, 14, 9), (11, 1), 1, True, 1, [5, 0], 1, True),
    ((2, 3, 9, 10), (5, 5), 1, True, 1, "same", 1, True),
    ((2, 3, 9, 10), (4, 6), 1, True, 1, "same", 1, True),      # even kernel: odd pixel bottom/right
    ((2, 3, 9, 10), (2, 3), 1, False, 1, "same", 1, True),
    ((2, 3, 9, 10), (4, 3), 1, True, 1, "same", 2, False),     # 'same' with dilation: F.conv2d
    ((2, 3, 9, 10), (3, 4), 1, True, 1, "valid", 1, True),
    ((2, 3, 9, 10), (3, 3), 1, True, 1, (1, 2, 0, 3), 1, True),  # (top, bottom, left, right)
    ((1, 2, 6, 7), (5, 5), 1, False, 1, (4, 0, 0, 4), 1, True),
    ((1, 3, 5, 5), (7, 7), 1, True, 1, 3, 1, True),            # map smaller than the kernel
    ((1, 3, 5, 5), (7, 7), 1, True, 1, 4, 1, True),            # padding larger than half the kernel
    ((2, 4, 11, 10), (3, 3), 1, True, 2, 1, 1, False),         # stride 2
    ((2, 4, 11, 10), (5, 3), 1, True, (2, 1), (2, 1), 1, False),
    ((2, 4, 11, 10), (3, 3), 1, True, 1, 2, 2, False),         # dilation 2
    ((2, 4, 11, 10), (3, 3), 2, True, 1, 1, 1, False),         # multiplier 2
    ((2, 4, 11, 10), (3, 3), 3, False, 2, 1, 1, False),
    ((2, 4, 11, 10), (5, 5), 2, True, 2, (1, 2, 2, 1), 1, False),  # 4-tuple through F.pad + strided conv
]


def _case_tensors(case, dtype=torch.float32, seed=0):
    size, k, mult, has_bias = case[:4]
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = size
    x = torch.randn(size, generator=g, dtype=dtype)
    wt = torch.randn(c * mult, 1, *k, generator=g, dtype=dtype)
    b = torch.randn(c * mult, generator=g, dtype=dtype) if has_bias else None
    return x, wt, b


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_default_route_is_f_conv2d(case):
    x, w, b = _case_tensors(case)
    stride, padding, dilation = case[4:7]
    with OpLog() as log:
        out = lkpatch.depthwise_conv2d(x, w, b, stride, padding, dilation)
    assert log.count("lkpatch::dwconv2d") == 0  # CPU tensors never take the op by default
    ref = reference_pad_conv(x, w, b, stride, padding, dilation)
    assert out.shape == ref.shape and torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_op_route_forward_and_gradients(case, dtype):
    x, w, b = _case_tensors(case, dtype, seed=1)
    stride, padding, dilation, eligible = case[4:8]
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    ref = reference_pad_conv(x, w, b, stride, padding, dilation)
    g = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    ref_grads = torch.autograd.grad(ref, leaves, g)
    with op_route(), OpLog() as log:
        out = lkpatch.depthwise_conv2d(x, w, b, stride, padding, dilation)
        grads = torch.autograd.grad(out, leaves, g)
    assert log.count("lkpatch::dwconv2d") == int(eligible)
    if eligible:
        assert log.count("lkpatch::dwconv2d_input_grad") == 1
        assert log.count("lkpatch::dwconv2d_weight_grad") == 1
        assert log.count("lkpatch::dwconv2d_bias_grad") == int(b is not None)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(out, ref) <= tol
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert rel_err(got, want) <= tol


def test_op_route_only_computes_the_gradients_asked_for():
    x, w, b = _case_tensors(CASES[0])
    w.requires_grad_()
    with op_route(), OpLog() as log:
        lkpatch.depthwise_conv2d(x, w, b, padding=1).sum().backward()
    assert log.count("lkpatch::dwconv2d_weight_grad") == 1
    assert log.count("lkpatch::dwconv2d_input_grad") == 0
    assert log.count("lkpatch::dwconv2d_bias_grad") == 0
    assert x.grad is None and b.grad is None and w.grad is not None


def test_forward_mode_ad_and_torch_func_transforms_compute_f_conv2d():
    """The op has no forward-mode formula and no batching rule: under a dual level or a torch.func
    transform the call is F.conv2d's (a zero tangent came back before, without an error)."""
    import torch.autograd.forward_ad as forward_ad

    g = torch.Generator().manual_seed(3)
    x, t = (torch.randn(2, 4, 9, 9, dtype=torch.float64, generator=g) for _ in range(2))
    w, b = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=g), torch.randn(4, dtype=torch.float64, generator=g)

    def ours(x_, w_=w):
        return lkpatch.depthwise_conv2d(x_, w_, b, padding=1)

    def pytorch(x_, w_=w):
        return F.conv2d(x_, w_, b, padding=1, groups=x_.shape[-3])

    def per_sample(conv):
        return torch.func.vmap(torch.func.grad(lambda w_, x_: conv(x_[None], w_).square().sum()), in_dims=(None, 0))

    with op_route(), OpLog() as log:
        got = {"jvp": torch.func.jvp(ours, (x,), (t,))[1],
               "per-sample": per_sample(ours)(w, x),
               "hessian": torch.func.hessian(lambda w_: ours(x[:1, :, :4, :4], w_).square().sum())(w)}
        with forward_ad.dual_level():
            got["dual"] = forward_ad.unpack_dual(ours(forward_ad.make_dual(x, t))).tangent
        assert log.count("lkpatch::dwconv2d") == 0
        lkpatch.depthwise_conv2d(x, w, b, padding=1)  # no transform: the op again
        assert log.count("lkpatch::dwconv2d") == 1
    want = torch.func.jvp(pytorch, (x,), (t,))[1]
    assert torch.equal(got["jvp"], want) and torch.equal(got["dual"], want)
    assert torch.equal(got["per-sample"], per_sample(pytorch)(w, x))
    assert torch.equal(got["hessian"], torch.func.hessian(lambda w_: pytorch(x[:1, :, :4, :4], w_).square().sum())(w))


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_batched_gradients_through_the_op(fmt):
    """autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) run the op's backward on
    batched gradients, whose memory format cannot be asked (channels_last inputs failed)."""
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, 4, 8, 8, dtype=torch.float64)
    small = x[:1, :2, :4, :4].detach().contiguous(memory_format=fmt)  # jacobian: a batch per output element

    def jacobian(conv):
        return torch.autograd.functional.jacobian(lambda w_: conv(small, w_), w[:2], vectorize=True)

    want = torch.autograd.grad(F.conv2d(x, w, b, padding=1, groups=4), (x, w, b), v, is_grads_batched=True)
    want_jacobian = jacobian(lambda x_, w_: F.conv2d(x_, w_, None, padding=1, groups=2))
    with op_route(), OpLog() as log:
        y = lkpatch.depthwise_conv2d(x, w, b, padding=1)
        got = torch.autograd.grad(y, (x, w, b), v, is_grads_batched=True)
        got_jacobian = jacobian(lambda x_, w_: lkpatch.depthwise_conv2d(x_, w_, None, padding=1))
        assert log.count("lkpatch::dwconv2d") == 2
        assert torch.autograd.gradcheck(lambda x_, w_: lkpatch.depthwise_conv2d(x_, w_, None, padding=1),
                                        (small.requires_grad_(), w[:2].detach().requires_grad_()),
                                        check_batched_grad=True)
    for a, r in zip(got, want):
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got_jacobian, want_jacobian, rtol=1e-12, atol=1e-12)


def test_numpy_integers_take_the_op():
    """F.conv2d takes numpy's integer scalars for sizes (not arrays, even 0-d ones: BAD)."""
    x, w, b = _case_tensors(CASES[0])
    with op_route(), OpLog() as log:
        out = lkpatch.depthwise_conv2d(x, w, b, stride=np.int64(1), padding=(np.int32(1), 1), groups=np.int64(4))
        assert log.count("lkpatch::dwconv2d") == 1
    assert torch.equal(out, F.conv2d(x, w, b, padding=1, groups=4))


def test_groups_named_as_in_f_conv2d():
    x, w, b = _case_tensors(CASES[0])
    with op_route(), OpLog() as log:
        out = lkpatch.depthwise_conv2d(x, w, b, padding=1, groups=4)  # the input's channels: the op
        assert log.count("lkpatch::dwconv2d") == 1
        assert torch.equal(out, F.conv2d(x, w, b, padding=1, groups=4))
        dense = torch.randn(4, 2, 3, 3)
        assert torch.equal(lkpatch.depthwise_conv2d(x, dense, None, 1, 1, 1, 2), F.conv2d(x, dense, None, 1, 1, 1, 2))
        assert log.count("lkpatch::dwconv2d") == 1  # other groups: F.conv2d's
        with pytest.raises(RuntimeError) as theirs:
            F.conv2d(x, w, b, padding=1, groups=3)
        with pytest.raises(RuntimeError) as ours:
            lkpatch.depthwise_conv2d(x, w, b, padding=1, groups=3)
        assert str(ours.value) == str(theirs.value)


def test_integer_tensors_like_f_conv2d():
    x = torch.randint(-5, 5, (1, 3, 6, 6))
    w = torch.randint(-5, 5, (3, 1, 3, 3))
    for ctx in (contextlib.nullcontext(), op_route()):
        with ctx:
            out = lkpatch.depthwise_conv2d(x, w, None, 1, 1)
        assert out.dtype == torch.int64 and torch.equal(out, F.conv2d(x, w, None, 1, 1, 1, 3))


def test_unbatched_input():
    x = torch.randn(4, 9, 9)
    w = torch.randn(4, 1, 3, 3)
    for ctx in (contextlib.nullcontext(), op_route()):
        with ctx:
            out = lkpatch.depthwise_conv2d(x, w, None, 1, (1, 0, 2, 1))
        assert torch.equal(out, F.conv2d(F.pad(x, (2, 1, 1, 0)), w, groups=4))


def _bad_calls():
    x = torch.randn(2, 4, 9, 9)
    w = torch.randn(4, 1, 3, 3)
    return {
        "weight (C, 2, k, k)": ((x, torch.randn(4, 2, 3, 3)), dict(padding=1)),
        "weight out channels not a multiple": ((x, torch.randn(5, 1, 3, 3)), dict(padding=1)),
        "weight 3-D": ((x, torch.randn(4, 3, 3)), dict(padding=1)),
        "weight dtype": ((x, w.double()), dict(padding=1)),
        "bias dtype": ((x, w, torch.randn(4, dtype=torch.float64)), dict(padding=1)),
        "bias shape": ((x, w, torch.randn(3)), dict(padding=1)),
        "int input, float weight": ((x.long(), w), dict(padding=1)),
        "input 5-D": ((x[None], w), dict(padding=1)),
        "input 2-D": ((x[0, 0], w), dict(padding=1)),
        "kernel larger than padded input": ((x[:, :, :2, :2], w), dict(padding=0)),
        "negative padding": ((x, w), dict(padding=-1)),
        "padding of 3 values": ((x, w), dict(padding=(1, 1, 1))),
        "padding of 5 values": ((x, w), dict(padding=(1, 1, 1, 1, 1))),
        "float padding": ((x, w), dict(padding=1.0)),
        "a float in a padding pair": ((x, w), dict(padding=(1.0, 1))),
        "a bool in a padding pair": ((x, w), dict(padding=(True, 1))),
        "stride of 3 values": ((x, w), dict(padding=1, stride=(1, 1, 1))),
        "dilation of 3 values": ((x, w), dict(padding=1, dilation=(1, 1, 1))),
        "zero stride": ((x, w), dict(padding=1, stride=0)),
        "padding string": ((x, w), dict(padding="SAME")),
        "'same' with stride 2": ((x, w), dict(padding="same", stride=2)),
        "bool stride": ((x, w), dict(padding=1, stride=True)),
        "float stride": ((x, w), dict(padding=1, stride=1.0)),
        "a bool in a dilation pair": ((x, w), dict(padding=1, dilation=(True, 1))),
        "padding as a tensor": ((x, w), dict(padding=torch.tensor([1, 1]))),
        "padding as a range": ((x, w), dict(padding=range(1, 3))),
        "padding as a 0-d numpy array": ((x, w), dict(padding=np.array(1))),
        "stride as a 0-d numpy array": ((x, w), dict(padding=1, stride=np.array(1))),
    }


BAD = _bad_calls()


@pytest.mark.parametrize("route", ["default", "op"])
@pytest.mark.parametrize("what", list(BAD))
def test_bad_inputs_raise_pytorchs_own_error(what, route):
    args, kwargs = BAD[what]
    x, w, b = (args + (None,))[:3]
    groups = x.shape[-3] if x.dim() >= 3 else 1
    with pytest.raises(Exception) as theirs:  # positionally, as lkpatch calls it
        F.conv2d(x, w, b, kwargs.get("stride", 1), kwargs["padding"], kwargs.get("dilation", 1), groups)
    with (op_route() if route == "op" else contextlib.nullcontext()), OpLog() as log:
        with pytest.raises(Exception) as ours:
            lkpatch.depthwise_conv2d(*args, **kwargs)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)
    assert log.count("lkpatch::dwconv2d") == 0


def test_a_float_groups_raises_pytorchs_own_error():
    x, w = torch.randn(2, 4, 9, 9), torch.randn(4, 1, 3, 3)
    with pytest.raises(TypeError) as theirs:
        F.conv2d(x, w, None, 1, 1, 1, 4.0)
    for ctx in (contextlib.nullcontext(), op_route()):
        with ctx, pytest.raises(TypeError) as ours:
            lkpatch.depthwise_conv2d(x, w, None, padding=1, groups=4.0)
        assert str(ours.value) == str(theirs.value)


# --- DepthwiseConv2d ----------------------------------------------------------------------------

def test_module_defaults():
    m = lkpatch.DepthwiseConv2d(16, kernel_size=7, padding=3)
    assert isinstance(m, nn.Conv2d)
    assert m.in_channels == m.out_channels == m.groups == 16
    assert m.weight.shape == (16, 1, 7, 7) and m.bias.shape == (16,)
    assert m.tf_same_padding is False and m.padding_mode == "zeros"
    ref = nn.Conv2d(16, 16, 7, padding=3, groups=16)
    assert list(m.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 16, 12, 12)
    assert torch.equal(m(x), ref(x))
    with op_route():
        assert rel_err(m(x), ref(x)) <= 1e-5

    m2 = lkpatch.DepthwiseConv2d(8, 24, (3, 5), stride=2, padding=(1, 2), bias=False, dtype=torch.float64)
    assert m2.groups == 8 and m2.weight.shape == (24, 1, 3, 5) and m2.bias is None
    assert m2.weight.dtype == torch.float64
    ref2 = nn.Conv2d(8, 24, (3, 5), stride=2, padding=(1, 2), groups=8, bias=False, dtype=torch.float64)
    ref2.load_state_dict(m2.state_dict())
    x2 = torch.randn(1, 8, 9, 10, dtype=torch.float64)
    assert torch.equal(m2(x2), ref2(x2))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(in_channels=8, groups=4), "groups=4"),
    (dict(in_channels=8, groups=1), "groups=1"),
    (dict(in_channels=8, out_channels=12), "out_channels=12"),
    (dict(in_channels=8, padding_mode="reflect", padding=1), "padding_mode='reflect'"),
    (dict(in_channels=8, padding_mode="circular", padding=1), "padding_mode='circular'"),
    (dict(in_channels=0), "in_channels=0"),
    (dict(in_channels=8, padding=(1, 2, 0, 3)), "padding=(1, 2, 0, 3) is none of nn.Conv2d's forms"),
])
def test_module_rejects_non_depthwise(kwargs, needle):
    with pytest.raises(ValueError) as err:
        lkpatch.DepthwiseConv2d(kernel_size=3, **kwargs)
    assert needle in str(err.value) and "DepthwiseConv2d" in str(err.value)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_a_padding_mode_set_after_conversion_is_honoured(mode):
    conv = nn.Conv2d(4, 4, 5, padding=2, groups=4)
    lkpatch.convert_model(nn.Sequential(conv))
    conv.padding_mode = mode
    x = torch.randn(2, 4, 9, 9)
    want = F.conv2d(F.pad(x, (2, 2, 2, 2), mode=mode), conv.weight, conv.bias, groups=4)
    with op_route():
        assert torch.equal(conv(x), want)
    assert torch.equal(conv(x), want)


def test_module_wrong_channel_count_raises_like_nn_conv2d():
    """groups come from the module, not the input: 4 channels into an 8-channel conv is an error
    (F.conv2d with groups=4 would accept it as a multiplier-2 convolution)."""
    m = lkpatch.DepthwiseConv2d(8, kernel_size=3, padding=1)
    ref = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    ref.load_state_dict(m.state_dict())
    m16 = lkpatch.DepthwiseConv2d(8, 16, kernel_size=3, padding=1)
    ref16 = nn.Conv2d(8, 16, 3, padding=1, groups=8)
    ref16.load_state_dict(m16.state_dict())
    for mod, r, x in [(m, ref, torch.randn(1, 4, 6, 6)), (m16, ref16, torch.randn(1, 16, 6, 6)),
                      (m, ref, torch.randn(6, 6))]:
        with pytest.raises(RuntimeError) as theirs:
            r(x)
        for ctx in (contextlib.nullcontext(), op_route()):
            with ctx, pytest.raises(RuntimeError) as ours:
                mod(x)
            assert str(ours.value) == str(theirs.value)


def _timm_conv2d_same():
    from timm.layers.conv2d_same import Conv2dSame
    return Conv2dSame


@pytest.mark.parametrize("k", [3, 4, 5, (3, 6)])
@pytest.mark.parametrize("stride", [1, 2, (2, 1)])
@pytest.mark.parametrize("hw", [(8, 8), (9, 9), (7, 10), (2, 3)])
def test_tf_same_padding_matches_timm_conv2d_same(k, stride, hw):
    Conv2dSame = _timm_conv2d_same()
    torch.manual_seed(0)
    ref = Conv2dSame(6, 6, k, stride=stride, groups=6, bias=True)
    m = lkpatch.DepthwiseConv2d(6, kernel_size=k, stride=stride, tf_same_padding=True)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, *hw, requires_grad=True)
    want = ref(x)
    out = m(x)
    assert out.shape == want.shape and torch.equal(out, want)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (x, ref.weight, ref.bias), g)
    with op_route(), OpLog() as log:
        out = m(x)
        grads = torch.autograd.grad(out, (x, m.weight, m.bias), g)
    assert log.count("lkpatch::dwconv2d") == int(m.stride == (1, 1))
    assert out.shape == want.shape and rel_err(out, want) <= 1e-5
    for a, b in zip(grads, want_grads):
        assert rel_err(a, b) <= 1e-5


def test_tf_same_padding_with_dilation_and_multiplier():
    Conv2dSame = _timm_conv2d_same()
    torch.manual_seed(0)
    ref = Conv2dSame(4, 8, 3, stride=1, dilation=2, groups=4)
    m = lkpatch.DepthwiseConv2d(4, 8, 3, dilation=2, tf_same_padding=True)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(1, 4, 9, 8)
    assert torch.equal(m(x), ref(x))


def test_to_conv_and_repr():
    m = lkpatch.DepthwiseConv2d(4, kernel_size=3, padding=1)
    same = lkpatch.DepthwiseConv2d(4, kernel_size=3, stride=2, tf_same_padding=True)
    assert "tf_same_padding=True" in repr(same) and "tf_same_padding" not in repr(m)
    x = torch.randn(1, 4, 7, 7)
    y = m(x)
    back = m.to_conv()
    assert back is m and type(back) is nn.Conv2d
    assert torch.equal(back(x), y)
    assert not hasattr(back, "tf_same_padding")
