"""Folding an eval-mode BatchNorm into the depthwise convolution before it (for deployment).

``fuse_conv_bn(model)`` finds every depthwise ``nn.Conv2d`` whose output goes only into a
BatchNorm2d, folds the normalization into the convolution's weight and bias, and replaces the
BatchNorm by ``nn.Identity`` (or, for timm's ``BatchNormAct2d``, by the activation it applies).
Only valid for inference: the folded model uses the BatchNorm's running statistics.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from . import eligibility

try:
    from timm.layers import BatchNormAct2d as _TimmBatchNormAct2d
except ImportError:  # pragma: no cover - timm is a dependency
    _TimmBatchNormAct2d = None

#: exact types folded; subclasses may normalize differently
_FOLDABLE_NORMS = tuple(t for t in (nn.BatchNorm2d, nn.SyncBatchNorm, _TimmBatchNormAct2d) if t is not None)


def fold_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution (eval mode), computed in float64."""
    std = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    b = bias.double() if bias is not None else torch.zeros_like(std)
    new_weight = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    new_bias = beta + (b - bn.running_mean.double()) * scale
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (eligibility.is_depthwise(conv) and isinstance(conv, nn.Conv2d) and type(bn) in _FOLDABLE_NORMS
            and bn.num_features == conv.out_channels and bn.track_running_stats
            and bn.running_mean is not None)


def _pairs_traced(model: nn.Module) -> Optional[List[Tuple[str, str]]]:
    """(conv, bn) module names from a torch.fx trace; None if the model does not trace."""
    import torch.fx

    class _Tracer(torch.fx.Tracer):  # convolutions and norms stay single nodes
        def is_leaf_module(self, m, qualname):
            return isinstance(m, (nn.Conv2d,) + _FOLDABLE_NORMS) or super().is_leaf_module(m, qualname)

    # Buffers traced as nodes show a BatchNorm's statistics read by the forward itself; a model that
    # reads a buffer as a number (float(self.scale)) traces only without that.
    graph = None
    for proxy_buffers in (True, False):
        tracer = _Tracer()
        tracer.proxy_buffer_attributes = proxy_buffers
        try:
            graph = tracer.trace(model)
            break
        except Exception:  # noqa: BLE001 -- data-dependent control flow and the like
            continue
    if graph is None:  # fall back to nn.Sequential pairs
        return None
    modules = dict(model.named_modules())
    # A module called more than once, or whose tensors the forward also reads itself, computes
    # something else once folded: only modules called once and touched nowhere else qualify.
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    touched = {node.target.rpartition(".")[0] for node in graph.nodes if node.op == "get_attr"}

    def alone(name):
        return calls[name] == 1 and name not in touched

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _FOLDABLE_NORMS):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
                and _foldable(modules[src.target], modules[node.target]) and alone(src.target) and alone(node.target)):
            pairs.append((src.target, node.target))
    return pairs


def _pairs_sequential(model: nn.Module) -> List[Tuple[str, str]]:
    """Where tracing fails: adjacent children of Sequentials that run them in order (a subclass
    with a forward of its own may use the conv's output elsewhere)."""
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            children = list(module._modules.items())  # as its forward runs them (named_children skips repeats)
            for (a, conv), (b, bn) in zip(children, children[1:]):
                if _foldable(conv, bn):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """Names of (depthwise conv, BatchNorm) pairs where the BatchNorm takes only the conv's output,
    and neither module is called again, read by the forward itself, held under another name or
    hooked. A model torch.fx cannot trace gives the pairs of nn.Sequential containers, with a
    warning: its forward's other uses of them cannot be seen."""
    pairs, traced = _find_pairs(model)
    if not traced:
        _warn_untraced(pairs)
    return pairs


def _warn_untraced(pairs: List[Tuple[str, str]]) -> None:
    """Said where pairs of a model torch.fx cannot trace are found, or about to be folded."""
    if pairs:
        warnings.warn(
            "lkpatch: the model does not trace with torch.fx, so BatchNorms are folded where an nn.Sequential "
            "runs them right after their depthwise convolution; a forward that also calls such a convolution "
            "or BatchNorm, or reads its weights, is not seen and would compute something else once folded",
            UserWarning, stacklevel=3)


def _find_pairs(model: nn.Module) -> Tuple[List[Tuple[str, str]], bool]:
    """:func:`find_conv_bn_pairs`, and whether the model traced (else the pairs are its Sequentials')."""
    pairs = _pairs_traced(model)  # each module in one pair at most (called once; one place in its Sequential)
    traced = pairs is not None
    if not traced:
        pairs = _pairs_sequential(model)
    # A module held under more than one name is ambiguous (a second attribute may call it
    # elsewhere); so is a convolution whose weight or bias another module also holds (folding
    # would change both).
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    holders = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))

    def single(name):
        return names[id(model.get_submodule(name))] == 1

    def own_parameters(name):
        return all(holders[id(p)] == 1 for p in model.get_submodule(name).parameters())

    def unhooked(name):  # a hook would see (or change) what folding removes
        m = model.get_submodule(name)
        return not (m._forward_hooks or m._forward_pre_hooks)
    return [(c, b) for c, b in pairs if single(c) and single(b) and own_parameters(c) and unhooked(c)
            and unhooked(b)], traced


def _refuse_unfoldable(model, func: str, verb: str) -> None:
    """What fuse_conv_bn and reparameterize refuse before changing anything: wrapped, compiled or
    non-module models, and a model in training mode (folding uses the BatchNorm running statistics)."""
    from .convert import _refuse_wrapped

    _refuse_wrapped(model, func, verb)
    if model.training:
        raise ValueError(f"lkpatch.{func}: call model.eval() first; folding uses the BatchNorm running "
                         "statistics, which is only what the model computes in eval mode")


def _refuse_training_norms(model: nn.Module, pairs: List[Tuple[str, str]], func: str) -> None:
    """A BatchNorm of a pair left in training mode in an eval model normalizes by batch statistics,
    which no folded weight reproduces."""
    training = [b for _, b in pairs if model.get_submodule(b).training]
    if training:
        raise ValueError(f"lkpatch.{func}: the BatchNorm '{training[0]}' is in training mode although the model "
                         "is in eval mode; folding uses its running statistics: call .eval() on it first")


class _ActAfterFold(nn.Module):
    """What remains of timm's BatchNormAct2d once its normalization moved into the convolution."""

    def __init__(self, bn_act: nn.Module):
        super().__init__()
        self.drop = bn_act.drop
        self.act = bn_act.act

    def forward(self, x):
        return self.act(self.drop(x))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def fuse_conv_bn(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """Fold every BatchNorm that follows a depthwise convolution into it, in place; returns the model.

    The model must be in eval mode (the folding uses the running statistics). The folded
    convolutions gain a bias; their BatchNorms become ``nn.Identity``. A pair is left as it is
    where the convolution's output is also used elsewhere, either module is called more than
    once, read by the forward itself (its weight, its statistics), held under another name or
    hooked, or the convolution's weight is shared with another module. A model torch.fx cannot
    trace folds the pairs of nn.Sequential containers only, with a warning (its forward's other
    uses of them cannot be checked). Wrapped models (torch.compile, DDP, FSDP), TorchScript modules
    and non-modules raise TypeError; a model, or a BatchNorm to fold, in training mode raises
    ValueError.
    """
    _refuse_unfoldable(model, "fuse_conv_bn", "fold")
    pairs = find_conv_bn_pairs(model)
    _refuse_training_norms(model, pairs, "fuse_conv_bn")
    return _fold_pairs(model, pairs, verbose=verbose)


@torch.no_grad()
def _fold_pairs(model: nn.Module, pairs: List[Tuple[str, str]], *, verbose: bool = False) -> nn.Module:
    """Fold each (conv, BatchNorm) pair of :func:`find_conv_bn_pairs` (or some of them), in place;
    the caller has checked that the model is in eval mode."""
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        weight, bias = fold_bn(conv.weight, conv.bias, bn)
        conv.weight.copy_(weight)
        if conv.bias is None:
            conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(bias)
        replacement = _ActAfterFold(bn) if type(bn) is _TimmBatchNormAct2d else nn.Identity()
        _set_submodule(model, bn_name, replacement)
        if verbose:
            print(f"folded {bn_name} into {conv_name}")
    return model
