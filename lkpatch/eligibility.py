"""Which modules are depthwise convolutions, and which of those ``convert_model`` may swap.

All module-level rules live here; which *implementation* then runs a converted layer is
``dispatch``'s business.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

import torch.nn as nn
from torch.nn.utils import parametrize

#: nn.Conv2d subclasses whose forward lkpatch reproduces exactly -> the padding rule they use.
#: 'static': nn.Conv2d's own (the `padding` attribute); 'tf_same': TensorFlow 'SAME' padding
#: computed from the input size at every call (timm's Conv2dSame).
_KNOWN_SUBCLASSES: Dict[Type[nn.Conv2d], str] = {nn.Conv2d: "static"}

try:  # timm >= 0.9
    from timm.layers.conv2d_same import Conv2dSame as _TimmConv2dSame
    _KNOWN_SUBCLASSES[_TimmConv2dSame] = "tf_same"
except ImportError:  # pragma: no cover - timm is a dependency, but keep lkpatch importable without it
    _TimmConv2dSame = None


def padding_rule(cls: type) -> Optional[str]:
    """'static' or 'tf_same' for a class lkpatch can convert; None otherwise."""
    return _KNOWN_SUBCLASSES.get(cls)


def class_for(rule: str) -> Optional[Type[nn.Conv2d]]:
    """The convolution class that pads by ``rule`` ('static': nn.Conv2d, 'tf_same': timm's
    Conv2dSame, None where timm is missing)."""
    return next((cls for cls, r in _KNOWN_SUBCLASSES.items() if r == rule), None)


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution by structure: groups == in_channels, out_channels a multiple of it.

    Also true for depthwise-shaped modules that are not ``nn.Conv2d`` (timm's CondConv2d, say),
    so that reports can say why those stay as they are.
    """
    groups = getattr(module, "groups", None)
    cin, cout = getattr(module, "in_channels", None), getattr(module, "out_channels", None)
    if not all(isinstance(v, int) for v in (groups, cin, cout)) or not hasattr(module, "kernel_size"):
        return False
    if not (isinstance(module, nn.Conv2d) or type(module).__name__.endswith("Conv2d")):
        return False
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return groups > 1  # in_channels is not known yet: listed, so the report can say to run it first
    return cin > 0 and groups == cin and cout % cin == 0


def structure_reason(in_channels: int, out_channels: int, groups: int, padding_mode: str) -> Optional[str]:
    """Why a Conv2d with these settings is not a depthwise convolution lkpatch computes (None if it is)."""
    if in_channels <= 0 or groups != in_channels:
        return f"groups={groups} is not in_channels={in_channels}: not a depthwise convolution"
    if out_channels % in_channels:
        return f"out_channels={out_channels} is not a multiple of in_channels={in_channels}"
    if padding_mode != "zeros":
        return f"padding_mode={padding_mode!r} (lkpatch pads with zeros only)"
    return None


#: the methods through which nn.Conv2d computes: a module that replaces either computes its own way
_FORWARDS = ("forward", "_conv_forward")


def padding_reason(padding) -> Optional[str]:
    """Why ``padding`` is none of nn.Conv2d's forms (None: it is one). nn.Conv2d stores a
    sequence of another length and raises in its forward."""
    if isinstance(padding, (tuple, list)) and len(padding) not in (1, 2):
        return (f"padding={padding!r} is none of nn.Conv2d's forms (an int, a pair, 'same', 'valid'); "
                f"lkpatch.depthwise_conv2d takes (top, bottom, left, right)")
    return None


def conversion_blocker(module: nn.Module) -> Optional[str]:
    """Why ``convert_model`` leaves this depthwise module as it is (None: it converts it)."""
    from .modules import DepthwiseConv2d

    if isinstance(module, DepthwiseConv2d):
        return None
    cls = type(module)
    if not isinstance(module, nn.Conv2d):
        return f"{cls.__module__}.{cls.__name__} is not an nn.Conv2d (its forward is its own)"
    if parametrize.is_parametrized(module):
        return "weight is parametrized (torch.nn.utils.parametrize); convert after removing it"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy module not initialized yet; run one forward first"
    replaced = [n for n in _FORWARDS if n in vars(module)]
    if replaced:
        return f"its {' and '.join(replaced)} is set on the instance; lkpatch does not know its semantics"
    if padding_rule(cls) is None:
        below = cls.__mro__[:cls.__mro__.index(nn.Conv2d)]
        own = [n for n in _FORWARDS if any(n in vars(c) for c in below)]
        what = (f"overrides nn.Conv2d's {' and '.join(own)}; lkpatch does not know its semantics" if own else
                "is an nn.Conv2d subclass lkpatch does not know (it may compute differently)")
        return f"{cls.__module__}.{cls.__name__} {what}"
    return (structure_reason(module.in_channels, module.out_channels, module.groups, module.padding_mode)
            or padding_reason(module.padding))
