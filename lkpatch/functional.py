"""``depthwise_conv2d``: the single entry point every converted layer calls."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ops
from . import dispatch

_is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5: set by torch.export
# Both ONNX exporters set one of the flags above (TorchScript's traces; the dynamo one runs
# torch.export), so the slower torch.onnx.is_in_onnx_export() is asked only where torch lacks them.
_onnx_flag = torch.onnx.is_in_onnx_export if _is_exporting is None else (lambda: False)


def exporting() -> bool:
    """Whether the call is being captured into a graph meant to run without lkpatch:
    ``torch.onnx.export`` (either exporter), ``torch.export``, ``torch.jit.trace`` or
    ``torch.jit.script``. Then a converted layer computes ``F.conv2d`` (the same numbers), so the
    graph holds a standard ``Conv`` / ``aten.convolution``. ``torch.compile`` is not exporting: it
    keeps lkpatch's op."""
    return bool(torch.jit.is_scripting() or torch.jit.is_tracing()
                or (_is_exporting is not None and _is_exporting()) or _onnx_flag())


def depthwise_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride=1, padding=0, dilation=1) -> torch.Tensor:
    """``F.conv2d(input, weight, bias, stride, padding, dilation, groups=input channels)``.

    Runs the ``lkpatch::dwconv2d`` op (CUDA kernels, full autograd) where it reproduces the call
    exactly and is faster for the shape, and ``F.conv2d`` otherwise -- including for every input
    PyTorch would reject, so errors are PyTorch's own -- and while :func:`exporting`.

    ``padding`` takes what ``F.conv2d`` takes (an int, ``(h, w)``, 'same', 'valid') and also
    ``(top, bottom, left, right)``, which PyTorch computes as ``F.pad`` followed by the convolution.
    """
    if not exporting():
        pads = dispatch.op_padding(input, weight, bias, stride, padding, dilation)
        if pads is not None:
            return _run_op(input, weight, bias, pads)
    groups = input.shape[-3] if isinstance(input, torch.Tensor) and input.dim() >= 3 else 1
    return padded_conv2d(input, weight, bias, stride, padding, dilation, groups)


def _run_op(input, weight, bias, pads) -> torch.Tensor:
    """lkpatch's op: in eager mode on CUDA its low-host-time path, else ``torch.ops.lkpatch.dwconv2d``."""
    if input.is_cuda and not torch.compiler.is_compiling():
        x, w, b = _ops.autocast_inputs("cuda", input, weight, bias)
        return _ops.eager_dwconv2d(x, w, b, pads)
    return torch.ops.lkpatch.dwconv2d(input, weight, bias, pads)


def padded_conv2d(input, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """``F.conv2d``, also taking a ``(top, bottom, left, right)`` padding (as F.pad + conv)."""
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        pt, pb, pl, pr = padding
        return F.conv2d(F.pad(input, (pl, pr, pt, pb)), weight, bias, stride, 0, dilation, groups)
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
