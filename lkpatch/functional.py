"""``depthwise_conv2d``: the single entry point every converted layer calls."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ops
from . import dispatch


def depthwise_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride=1, padding=0, dilation=1) -> torch.Tensor:
    """``F.conv2d(input, weight, bias, stride, padding, dilation, groups=input channels)``.

    Runs the ``lkpatch::dwconv2d`` op (CUDA kernels, full autograd) where it reproduces the call
    exactly and is faster for the shape, and ``F.conv2d`` otherwise -- including for every input
    PyTorch would reject, so errors are PyTorch's own.

    ``padding`` takes what ``F.conv2d`` takes (an int, ``(h, w)``, 'same', 'valid') and also
    ``(top, bottom, left, right)``, which PyTorch computes as ``F.pad`` followed by the convolution.
    """
    pads = dispatch.op_padding(input, weight, bias, stride, padding, dilation)
    if pads is not None:
        if input.is_cuda and not torch.compiler.is_compiling():
            x, w, b = _ops.autocast_inputs("cuda", input, weight, bias)
            return _ops.eager_dwconv2d(x, w, b, pads)
        return torch.ops.lkpatch.dwconv2d(input, weight, bias, pads)
    groups = input.shape[-3] if isinstance(input, torch.Tensor) and input.dim() >= 3 else 1
    return padded_conv2d(input, weight, bias, stride, padding, dilation, groups)


def padded_conv2d(input, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """``F.conv2d``, also taking a ``(top, bottom, left, right)`` padding (as F.pad + conv)."""
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        pt, pb, pl, pr = padding
        return F.conv2d(F.pad(input, (pl, pr, pt, pb)), weight, bias, stride, 0, dilation, groups)
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
