"""The ``lkpatch::`` custom ops: schemas and one registration per dispatch key.

* CPU: PyTorch's convolution (``_pytorch``) -- the reference, and what runs without a GPU.
* CUDA: lkpatch's kernels from the compiled extension, or PyTorch's where
  ``dispatch.use_kernel`` says so, decided per pass.
* Meta / fake tensors, Autograd and Autocast each get their own registration below.

In eager mode on CUDA, ``eager_dwconv2d`` runs the same passes with less host time: the
extension's C++ autograd op where every pass runs on the kernels (NCHW, or channels_last they take
directly), else ``EagerDepthwiseConv2d``
(the same CUDA passes and backward formula, minus the dispatcher for each pass). Under
``torch.compile`` the op itself is traced instead.

Padding is always ``(top, bottom, left, right)``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _pytorch, dispatch

_lib = torch.library.Library("lkpatch", "DEF")
_lib.define("dwconv2d(Tensor input, Tensor weight, Tensor? bias, int[4] padding) -> Tensor")
_lib.define("dwconv2d_input_grad(Tensor grad_output, Tensor weight, int[2] input_size, int[4] padding) -> Tensor")
_lib.define("dwconv2d_weight_grad(Tensor grad_output, Tensor input, int[2] kernel_size, int[4] padding) -> Tensor")
_lib.define("dwconv2d_bias_grad(Tensor grad_output) -> Tensor")


# --- Arguments: the same checks for every backend (CPU, CUDA, fake), before any work -------------
def _check(ok: bool, op: str, what) -> None:
    """``what``: a function giving the message, so that a passing check formats nothing (these run
    on every call of the CUDA registrations, which compiled graphs call); a plain True skips
    torch._check, which is there for the symbolic conditions of fake tensors."""
    if ok is not True:
        torch._check(ok, lambda: f"lkpatch::{op}: {what()}")


def _check_activation(t, op: str, name: str) -> None:
    _check(t.dim() == 4, op, lambda: f"{name} must be (N, C, H, W), got {tuple(t.shape)}")


def _check_weight(weight, like, op: str) -> None:
    c = like.shape[1]
    _check(weight.dim() == 4 and weight.shape[0] == c and weight.shape[1] == 1, op,
           lambda: f"weight must be (C, 1, KH, KW) with C = {c}, got {tuple(weight.shape)}")
    _check(weight.dtype == like.dtype, op, lambda: f"weight dtype {weight.dtype} differs from {like.dtype}")


def _check_map(op: str, hw, kernel_size, padding, out_hw=None) -> None:
    _check(hw[0] >= 1 and hw[1] >= 1, op, lambda: f"the input map {hw[0]}x{hw[1]} is empty")
    _check(min(padding) >= 0, op, lambda: f"padding must be non-negative, got {list(padding)}")
    oh, ow = dispatch.output_size(hw, kernel_size, padding)
    _check(oh >= 1 and ow >= 1, op, lambda: f"the padded {hw[0]}x{hw[1]} map is smaller than the "
           f"{kernel_size[0]}x{kernel_size[1]} kernel")
    if out_hw is not None:
        _check(oh == out_hw[0] and ow == out_hw[1], op, lambda: f"grad_output is {out_hw[0]}x{out_hw[1]}, but a "
               f"{hw[0]}x{hw[1]} map gives {oh}x{ow} with this kernel and padding")


def _check_forward(x, weight, bias, padding) -> None:
    _check_activation(x, "dwconv2d", "input")
    _check_weight(weight, x, "dwconv2d")
    _check(bias is None or (tuple(bias.shape) == (x.shape[1],) and bias.dtype == x.dtype), "dwconv2d",
           lambda: f"bias must be ({x.shape[1]},) in {x.dtype}")
    _check_map("dwconv2d", x.shape[2:], weight.shape[2:], padding)


def _check_input_grad(grad, weight, input_size, padding) -> None:
    _check_activation(grad, "dwconv2d_input_grad", "grad_output")
    _check_weight(weight, grad, "dwconv2d_input_grad")
    _check_map("dwconv2d_input_grad", input_size, weight.shape[2:], padding, grad.shape[2:])


def _check_weight_grad(grad, x, kernel_size, padding) -> None:
    _check_activation(grad, "dwconv2d_weight_grad", "grad_output")
    _check_activation(x, "dwconv2d_weight_grad", "input")
    _check(grad.shape[:2] == x.shape[:2] and grad.dtype == x.dtype, "dwconv2d_weight_grad",
           lambda: f"grad_output {tuple(grad.shape)} {grad.dtype} and input {tuple(x.shape)} {x.dtype} differ in N, C or dtype")
    _check_map("dwconv2d_weight_grad", x.shape[2:], kernel_size, padding, grad.shape[2:])


def _check_bias_grad(grad) -> None:
    _check_activation(grad, "dwconv2d_bias_grad", "grad_output")


def _checked(check, impl):
    """``impl`` after ``check`` of its arguments: one registration of an op's pass."""
    @functools.wraps(impl)
    def run(*args):
        check(*args)
        return impl(*args)
    return run


# --- CPU ---------------------------------------------------------------------------------------
_lib.impl("dwconv2d", _checked(_check_forward, _pytorch.forward), "CPU")
_lib.impl("dwconv2d_input_grad", _checked(_check_input_grad, _pytorch.backward_input), "CPU")
_lib.impl("dwconv2d_weight_grad", _checked(_check_weight_grad, _pytorch.backward_weight), "CPU")
_lib.impl("dwconv2d_bias_grad", _checked(_check_bias_grad, _pytorch.backward_bias), "CPU")


# --- CUDA --------------------------------------------------------------------------------------
_ext = None


def kernels():
    """The extension's ops (``torch.ops.lkpatch_ext``), built and loaded on first use."""
    global _ext
    if _ext is None:
        from . import build
        _ext = build.extension_ops()
    return _ext


# The kernels take contiguous NCHW, and channels_last where ``dispatch.reads_channels_last`` says
# so; results come back in the input's format. Other channels_last tensors change format through
# lkpatch's tiled copies (PyTorch's strided copy moves them at a fraction of the memory bandwidth).
def _channels_last(t) -> bool:
    return _pytorch.output_memory_format(t) == torch.channels_last


def dense(t):
    """A CUDA activation with gaps between its elements (a channel slice of a channels_last map,
    as InceptionNeXt's token mixer convolves, or its gradient) as a dense copy in its own memory
    format, which the kernels read: the copy PyTorch's convolutions make too."""
    if (isinstance(t, torch.Tensor) and t.is_cuda and t.dim() == 4 and not torch.compiler.is_compiling()
            and not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)):
        return t.contiguous(memory_format=_pytorch.output_memory_format(t))
    return t


def _nchw(t):
    """``t`` as a contiguous NCHW tensor, for the kernels."""
    if t.is_contiguous():
        return t
    if t.is_contiguous(memory_format=torch.channels_last) and t.dtype in dispatch.KERNEL_DTYPES:
        return kernels().to_nchw(t)
    return t.contiguous()


class _SharedNCHW:
    """``_nchw`` for the passes of one backward: each channels_last tensor is copied once."""

    def __init__(self):
        self.copies = {}  # id(tensor) -> (tensor, its NCHW copy)

    def __call__(self, t):
        if id(t) not in self.copies:
            self.copies[id(t)] = (t, _nchw(t))
        return self.copies[id(t)][1]

    def has_copy(self, t) -> bool:
        return id(t) in self.copies


def _as_format(t, memory_format=torch.contiguous_format):
    """An activation-shaped CUDA result in ``memory_format`` (the input's)."""
    if (memory_format == torch.channels_last and t.is_cuda and t.is_contiguous()
            and not t.is_contiguous(memory_format=torch.channels_last) and t.dtype in dispatch.KERNEL_DTYPES
            and dispatch.kernels_ready()):
        return kernels().to_channels_last(t)
    return t.contiguous(memory_format=memory_format)


def _reads_cl(pass_, t, size, kernel_size, padding, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the kernels take ``t`` (this pass's activation) as it is: channels_last where they
    read it so (``dispatch.reads_channels_last``). ``dtype``: the computing dtype (default: t's)."""
    return _channels_last(t) and dispatch.reads_channels_last(pass_, size, kernel_size, padding, dtype or t.dtype)


def _forward_cuda(x, weight, bias, padding):
    x = dense(x)
    fmt = _pytorch.output_memory_format(x)
    if dispatch.use_kernel("forward", x.shape, weight.shape[2:], padding, x.dtype, fmt == torch.channels_last):
        reads_cl = _reads_cl("forward", x, x.shape, weight.shape[2:], padding)
        y = kernels().dwconv2d(x if reads_cl else _nchw(x), weight.contiguous(),
                                None if bias is None else bias.contiguous(), padding, dispatch.tf32_pass(x.dtype))
        return _as_format(y, fmt)
    return _pytorch.forward(x, weight, bias, padding)


# The gradient passes take `nchw`: in eager mode the backward's passes share a _SharedNCHW, so a
# channels_last output gradient is copied to NCHW once for all three.
def _input_grad_cuda(grad, weight, input_size, padding, nchw=_nchw, memory_format=None):
    """``memory_format``: the kernel result's (default: the output gradient's, as the op returns it;
    the eager backward asks for the input's directly instead of changing it twice)."""
    grad = dense(grad)
    size = (grad.shape[0], grad.shape[1], input_size[0], input_size[1])
    fmt = _pytorch.output_memory_format(grad)
    if dispatch.use_kernel("input_grad", size, weight.shape[2:], padding, grad.dtype, fmt == torch.channels_last):
        reads_cl = _reads_cl("input_grad", grad, size, weight.shape[2:], padding)
        gx = kernels().dwconv2d_input_grad(grad if reads_cl else nchw(grad), weight.contiguous(), input_size,
                                            padding, dispatch.tf32_pass(grad.dtype))
        return _as_format(gx, fmt if memory_format is None else memory_format)
    return _pytorch.backward_input(grad, weight, input_size, padding)


def _weight_grad_cuda(grad, x, kernel_size, padding, nchw=_nchw):
    grad, x = dense(grad), dense(x)
    cl = _channels_last(x) or _channels_last(grad)
    if dispatch.use_kernel("weight_grad", x.shape, kernel_size, padding, x.dtype, cl):
        if cl and dispatch.reads_channels_last("weight_grad", x.shape, kernel_size, padding, x.dtype):
            grad, x = _as_format(grad, torch.channels_last), _as_format(x, torch.channels_last)  # both
        else:
            grad, x = nchw(grad), nchw(x)
        return kernels().dwconv2d_weight_grad(grad, x, kernel_size, padding, dispatch.tf32_pass(x.dtype))
    return _pytorch.backward_weight(grad, x, kernel_size, padding)


def _bias_grad_cuda(grad, nchw=_nchw):
    # A channels_last gradient that the other passes already copied to NCHW counts as NCHW; else
    # the kernel reads channels_last as it is.
    grad = dense(grad)
    cl = _channels_last(grad) and not (isinstance(nchw, _SharedNCHW) and nchw.has_copy(grad))
    if dispatch.bias_grad_on_kernel(grad.shape, grad.dtype, cl):
        return kernels().dwconv2d_bias_grad(grad if cl else nchw(grad))
    return _pytorch.backward_bias(grad)


_lib.impl("dwconv2d", _checked(_check_forward, _forward_cuda), "CUDA")
_lib.impl("dwconv2d_input_grad", _checked(_check_input_grad, _input_grad_cuda), "CUDA")
_lib.impl("dwconv2d_weight_grad", _checked(_check_weight_grad, _weight_grad_cuda), "CUDA")
_lib.impl("dwconv2d_bias_grad", _checked(_check_bias_grad, _bias_grad_cuda), "CUDA")


# --- Meta / fake tensors -----------------------------------------------------------------------
@torch.library.register_fake("lkpatch::dwconv2d")
def _forward_fake(x, weight, bias, padding):
    _check_forward(x, weight, bias, padding)
    oh, ow = dispatch.output_size(x.shape[2:], weight.shape[2:], padding)
    return x.new_empty((x.shape[0], x.shape[1], oh, ow)).contiguous(memory_format=_pytorch.output_memory_format(x))


@torch.library.register_fake("lkpatch::dwconv2d_input_grad")
def _input_grad_fake(grad, weight, input_size, padding):
    _check_input_grad(grad, weight, input_size, padding)
    out = grad.new_empty((grad.shape[0], grad.shape[1], input_size[0], input_size[1]))
    return out.contiguous(memory_format=_pytorch.output_memory_format(grad))


@torch.library.register_fake("lkpatch::dwconv2d_weight_grad")
def _weight_grad_fake(grad, x, kernel_size, padding):
    _check_weight_grad(grad, x, kernel_size, padding)
    return x.new_empty((x.shape[1], 1, kernel_size[0], kernel_size[1]))


@torch.library.register_fake("lkpatch::dwconv2d_bias_grad")
def _bias_grad_fake(grad):
    _check_bias_grad(grad)
    return grad.new_empty((grad.shape[1],))


# --- Autograd ----------------------------------------------------------------------------------
# autograd.grad(..., is_grads_batched=True) runs the backward on batched gradients (legacy vmap)
_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def _setup_context(ctx, inputs, output):
    x, weight, bias, padding = inputs
    ctx.padding = tuple(padding)
    ctx.input_size = tuple(x.shape[2:])
    ctx.input_format = _pytorch.output_memory_format(x)
    ctx.kernel_size = tuple(weight.shape[2:])
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                          weight if ctx.needs_input_grad[0] else None)


def _gradients(ctx, grad, input_grad, weight_grad, bias_grad, as_format=torch.Tensor.contiguous):
    """The backward. ``as_format(t, memory_format)`` changes the input gradient's format: a
    differentiable, traceable PyTorch copy unless the caller runs eagerly without create_graph."""
    x, weight = ctx.saved_tensors
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = input_grad(grad, weight, ctx.input_size, ctx.padding)
        # in the input's memory format, as PyTorch's convolutions return it (whatever grad's is);
        # batched gradients (autograd.grad's is_grads_batched) cannot be asked for their format
        if not _batched(gx):
            gx = as_format(gx, memory_format=ctx.input_format)
    if ctx.needs_input_grad[1]:
        gw = weight_grad(grad, x, ctx.kernel_size, ctx.padding)
    if len(ctx.needs_input_grad) > 2 and ctx.needs_input_grad[2]:
        gb = bias_grad(grad)
    return gx, gw, gb, None


def _backward(ctx, grad):
    return _gradients(ctx, grad, torch.ops.lkpatch.dwconv2d_input_grad, torch.ops.lkpatch.dwconv2d_weight_grad,
                      torch.ops.lkpatch.dwconv2d_bias_grad)


torch.library.register_autograd("lkpatch::dwconv2d", _backward, setup_context=_setup_context)


# Double backward (create_graph=True: gradient penalties, Hessian-vector products). Each gradient
# pass is bilinear in its two tensors, and its derivatives are the other passes.
def _grad_pass_setup(ctx, inputs, output):
    grad, other, size, padding = inputs  # other: the weight (input_grad) or the input (weight_grad)
    ctx.padding = tuple(padding)
    ctx.size = tuple(other.shape[2:])
    ctx.save_for_backward(grad if ctx.needs_input_grad[1] else None, other if ctx.needs_input_grad[0] else None)


def _input_grad_backward(ctx, ggx):
    grad, weight = ctx.saved_tensors
    d_grad = torch.ops.lkpatch.dwconv2d(ggx, weight, None, ctx.padding) if ctx.needs_input_grad[0] else None
    d_weight = (torch.ops.lkpatch.dwconv2d_weight_grad(grad, ggx, ctx.size, ctx.padding)
                if ctx.needs_input_grad[1] else None)
    return d_grad, d_weight, None, None


def _weight_grad_backward(ctx, ggw):
    grad, x = ctx.saved_tensors
    d_grad = torch.ops.lkpatch.dwconv2d(x, ggw, None, ctx.padding) if ctx.needs_input_grad[0] else None
    d_x = (torch.ops.lkpatch.dwconv2d_input_grad(grad, ggw, ctx.size, ctx.padding)
           if ctx.needs_input_grad[1] else None)
    return d_grad, d_x, None, None


def _bias_grad_setup(ctx, inputs, output):
    ctx.grad_shape = inputs[0].shape


def _bias_grad_backward(ctx, ggb):
    return ggb[None, :, None, None].expand(ctx.grad_shape)


torch.library.register_autograd("lkpatch::dwconv2d_input_grad", _input_grad_backward, setup_context=_grad_pass_setup)
torch.library.register_autograd("lkpatch::dwconv2d_weight_grad", _weight_grad_backward,
                                setup_context=_grad_pass_setup)
torch.library.register_autograd("lkpatch::dwconv2d_bias_grad", _bias_grad_backward, setup_context=_bias_grad_setup)


class EagerDepthwiseConv2d(torch.autograd.Function):
    """``lkpatch::dwconv2d`` on CUDA tensors in eager mode, with its autograd, minus the dispatcher.

    ``forward`` takes ``ctx`` itself: with a separate ``setup_context``, ``Function.apply`` binds
    the arguments through ``inspect.signature`` on every call, which costs more host time than
    the rest of the call.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        # The input itself is saved, not an NCHW copy made here: double backward differentiates
        # through it (eager_dwconv2d makes its copy an autograd node for that).
        y = _forward_cuda(x, weight, bias, padding)
        _setup_context(ctx, (x, weight, bias, padding), y)
        return y

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled() or _batched(grad):
            # create_graph=True: the ops, whose own autograd gives double backward; a batched
            # gradient (is_grads_batched): the ops, which vmap runs slice by slice
            return _backward(ctx, grad)
        grad = dense(grad)  # once for the three passes
        nchw = _SharedNCHW()
        input_grad = functools.partial(_input_grad_cuda, nchw=nchw, memory_format=ctx.input_format)
        return _gradients(ctx, grad, input_grad, functools.partial(_weight_grad_cuda, nchw=nchw),
                          functools.partial(_bias_grad_cuda, nchw=nchw), _as_format)


# A channels_last input whose forward runs on lkpatch's kernel, but not directly in that layout,
# goes through NCHW as a whole: the copies in and out are autograd nodes of their own, so the
# convolution saves the forward's NCHW copy and its backward needs no copy of the input again --
# four layout copies per forward + backward instead of five. The saved copy takes the input's
# place: memory stays the same unless something else keeps the input for the backward too (a ReLU
# just before the layer saves its output), which then holds one more activation-sized tensor until
# the backward. Under create_graph the copies' gradients are PyTorch's differentiable ones.
# A batched gradient (is_grads_batched) passes as it is: vmap cannot change its memory format.
class _ChannelsLastAsNCHW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return _nchw(t)

    @staticmethod
    def backward(ctx, grad):
        if _batched(grad):
            return grad
        if torch.is_grad_enabled():
            return grad.contiguous(memory_format=torch.channels_last)
        return _as_format(grad, torch.channels_last)


class _NCHWAsChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return _as_format(t, torch.channels_last)

    @staticmethod
    def backward(ctx, grad):
        if _batched(grad):
            return grad
        return grad.contiguous() if torch.is_grad_enabled() else _nchw(grad)


def _through_nchw(x, size, kernel_size, padding, reads_cl: bool, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the layer of this channels_last input runs on the kernels through NCHW as a whole
    (dispatch's route "copies"). ``reads_cl``: ``_reads_cl("all", x, size, ...)``; ``dtype``: the
    computing dtype (default: x's)."""
    return (not reads_cl and _channels_last(x)
            and dispatch.use_kernel("forward", size, kernel_size, padding, dtype or x.dtype, True))


def eager_dwconv2d(x, weight, bias, padding, cast: Optional[torch.dtype] = None):
    """``lkpatch::dwconv2d`` on CUDA tensors in eager mode. ``cast``: autocast's dtype, where it is
    on (the inputs are cast as PyTorch's convolutions cast theirs)."""
    k = weight.shape[2:]
    dtype = dispatch.compute_dtype(x, cast)
    reads_cl = _reads_cl("all", x, x.shape, k, padding, dtype)
    if _through_nchw(x, x.shape, k, padding, reads_cl, dtype):
        x, weight, bias = cast_inputs(cast, x, weight, bias)  # the copies are in the computing dtype
        y = _eager_direct(_ChannelsLastAsNCHW.apply(x), weight, bias, padding, False)
        # A 1 x 1 output is channels_last already; passed through the copy node unchanged, it
        # would be a view that in-place ops (a ReLU(inplace=True) after it) must not modify.
        return y if y.is_contiguous(memory_format=torch.channels_last) else _NCHWAsChannelsLast.apply(y)
    return _eager_direct(x, weight, bias, padding, reads_cl, cast)


def _eager_direct(x, weight, bias, padding, reads_cl, cast: Optional[torch.dtype] = None):
    """Where every pass of the call runs on the kernels, on ``x`` as it is (NCHW, or channels_last
    the kernels read directly), the extension's C++ autograd op (in ``csrc/binding.cpp``: its
    backward runs without Python, which costs less host time; it makes autocast's casts itself,
    one autograd node for all; it reads PyTorch's TF32 switch at the forward, for the backward
    too); otherwise ``EagerDepthwiseConv2d``, which decides per pass. ``reads_cl``:
    ``_reads_cl("all", x, ...)`` in the computing dtype, which the caller has decided already."""
    dtype = dispatch.compute_dtype(x, cast)
    if type(x) is torch.Tensor and x.is_cuda:  # no fake or subclass tensors
        k = weight.shape[2:]
        if (reads_cl or x.is_contiguous()) and dispatch.use_kernel("all", x.shape, k, padding, dtype, reads_cl):
            # The weight-gradient's kernel can give the bias gradient only where it runs (a trained weight).
            layer_k = k if weight.requires_grad else None
            bias_kernel = bias is not None and dispatch.bias_grad_on_kernel(x.shape, dtype, reads_cl, layer_k, padding)
            return kernels().dwconv2d_autograd(x, weight, bias, padding, dispatch.tf32_pass(dtype), bias_kernel, cast)
    return EagerDepthwiseConv2d.apply(*cast_inputs(cast, x, weight, bias), padding)


# Under torch.compile the layer's copies through NCHW are graph nodes (PyTorch's copies, which
# Inductor may fuse into the kernels next to them), each direction's gradient the copy back, so
# the op's passes all see NCHW: its backward needs no copy of its own.
class _TracedLayoutCopy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, memory_format, grad_format):
        ctx.grad_format = grad_format
        return t.contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.grad_format), None, None


def traced_dwconv2d(x, weight, bias, padding):
    """``lkpatch::dwconv2d`` as ``torch.compile`` traces it (also on CPU tensors sent to the op).
    Tensors with gaps (a channel slice) go to the op as they are: its passes make them dense."""
    if x.is_cuda and dispatch.channels_last(x):
        x, weight, bias = autocast_inputs("cuda", x, weight, bias)
        k, size = dispatch.static_sizes(weight)[2:], dispatch.static_sizes(x)
        if _through_nchw(x, size, k, padding, _reads_cl("all", x, size, k, padding)):
            nchw = _TracedLayoutCopy.apply(x, torch.contiguous_format, torch.channels_last)
            y = torch.ops.lkpatch.dwconv2d(nchw, weight, bias, padding)
            if y.is_contiguous(memory_format=torch.channels_last):  # a 1 x 1 output is both
                return y
            return _TracedLayoutCopy.apply(y, torch.channels_last, torch.contiguous_format)
    return torch.ops.lkpatch.dwconv2d(x, weight, bias, padding)


# --- Autocast ----------------------------------------------------------------------------------
# As for PyTorch's convolutions: under autocast every floating-point input except float64 is
# cast to the autocast dtype, and the op runs with autocast off. The casts are differentiable,
# so gradients reach fp32 master weights in fp32.
def autocast_inputs(device_type: str, x, weight, bias):
    """The inputs as PyTorch's convolutions see them under autocast (unchanged without it)."""
    return cast_inputs(dispatch.autocast_dtype(device_type), x, weight, bias)


def cast_inputs(dtype: Optional[torch.dtype], x, weight, bias):
    """Every floating-point input except float64 cast to ``dtype`` (None: unchanged), as autocast
    casts a convolution's."""
    if dtype is None:
        return x, weight, bias

    def cast(t: Optional[torch.Tensor]):
        return t if t is None else t.to(dispatch.compute_dtype(t, dtype))  # .to() of its own dtype: t itself
    return cast(x), cast(weight), cast(bias)


def _autocast_impl(device_type: str):
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def impl(keyset, x, weight, bias, padding):
        x, weight, bias = autocast_inputs(device_type, x, weight, bias)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return torch.ops.lkpatch.dwconv2d(x, weight, bias, padding)

    op = torch.ops.lkpatch.dwconv2d.default
    op.py_impl(key)(lambda *args: impl(None, *args))  # seen by the Python dispatcher while tracing
    _lib.impl("dwconv2d", impl, "Autocast" + torch._C._dispatch_key_for_device(device_type), with_keyset=True)


_autocast_impl("cuda")
_autocast_impl("cpu")
