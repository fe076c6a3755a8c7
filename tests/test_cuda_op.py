"""GPU tests of lkpatch's CUDA kernels against a float64 reference (skipped without CUDA).

Every check runs with the kernel forced on (``dispatch.force("kernel")``) so the speed rule
cannot route a case to PyTorch, and under ``torch.use_deterministic_algorithms(True)``, which
makes PyTorch fill every fresh allocation -- our outputs and workspaces included -- with NaN:
an element a kernel fails to write shows up as NaN in the comparison.
"""
import collections
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

import lkpatch
from conftest import REPO, rel_err, tf32
from lkpatch import _ops, build, dispatch
from lkpatch._pytorch import output_memory_format

pytestmark = pytest.mark.cuda

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SWEEP_CASES = int(os.environ.get("LKPATCH_SWEEP_CASES", "240"))
HALF_SWEEP_CASES = int(os.environ.get("LKPATCH_HALF_SWEEP_CASES", "80"))
PRIMES = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 101,
          103, 107, 109, 113, 127]


@pytest.fixture(autouse=True)
def poisoned_allocations():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def reference(x, w, b, pads, g):
    """Output and gradients in float64 through F.pad + F.conv2d and autograd."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    pt, pb, pl, pr = pads
    y = F.conv2d(F.pad(x64, (pl, pr, pt, pb)), w64, b64, groups=x.shape[1])
    y.backward(g.double())
    return y.detach(), x64.grad, w64.grad, None if b is None else b64.grad


def run_op(x, w, b, pads, g):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    with dispatch.force("kernel"):
        y = torch.ops.lkpatch.dwconv2d(x, w, b, pads)
        y.backward(g)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


def draw_case(rng: random.Random, batch=None):
    """A random case; ``batch=(lo, hi)`` draws the image count from that range instead of 1..8."""
    kind = rng.random()
    if kind < 0.3:
        kh, kw = rng.randint(1, 7), rng.randint(1, 7)
    elif kind < 0.7:
        kh, kw = rng.randint(1, 31), rng.randint(1, 31)
    else:
        kh, kw = rng.randint(20, 63), rng.randint(20, 63)
    if rng.random() < 0.3:
        kw = kh  # square kernels are the common case
    def size(k):
        r = rng.random()
        if r < 0.2:
            return rng.randint(1, max(1, k - 1))  # smaller than the kernel
        if r < 0.5:
            return rng.choice(PRIMES)
        return rng.randint(1, 130)
    h, w = size(kh), size(kw)
    pads = [rng.choice([0, (kh - 1) // 2, kh // 2, kh - 1, kh, rng.randint(0, kh)]) for _ in range(2)] + \
           [rng.choice([0, (kw - 1) // 2, kw // 2, kw - 1, kw, rng.randint(0, kw)]) for _ in range(2)]
    # the padded input must hold the kernel
    pads[1] = max(pads[1], kh - h - pads[0])
    pads[3] = max(pads[3], kw - w - pads[2])
    n, c = rng.randint(1, 8), rng.randint(1, 300)
    if batch is not None:
        n = rng.randint(*batch)
    oh, ow = h + pads[0] + pads[1] - kh + 1, w + pads[2] + pads[3] - kw + 1
    # keep the float64 reference quick: bound the multiply-adds and the tensor sizes
    while c > 1 and (n * c * oh * ow * kh * kw > 2e9 or n * c * max(h * w, oh * ow) > 4e6):
        c = max(1, c // 2)
    layout = rng.choice(["contiguous", "contiguous", "channels_last", "strided"])
    case = dict(n=n, c=c, h=h, w=w, kh=kh, kw=kw, pads=tuple(pads), bias=rng.random() < 0.6, layout=layout)
    if layout == "channels_last" and rng.random() < 0.5:
        case["grad_layout"] = "channels_last"  # else an NCHW output gradient for a channels_last input
    return case


def make_inputs(case, gen, dtype=torch.float32):
    n, c, h, w, kh, kw, pads = (case[k] for k in ("n", "c", "h", "w", "kh", "kw", "pads"))
    dev = "cuda"
    if case["layout"] == "strided":  # every other column of a wider tensor
        x = torch.randn(n, c, h, 2 * w, generator=gen, device=dev, dtype=dtype)[..., ::2]
    else:
        x = torch.randn(n, c, h, w, generator=gen, device=dev, dtype=dtype)
        if case["layout"] == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(c, 1, kh, kw, generator=gen, device=dev, dtype=dtype) / math.sqrt(kh * kw)
    b = torch.randn(c, generator=gen, device=dev, dtype=dtype) if case["bias"] else None
    oh, ow = h + pads[0] + pads[1] - kh + 1, w + pads[2] + pads[3] - kw + 1
    g = torch.randn(n, c, oh, ow, generator=gen, device=dev, dtype=dtype)
    if case.get("grad_layout") == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    if case["layout"] == "strided":
        g = torch.randn(n, c, ow, oh, generator=gen, device=dev, dtype=dtype).transpose(2, 3)
    return x, wt, b, g


def check_case(case, seed, dtype=torch.float32, tol=None):
    """Output and gradients against float64 computed from the same (rounded) inputs; ``tol``:
    relative error bounds by name (default: the dtype's for all four)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x, w, b, g = make_inputs(case, gen, dtype)
    got = run_op(x, w, b, case["pads"], g)
    ref = reference(x, w, b, case["pads"], g)
    names = ("output", "grad_input", "grad_weight", "grad_bias")
    assert all(t.dtype == dtype for t in got if t is not None)
    errs = {name: rel_err(a, r) for name, a, r in zip(names, got, ref) if r is not None}
    bad = {k: v for k, v in errs.items() if not v <= (tol or {}).get(k, TOL[dtype])}
    assert not bad, f"case {case} seed {seed} {dtype}: relative errors {errs}"
    assert got[0].shape == ref[0].shape and got[1].shape == x.shape
    assert got[0].is_contiguous(memory_format=output_memory_format(x))
    return errs


def draw_small_map_case(rng: random.Random, batch=None, most=16):
    """A random case whose input and output maps are at most ``most`` x ``most`` (drawn until one is)."""
    while True:
        case = draw_case(rng, batch)
        p = case["pads"]
        oh, ow = case["h"] + p[0] + p[1] - case["kh"] + 1, case["w"] + p[2] + p[3] - case["kw"] + 1
        if max(case["h"], case["w"], oh, ow) <= most and (most == 16 or max(case["h"], case["w"], oh, ow) > 16):
            return case


def assert_sweep(seed: int, cases: int, dtype=torch.float32, batch=None, draw=draw_case, tol=None):
    """``cases`` random cases (``draw``) through ``check_case``; all failures reported together."""
    rng = random.Random(seed)
    failures = []
    for i in range(cases):
        case = draw(rng, batch)
        try:
            check_case(case, seed=i, dtype=dtype, tol=tol)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, f"{len(failures)} of {cases} cases failed:\n" + "\n".join(failures[:20])


def test_random_sweep_fp32():
    assert_sweep(1234, SWEEP_CASES)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_sweep_half(dtype):
    assert_sweep(4321, HALF_SWEEP_CASES, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_sweep_tensor_cores(dtype):
    """Batches of 8 and more, which the half-precision tensor-core kernels take (16 images per
    matrix row block: partial blocks, one and several of them)."""
    assert_sweep(2468, HALF_SWEEP_CASES, dtype, batch=(8, 40))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_sweep_tensor_cores_small_maps(dtype):
    """Maps up to 16 x 16, whose weight-gradient sums over images on tensor cores: batches up to
    80 (several 64-image blocks, partial 16-image steps) and kernels much larger than the map."""
    assert_sweep(1357, HALF_SWEEP_CASES, dtype, batch=(8, 80), draw=draw_small_map_case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_sweep_tensor_cores_maps_to_32(dtype):
    """Maps from 17 to 32 on a side, whose weight-gradient sums over images in 32 x 32 tiles."""
    assert_sweep(9753, HALF_SWEEP_CASES // 2, dtype, batch=(8, 80),
                 draw=lambda rng, batch: draw_small_map_case(rng, batch, most=32))


def draw_channels_last_case(rng: random.Random, batch=None):
    """A small-map case in channels_last, its output gradient too: C a multiple of 8 (16-byte
    vectors of a pixel's channels) or not (element copies, a partial channel group), and enough
    channels (528+; 17+ images) for the kernels' grids to fill an H100, where they read it as it is."""
    case = draw_small_map_case(rng, batch)
    case.update(layout="channels_last", grad_layout="channels_last",
                c=rng.choice([528, 536, 1024, rng.randint(528, 1100), rng.randint(528, 1100)]))
    return case


class CountingExtension:
    """The extension's ops, counting the calls of each by name."""

    def __init__(self, ops):
        self.ops, self.calls = ops, collections.Counter()

    def __getattr__(self, name):
        fn = getattr(self.ops, name)

        def call(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)
        return call


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_sweep_channels_last_direct(dtype, monkeypatch):
    """channels_last maps up to 16 x 16 with 17+ images and 528+ channels, which the fp16 / bf16
    kernels take as they are: every pass against float64, and no layout copy made."""
    ext = CountingExtension(build.extension_ops())
    monkeypatch.setattr(_ops, "_ext", ext)
    assert_sweep(2027, HALF_SWEEP_CASES, dtype, batch=(17, 48), draw=draw_channels_last_case)
    assert ext.calls["dwconv2d"] == HALF_SWEEP_CASES and ext.calls["dwconv2d_weight_grad"] == HALF_SWEEP_CASES
    assert ext.calls["to_nchw"] == 0 and ext.calls["to_channels_last"] == 0


@pytest.mark.parametrize("grad_fmt", [torch.channels_last, torch.contiguous_format])
def test_channels_last_direct_eager(grad_fmt):
    """The eager path on a channels_last layer the kernels read directly: the C++ autograd op on
    the tensors as they are, results in the input's format, an output gradient in either format."""
    gen = torch.Generator(device="cuda").manual_seed(21)
    pads = (6, 6, 6, 6)
    cl = torch.channels_last
    x = torch.randn(20, 1056, 14, 14, device="cuda", generator=gen).bfloat16().contiguous(memory_format=cl)
    w = (torch.randn(1056, 1, 13, 13, device="cuda", generator=gen) / 13).bfloat16()
    b = torch.randn(1056, device="cuda", generator=gen).bfloat16()
    g = torch.randn(20, 1056, 14, 14, device="cuda", generator=gen).bfloat16().contiguous(memory_format=grad_fmt)
    ref = reference(x, w, b, pads, g)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    with dispatch.force("kernel"):
        y = lkpatch.depthwise_conv2d(xs, ws, bs, padding=pads)
        got = (y,) + torch.autograd.grad(y, (xs, ws, bs), g)
    assert "DwConv2d" in y.grad_fn.name()
    assert y.is_contiguous(memory_format=cl) and got[1].is_contiguous(memory_format=cl)
    for name, a, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        assert rel_err(a, r) <= 1e-2, name
    # a frozen weight: the input and bias gradients alone
    with dispatch.force("kernel"):
        gx, gb = torch.autograd.grad(lkpatch.depthwise_conv2d(xs, w, bs, padding=pads), (xs, bs), g)
    assert rel_err(gx, ref[1]) <= 1e-2 and rel_err(gb, ref[3]) <= 1e-2


def eager_step_kernels(x, wt, b, pads, g):
    """Forward and backward through the eager path's C++ autograd op (under the caller's dispatch
    and TF32 settings): the output and the three gradients, and the names of the CUDA kernels the
    backward ran (None under compute-sanitizer, which keeps the profiler from seeing kernels)."""
    from torch.profiler import ProfilerActivity, profile
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, wt, b))
    y = lkpatch.depthwise_conv2d(xs, ws, bs, padding=pads)
    assert "DwConv2d" in y.grad_fn.name()  # the C++ autograd op
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        grads = torch.autograd.grad(y, (xs, ws, bs), g)
        torch.cuda.synchronize()
    if os.environ.get("LKPATCH_SANITIZER"):
        return (y,) + grads, None
    return (y,) + grads, [e.name for e in prof.events() if e.device_type.name == "CUDA"]


def check_bias_from_weight_grad(n, c, h, w, k, dtype, seed, kernel):
    """A channels_last layer with a bias through the eager C++ backward: its weight-gradient kernel
    (named ``kernel``) sums the bias gradient, so neither a bias-gradient kernel nor a layout copy
    runs, and every result matches float64."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pads = dispatch.explicit_padding("same", k)
    cl = torch.channels_last
    x = torch.randn(n, c, h, w, device="cuda", generator=gen).to(dtype).contiguous(memory_format=cl)
    wt = (torch.randn(c, 1, *k, device="cuda", generator=gen) / math.prod(k) ** 0.5).to(dtype)
    b = torch.randn(c, device="cuda", generator=gen).to(dtype)
    g = torch.randn(n, c, h, w, device="cuda", generator=gen).to(dtype).contiguous(memory_format=cl)
    ref = reference(x, wt, b, pads, g)
    with dispatch.force("kernel"):
        assert dispatch.reads_channels_last("all", x.shape, k, pads, dtype)
        assert dispatch.weight_grad_sums_bias(x.shape, k, pads, dtype, True)
        got, kernels = eager_step_kernels(x, wt, b, pads, g)
    if kernels is not None:
        assert any(kernel in name for name in kernels), kernels
        assert not any("bias_grad" in name or "transpose" in name for name in kernels), kernels
    assert got[1].is_contiguous(memory_format=cl)
    assert got[3].dtype == dtype and got[3].shape == (c,)
    for name, a, want in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        assert rel_err(a, want) <= TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,c,h,w,k", [(24, 1056, 7, 7, (13, 13)), (17, 1061, 9, 11, (7, 7)),
                                       (20, 528, 16, 16, (17, 3))],
                         ids=["vectors", "element_copies", "two_row_groups"])
def test_channels_last_bias_gradient_from_the_weight_gradient(n, c, h, w, k, dtype):
    """channels_last layers the images family reads directly (small maps): its weight-gradient sums
    the bias gradient (check_bias_from_weight_grad). A second, partial 16-image chunk; C a multiple
    of 4 (vector loads) or not (element loads, a partial channel group); 17 kernel rows, two row
    groups of blocks, of which only the first sums."""
    check_bias_from_weight_grad(n, c, h, w, k, dtype, 29, "weight_grad_nhwc")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,h,w,k", [(16, 96, 28, 27, (1, 11)), (9, 40, 30, 33, (11, 1)),
                                       (5, 70, 21, 19, (7, 7)), (3, 33, 13, 17, (5, 9))],
                         ids=["thin_row", "thin_column_partial_group", "square_two_groups", "odd_channels"])
def test_channels_last_cuda_core_weight_gradient_sums_the_bias(n, c, h, w, k, dtype):
    """The CUDA-core channel tiles' weight-gradient sums the bias gradient from the output gradient
    it stages (each value once, zeros outside the map; check_bias_from_weight_grad). Channel counts
    that leave a block's last 32-channel group partial (40, 70) or odd (33: element loads)."""
    with dispatch.force("kernel"), dispatch.conv_tf32(False):
        q = dispatch.plan("weight_grad", (n, c, h, w), k, dispatch.explicit_padding("same", k), dtype, True)
        assert (q.family, q.nhwc, q.takes_bias) == ("fma", True, True), q
        check_bias_from_weight_grad(n, c, h, w, k, dtype, 31, "channel_tile_weight_grad")


def test_channels_last_errors():
    """The extension takes channels_last only where its kernels do, and says so otherwise."""
    ext = build.extension_ops()
    cl = torch.channels_last
    x = torch.randn(8, 8, 20, 20, device="cuda").contiguous(memory_format=cl)
    w = torch.randn(8, 1, 5, 5, device="cuda")
    with pytest.raises(RuntimeError, match="no channels_last forward kernel"):
        ext.dwconv2d(x, torch.randn(8, 1, 17, 17, device="cuda"), None, [8] * 4)  # exact fp32 17 x 17: NCHW only
    assert ext.dwconv2d(x, w, None, [2, 2, 2, 2]).is_contiguous(memory_format=cl)  # exact fp32 5 x 5: read as it is
    xh, wh = x[..., :14, :14].bfloat16().contiguous(memory_format=cl), w.bfloat16()
    with pytest.raises(RuntimeError, match="must both be NCHW or both channels_last"):
        ext.dwconv2d_weight_grad(xh, xh.contiguous(), [5, 5], [2, 2, 2, 2])
    with pytest.raises(RuntimeError, match="contiguous NCHW or channels_last"):
        ext.dwconv2d_bias_grad(xh[..., ::2])
    # a 14 x 14 map: the images family reads channels_last where its grid fills the GPU (132
    # blocks of 8 channels on an H100), not for 8 channels
    with pytest.raises(RuntimeError, match="no channels_last forward kernel"):
        ext.dwconv2d(xh, wh, None, [2, 2, 2, 2])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    xw = torch.randn(8, 8 * sms, 14, 14, device="cuda").bfloat16().contiguous(memory_format=cl)
    ww = torch.randn(8 * sms, 1, 5, 5, device="cuda").bfloat16()
    assert ext.dwconv2d(xw, ww, None, [2, 2, 2, 2]).is_contiguous(memory_format=cl)


def draw_nhwc_fma_case(rng: random.Random, batch=None, wide=False):
    """A channels_last case for the CUDA-core kernels that read channels_last: thin kernels (1 x k
    with k odd up to 15, k x 1 up to 15) or up to 5 x 5 with an odd width; 1-4 images; maps of 1 to
    80 (smaller than the kernel too) with any padding up to K - 1 a side; C a multiple of the
    32-channel block, of the 8-channel vector, or neither. ``wide``: kernels of 26 to 49 taps (the
    weight-gradient's one-channel threads; exact fp32 takes them)."""
    while True:
        if wide:
            kh, kw = rng.choice([(7, 7), (5, 7), (7, 5), (9, 5), (3, 11), (11, 3), (4, 9), (6, 7), (3, 15), (2, 13)])
        elif rng.random() < 0.5:
            kh, kw = rng.choice([(1, rng.choice([3, 5, 7, 9, 11, 13, 15])), (rng.randint(2, 15), 1)])
        else:
            kh, kw = rng.randint(1, 5), rng.choice([1, 3, 5])
        h, w = rng.randint(1, 80), rng.randint(1, 80)
        pads = (rng.randint(0, kh - 1), rng.randint(0, kh - 1), rng.randint(0, kw - 1), rng.randint(0, kw - 1))
        if h + pads[0] + pads[1] >= kh and w + pads[2] + pads[3] >= kw:
            return dict(n=rng.randint(1, 4), c=rng.choice([32, 64, 8, 24, rng.randint(1, 70)]), h=h, w=w, kh=kh,
                        kw=kw, pads=pads, bias=rng.random() < 0.7, layout="channels_last",
                        grad_layout="channels_last")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_sweep_nhwc_fma(dtype):
    """The channels_last CUDA-core kernels (the plan's "fma" reading channels_last: exact fp32; in
    half types thin kernels and up to 25 taps, and weight-gradients up to 49 taps), every pass
    against float64."""
    rng = random.Random(2043)
    half = dtype != torch.float32
    for i in range(HALF_SWEEP_CASES):
        case = draw_nhwc_fma_case(rng, wide=i % 3 == 2)
        size, k = (case["n"], case["c"], case["h"], case["w"]), (case["kh"], case["kw"])
        for pass_ in dispatch.CONV_PASSES:
            q = dispatch.plan(pass_, size, k, case["pads"], dtype, True)
            # half types: wider kernels' forward and input-gradient, and the weight-gradients of
            # fewer than 32 channels, on tc_rows (also reading channels_last)
            if pass_ == "weight_grad":
                on_fma = not half or size[1] >= 32
            else:
                on_fma = not half or min(k) == 1 or k[0] * k[1] <= 25
            assert q[:2] == ("fma" if on_fma else "tc_rows", True), (case, pass_)
        check_case(case, seed=i, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_sweep_channel_tiles_nchw(dtype):
    """The weight-gradient of NCHW fp16 / bf16 layers with thin kernels or kernels of up to 15 taps,
    on 32+ channels and 512+ planes, runs on the CUDA-core kernel that stages 32 channels of a tile
    (rows moved as runs of 8, 4, 2 or 1 elements by the map's width and the tensors' alignment) and
    sums the bias gradient; every gradient against float64: maps of 31 to 60 rows and columns (the
    rule's: outputs over 16 wide and tall), any padding up to K - 1 a side, 16-40 images or 2-4 of
    many channels, C a multiple of 32 or not, and tensors that start one element past an aligned
    address."""
    rng = random.Random(2051)
    for i in range(HALF_SWEEP_CASES):
        while True:
            if rng.random() < 0.5:
                kh, kw = rng.choice([(1, rng.choice([3, 5, 7, 9, 11, 13, 15])), (rng.randint(2, 15), 1)])
            else:
                kh, kw = rng.choice([(3, 3), (3, 5), (5, 3), (1, 1), (2, 3), (4, 3), (5, 1)])
            h, w = rng.randint(31, 60), rng.choice([rng.randint(31, 60), 8 * rng.randint(4, 7), 56])
            pads = (rng.randint(0, kh - 1), rng.randint(0, kh - 1), rng.randint(0, kw - 1), rng.randint(0, kw - 1))
            if h + pads[0] + pads[1] >= kh and w + pads[2] + pads[3] >= kw:
                break
        if i % 3:
            n, c = rng.randint(16, 40), rng.choice([32, 64, 40, 33, rng.randint(32, 100)])
        else:
            n = rng.randint(2, 4)
            c = rng.randint(-(-512 // n), 300)
        case = dict(n=n, c=c, h=h, w=w, kh=kh, kw=kw, pads=pads, bias=rng.random() < 0.7, layout="contiguous")
        size, k = (n, c, h, w), (kh, kw)
        with dispatch.force("kernel"):
            q = dispatch.plan("weight_grad", size, k, pads, dtype)
            assert q[:3] == ("fma", False, True) and q.macs > 0, (case, q)
            assert dispatch.weight_grad_sums_bias(size, k, pads, dtype)
            assert dispatch.plan("forward", size, k, pads, dtype).family != "fma", case
        check_case(case, seed=i, dtype=dtype)
    # unaligned tensors: element runs
    gen = torch.Generator(device="cuda").manual_seed(7)
    n, c, h, w, k, pads = 12, 48, 20, 24, (1, 7), (0, 0, 3, 3)
    flat = torch.randn(2, n * c * h * w + 1, device="cuda", generator=gen).to(dtype)
    x, g = (flat[j, 1:].view(n, c, h, w) for j in (0, 1))
    wt = (torch.randn(c, 1, *k, device="cuda", generator=gen) / 7 ** 0.5).to(dtype)
    b = torch.randn(c, device="cuda", generator=gen).to(dtype)
    assert dispatch.plan("weight_grad", x.shape, k, pads, dtype).family == "fma"
    got, ref = run_op(x, wt, b, pads, g), reference(x, wt, b, pads, g)
    for name, a, want in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        assert rel_err(a, want) <= TOL[dtype], name


TF32_TOL = {"output": 2e-3, "grad_input": 2e-3, "grad_weight": 2e-3}  # the bias gradient stays exact


# ---- the rows family: M = 16 output rows of one image (any batch, NCHW or channels_last) --------
def draw_rows_case(rng: random.Random, batch=None, layout=None, nchw_grads=0.0):
    """A case for the rows family: 1-7 images (or ``batch``), maps up to 200 on a side, kernels of
    every shape (thin, anisotropic, square, larger than the map), channels_last or NCHW, C a
    multiple of the pixel vector or not; ``nchw_grads``: the share of channels_last cases whose
    output gradient comes in NCHW (its input gradient then needs a layout copy)."""
    case = draw_case(rng, batch or (1, 7))
    if rng.random() < 0.25:  # larger maps (the float64 reference bounds C)
        case.update(h=rng.randint(60, 200), w=rng.randint(60, 200))
        p = list(case["pads"])
        p[1] = max(p[1], case["kh"] - case["h"] - p[0])
        p[3] = max(p[3], case["kw"] - case["w"] - p[2])
        case["pads"] = tuple(p)
        n, oh, ow = case["n"], case["h"] + p[0] + p[1] - case["kh"] + 1, case["w"] + p[2] + p[3] - case["kw"] + 1
        while case["c"] > 1 and (n * case["c"] * oh * ow * case["kh"] * case["kw"] > 2e9
                                 or n * case["c"] * max(case["h"] * case["w"], oh * ow) > 4e6):
            case["c"] = max(1, case["c"] // 2)
    layout = layout or rng.choice(["contiguous", "channels_last"])
    case["layout"] = layout
    case.pop("grad_layout", None)
    if layout == "channels_last":
        case["grad_layout"] = "contiguous" if rng.random() < nchw_grads else "channels_last"
        if rng.random() < 0.5:
            case["c"] = rng.choice([8, 16, 24, 32])
    return case


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_sweep_rows(dtype, layout, monkeypatch):
    """1-7 images in fp16 / bf16 run the rows family in both layouts: every pass against float64;
    channels_last tensors are read as they are (no layout copy)."""
    ext = CountingExtension(build.extension_ops())
    monkeypatch.setattr(_ops, "_ext", ext)
    assert_sweep(777 + (layout == "channels_last"), HALF_SWEEP_CASES, dtype,
                 draw=lambda rng, batch: draw_rows_case(rng, layout=layout))
    assert ext.calls["to_nchw"] == 0 and ext.calls["to_channels_last"] == 0, ext.calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_sweep_rows_channels_last_batches(dtype, monkeypatch):
    """channels_last with 8-40 images on maps of every size, against float64: no layout copy in a
    layer whose plan reads channels_last in every pass (the rows family on maps above 16 x 16,
    always), and copies in the others (maps up to 16 x 16 whose images-family grids would leave SMs
    idle: these few channels always), except where the input is NCHW as well."""
    ext = CountingExtension(build.extension_ops())
    monkeypatch.setattr(_ops, "_ext", ext)
    rng, direct = random.Random(4242), 0
    for i in range(HALF_SWEEP_CASES // 2):
        case = draw_rows_case(rng, batch=(8, 40), layout="channels_last")
        before = ext.calls["to_nchw"] + ext.calls["to_channels_last"]
        check_case(case, seed=i, dtype=dtype)
        copies = ext.calls["to_nchw"] + ext.calls["to_channels_last"] - before
        size, k = (case["n"], case["c"], case["h"], case["w"]), (case["kh"], case["kw"])
        with dispatch.force("kernel"):
            reads = dispatch.reads_channels_last("all", size, k, case["pads"], dtype)
        # (a tensor of one pixel, or of one channel, is NCHW as well: it needs no copy)
        p = case["pads"]
        out_pixels = (case["h"] + p[0] + p[1] - case["kh"] + 1) * (case["w"] + p[2] + p[3] - case["kw"] + 1)
        distinct = case["c"] > 1 and max(case["h"] * case["w"], out_pixels) > 1
        assert (copies == 0) == (reads or not distinct) and (reads or max(case["h"], case["w"]) <= 16), (case, copies)
        direct += reads
    assert direct >= HALF_SWEEP_CASES // 4, direct


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_sweep_rows_mixed_gradient_layouts(dtype):
    """channels_last inputs whose output gradient comes in NCHW (or the other way): the results
    in the input's format, against float64."""
    assert_sweep(5151, HALF_SWEEP_CASES // 2, dtype,
                 draw=lambda rng, batch: draw_rows_case(rng, layout="channels_last", nchw_grads=0.5))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_random_sweep_rows_tf32(layout):
    """fp32 with TF32 on: 1-7 images on the rows family (NCHW where the kernel is 9+ wide on
    28 x 28 maps and larger; channels_last always), exact CUDA-core kernels elsewhere."""
    with tf32(True):
        assert_sweep(9090 + (layout == "channels_last"), HALF_SWEEP_CASES // 2, torch.float32, tol=TF32_TOL,
                     draw=lambda rng, batch: draw_rows_case(rng, layout=layout))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,c,h,w,k,pads", [
    (1, 128, 64, 64, (31, 31), (15, 15, 15, 15)),    # batch-1 inference, RepLKNet stage 1
    (2, 16, 200, 304, (31, 31), (15, 15, 15, 15)),   # detection maps: several tiles both ways
    (2, 24, 25, 38, (13, 13), (6, 6, 6, 6)),         # not a multiple of the tiles
    (3, 40, 56, 56, (61, 5), (30, 30, 2, 2)),        # SLaK's decomposed kernels
    (3, 40, 56, 56, (5, 61), (2, 2, 30, 30)),
    (4, 48, 28, 28, (1, 11), (0, 0, 5, 5)),          # band kernels
    (4, 48, 28, 28, (11, 1), (5, 5, 0, 0)),
    (4, 24, 28, 27, (1, 11), (0, 0, 5, 5)),          # band kernels on fewer than 32 channels
    (2, 8, 9, 70, (3, 63), (1, 1, 40, 7)),           # the widest kernel, asymmetric padding
    (2, 8, 5, 5, (17, 17), (8, 8, 8, 8)),            # a map smaller than the kernel
], ids=["batch1", "detection", "ragged", "61x5", "5x61", "1x11", "11x1", "1x11_24ch", "63_wide", "tiny_map"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_rows_named_layers(n, c, h, w, k, pads, dtype, layout):
    case = dict(n=n, c=c, h=h, w=w, kh=k[0], kw=k[1], pads=pads, bias=True, layout=layout)
    if layout == "channels_last":
        case["grad_layout"] = "channels_last"
    with dispatch.force("kernel"):
        for p in dispatch.CONV_PASSES:
            q = dispatch.plan(p, (n, c, h, w), k, pads, dtype, layout == "channels_last")
            # channels_last band kernels: every pass on the CUDA cores that read it (the
            # weight-gradient on 32+ channels)
            cl = layout == "channels_last"
            thin_cl = cl and min(k) == 1 and (p != "weight_grad" or c >= 32)
            assert q.family == ("fma" if thin_cl else "tc_rows") and q.nhwc == cl, (p, q)
    check_case(case, seed=3, dtype=dtype)


def test_plan_families():
    """The extension's plan on this GPU: the images family for 8+ images on NCHW where the plan's
    rule gives it the call (and channels_last maps up to 16), the channels_last CUDA-core kernel
    for thin kernels and channels_last weight-gradients up to 49 taps, the rows family for every
    other tensor-core call, exact CUDA cores for fp32."""
    plan = dispatch.plan
    bf = torch.bfloat16
    assert plan("forward", (64, 384, 64, 64), (31, 31), (15,) * 4, bf).family == "tc_images"
    assert plan("weight_grad", (64, 1024, 7, 7), (13, 13), (6,) * 4, bf, True)[:4] == ("tc_images", True, True, "")
    assert plan("forward", (4, 384, 64, 64), (31, 31), (15,) * 4, bf)[:4] == ("tc_rows", False, False, "")
    # the rule between the two families (test_build_and_dispatch has it in full), on this GPU
    assert plan("forward", (8, 64, 60, 90), (31, 31), (15,) * 4, bf).family == "tc_rows"
    assert plan("input_grad", (12, 64, 100, 100), (13, 13), (6,) * 4, bf).family == "tc_images"
    assert plan("forward", (8, 64, 14, 14), (7, 7), (3,) * 4, bf).family == "tc_images"  # small map
    assert plan("input_grad", (64, 384, 64, 64), (7, 7), (3,) * 4, bf, True)[:4] == ("tc_rows", True, False, "")
    assert plan("weight_grad", (64, 384, 64, 64), (7, 7), (3,) * 4, bf, True)[:4] == ("fma", True, True, "")
    assert plan("forward", (4, 384, 64, 64), (31, 31), (15,) * 4, torch.float32)[:4] == ("fma", False, False, "")
    assert plan("forward", (4, 384, 64, 64), (7, 7), (3,) * 4, torch.float32, True)[:2] == ("fma", True)  # exact, as it is
    assert plan("input_grad", (64, 192, 28, 28), (1, 11), (0, 0, 5, 5), bf, True)[:2] == ("fma", True)  # thin
    with tf32(True):
        assert plan("forward", (4, 384, 64, 64), (31, 31), (15,) * 4, torch.float32).family == "tc_rows"
        assert plan("forward", (4, 384, 64, 64), (7, 7), (3,) * 4, torch.float32).family == "fma"
        # channels_last: the channel tiles' exact fp32, faster than tc_rows' TF32 on such kernels
        assert plan("forward", (4, 384, 64, 64), (7, 7), (3,) * 4, torch.float32, True).family == "fma"
        assert plan("forward", (4, 384, 64, 64), (17, 17), (8,) * 4, torch.float32, True).family == "tc_rows"
    assert plan("forward", (4, 384, 64, 64), (71, 3), (35, 35, 1, 1), bf).family == "none"


def test_rows_blocks_taking_several_tile_rows():
    """A rows-family block can take several tile rows (forward) or items (weight-gradient) one
    after the other, its staged input rows a ring that keeps the rows two neighbours share. The
    plan decides how many by the GPU's size, so the small layers of these tests rarely reach it:
    LKPATCH_ROWS_STEPS sets it, read once, so the named layers, the rows sweeps and the rows
    family's bias-gradient test run again in fresh processes with 2 and 5 a block."""
    import subprocess
    import sys
    for steps in (2, 5):
        env = dict(os.environ, LKPATCH_ROWS_STEPS=str(steps), LKPATCH_HALF_SWEEP_CASES="8",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                            "-k", "rows_named or test_random_sweep_rows or rows_bias_gradient"], env=env,
                           capture_output=True, text=True,
                           cwd=os.path.dirname(__file__))
        assert r.returncode == 0 and " passed" in r.stdout, (steps, r.stdout[-4000:], r.stderr[-2000:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "tf32"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("n,c,h,w,k", [(2, 20, 45, 70, (31, 31)), (1, 9, 37, 141, (41, 35)), (3, 13, 29, 23, (7, 9)),
                                       (3, 600, 29, 23, (7, 9)), (2, 12, 37, 64, (15, 13))],
                         ids=["slices", "kernel_tiles", "odd_widths", "items_a_block", "aligned_rows"])
def test_rows_bias_gradient_from_the_weight_gradient(n, c, h, w, k, layout, dtype):
    """The rows family's weight-gradient sums the bias gradient from its staged output gradient
    (the first kernel tile's blocks only), so the eager backward runs no bias-gradient kernel, and
    every gradient matches float64: items spread over slices, several items a block (600
    channels: one slice), kernels of two tiles a side, odd widths and a partial channels_last
    group, rows that 16-byte copies stage (64 wide). TF32: one channel of the output gradient is
    1 + 2^-12, which TF32 rounds to 1, so a sum taken after the rounding fails the exact check."""
    tf32_on = dtype == "tf32"
    dtype = torch.float32 if tf32_on else dtype
    cl = layout == "channels_last"
    fmt = torch.channels_last if cl else torch.contiguous_format
    gen = torch.Generator(device="cuda").manual_seed(31)
    pads = dispatch.explicit_padding("same", k)
    x = torch.randn(n, c, h, w, device="cuda", generator=gen).to(dtype).contiguous(memory_format=fmt)
    wt = (torch.randn(c, 1, *k, device="cuda", generator=gen) / math.prod(k) ** 0.5).to(dtype)
    b = torch.randn(c, device="cuda", generator=gen).to(dtype)
    g = (torch.randn(n, c, h, w, device="cuda", generator=gen) + 0.5).to(dtype).contiguous(memory_format=fmt)
    if tf32_on:
        g[:, 0] = 1 + 2 ** -12
    ref = reference(x, wt, b, pads, g)
    with tf32(tf32_on), dispatch.force("kernel"):
        q = dispatch.plan("weight_grad", (n, c, h, w), k, pads, dtype, cl)
        assert (q.family, q.nhwc, q.takes_bias) == ("tc_rows", cl, True), q
        assert dispatch.weight_grad_sums_bias((n, c, h, w), k, pads, dtype, cl)
        got, kernels = eager_step_kernels(x, wt, b, pads, g)
    if kernels is not None:
        assert any("dw_rows_weight_grad" in name for name in kernels), kernels
        assert not any("bias_grad" in name for name in kernels), kernels
    tol = TF32_TOL if tf32_on else {name: TOL[dtype] for name in ("output", "grad_input", "grad_weight")}
    for name, a, want in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        assert rel_err(a, want) <= tol.get(name, TOL[dtype]), name


@pytest.mark.parametrize("k,pads,family", [((31, 31), (15,) * 4, "tc_rows"), ((1, 11), (0, 0, 5, 5), "fma"),
                                            ((7, 7), (3,) * 4, "fma")])
def test_rows_weight_grad_deterministic(k, pads, family):
    """Weight-gradients that sum partial results are bit-identical from run to run (the rows
    family; the channels_last CUDA-core kernel: thin in bf16, 7 x 7 in exact fp32)."""
    dtype = torch.float32 if k == (7, 7) else torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 40, 120, 120, device="cuda", generator=gen).to(dtype)
    g = torch.randn(2, 40, 120, 120, device="cuda", generator=gen).to(dtype)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf, gf = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
        if fmt == torch.channels_last:
            assert dispatch.plan("weight_grad", x.shape, k, pads, dtype, True)[:2] == (family, True)
        with dispatch.force("kernel"):
            a = torch.ops.lkpatch.dwconv2d_weight_grad(gf, xf, k, pads)
            b = torch.ops.lkpatch.dwconv2d_weight_grad(gf, xf, k, pads)
        assert torch.equal(a, b)


def test_random_sweep_tf32():
    """fp32 with PyTorch's TF32 switch on: the forward and input-gradient on TF32 tensor cores
    (batches of 8 and more; maps up to 16 x 16, or from 28 x 28 with 9+ taps a row), the
    weight-gradient on maps up to 16 x 16 or from 20 x 20 in area; the rest exact."""
    with tf32(True):
        assert_sweep(8642, HALF_SWEEP_CASES, torch.float32, batch=(8, 40), tol=TF32_TOL)


def test_random_sweep_tf32_small_maps():
    """fp32 maps up to 16 x 16 with TF32 on: every pass but the bias gradient on the TF32
    small-map kernels (batches up to 80: several blocks of images, partial 8-image k-steps;
    maps up to 8 wide, one k-step a row)."""
    with tf32(True):
        assert_sweep(3141, HALF_SWEEP_CASES, torch.float32, batch=(8, 80), draw=draw_small_map_case, tol=TF32_TOL)


@pytest.mark.parametrize("case", [
    dict(n=16, c=8, h=40, w=40, kh=31, kw=31, pads=(15, 15, 15, 15), bias=True, layout="contiguous"),
    dict(n=24, c=8, h=14, w=13, kh=27, kw=27, pads=(13, 13, 13, 13), bias=True, layout="contiguous"),  # small map
    dict(n=40, c=8, h=16, w=16, kh=13, kw=13, pads=(6, 6, 6, 6), bias=True, layout="contiguous"),  # even: 8-byte copies
], ids=["general", "small_map", "small_map_even"])
def test_tf32_follows_pytorch_switch(case):
    """The same fp32 call rounds to TF32 only while PyTorch allows TF32 convolutions."""
    with tf32(True):
        errs = check_case(case, seed=5, tol=TF32_TOL)
    for name in ("output", "grad_input", "grad_weight"):
        assert errs[name] > 1e-5, errs  # rounded: the TF32 kernels ran
    assert errs["grad_bias"] <= 1e-5
    errs = check_case(case, seed=5)  # exact_fp32: TF32 off
    assert max(errs.values()) <= 1e-5


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_autocast_bf16_training_step(fmt):
    """Under bf16 autocast the converted model is at least as close to fp32 as PyTorch's own
    (channels_last: the layers go through NCHW as a whole, their copies as autograd nodes)."""
    import copy
    torch.manual_seed(0)
    model = _small_convnet(k=31).cuda().to(memory_format=fmt)
    converted = lkpatch.convert_model(copy.deepcopy(model))
    x = torch.randn(4, 3, 40, 40, device="cuda").contiguous(memory_format=fmt)

    def step(m, amp):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp), dispatch.force("kernel"):
            out = m(x)
        out.float().square().mean().backward()
        return out, [p.grad for p in m.parameters()]

    ref_out, ref_grads = step(model, amp=False)  # fp32, unconverted
    pt_out, pt_grads = step(model, amp=True)
    lk_out, lk_grads = step(converted, amp=True)
    assert lk_out.dtype == pt_out.dtype == torch.bfloat16 and lk_out.stride() == pt_out.stride()
    assert rel_err(lk_out, ref_out) <= max(2 * rel_err(pt_out, ref_out), 1e-2)
    for ours, theirs, ref, p in zip(lk_grads, pt_grads, ref_grads, converted.parameters()):
        assert ours.dtype == p.dtype == torch.float32  # fp32 master weights get fp32 gradients
        assert rel_err(ours, ref) <= max(2 * rel_err(theirs, ref), 2e-2)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_casts_in_one_node(fmt, x_dtype):
    """Under autocast the eager op casts its inputs itself: the same output and gradients, bit for
    bit, as casting first and calling the op without autocast, gradients in the inputs' dtypes,
    and one autograd node whose inputs are the leaves (no node per cast)."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(3, 40, 24, 24, device="cuda", generator=gen).to(x_dtype).contiguous(memory_format=fmt)
    w = torch.randn(40, 1, 7, 7, device="cuda", generator=gen) / 7
    b = torch.randn(40, device="cuda", generator=gen)
    g = torch.randn(3, 40, 24, 24, device="cuda", generator=gen).bfloat16().contiguous(memory_format=fmt)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with dispatch.force("kernel"), torch.autocast("cuda", dtype=torch.bfloat16):
        y = lkpatch.depthwise_conv2d(*leaves, padding=3)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=fmt)
    assert {type(f[0]).__name__ for f in y.grad_fn.next_functions if f[0] is not None} == {"AccumulateGrad"}
    y.backward(g)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with dispatch.force("kernel"):
        y_ref = lkpatch.depthwise_conv2d(*(t.bfloat16() for t in ref_leaves), padding=3)
    y_ref.backward(g)
    assert torch.equal(y, y_ref)
    for ours, ref in zip(leaves, ref_leaves):
        assert ours.grad.dtype == ours.dtype and torch.equal(ours.grad, ref.grad)


@pytest.mark.parametrize("case", [
    dict(n=2, c=3, h=1, w=1, kh=1, kw=1, pads=(0, 0, 0, 0), bias=True, layout="contiguous"),
    dict(n=1, c=5, h=1, w=1, kh=63, kw=63, pads=(31, 31, 31, 31), bias=True, layout="contiguous"),
    dict(n=2, c=7, h=14, w=14, kh=27, kw=27, pads=(13, 13, 13, 13), bias=False, layout="contiguous"),
    dict(n=2, c=9, h=7, w=7, kh=13, kw=13, pads=(6, 6, 6, 6), bias=True, layout="channels_last"),
    dict(n=1, c=4, h=56, w=56, kh=51, kw=5, pads=(25, 25, 2, 2), bias=True, layout="contiguous"),
    dict(n=1, c=4, h=33, w=40, kh=1, kw=11, pads=(0, 0, 5, 5), bias=True, layout="contiguous"),
    dict(n=1, c=4, h=33, w=40, kh=11, kw=1, pads=(5, 5, 0, 0), bias=True, layout="contiguous"),
    dict(n=2, c=3, h=20, w=21, kh=4, kw=6, pads=(1, 2, 2, 3), bias=True, layout="strided"),   # 'same', even
    dict(n=1, c=2, h=9, w=9, kh=5, kw=5, pads=(5, 5, 5, 5), bias=True, layout="contiguous"),  # pad == K
    dict(n=1, c=2, h=130, w=130, kh=31, kw=31, pads=(15, 15, 15, 15), bias=True, layout="contiguous"),
    dict(n=3, c=2, h=200, w=70, kh=7, kw=7, pads=(3, 3, 3, 3), bias=True, layout="contiguous"),  # several tiles
    # small maps with a batch: the whole-plane kernels
    dict(n=16, c=5, h=14, w=14, kh=27, kw=27, pads=(13, 13, 13, 13), bias=True, layout="contiguous"),
    dict(n=9, c=3, h=7, w=7, kh=13, kw=13, pads=(6, 6, 6, 6), bias=True, layout="channels_last"),
    dict(n=64, c=2, h=16, w=16, kh=5, kw=7, pads=(1, 3, 2, 4), bias=True, layout="contiguous"),
    dict(n=8, c=3, h=10, w=12, kh=31, kw=31, pads=(15, 15, 15, 15), bias=False, layout="strided"),
    dict(n=12, c=2, h=9, w=5, kh=9, kw=11, pads=(9, 9, 11, 11), bias=True, layout="contiguous"),  # pad == K
])
def test_edge_cases(case):
    check_case(case, seed=7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_map_half(dtype):
    check_case(dict(n=24, c=4, h=14, w=14, kh=27, kw=27, pads=(13, 13, 13, 13), bias=True, layout="contiguous"),
               seed=3, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "tf32"])
@pytest.mark.parametrize("case", [
    dict(n=40, c=320, h=14, w=13, kh=27, kw=27, pads=(13, 13, 13, 13), bias=True, layout="contiguous"),
    dict(n=50, c=320, h=16, w=16, kh=5, kw=5, pads=(1, 3, 2, 2), bias=False, layout="contiguous"),
    dict(n=50, c=320, h=12, w=15, kh=17, kw=19, pads=(8, 8, 9, 9), bias=True, layout="contiguous"),
], ids=["14x13_k27_n40", "16x16_k5_n50", "12x15_k17x19_n50"])
def test_small_map_wide_layers(case, dtype):
    """Small maps with enough channels for 32-image blocks: the forward's warps take an output row
    of both 16-image groups (a last block of one group, or of a partial second one), and the
    half-precision weight-gradient's warps take pairs of kernel rows (17+ rows, an odd count)."""
    if dtype == "tf32":
        with tf32(True):
            check_case(case, seed=17, tol=TF32_TOL)
    else:
        check_case(case, seed=17, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "tf32"])
@pytest.mark.parametrize("n,c,h,w,k", [(24, 300, 14, 14, 27), (80, 5, 9, 11, 7), (40, 6, 20, 23, 29),
                                       (16, 3, 21, 22, 41), (16, 4, 18, 17, 9)],
                         ids=["one_block_a_channel", "five_slices", "maps_to_32", "kernel_tiles", "tf32_cuda_cores"])
def test_eager_bias_gradient_from_the_weight_gradient(n, c, h, w, k, dtype):
    """The eager path's C++ backward takes the bias gradient from the tensor-core weight-gradient
    kernels that stage every output-gradient element (half types: maps up to 32; TF32: up to 16,
    and from 20 x 20 in area on the banded kernel, whose first kernel tile sums it; exact, before
    the rounding): no bias-gradient kernel runs, and all gradients match float64; elsewhere (TF32
    on an 18 x 17 map, CUDA cores) the bias-gradient kernel runs as before. Even and odd widths:
    the output gradient staged in 4-byte pairs or element by element."""
    tf32_on = dtype == "tf32"
    dtype = torch.float32 if tf32_on else dtype
    gen = torch.Generator(device="cuda").manual_seed(23)
    pads = (k // 2, k // 2, k // 2, k // 2)
    x = torch.randn(n, c, h, w, device="cuda", generator=gen).to(dtype)
    wt = (torch.randn(c, 1, k, k, device="cuda", generator=gen) / k).to(dtype)
    b = torch.randn(c, device="cuda", generator=gen).to(dtype)
    g = torch.randn(n, c, h, w, device="cuda", generator=gen).to(dtype)
    ref = reference(x, wt, b, pads, g)
    with tf32(tf32_on), dispatch.force("kernel"):
        fused = dispatch.weight_grad_sums_bias((n, c, h, w), (k, k), pads, dtype)
        assert fused == (not tf32_on or max(h, w) <= 16 or h * w >= 400)
        got, kernels = eager_step_kernels(x, wt, b, pads, g)
    if kernels is not None:
        assert any("weight_grad" in name for name in kernels), kernels
        assert any("bias_grad" in name for name in kernels) != fused, kernels
    tol = TF32_TOL if tf32_on else {name: TOL[dtype] for name in ("output", "grad_input", "grad_weight")}
    for name, a, want in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        assert rel_err(a, want) <= tol.get(name, TOL[dtype]), name


def test_memory_format_follows_pytorch():
    x = torch.randn(2, 8, 9, 9, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 3, 3, device="cuda")
    native = F.conv2d(x, w, padding=1, groups=8)
    with dispatch.force("kernel"):
        ours = lkpatch.depthwise_conv2d(x, w, padding=1)
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert ours.is_contiguous(memory_format=fmt) == native.is_contiguous(memory_format=fmt)
    # an output gradient in the other layout: the input gradient still takes the input's, as in PyTorch
    for x_fmt, g_fmt in [(torch.channels_last, torch.contiguous_format), (torch.contiguous_format, torch.channels_last)]:
        xx = x.detach().contiguous(memory_format=x_fmt).requires_grad_()
        g = torch.randn(2, 8, 9, 9, device="cuda").contiguous(memory_format=g_fmt)
        ref = torch.autograd.grad(F.conv2d(xx, w, padding=1, groups=8), xx, g)[0]
        with dispatch.force("kernel"):
            gx = torch.autograd.grad(lkpatch.depthwise_conv2d(xx, w, padding=1), xx, g)[0]
        assert gx.stride() == ref.stride() and torch.allclose(gx, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad_fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("x_fmt", [torch.channels_last, torch.contiguous_format])
def test_eager_gradients(x_fmt, grad_fmt):
    """The eager path (channels_last: through NCHW as a whole; NCHW: the C++ autograd op): all
    three gradients against float64, and the input gradient in the input's format, with the
    output gradient in either format."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    pads = (15, 15, 15, 15)
    x = torch.randn(16, 8, 40, 40, device="cuda", generator=gen).contiguous(memory_format=x_fmt)
    w = torch.randn(8, 1, 31, 31, device="cuda", generator=gen) / 31
    b = torch.randn(8, device="cuda", generator=gen)
    g = torch.randn(16, 8, 40, 40, device="cuda", generator=gen).contiguous(memory_format=grad_fmt)
    ref = reference(x, w, b, pads, g)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    with dispatch.force("kernel"):
        y = lkpatch.depthwise_conv2d(xs, ws, bs, padding=pads)  # EagerDepthwiseConv2d on CUDA
        got = (y,) + torch.autograd.grad(y, (xs, ws, bs), g)
    for name, a, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        assert rel_err(a, r) <= 1e-5, name
    assert got[1].is_contiguous(memory_format=x_fmt)


@pytest.mark.parametrize("bias_kernel", [True, False])
def test_cpp_autograd_op(bias_kernel):
    """The C++ autograd op that the eager path takes where every pass runs on the kernels (NCHW):
    values and gradients against float64, the bias gradient on the kernel or as PyTorch's sum,
    inputs that need no gradient (and are then not saved), inference mode, and create_graph."""
    ext = build.extension_ops()
    gen = torch.Generator(device="cuda").manual_seed(13)
    pads = (4, 4, 3, 3)
    x = torch.randn(8, 6, 23, 29, device="cuda", generator=gen)
    w = torch.randn(6, 1, 9, 7, device="cuda", generator=gen) / 8
    b = torch.randn(6, device="cuda", generator=gen)
    g = torch.randn(8, 6, 23, 29, device="cuda", generator=gen)
    ref = reference(x, w, b, pads, g)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = ext.dwconv2d_autograd(xs, ws, bs, list(pads), False, bias_kernel)
    assert "DwConv2d" in y.grad_fn.name()
    got = (y,) + torch.autograd.grad(y, (xs, ws, bs), g)
    for name, a, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        assert rel_err(a, r) <= 1e-5, name
    gw = torch.autograd.grad(ext.dwconv2d_autograd(x, ws, None, list(pads), False, bias_kernel), ws, g)[0]
    assert rel_err(gw, ref[2]) <= 1e-5
    gx, gw = torch.autograd.grad(ext.dwconv2d_autograd(xs, ws, None, list(pads), False, bias_kernel), (xs, ws), g)
    assert rel_err(gx, ref[1]) <= 1e-5 and rel_err(gw, ref[2]) <= 1e-5
    with torch.inference_mode():
        assert rel_err(ext.dwconv2d_autograd(x, w, b, list(pads), False, bias_kernel), ref[0]) <= 1e-5
    # a frozen weight saves no input: changing the input in place after the forward is allowed
    x2 = xs * 1
    y = ext.dwconv2d_autograd(x2, w, None, list(pads), False, bias_kernel)
    x2.add_(1)
    assert rel_err(torch.autograd.grad(y, xs, g)[0], ref[1]) <= 1e-5
    # create_graph with a channels_last output gradient: the input gradient in the input's format
    y = ext.dwconv2d_autograd(xs, ws, bs, list(pads), False, bias_kernel)
    gx = torch.autograd.grad(y, xs, g.contiguous(memory_format=torch.channels_last), create_graph=True)[0]
    assert gx.is_contiguous() and rel_err(gx, ref[1]) <= 1e-5
    with dispatch.force("kernel"):  # the eager entry takes it
        assert "DwConv2d" in lkpatch.depthwise_conv2d(xs, ws, bs, padding=pads).grad_fn.name()


@pytest.mark.parametrize("path,fmt", [("eager", torch.channels_last), ("eager", torch.contiguous_format),
                                      ("traced", torch.channels_last), ("traced", torch.contiguous_format),
                                      ("cpp", torch.contiguous_format)])
def test_batched_gradients(path, fmt):
    """autograd.grad(is_grads_batched=True) runs the backward on batched output gradients, which
    have no storage and no memory format: every eager path (the C++ autograd op, the Python one,
    channels_last through NCHW) and the op as compiled graphs call it, against float64."""
    gen = torch.Generator(device="cuda").manual_seed(14)
    pads = (3, 3, 2, 2)
    x = torch.randn(4, 6, 17, 19, device="cuda", generator=gen).contiguous(memory_format=fmt)
    w = torch.randn(6, 1, 7, 5, device="cuda", generator=gen) / 6
    b = torch.randn(6, device="cuda", generator=gen)
    v = torch.randn(3, 4, 6, 17, 19, device="cuda", generator=gen)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    ref = torch.autograd.grad(F.conv2d(F.pad(xd, (2, 2, 3, 3)), wd, bd, groups=6), (xd, wd, bd), v.double(),
                              is_grads_batched=True)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    with dispatch.force("kernel"):
        if path == "cpp":
            y = build.extension_ops().dwconv2d_autograd(xs, ws, bs, list(pads), False, True)
        elif path == "traced":
            y = torch.ops.lkpatch.dwconv2d(xs, ws, bs, list(pads))
        else:
            y = lkpatch.depthwise_conv2d(xs, ws, bs, padding=pads)
        got = torch.autograd.grad(y, (xs, ws, bs), v, is_grads_batched=True)
    for name, a, r in zip(("grad_input", "grad_weight", "grad_bias"), got, ref):
        assert a.shape == r.shape and rel_err(a, r) <= 1e-5, name


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_double_backward_eager(fmt):
    """create_graph through the eager path (channels_last: the copies as autograd nodes; NCHW: the
    C++ autograd op) with an NCHW output gradient: the input gradient's format change stays
    differentiable (gradient penalty against float64)."""
    gen = torch.Generator(device="cuda").manual_seed(12)
    pads = (4, 4, 4, 4)
    x = torch.randn(8, 4, 20, 20, device="cuda", generator=gen).contiguous(memory_format=fmt)
    w = torch.randn(4, 1, 9, 9, device="cuda", generator=gen) / 9
    b = torch.randn(4, device="cuda", generator=gen)
    t = torch.randn(8, 4, 20, 20, device="cuda", generator=gen)  # NCHW: y * t's gradient is NCHW

    def penalty_grads(fn, x, w, b):
        x, w, b = (v.detach().clone().requires_grad_() for v in (x, w, b))
        grads = torch.autograd.grad((fn(x, w, b) * t).sin().sum(), (x, w, b), create_graph=True)
        return torch.autograd.grad(sum(gr.square().sum() for gr in grads), (x, w, b))

    ref = penalty_grads(lambda x, w, b: F.conv2d(x, w, b, padding=4, groups=4),
                        *(v.double() for v in (x, w, b)))
    with dispatch.force("kernel"):
        got = penalty_grads(lambda x, w, b: lkpatch.depthwise_conv2d(x, w, b, padding=pads), x, w, b)
    for a, r in zip(got, ref):
        assert rel_err(a, r) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    (3, 17, 9, 7), (2, 64, 16, 16), (2, 72, 10, 13), (1, 136, 64, 72), (70001, 2, 1, 3),  # 64 x 64 tiles
    (3, 1024, 7, 7), (2, 520, 14, 14), (2, 256, 28, 28), (2, 40, 32, 32), (2, 96, 33, 33), (1, 24, 5, 5),  # flat
    (2, 8, 1, 1), (1, 1032, 3, 8)])
def test_layout_copies(shape, dtype):
    """The channels_last <-> NCHW copies: vector and element tiles, flat tiles (a short side,
    partial spans), edge tiles, more matrices than one grid row holds, and unaligned starts
    (poisoned outputs: a missed element is NaN)."""
    ext = torch.ops.lkpatch_ext
    build.build()
    n, c, h, w = shape
    x = torch.randn(shape, device="cuda").to(dtype)
    cl = ext.to_channels_last(x)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)
    back = ext.to_nchw(cl)
    assert back.is_contiguous() and torch.equal(back, x)
    flat = torch.randn(x.numel() + 1, device="cuda").to(dtype)
    x_odd = flat[1:].view(shape)  # NCHW starting one element past an aligned address
    assert torch.equal(ext.to_channels_last(x_odd), x_odd)
    cl_odd = flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    assert torch.equal(ext.to_nchw(cl_odd), cl_odd)
    with pytest.raises(RuntimeError, match="channels_last"):
        ext.to_nchw(torch.randn(2, 3, 4, 5, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,c,h,w,kh,kw,pads,families", [
    (2, 24, 37, 45, 13, 13, (6, 6, 6, 6), ("tc_rows",) * 3), (3, 16, 30, 131, 31, 31, (15, 15, 15, 15), ("tc_rows",) * 3),
    (1, 8, 19, 38, 5, 61, (2, 2, 30, 30), ("tc_rows",) * 3), (16, 8, 21, 32, 7, 7, (3, 3, 3, 3), ("tc_images",) * 3),
    (2, 8, 70, 130, 17, 17, (8, 8, 8, 8), ("tc_rows",) * 3),  # three 64-column tiles of two channels a block
    (16, 4, 60, 64, 31, 31, (15, 15, 15, 15), ("tc_images",) * 3),  # more input rows than shared memory holds: a ring
    # odd widths up to 32 on the images family; wider ones: the forward and input-gradient on the
    # rows family, the weight-gradient on the images one
    (16, 8, 21, 29, 7, 7, (3, 3, 3, 3), ("tc_images",) * 3), (9, 5, 28, 27, 1, 11, (0, 0, 5, 5), ("tc_images",) * 3),
    (16, 4, 33, 131, 17, 17, (8, 8, 8, 8), ("tc_rows", "tc_rows", "tc_images")),
    (17, 3, 40, 37, 11, 3, (5, 5, 0, 2), ("tc_rows", "tc_rows", "tc_images"))])
def test_tensor_cores_on_unaligned_rows(n, c, h, w, kh, kw, pads, families, dtype):
    """NCHW rows that 16-byte copies cannot move -- odd widths, and tensors starting one element
    past an aligned address -- are staged by 16-byte loads shifted into place: every pass matches
    float64, with zeros at the image's edges (the neighbouring rows' elements in the same 16-byte
    vectors never leak in)."""
    gen = torch.Generator(device="cuda").manual_seed(n * 1000 + w)
    oh, ow = h + pads[0] + pads[1] - kh + 1, w + pads[2] + pads[3] - kw + 1

    def unaligned(*shape):  # one element past an aligned address, its last element the buffer's last
        flat = torch.randn(math.prod(shape) + 1, generator=gen, device="cuda", dtype=dtype)
        return flat[1:].view(shape)

    wt = torch.randn(c, 1, kh, kw, generator=gen, device="cuda", dtype=dtype) / math.sqrt(kh * kw)
    b = torch.randn(c, generator=gen, device="cuda", dtype=dtype)
    assert tuple(dispatch.plan(p, (n, c, h, w), (kh, kw), pads, dtype).family for p in dispatch.CONV_PASSES) == families
    for x, g in ((torch.randn(n, c, h, w, generator=gen, device="cuda", dtype=dtype),
                  torch.randn(n, c, oh, ow, generator=gen, device="cuda", dtype=dtype)),
                 (unaligned(n, c, h, w), unaligned(n, c, oh, ow))):
        got = run_op(x, wt, b, pads, g)
        ref = reference(x, wt, b, pads, g)
        for name, a, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
            assert rel_err(a, r) <= TOL[dtype], (name, x.data_ptr() % 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 512, 14, 14), (3, 17, 9, 7), (2, 1, 5, 5), (1, 3000, 1, 1), (200, 24, 30, 30),
                                   (2, 520, 3, 3), (8, 8, 2, 2)])
def test_bias_grad_channels_last(shape, dtype):
    """The bias gradient read channels_last as it is: 16-byte and element loads, partial channel
    blocks, one and many row slices, an unaligned start (poisoned outputs and workspaces)."""
    ext = build.extension_ops()
    n, c, h, w = shape
    flat = torch.randn(n * c * h * w + 1, device="cuda").to(dtype)
    for g in (torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last),
              flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)):
        ref = g.double().sum((0, 2, 3))
        got = ext.dwconv2d_bias_grad(g)
        assert got.dtype == dtype and rel_err(got, ref) <= TOL[dtype]


def test_weight_grad_deterministic():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 32, 56, 56, device="cuda", generator=gen)
    g = torch.randn(8, 32, 56, 56, device="cuda", generator=gen)
    with dispatch.force("kernel"):
        a = torch.ops.lkpatch.dwconv2d_weight_grad(g, x, (31, 31), (15, 15, 15, 15))
        b = torch.ops.lkpatch.dwconv2d_weight_grad(g, x, (31, 31), (15, 15, 15, 15))
    assert torch.equal(a, b)


def test_opcheck_all_ops():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 6, 17, 19, device="cuda", generator=gen, requires_grad=True)
    w = torch.randn(6, 1, 5, 7, device="cuda", generator=gen, requires_grad=True)
    b = torch.randn(6, device="cuda", generator=gen, requires_grad=True)
    pads = [1, 3, 2, 4]
    g = torch.randn(2, 6, 17, 19, device="cuda", generator=gen)
    with dispatch.force("kernel"):
        torch.library.opcheck(torch.ops.lkpatch.dwconv2d.default, (x, w, b, pads))
        torch.library.opcheck(torch.ops.lkpatch.dwconv2d.default, (x.detach().contiguous(
            memory_format=torch.channels_last), w.detach(), None, pads))
        torch.library.opcheck(torch.ops.lkpatch.dwconv2d_input_grad.default, (g, w.detach(), [17, 19], pads))
        torch.library.opcheck(torch.ops.lkpatch.dwconv2d_weight_grad.default, (g, x.detach(), [5, 7], pads))
        torch.library.opcheck(torch.ops.lkpatch.dwconv2d_bias_grad.default, (g,))
        # channels_last on the kernels as it is (bf16, 8 images, 14 x 14)
        xc = torch.randn(8, 16, 14, 14, device="cuda", generator=gen).bfloat16().contiguous(
            memory_format=torch.channels_last)
        wc = torch.randn(16, 1, 9, 9, device="cuda", generator=gen).bfloat16()
        torch.library.opcheck(torch.ops.lkpatch.dwconv2d.default, (xc.requires_grad_(), wc.requires_grad_(), None,
                                                                   [4, 4, 4, 4]))


def _small_convnet(c=32, k=13):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, c, 3, padding=1),
        torch.nn.Conv2d(c, c, k, padding=k // 2, groups=c),
        torch.nn.GELU(),
        torch.nn.Conv2d(c, c, (1, 11), padding=(0, 5), groups=c),
        torch.nn.Conv2d(c, c, 4, padding="same", groups=c, bias=False),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, 10))


def test_compile_fullgraph():
    torch.manual_seed(0)
    model = lkpatch.convert_model(_small_convnet().cuda())
    x = torch.randn(4, 3, 40, 40, device="cuda")
    with dispatch.force("kernel"):
        with torch.no_grad():
            eager = model(x)
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x)
        out.sum().backward()
    assert rel_err(out.detach(), eager) < 1e-5
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("route", ["copies", "direct"])
def test_compile_channels_last_routes(route, monkeypatch):
    """A compiled channels_last bf16 model under autocast, fullgraph: outputs and gradients as in
    eager mode, in the input's format. Through NCHW, the layer's copies are graph nodes, so the
    op's own passes see NCHW tensors (none of them copies a channels_last tensor); direct, the
    kernels read channels_last."""
    torch._dynamo.reset()  # static shapes: sizes seen by earlier compiles of these modules would make them dynamic
    monkeypatch.setattr(dispatch, "_decisions", {})
    monkeypatch.setattr(dispatch, "channels_last_route", lambda *args: route)
    copied, launched = [], []
    nchw, kernels = _ops._nchw, _ops.kernels
    monkeypatch.setattr(_ops, "_nchw", lambda t: (t.is_contiguous() or copied.append(t.shape), nchw(t))[1])
    monkeypatch.setattr(_ops, "kernels", lambda: (launched.append(1), kernels())[1])
    torch.manual_seed(0)
    model = lkpatch.convert_model(torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.Conv2d(64, 64, 13, padding=6, groups=64),
        torch.nn.GELU(), torch.nn.Conv2d(64, 64, (1, 11), padding=(0, 5), groups=64, bias=False))).cuda()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 48, 48, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()

    def run(net):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = net(x)
        y.float().square().mean().backward()
        grads = [x.grad] + [p.grad for p in model.parameters()]
        x.grad = None
        model.zero_grad(set_to_none=True)
        return y, grads

    y0, g0 = run(model)
    copied.clear()
    launched.clear()
    y1, g1 = run(torch.compile(model, fullgraph=True))
    assert launched, "the compiled model must run lkpatch's kernels"
    assert copied == [] and y1.is_contiguous(memory_format=torch.channels_last)
    assert g1[0].is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y1.float(), y0.float()) <= 1e-2
    for a, b in zip(g1, g0):
        assert rel_err(a.float(), b.float()) <= 2e-2


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_compile_dynamic_shapes(fmt, monkeypatch):
    """torch.compile with dynamic (symbolic) sizes, as a second input size makes them: the op is
    traced without a decision, its passes decide when they run -- on the kernels here, with the
    same results as eager mode for each size."""
    launched = []
    kernels = _ops.kernels
    monkeypatch.setattr(_ops, "kernels", lambda: (launched.append(1), kernels())[1])
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = lkpatch.convert_model(torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.Conv2d(32, 32, 15, padding=7, groups=32),
        torch.nn.ReLU(), torch.nn.Conv2d(32, 32, (7, 3), padding=(3, 1), groups=32))).cuda().to(memory_format=fmt)
    compiled = torch.compile(model, dynamic=True, fullgraph=True)
    for size in (24, 37):
        x = torch.randn(3, 3, size, size + 5, device="cuda").contiguous(memory_format=fmt)
        with dispatch.force("kernel"), torch.autocast("cuda", dtype=torch.bfloat16):
            want = model(x)
            launched.clear()
            got = compiled(x)
        assert launched and got.stride() == want.stride()
        assert rel_err(got.float(), want.float()) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_slice_of_channels_last(dtype):
    """A depthwise convolution of a channel slice of a channels_last map (InceptionNeXt's token
    mixer): the result and the input gradient in PyTorch's formats, values and gradients against
    float64, eager and compiled."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(4, 40, 30, 30, device="cuda", generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(12, 1, 1, 11, device="cuda", generator=gen) / 4).to(dtype)
    g = torch.randn(4, 12, 30, 30, device="cuda", generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    xs = x.requires_grad_()
    pads = (0, 0, 5, 5)
    sl = x.detach()[:, 8:20]
    ref = reference(sl, w, None, pads, g)
    expect = F.conv2d(xs[:, 8:20], w, None, 1, (0, 5), 1, 12)
    expect_gx = torch.autograd.grad(expect, xs, g)[0]
    for fn in (lkpatch.depthwise_conv2d, torch.compile(lkpatch.depthwise_conv2d, fullgraph=True)):
        with dispatch.force("kernel"), dispatch.exact_fp32():
            y = fn(xs[:, 8:20], w, None, padding=(0, 5))
            gx = torch.autograd.grad(y, xs, g)[0]
        assert y.stride() == expect.stride()
        assert rel_err(y, ref[0]) <= TOL[dtype] and rel_err(gx[:, 8:20], ref[1]) <= TOL[dtype]
        assert gx.stride() == expect_gx.stride() and not gx[:, :8].any()


def test_cuda_graph_capture():
    torch.manual_seed(0)
    model = lkpatch.convert_model(_small_convnet().cuda())
    static_x = torch.randn(4, 3, 40, 40, device="cuda")
    with dispatch.force("kernel"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (and build) outside the capture
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                model(static_x).sum().backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        model.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_out = model(static_x)
            static_out.sum().backward()
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        captured = static_out.clone(), [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        out = model(static_x)
        out.sum().backward()
    assert rel_err(captured[0], out.detach()) < 1e-5
    assert max(rel_err(a, p.grad) for a, p in zip(captured[1], model.parameters())) < 1e-5


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = (out if out.dtype == torch.float64 else out.float()).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,size", [("convnext_tiny", 96), ("replknet_31b", 64)])
def test_converted_model_matches(name, size):
    """Loss and every gradient of a converted network against the unconverted one, both measured
    against a float64 copy: some gradients are exactly zero in exact arithmetic (a BN bias
    feeding a train-mode BN through the shortcut), so fp32 rounding is all they hold -- there
    lkpatch's error must be that of PyTorch's own fp32, elsewhere within fp32 tolerance."""
    import copy
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).cuda().train()
    converted = lkpatch.convert_model(copy.deepcopy(model))
    exact = copy.deepcopy(model).double()
    assert lkpatch.conversion_report(converted).converted
    x = torch.randn(2, 3, size, size, device="cuda")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # the other layers exact
    try:
        with dispatch.force("kernel"):
            loss_ref, grads_ref = _loss_and_grads(model, x)
            loss, grads = _loss_and_grads(converted, x)
        loss_64, grads_64 = _loss_and_grads(exact, x.double())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert rel_err(loss, loss_ref) < 1e-5
    assert grads.keys() == grads_ref.keys() == grads_64.keys()
    for k in grads:
        ours = (grads[k].double() - grads_64[k]).norm().item()
        native = (grads_ref[k].double() - grads_64[k]).norm().item()
        assert ours <= max(1e-4 * grads_64[k].norm().item(), 4 * native), (k, ours, native)


def test_bad_inputs_raise_like_pytorch():
    x = torch.randn(2, 4, 9, 9, device="cuda")
    w = torch.randn(4, 1, 3, 3, device="cuda")
    with dispatch.force("kernel"):
        for args in [(x, w.cpu()), (x, torch.randn(4, 2, 3, 3, device="cuda")), (x, w.double()),
                     (x, torch.randn(5, 1, 3, 3, device="cuda"))]:
            with pytest.raises(RuntimeError) as ours:
                lkpatch.depthwise_conv2d(*args, padding=1)
            with pytest.raises(RuntimeError) as theirs:
                F.conv2d(*args, padding=1, groups=4)
            assert type(ours.value) is type(theirs.value)
        empty = torch.randn(0, 4, 9, 9, device="cuda")
        assert lkpatch.depthwise_conv2d(empty, w, padding=1).shape == (0, 4, 9, 9)
        # the ops themselves check their arguments instead of reading out of bounds
        with pytest.raises(RuntimeError, match="weight"):
            torch.ops.lkpatch.dwconv2d(x, torch.randn(4, 1, 3, 3), None, [1, 1, 1, 1])
        with pytest.raises(RuntimeError):
            torch.ops.lkpatch.dwconv2d_input_grad(x, w, [5, 5], [1, 1, 1, 1])
    torch.cuda.synchronize()  # no asynchronous fault was left behind


def test_train_step_timing_alone_and_queued():
    """Model mode's timing: each model's steps timed alone and queued back to back (both train the
    model: its weights move), and no queued numbers where queue is 0."""
    from lkpatch import bench

    def tiny():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(8, 1000)).cuda()
    models = {"a": tiny(), "b": tiny()}
    before = models["a"][0].weight.detach().clone()
    r = bench.time_train_steps(models, 4, 16, "bfloat16", steps=2, warmup=1, queue=2)
    assert set(r) == {f"{k}_{kind}{unit}" for k in "ab" for kind in ("", "queued_") for unit in ("step_ms", "img_per_s")}
    for k in "ab":
        assert r[f"{k}_queued_step_ms"] > 0 and r[f"{k}_queued_img_per_s"] == pytest.approx(4e3 / r[f"{k}_queued_step_ms"])
    assert not torch.equal(before, models["a"][0].weight)
    assert "a_queued_step_ms" not in bench.time_train_steps(models, 4, 16, "float32", steps=1, warmup=0, queue=0)


def test_bench_model_mode_json(tmp_path, capsys):
    """`lkpatch bench --model`: both models' img/s, queued too unless `--queue 0`."""
    from lkpatch import bench
    for queue in (1, 0):
        out = tmp_path / f"model{queue}.json"
        assert bench.main(["--model", "resnet18", "--batch", "4", "--size", "32", "--reps", "1", "--queue", str(queue),
                           "--json", str(out)]) == 0
        (r,) = json.loads(out.read_text())["models"]
        assert r["queue"] == queue and r["pytorch_img_per_s"] > 0 and r["lkpatch_img_per_s"] > 0
        assert ("lkpatch_queued_img_per_s" in r) == (queue > 0)
        assert ("queued" in capsys.readouterr().out) == (queue > 0)


def test_bench_rows_and_json(tmp_path):
    """`lkpatch bench` times both implementations (queued and CUDA-graph replay) and writes JSON."""
    from lkpatch import bench
    out = tmp_path / "bench.json"
    assert bench.main(["--shapes", "8,16,12,12,5", "--dtype", "float32", "bfloat16", "--passes", "--reps", "3",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    for r in rows:
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_bwd_gpu_ms", "input_grad_ms", "weight_grad_ms", "bias_grad_ms"):
            assert r[f"pytorch_{key}"] > 0 and r[f"lkpatch_{key}"] > 0, key
