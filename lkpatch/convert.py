"""``convert_model`` / ``revert_model`` and the report of what they did.

Conversion changes the class of each eligible depthwise ``nn.Conv2d`` in place
(:meth:`DepthwiseConv2d.from_conv`): the module objects, their ``Parameter`` objects, buffers,
hooks and ``state_dict`` stay exactly as they were, so an optimizer built before conversion keeps
training the model, and a checkpoint saved after it loads into the unconverted model.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch.nn as nn
from torch.nn.utils import parametrize

from . import dispatch, eligibility
from .modules import DepthwiseConv2d


@dataclasses.dataclass(frozen=True)
class LayerReport:
    name: str
    kind: str                 # class name
    in_channels: int
    out_channels: int
    kernel_size: tuple
    stride: tuple
    padding: object
    converted: bool
    reason: Optional[str]     # why not converted (None if converted)
    runs: str                 # which implementation a converted layer runs on CUDA float32

    def row(self) -> List[str]:
        k = "x".join(map(str, self.kernel_size))
        s = "x".join(map(str, self.stride))
        p = self.padding if isinstance(self.padding, str) else ",".join(map(str, self.padding))
        status = "converted" if self.converted else f"skipped: {self.reason}"
        return [self.name or "(root)", self.kind, f"{self.in_channels}->{self.out_channels}", k, s, p,
                status, self.runs if self.converted else "-"]


@dataclasses.dataclass
class ConversionReport:
    """Every depthwise convolution of a model: converted, or why not."""
    layers: List[LayerReport]

    @property
    def converted(self) -> List[LayerReport]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def skipped(self) -> List[LayerReport]:
        return [layer for layer in self.layers if not layer.converted]

    def table(self) -> str:
        header = ["layer", "type", "channels", "kernel", "stride", "padding", "status", "CUDA fp32 path"]
        rows = [header] + [layer.row() for layer in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = f"{len(self.converted)} of {len(self.layers)} depthwise convolutions converted"
        return "\n".join(lines + [summary])

    def __str__(self) -> str:
        return self.table()


def _runs(module: nn.Conv2d) -> str:
    """Which implementation the converted layer runs for CUDA float32 inputs (shape permitting)."""
    multiplier = module.out_channels // module.in_channels
    why = None
    if multiplier != 1:
        why = f"channel multiplier {multiplier}"
    elif tuple(module.stride) != (1, 1):
        why = "stride " + "x".join(map(str, module.stride))
    elif tuple(module.dilation) != (1, 1):
        why = "dilation " + "x".join(map(str, module.dilation))
    elif max(module.kernel_size) > dispatch.MAX_KERNEL_SIZE:
        why = f"kernel larger than {dispatch.MAX_KERNEL_SIZE}"
    return f"PyTorch ({why})" if why else "lkpatch kernel"


def _tuple(v) -> tuple:
    """A module's size attribute as a tuple (modules that are not nn.Conv2d may keep an int)."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def conversion_report(model: nn.Module) -> ConversionReport:
    """List every depthwise convolution in ``model``: converted, or the reason it is not. A
    TorchScript model (which holds no Python modules to list) raises TypeError."""
    _refuse_uncapturable(model, "conversion_report", "list", "print(lkpatch.conversion_report(model))")
    layers = []
    for name, module in model.named_modules():
        if not eligibility.is_depthwise(module):
            continue
        converted = isinstance(module, DepthwiseConv2d)
        reason = None if converted else (eligibility.conversion_blocker(module) or "not converted yet")
        padding = module.padding if isinstance(module.padding, str) else _tuple(module.padding)
        if getattr(module, "tf_same_padding", False) or eligibility.padding_rule(type(module)) == "tf_same":
            padding = "TF 'SAME'"  # from the input size at each call
        layers.append(LayerReport(
            name=name, kind=type(module).__name__, in_channels=module.in_channels,
            out_channels=module.out_channels, kernel_size=_tuple(module.kernel_size),
            stride=_tuple(module.stride), padding=padding, converted=converted, reason=reason,
            runs=_runs(module) if converted else "-"))
    return ConversionReport(layers)


_WRAPPERS = (  # (module, class, what) -- classes that capture the modules they wrap
    ("torch._dynamo.eval_frame", "OptimizedModule", "torch.compile"),
    ("torch.nn.parallel", "DistributedDataParallel", "DistributedDataParallel"),
    ("torch.distributed.fsdp", "FullyShardedDataParallel", "FSDP"),
    ("torch.distributed.fsdp", "FSDPModule", "FSDP (fully_shard)"),
)


def _refuse_uncapturable(model, func: str, verb: str, fix: Optional[str] = None) -> None:
    """TorchScript and torch.export hold compiled code, not the Python modules that lkpatch's
    ``func`` (convert_model, fuse_conv_bn, ...) changes: it would silently change nothing.
    ``fix``: the call to make before capturing (default ``model = lkpatch.func(model)``)."""
    import torch

    fix = fix or f"model = lkpatch.{func}(model)"
    if not isinstance(model, nn.Module):
        what = type(model).__name__
        hint = (f" {verb.capitalize()} the nn.Module before torch.export: {fix}; "
                "torch.export.export(model, args)") if what == "ExportedProgram" else ""
        raise TypeError(f"lkpatch.{func} expects an nn.Module, not {what}.{hint}")
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            where = f" (at '{name}')" if name else ""
            raise TypeError(
                f"lkpatch.{func}: the model is a TorchScript module{where} (torch.jit.script or "
                f"torch.jit.trace), whose compiled code {func} cannot {verb}. {verb.capitalize()} before "
                f"scripting or tracing: {fix}; scripted = torch.jit.script(model)")


def _refuse_wrapped(model: nn.Module, func: str = "convert_model", verb: str = "convert") -> None:
    """lkpatch's in-place model functions (``func``) must run before DDP/FSDP wrapping or
    torch.compile, which capture the modules, and before TorchScript or torch.export, which compile
    them: on a wrapped model they would change modules the wrapper no longer runs as it was built."""
    import importlib

    _refuse_uncapturable(model, func, verb)

    wrappers = []
    for module_name, cls_name, what in _WRAPPERS:
        try:
            wrappers.append((getattr(importlib.import_module(module_name), cls_name), what))
        except (ImportError, AttributeError):  # older torch, or built without distributed
            pass
    for name, module in model.named_modules():
        for cls, what in wrappers:
            if isinstance(module, cls):
                where = f" (at '{name}')" if name else ""
                raise TypeError(
                    f"lkpatch.{func}: the model is wrapped by {what}{where}. {verb.capitalize()} the "
                    f"plain model first, then wrap it: model = lkpatch.{func}(model); model = wrap(model)")


def convert_model(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """Swap every eligible depthwise convolution of ``model`` for :class:`DepthwiseConv2d`, in place.

    Recursive and idempotent; keeps parameters (the same objects), buffers, hooks, train/eval
    mode, ``requires_grad``, devices and dtypes. Returns ``model`` (also when ``model`` is itself
    a convolution). ``verbose=True`` prints :func:`conversion_report`.

    Convert before wrapping (DDP, FSDP, ``torch.compile``) and before capturing (``torch.jit``,
    ``torch.export``): a wrapped or TorchScript model is refused with a TypeError saying so. A
    converted model exports, traces and scripts to standard convolutions (``F.conv2d``).
    """
    _refuse_wrapped(model)
    for module in model.modules():
        if eligibility.is_depthwise(module) and eligibility.conversion_blocker(module) is None:
            DepthwiseConv2d.from_conv(module)
    if verbose:
        print(conversion_report(model))
    return model


def revert_model(model: nn.Module) -> nn.Module:
    """Turn every :class:`DepthwiseConv2d` of ``model`` back into the class it came from, in place
    (a user's subclass of it, whose forward is its own, stays as it is)."""
    _refuse_wrapped(model, "revert_model", "revert")
    for module in model.modules():
        # DepthwiseConv2d itself (parametrized or not); a subclass's forward is its own
        base = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
        if base is DepthwiseConv2d:
            module.to_conv()
    return model
