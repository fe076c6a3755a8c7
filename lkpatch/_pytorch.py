"""PyTorch's own implementation of each pass of a stride-1 depthwise convolution.

These are the CPU kernels of the ``lkpatch::`` ops and the CUDA fallback for every pass
where lkpatch's kernel does not run (see ``dispatch.use_kernel``). Padding is always
``(top, bottom, left, right)``; asymmetric padding is handled by padding or cropping,
since ATen's convolutions only take symmetric padding.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format


def output_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format lkpatch returns for an activation-shaped result: the input's own, as
    PyTorch's convolutions read it -- channels_last also for channels_last strides with gaps (a
    channel slice of a channels_last map, as InceptionNeXt's token mixer takes)."""
    if t.dim() != 4 or t.is_contiguous():
        return torch.contiguous_format
    # suggest_memory_format costs host time: asked only of tensors that are neither format densely
    if t.is_contiguous(memory_format=torch.channels_last) or suggest_memory_format(t) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def _symmetric(pads: Sequence[int]) -> bool:
    return pads[0] == pads[1] and pads[2] == pads[3]


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pads: Sequence[int]) -> torch.Tensor:
    pt, pb, pl, pr = pads
    groups = x.shape[1]
    if _symmetric(pads):
        y = F.conv2d(x, weight, bias, 1, (pt, pl), 1, groups)
    else:
        y = F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight, bias, 1, 0, 1, groups)
    return y.contiguous(memory_format=output_memory_format(x))


def backward_input(grad: torch.Tensor, weight: torch.Tensor, input_size: Sequence[int], pads: Sequence[int]) -> torch.Tensor:
    pt, pb, pl, pr = pads
    n, c = grad.shape[:2]
    h, w = input_size
    fmt = output_memory_format(grad)
    # convolution_backward reads only the shape (and layout) of `input` for the input gradient.
    if _symmetric(pads):
        shape_only = grad.new_empty((n, c, h, w)).contiguous(memory_format=fmt)
        gx = torch.ops.aten.convolution_backward(
            grad, shape_only, weight, None, [1, 1], [pt, pl], [1, 1], False, [0, 0], c, [True, False, False])[0]
    else:
        shape_only = grad.new_empty((n, c, h + pt + pb, w + pl + pr)).contiguous(memory_format=fmt)
        gx = torch.ops.aten.convolution_backward(
            grad, shape_only, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], c, [True, False, False])[0]
        gx = gx[:, :, pt:pt + h, pl:pl + w]
    return gx.contiguous(memory_format=fmt)


def backward_weight(grad: torch.Tensor, x: torch.Tensor, kernel_size: Sequence[int], pads: Sequence[int]) -> torch.Tensor:
    pt, pb, pl, pr = pads
    c = x.shape[1]
    shape_only = grad.new_empty((c, 1, kernel_size[0], kernel_size[1]))
    if _symmetric(pads):
        gw = torch.ops.aten.convolution_backward(
            grad, x, shape_only, None, [1, 1], [pt, pl], [1, 1], False, [0, 0], c, [False, True, False])[1]
    else:
        gw = torch.ops.aten.convolution_backward(
            grad, F.pad(x, (pl, pr, pt, pb)), shape_only, None, [1, 1], [0, 0], [1, 1], False, [0, 0], c,
            [False, True, False])[1]
    return gw.contiguous()


def backward_bias(grad: torch.Tensor) -> torch.Tensor:
    return grad.sum((0, 2, 3))
