"""The ``lkpatch::`` custom ops on the CPU: registrations (opcheck), torch.compile, autocast,
memory format and empty batches. The CPU kernels are PyTorch's own, so this exercises the op
machinery -- schemas, fake tensors, autograd, autocast -- that the CUDA kernels plug into."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lkpatch
from conftest import OpLog, op_route, rel_err
from lkpatch import dispatch

ops = torch.ops.lkpatch


def _padded_ref(x, w, b, pads):
    pt, pb, pl, pr = pads
    return F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, b, groups=x.shape[1])


# --- opcheck --------------------------------------------------------------------------------------

OPCHECK_CASES = [  # (N, C, H, W), (kh, kw), pads, dtype, channels_last
    ((2, 4, 7, 9), (3, 5), (1, 2, 0, 3), torch.float64, False),
    ((2, 4, 7, 9), (3, 5), (1, 2, 0, 3), torch.float64, True),
    ((1, 3, 6, 5), (4, 4), (2, 1, 2, 1), torch.float32, False),
    ((1, 3, 6, 5), (7, 7), (3, 3, 3, 3), torch.float32, True),
    ((3, 2, 4, 8), (1, 11), (0, 0, 5, 5), torch.float32, False),
    ((1, 2, 3, 3), (5, 5), (4, 0, 0, 4), torch.float64, False),   # map smaller than the kernel
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[str(i) for i in range(len(OPCHECK_CASES))])
def test_opcheck_all_four_ops(case):
    size, k, pads, dtype, channels_last = case
    gen = torch.Generator().manual_seed(0)
    n, c, h, w = size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(size, dtype=dtype, generator=gen).contiguous(memory_format=fmt).requires_grad_()
    wt = torch.randn(c, 1, *k, dtype=dtype, generator=gen, requires_grad=True)
    b = torch.randn(c, dtype=dtype, generator=gen, requires_grad=True)
    oh, ow = h + pads[0] + pads[1] - k[0] + 1, w + pads[2] + pads[3] - k[1] + 1
    g = torch.randn(n, c, oh, ow, dtype=dtype, generator=gen).contiguous(memory_format=fmt)
    results = [
        torch.library.opcheck(ops.dwconv2d.default, (x, wt, b, list(pads))),
        torch.library.opcheck(ops.dwconv2d.default, (x, wt, None, list(pads))),
        torch.library.opcheck(ops.dwconv2d_input_grad.default, (g, wt.detach(), [h, w], list(pads))),
        torch.library.opcheck(ops.dwconv2d_weight_grad.default, (g, x.detach(), list(k), list(pads))),
        torch.library.opcheck(ops.dwconv2d_bias_grad.default, (g,)),
    ]
    for res in results:
        assert all(v == "SUCCESS" for v in res.values()), res
    # and the values are PyTorch's
    y = ops.dwconv2d(x, wt, b, list(pads))
    ref = _padded_ref(x, wt, b, pads)
    assert rel_err(y, ref) <= 1e-6
    ref_grads = torch.autograd.grad(ref, (x, wt, b), g)
    assert rel_err(ops.dwconv2d_input_grad(g, wt, [h, w], list(pads)), ref_grads[0]) <= 1e-6
    assert rel_err(ops.dwconv2d_weight_grad(g, x, list(k), list(pads)), ref_grads[1]) <= 1e-6
    assert rel_err(ops.dwconv2d_bias_grad(g), ref_grads[2]) <= 1e-6


BAD_CALLS = {  # a direct op call with arguments its schema takes but no depthwise convolution has
    "multiplier": (ops.dwconv2d, lambda x: (x, torch.randn(6, 1, 3, 3), None, [1, 1, 1, 1]), "weight must be (C, 1"),
    "grouped": (ops.dwconv2d, lambda x: (x, torch.randn(3, 2, 3, 3), None, [1, 1, 1, 1]), "weight must be (C, 1"),
    "bias": (ops.dwconv2d, lambda x: (x, torch.randn(3, 1, 3, 3), torch.randn(4), [1, 1, 1, 1]), "bias must be (3,)"),
    "dtypes": (ops.dwconv2d, lambda x: (x, torch.randn(3, 1, 3, 3, dtype=torch.float64), None, [1, 1, 1, 1]),
               "weight dtype"),
    "negative": (ops.dwconv2d, lambda x: (x, torch.randn(3, 1, 3, 3), None, [-1, -1, 0, 0]), "non-negative"),
    "3-d": (ops.dwconv2d, lambda x: (x[0], torch.randn(3, 1, 3, 3), None, [1, 1, 1, 1]), "(N, C, H, W)"),
    "kernel": (ops.dwconv2d, lambda x: (x, torch.randn(3, 1, 9, 9), None, [1, 1, 1, 1]), "smaller than the 9x9"),
    "empty map": (ops.dwconv2d, lambda x: (x[:, :, :0], torch.randn(3, 1, 3, 3), None, [2, 2, 2, 2]),
                  "input map 0x5 is empty"),
    "input size": (ops.dwconv2d_input_grad, lambda x: (x, torch.randn(3, 1, 3, 3), [9, 9], [1, 1, 1, 1]),
                   "grad_output is 5x5"),
    "grad size": (ops.dwconv2d_weight_grad, lambda x: (x[:, :, :4], x, [3, 3], [1, 1, 1, 1]), "grad_output is 4x5"),
    "grad channels": (ops.dwconv2d_weight_grad, lambda x: (x[:, :2], x, [3, 3], [1, 1, 1, 1]), "differ in N, C"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_op_arguments_are_named_alike_on_every_backend(name, device):
    """The CPU kernel, fake tensors (torch.compile's tracing) and the CUDA kernels check the same."""
    op, args, words = BAD_CALLS[name]
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args(torch.randn(2, 3, 5, 5))]
    with pytest.raises(RuntimeError, match=f"lkpatch::{op._qualified_op_name.split('::')[1]}: .*"):
        try:
            op(*args)
        except RuntimeError as e:
            assert words in str(e), e
            raise


def test_gradcheck_through_the_op():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(2, 1, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.dwconv2d(x, w, b, [2, 0, 1, 2]), (x, w, b))


# --- torch.compile ------------------------------------------------------------------------------

def _small_model():
    from timm.layers.conv2d_same import Conv2dSame
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.Conv2d(8, 8, 7, padding=3, groups=8),
        nn.GELU(),
        nn.Conv2d(8, 8, (1, 5), padding=(0, 2), groups=8, bias=False),
        nn.Conv2d(8, 8, 4, padding="same", groups=8),
        Conv2dSame(8, 8, 3, stride=1, groups=8),
        Conv2dSame(8, 8, 3, stride=2, groups=8),      # F.conv2d inside the same graph
        nn.Conv2d(8, 16, 3, padding=1, groups=8),     # multiplier 2: F.conv2d
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def test_compile_fullgraph_matches_eager():
    """Dynamo traces the converted model as one graph with the ops in it, and AOTAutograd's
    forward and backward (the ops' fake kernels and autograd formulas) match eager."""
    from torch._dynamo.backends.registry import lookup_backend

    model = lkpatch.convert_model(_small_model())
    report = lkpatch.conversion_report(model)
    assert len(report.converted) == 6
    x = torch.randn(2, 3, 13, 12)

    with op_route():
        with OpLog() as log:
            eager = model(x)
            eager.sum().backward()
        assert log.count("lkpatch::dwconv2d") == 4
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)

        graphs = []

        def backend(gm, example_inputs):  # record the Dynamo graph, then compile it with AOTAutograd
            graphs.append(gm)
            return lookup_backend("aot_eager")(gm, example_inputs)

        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        out = compiled(x)
        out.sum().backward()
    assert len(graphs) == 1  # fullgraph=True: one graph, no breaks
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("lkpatch.dwconv2d" in t for t in targets) == 4
    assert rel_err(out, eager) <= 1e-5
    for p, want in zip(model.parameters(), eager_grads):
        assert p.grad is not None and rel_err(p.grad, want) <= 1e-5


def test_inductor_compiles_the_ops():
    """torch.compile's default backend (Inductor) runs the four ops, forward and backward, as
    eager does. The layers are lkpatch's alone, so Inductor generates no C++ of its own to
    compile (that takes 20 s on 2 cores); the GPU tests compile a whole model with it."""
    from timm.layers.conv2d_same import Conv2dSame
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = lkpatch.convert_model(nn.Sequential(
        nn.Conv2d(8, 8, 7, padding=3, groups=8),
        nn.Conv2d(8, 8, (1, 5), padding=(0, 2), groups=8, bias=False),
        Conv2dSame(8, 8, 4, groups=8)))
    assert len(lkpatch.conversion_report(model).converted) == 3
    x = torch.randn(2, 8, 13, 12, requires_grad=True)
    with op_route():
        eager = model(x)
        eager_grads = torch.autograd.grad(eager.square().sum(), [x, *model.parameters()])
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)

        def step():
            out = compiled(x)
            return out, torch.autograd.grad(out.square().sum(), [x, *model.parameters()])

        (out, grads), code = run_and_get_code(step)  # the Python that Inductor generated
    code = "\n".join(code)
    for op in ("dwconv2d", "dwconv2d_input_grad", "dwconv2d_weight_grad", "dwconv2d_bias_grad"):
        assert f"torch.ops.lkpatch.{op}.default" in code, op
    assert rel_err(out, eager) <= 1e-5
    for got, want in zip(grads, eager_grads):
        assert rel_err(got, want) <= 1e-5


def test_compile_with_dynamic_shapes_and_tf_same_padding():
    model = lkpatch.convert_model(_small_model())
    with op_route():
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
        for hw in [(13, 12), (16, 17), (9, 9)]:
            x = torch.randn(2, 3, *hw)
            assert rel_err(compiled(x), model(x)) <= 1e-5


def test_compile_under_autocast():
    model = lkpatch.convert_model(_small_model())
    x = torch.randn(2, 3, 12, 12)
    with op_route(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x)
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert rel_err(out, eager) <= 1e-2


# --- autocast -----------------------------------------------------------------------------------

@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16(input_dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 11, 10, generator=gen).to(input_dtype).requires_grad_()
    w = torch.randn(6, 1, 7, 7, generator=gen, requires_grad=True)   # fp32 master weights
    b = torch.randn(6, generator=gen, requires_grad=True)
    g = torch.randn(2, 6, 11, 10, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.conv2d(x, w, b, 1, 3, 1, 6)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g.to(ref.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16), op_route(), OpLog() as log:
        out = lkpatch.depthwise_conv2d(x, w, b, padding=3)
    # the op runs on bf16 activations with fp32 weights too: autocast casts both, as for F.conv2d
    assert log.count("lkpatch::dwconv2d") == 1
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 1e-2
    grads = torch.autograd.grad(out, (x, w, b), g.to(out.dtype))
    assert grads[0].dtype == input_dtype
    assert grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and rel_err(got, want) <= 2e-2


def test_autocast_leaves_float64_alone():
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16), op_route(), OpLog() as log:
        out = lkpatch.depthwise_conv2d(x, w, None, padding=1)
        with pytest.raises(RuntimeError):  # float64 input, fp32 weight (cast to bf16): PyTorch raises
            F.conv2d(x, w.float(), None, 1, 1, 1, 3)
        with pytest.raises(RuntimeError):
            lkpatch.depthwise_conv2d(x, w.float(), None, padding=1)
    assert log.count("lkpatch::dwconv2d") == 1
    assert out.dtype == torch.float64 and torch.allclose(out, F.conv2d(x, w, None, 1, 1, 1, 3))


def test_autocast_model_training_step():
    model = lkpatch.convert_model(_small_model())
    x = torch.randn(2, 3, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
    ref.float().square().mean().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with op_route(), torch.autocast("cpu", dtype=torch.bfloat16), OpLog() as log:
        out = model(x)
    assert log.count("lkpatch::dwconv2d") == 4  # bf16 activations between layers still take the op
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= 1e-2
    for p, want in zip(model.parameters(), ref_grads):
        assert p.grad.dtype == torch.float32 and rel_err(p.grad, want) <= 5e-2


# --- memory format, empty batch -----------------------------------------------------------------

@pytest.mark.parametrize("pads", [(1, 1, 1, 1), (0, 2, 1, 3)])
def test_channels_last_follows_f_conv2d(pads):
    x = torch.randn(2, 6, 9, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 1, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    ref = _padded_ref(x, w, b, pads)
    g = torch.randn_like(ref)
    ref_gx = torch.autograd.grad(ref, x, g)[0]
    assert ref.is_contiguous(memory_format=torch.channels_last)  # what F.conv2d returns on the CPU
    with op_route(), OpLog() as log:
        out = lkpatch.depthwise_conv2d(x, w, b, padding=pads)
        gx = torch.autograd.grad(out, x, g)[0]
    assert log.count("lkpatch::dwconv2d") == 1
    assert out.stride() == ref.stride() and rel_err(out, ref) <= 1e-5
    assert gx.stride() == ref_gx.stride() and rel_err(gx, ref_gx) <= 1e-5
    # contiguous in, contiguous out
    xc = x.detach().contiguous()
    with op_route():
        out = lkpatch.depthwise_conv2d(xc, w, b, padding=pads)
    assert out.stride() == _padded_ref(xc, w, b, pads).stride()

def test_channel_slice_of_channels_last_follows_f_conv2d():
    """A channel slice of a channels_last map (InceptionNeXt's token mixer) has channels_last
    strides with gaps: the op returns channels_last there, as F.conv2d does."""
    x = torch.randn(2, 20, 9, 8).contiguous(memory_format=torch.channels_last)
    sl = x[:, 4:10]
    w = torch.randn(6, 1, 3, 5)
    ref = F.conv2d(sl, w, None, 1, (1, 2), 1, 6)
    assert ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous()
    with op_route(), OpLog() as log:
        out = lkpatch.depthwise_conv2d(sl, w, padding=(1, 2))
    assert log.count("lkpatch::dwconv2d") == 1
    assert out.stride() == ref.stride() and rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("x_fmt,g_fmt", [(torch.channels_last, torch.contiguous_format),
                                         (torch.contiguous_format, torch.channels_last)])
def test_input_grad_takes_the_input_memory_format_like_f_conv2d(x_fmt, g_fmt):
    """The output gradient may come in another layout than the input (a permute after the conv)."""
    x = torch.randn(2, 6, 9, 8).contiguous(memory_format=x_fmt).requires_grad_()
    w = torch.randn(6, 1, 3, 3)
    g = torch.randn(2, 6, 9, 8).contiguous(memory_format=g_fmt)
    ref_gx = torch.autograd.grad(F.conv2d(x, w, None, 1, 1, 1, 6), x, g)[0]
    with op_route(), OpLog() as log:
        gx = torch.autograd.grad(lkpatch.depthwise_conv2d(x, w, padding=1), x, g)[0]
    assert log.count("lkpatch::dwconv2d") == 1
    assert gx.stride() == ref_gx.stride() and rel_err(gx, ref_gx) <= 1e-5


def test_empty_batch_goes_to_f_conv2d():
    x = torch.randn(0, 4, 9, 9, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    with op_route():
        assert dispatch.op_padding(x, w, b, 1, 1, 1) is None
        assert dispatch.op_padding(x[:, :0], w[:0], b[:0], 1, 1, 1) is None
        with OpLog() as log:
            out = lkpatch.depthwise_conv2d(x, w, b, padding=1)
            out.sum().backward()
    assert log.count("lkpatch::dwconv2d") == 0 and "aten::convolution" in log.names
    ref = F.conv2d(x, w, b, 1, 1, 1, 4)
    assert out.shape == ref.shape == (0, 4, 9, 9)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# --- double backward ----------------------------------------------------------------------------

def _double_backward(fn, x, w, b, t):
    """Gradient penalty: d/d(x, w, b) of |d<sin(y*t)>/d(x, w, b)|^2."""
    y = fn(x, w, b)
    grads = torch.autograd.grad((y * t).sin().sum(), (x, w, b), create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    return torch.autograd.grad(penalty, (x, w, b))


@pytest.mark.parametrize("pads", [(1, 1, 2, 2), (0, 2, 3, 1)])
def test_double_backward_through_the_op(pads):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 1, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(_padded_ref(x, w, b, pads).shape, dtype=torch.float64, generator=gen)
    ref = _double_backward(lambda x, w, b: _padded_ref(x, w, b, pads), x, w, b, t)
    with op_route(), OpLog() as log:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "autograd kernel was not registered" fallback
            got = _double_backward(lambda x, w, b: lkpatch.depthwise_conv2d(x, w, b, padding=pads), x, w, b, t)
    assert log.count("lkpatch::dwconv2d") >= 3  # the forward, and the double-backward terms
    for a, r in zip(got, ref):
        assert rel_err(a, r) <= 1e-10
    # gradgradcheck and opcheck (autograd registration with inputs that require grad)
    assert torch.autograd.gradgradcheck(lambda x, w, b: ops.dwconv2d(x, w, b, list(pads)), (x, w, b))
    g = t.clone().requires_grad_()
    for op, op_args in [(ops.dwconv2d_input_grad, (g, w, [7, 8], list(pads))),
                        (ops.dwconv2d_weight_grad, (g, x, [3, 5], list(pads))),
                        (ops.dwconv2d_bias_grad, (g,))]:
        res = torch.library.opcheck(op.default, op_args)
        assert all(v == "SUCCESS" for v in res.values()), res
        tensors = tuple(a for a in op_args if isinstance(a, torch.Tensor))
        assert torch.autograd.gradcheck(lambda *a: op(*a, *op_args[len(a):]), tensors)


class _OpaqueKernels:
    """Stands in for the CUDA extension: PyTorch's values, but no autograd history (like a kernel)."""

    def __getattr__(self, name):
        from lkpatch import _pytorch
        if name == "plan":  # kernels that read NCHW (channels_last tensors go through copies)
            return lambda *args: "fma nchw - 0 0"
        fn = {"dwconv2d": _pytorch.forward, "dwconv2d_input_grad": _pytorch.backward_input,
              "dwconv2d_weight_grad": _pytorch.backward_weight, "dwconv2d_bias_grad": _pytorch.backward_bias,
              "to_nchw": torch.Tensor.contiguous,
              "to_channels_last": lambda t: t.contiguous(memory_format=torch.channels_last)}[name]

        def run(*args):
            if name in ("dwconv2d", "dwconv2d_input_grad", "dwconv2d_weight_grad"):
                assert isinstance(args[-1], bool)  # the extension's `tf32` switch
                args = args[:-1]
            with torch.no_grad():
                return fn(*args)
        return run


@pytest.mark.parametrize("entry", ["EagerDepthwiseConv2d", "eager_dwconv2d"])
def test_eager_cuda_function_with_opaque_kernels(monkeypatch, entry):
    """``EagerDepthwiseConv2d`` (the CUDA eager path) with kernel stand-ins on CPU tensors:
    values, gradients, memory format, and double backward (which must not go through the
    kernels' autograd-less outputs). ``eager_dwconv2d`` sends this channels_last input through
    NCHW as a whole (its layout copies as autograd nodes)."""
    from lkpatch import _ops
    apply = _ops.EagerDepthwiseConv2d.apply if entry == "EagerDepthwiseConv2d" else _ops.eager_dwconv2d
    monkeypatch.setattr(_ops, "kernels", lambda: _OpaqueKernels())
    monkeypatch.setattr(_ops.dispatch, "use_kernel", lambda *args, **kwargs: True)
    pads = (2, 0, 1, 3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=gen).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(3, 1, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    ref = _padded_ref(x, w, b, pads)
    out = apply(x, w, b, pads)
    assert out.stride() == ref.stride() and rel_err(out, ref) <= 1e-12
    for fmt in (torch.channels_last, torch.contiguous_format):  # the input gradient takes the input's format
        g = torch.randn(ref.shape, dtype=torch.float64, generator=gen).contiguous(memory_format=fmt)
        got = torch.autograd.grad(out, (x, w, b), g, retain_graph=True)
        for a, r in zip(got, torch.autograd.grad(ref, (x, w, b), g, retain_graph=True)):
            assert a.stride() == r.stride() and rel_err(a, r) <= 1e-12
    t = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    want = _double_backward(lambda x, w, b: _padded_ref(x, w, b, pads), x, w, b, t)
    got = _double_backward(lambda x, w, b: apply(x, w, b, pads), x, w, b, t)
    for a, r in zip(got, want):
        assert rel_err(a, r) <= 1e-10
    # a 1 x 1 output (channels_last and NCHW at once) takes in-place ops, as F.conv2d's does
    w_full = torch.randn(3, 1, 7, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    out = apply(x, w_full, b, (0, 0, 0, 0))
    ref = _padded_ref(x, w_full, b, (0, 0, 0, 0))
    out.relu_()
    assert rel_err(out, ref.relu()) <= 1e-12
    got = torch.autograd.grad(out.sum(), (x, w_full, b))
    for a, r in zip(got, torch.autograd.grad(ref.relu().sum(), (x, w_full, b))):
        assert a.stride() == r.stride() and rel_err(a, r) <= 1e-12


def test_layout_copy_nodes_pass_batched_gradients():
    """The eager channels_last route's copies into and out of NCHW are autograd nodes: a batched
    output gradient (is_grads_batched) goes through them as it is (vmap cannot change its format)."""
    from lkpatch import _ops

    x = torch.randn(2, 3, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = _ops._ChannelsLastAsNCHW.apply(x)
    z = _ops._NCHWAsChannelsLast.apply(y * 2)
    assert y.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last)
    v = torch.randn(4, *z.shape, dtype=torch.float64)
    assert torch.equal(torch.autograd.grad(z, x, v, is_grads_batched=True, retain_graph=True)[0], 2 * v)
    gx = torch.autograd.grad(z, x, v[0].contiguous())[0]  # unbatched: back to channels_last
    assert torch.equal(gx, 2 * v[0]) and gx.is_contiguous(memory_format=torch.channels_last)
