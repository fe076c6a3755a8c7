"""``DepthwiseConv2d``: an ``nn.Conv2d`` whose forward runs lkpatch's depthwise op."""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from . import eligibility
from . import functional
from .functional import depthwise_conv2d


def tf_same_padding(size: List[int], kernel_size: List[int], stride: Tuple[int, int],
                    dilation: Tuple[int, int]) -> List[int]:
    """TensorFlow 'SAME' padding for an input of spatial ``size``, as [top, bottom, left, right].

    The same arithmetic as timm's ``pad_same``: the odd pixel goes to the bottom/right. TorchScript
    compiles it too (a scripted layer pads per call).
    """
    pads: List[int] = []
    for i in range(2):
        x, k, s, d = size[i], kernel_size[i], stride[i], dilation[i]
        total = max(((x + s - 1) // s - 1) * s + (k - 1) * d + 1 - x, 0)
        pads += [total // 2, total - total // 2]
    return pads


def _pytorch_forward(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                     padding: Union[str, Tuple[int, int]], dilation: Tuple[int, int], groups: int,
                     tf_same: bool) -> torch.Tensor:
    """What TorchScript compiles for a converted layer: ``F.conv2d``, so a scripted model runs and
    saves without lkpatch (the same numbers as the eager forward off the GPU kernels)."""
    if tf_same:
        top, bottom, left, right = tf_same_padding(input.shape[-2:], weight.shape[-2:], stride, dilation)
        return F.conv2d(F.pad(input, [left, right, top, bottom]), weight, bias, stride, 0, dilation, groups)
    if isinstance(padding, str):  # the same call twice: TorchScript picks F.conv2d's overload per branch
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)


@torch.fx.wrap  # one node when torch.fx traces a converted model: the padding and groups need real tensors
def _forward(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
             padding: Union[str, Tuple[int, int]], dilation: Tuple[int, int], groups: int,
             tf_same: bool) -> torch.Tensor:
    """``DepthwiseConv2d.forward`` (TorchScript compiles it where it scripts a torch.fx graph)."""
    if torch.jit.is_scripting():
        return _pytorch_forward(input, weight, bias, stride, padding, dilation, groups, tf_same)
    else:
        if tf_same:
            padding = tf_same_padding(input.shape[-2:], weight.shape[-2:], stride, dilation)
        if (functional.exporting() or not isinstance(input, torch.Tensor) or input.dim() not in (3, 4)
                or input.shape[-3] != groups):
            # depthwise_conv2d takes groups from the input, so a wrong channel count could pass as
            # another valid convolution: the module's own groups make F.conv2d raise its error.
            # Exported graphs get F.conv2d with the module's groups, which no traced shape decides.
            return functional.padded_conv2d(input, weight, bias, stride, padding, dilation, groups)
        return depthwise_conv2d(input, weight, bias, stride, padding, dilation)


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (``groups == in_channels``) computed by ``lkpatch.depthwise_conv2d``.

    Takes ``nn.Conv2d``'s arguments; ``out_channels`` and ``groups`` default to ``in_channels``.
    Parameters, buffers and ``state_dict`` are exactly ``nn.Conv2d``'s. With
    ``tf_same_padding=True`` it pads like TensorFlow's 'SAME' (timm's ``Conv2dSame``), from the
    input size at every call.

    :meth:`from_conv` turns an existing convolution into one *in place*: the same object, the
    same ``Parameter`` objects and hooks, only the class changes; :meth:`to_conv` turns it back.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, kernel_size=3, stride=1,
                 padding=0, dilation=1, groups: int | None = None, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, *, tf_same_padding: bool = False):
        out_channels = in_channels if out_channels is None else out_channels
        groups = in_channels if groups is None else groups
        reason = (eligibility.structure_reason(in_channels, out_channels, groups, padding_mode)
                  or eligibility.padding_reason(padding))
        if reason:
            raise ValueError(f"DepthwiseConv2d: {reason}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.tf_same_padding = tf_same_padding
        # to_conv's class: one that pads the same way (nn.Conv2d cannot pad like TensorFlow's 'SAME')
        self._lkpatch_source_class = eligibility.class_for("tf_same" if tf_same_padding else "static")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """Make ``conv`` a DepthwiseConv2d in place and return it (no-op if it already is one)."""
        if isinstance(conv, DepthwiseConv2d):
            return conv
        reason = eligibility.conversion_blocker(conv)
        if reason:
            raise ValueError(f"cannot convert {type(conv).__name__}: {reason}")
        source = type(conv)
        conv.__class__ = cls
        conv.tf_same_padding = eligibility.padding_rule(source) == "tf_same"
        conv._lkpatch_source_class = source
        return conv

    def to_conv(self) -> nn.Conv2d:
        """Turn this module back, in place, into the class it was converted from."""
        source = self.__dict__.get("_lkpatch_source_class", nn.Conv2d)
        if source is None:
            raise ValueError("DepthwiseConv2d.to_conv: built with tf_same_padding=True, which nn.Conv2d cannot do "
                             "and timm's Conv2dSame (not installed) would")
        target = source
        if parametrize.is_parametrized(self):
            # Parametrized after conversion: torch put its class (the parametrized tensors'
            # properties) over this one; the same class goes over the source class instead, so
            # that the layer still reads them and remove_parametrizations finds the source.
            if type(self).__bases__ != (DepthwiseConv2d,):
                raise ValueError(f"DepthwiseConv2d.to_conv: cannot turn a {type(self).__name__} back; remove its "
                                 f"parametrizations first (torch.nn.utils.parametrize.remove_parametrizations)")
            own = {k: v for k, v in vars(type(self)).items() if k not in ("__dict__", "__weakref__")}
            target = type(f"Parametrized{source.__name__}", (source,), own)
        self.__dict__.pop("_lkpatch_source_class", None)
        self.__dict__.pop("tf_same_padding", None)
        self.__class__ = target
        return self

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch alone: nn.Conv2d's own forward
            return self._scripted_forward(input)
        if self.padding_mode != "zeros" and not self.tf_same_padding:
            # set after conversion (convert_model leaves such layers alone): nn.Conv2d's padding
            return self._conv_forward(input, self.weight, self.bias)
        return _forward(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                        self.tf_same_padding)

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" and not self.tf_same_padding:
            return self._conv_forward(input, self.weight, self.bias)
        return _pytorch_forward(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                                self.tf_same_padding)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + ", tf_same_padding=True" if self.tf_same_padding else s
