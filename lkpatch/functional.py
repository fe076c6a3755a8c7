"""``depthwise_conv2d``: the single entry point every converted layer calls."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from . import _ops
from . import dispatch

# torch.export (and the dynamo ONNX exporter, which runs it) sets this flag; torch.compile does
# not. It is read rather than asked through torch.compiler.is_exporting(), which Dynamo answers with
# True in every torch.compile trace before torch 2.12.
_has_export_flag = hasattr(torch.compiler, "_is_exporting_flag")


def _export_flag() -> bool:
    return torch.compiler._is_exporting_flag if _has_export_flag else torch.onnx.is_in_onnx_export()


def exporting() -> bool:
    """Whether the call is being captured into a graph meant to run without lkpatch:
    ``torch.onnx.export`` (either exporter), ``torch.export``, ``torch.jit.trace`` or
    ``torch.jit.script``. Then a converted layer computes ``F.conv2d`` (the same numbers), so the
    graph holds a standard ``Conv`` / ``aten.convolution``. ``torch.compile`` is not exporting: it
    keeps lkpatch's op."""
    return bool(torch.jit.is_scripting() or torch.jit.is_tracing() or _export_flag())


def transformed() -> bool:
    """Whether forward-mode AD (a dual level) or a ``torch.func`` transform (vmap, grad, jvp,
    hessian, ...) is active, in eager mode. lkpatch's op has neither a forward-mode formula nor a
    batching rule, so ``F.conv2d``, which has both, computes those calls. While ``torch.compile``
    traces, this state cannot be read (Dynamo answers for its own trace): compiled code keeps the
    op, whose forward-mode tangents are not computed."""
    if torch.compiler.is_compiling():
        return False
    return getattr(forward_ad, "_current_level", -1) >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def depthwise_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride=1, padding=0, dilation=1, groups: int | None = None) -> torch.Tensor:
    """``F.conv2d(input, weight, bias, stride, padding, dilation, groups=input channels)``.

    ``groups``: as a drop-in for an ``F.conv2d`` call that names it; other than the input's
    channels, the call is ``F.conv2d``'s (and so are its errors).

    Runs the ``lkpatch::dwconv2d`` op (CUDA kernels, full autograd) where it reproduces the call
    exactly and is faster for the shape, and ``F.conv2d`` otherwise -- including for every input
    PyTorch would reject, so errors are PyTorch's own -- while :func:`exporting`, and under
    forward-mode AD and ``torch.func`` transforms (:func:`transformed`).

    ``padding`` takes what ``F.conv2d`` takes (an int, ``(h, w)``, 'same', 'valid') and also
    ``(top, bottom, left, right)``, which PyTorch computes as ``F.pad`` followed by the convolution.
    """
    channels = input.shape[-3] if isinstance(input, torch.Tensor) and input.dim() >= 3 else 1
    if groups is not None and (groups != channels or not dispatch.is_integer(groups)):
        return padded_conv2d(input, weight, bias, stride, padding, dilation, groups)
    if not exporting() and not transformed():
        input = _ops.dense(input)
        pads = dispatch.op_padding(input, weight, bias, stride, padding, dilation)
        if pads is not None:
            return _run_op(input, weight, bias, pads)
    return padded_conv2d(input, weight, bias, stride, padding, dilation, channels)


def _run_op(input, weight, bias, pads) -> torch.Tensor:
    """lkpatch's op: in eager mode on CUDA its low-host-time path, else as ``torch.compile`` traces it."""
    if input.is_cuda and not torch.compiler.is_compiling():
        return _ops.eager_dwconv2d(input, weight, bias, pads, dispatch.autocast_dtype("cuda"))
    return _ops.traced_dwconv2d(input, weight, bias, pads)


def padded_conv2d(input, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """``F.conv2d``, also taking a ``(top, bottom, left, right)`` padding (as F.pad + conv)."""
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        pt, pb, pl, pr = padding
        return F.conv2d(F.pad(input, (pl, pr, pt, pb)), weight, bias, stride, 0, dilation, groups)
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
