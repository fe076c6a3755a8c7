"""RepLKNet (Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022).

The architecture of the official PyTorch implementation under its ``state_dict`` key names, so that
official checkpoints -- training (``lkb_origin`` + ``small_conv``) and deploy (``lkb_reparam``) --
load with ``strict=True``. Written for lkpatch; no code taken from the official repository.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import DropPath
from timm.models import FeatureInfo, register_model

from ..fuse import fold_bn
from ..modules import DepthwiseConv2d

__all__ = ["RepLKNet", "ReparamLargeKernelConv", "RepLKBlock", "ConvFFN", "RepLKNetStage", "CONFIGS"]


def _bn(channels: int, sync: bool) -> nn.Module:
    return nn.SyncBatchNorm(channels) if sync else nn.BatchNorm2d(channels)


class ConvBN(nn.Sequential):
    """conv -> bn (-> ReLU): the official ``conv_bn`` / ``conv_bn_relu`` (keys ``conv``, ``bn``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: Optional[int] = None,
                 groups: int = 1, relu: bool = False, sync_bn: bool = False):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = _bn(cout, sync_bn)
        if relu:
            self.nonlinear = nn.ReLU()


def _branch(conv_bn: ConvBN):
    """A conv -> BN branch as one kernel and bias (eval mode); its BN may be folded into the conv
    already (``lkpatch.fuse_conv_bn`` leaves an ``nn.Identity`` and a conv bias)."""
    conv = conv_bn.conv
    if isinstance(conv_bn.bn, nn.Identity):
        bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
        return conv.weight, bias
    return fold_bn(conv.weight, conv.bias, conv_bn.bn)


class ReparamLargeKernelConv(nn.Module):
    """A large depthwise kernel plus a parallel small one, each with BN, merged into one conv for
    deployment (``merge_kernel``)."""

    def __init__(self, channels: int, kernel_size: int, small_kernel: Optional[int], small_kernel_merged: bool = False,
                 sync_bn: bool = False):
        super().__init__()
        self.kernel_size, self.small_kernel = kernel_size, small_kernel
        if small_kernel_merged:
            self.lkb_reparam = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        else:
            self.lkb_origin = ConvBN(channels, channels, kernel_size, groups=channels, sync_bn=sync_bn)
            if small_kernel is not None:
                if small_kernel > kernel_size or (kernel_size - small_kernel) % 2:
                    raise ValueError(f"small_kernel={small_kernel} must be at most kernel_size={kernel_size} "
                                     "and differ from it by an even number (it is centred in the large kernel)")
                self.small_conv = ConvBN(channels, channels, small_kernel, groups=channels, sync_bn=sync_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        if hasattr(self, "small_conv"):
            out = out + self.small_conv(x)
        return out

    @torch.no_grad()
    def equivalent_kernel_bias(self):
        """The one kernel and bias that compute this block in eval mode."""
        weight, bias = _branch(self.lkb_origin)
        if hasattr(self, "small_conv"):
            small_w, small_b = _branch(self.small_conv)
            pad = (self.kernel_size - self.small_kernel) // 2
            weight = weight + nn.functional.pad(small_w, [pad] * 4)
            bias = bias + small_b
        return weight, bias

    @torch.no_grad()
    def merge_kernel(self) -> None:
        """Replace the two branches by ``lkb_reparam`` (same class as the large conv: a converted
        model stays converted)."""
        if hasattr(self, "lkb_reparam"):
            return
        old = self.lkb_origin.conv
        weight, bias = self.equivalent_kernel_bias()
        merged = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                           old.dilation, old.groups, bias=True, device=weight.device, dtype=weight.dtype)
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)
        if isinstance(old, DepthwiseConv2d):
            DepthwiseConv2d.from_conv(merged)
        self.lkb_reparam = merged
        del self.lkb_origin
        if hasattr(self, "small_conv"):
            del self.small_conv


class RepLKBlock(nn.Module):
    """BN -> 1x1 conv (ReLU) -> large-kernel depthwise conv -> ReLU -> 1x1 conv, plus the shortcut."""

    def __init__(self, channels: int, dw_channels: int, kernel_size: int, small_kernel: Optional[int],
                 drop_path: float, small_kernel_merged: bool = False, sync_bn: bool = False):
        super().__init__()
        self.pw1 = ConvBN(channels, dw_channels, 1, relu=True, sync_bn=sync_bn)
        self.pw2 = ConvBN(dw_channels, channels, 1, sync_bn=sync_bn)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, kernel_size, small_kernel, small_kernel_merged,
                                                   sync_bn)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = _bn(channels, sync_bn)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw2(self.lk_nonlinear(self.large_kernel(self.pw1(self.prelkb_bn(x)))))
        return x + self.drop_path(out)


class ConvFFN(nn.Module):
    """BN -> 1x1 conv -> GELU -> 1x1 conv, plus the shortcut."""

    def __init__(self, channels: int, hidden: int, drop_path: float, sync_bn: bool = False):
        super().__init__()
        self.preffn_bn = _bn(channels, sync_bn)
        self.pw1 = ConvBN(channels, hidden, 1, sync_bn=sync_bn)
        self.pw2 = ConvBN(hidden, channels, 1, sync_bn=sync_bn)
        self.nonlinear = nn.GELU()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x)))))


class RepLKNetStage(nn.Module):
    def __init__(self, channels: int, depth: int, kernel_size: int, drop_path: Sequence[float],
                 small_kernel: Optional[int], dw_ratio: float, ffn_ratio: float, small_kernel_merged: bool,
                 norm_intermediate_features: bool, sync_bn: bool):
        super().__init__()
        blocks = []
        for i in range(depth):
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), kernel_size, small_kernel, drop_path[i],
                                     small_kernel_merged, sync_bn))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), drop_path[i], sync_bn))
        self.blocks = nn.ModuleList(blocks)
        self.norm = _bn(channels, sync_bn) if norm_intermediate_features else nn.Identity()
        self.use_checkpoint = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class RepLKNet(nn.Module):
    """RepLKNet. ``num_classes=None`` with ``out_indices`` gives a backbone returning the listed
    stages' features (normalized when ``norm_intermediate_features``), for detection and segmentation.

    ``small_kernel_merged=True`` builds the deploy structure (``lkb_reparam``);
    :meth:`structural_reparam` turns a trained model into it.
    """

    def __init__(self, large_kernel_sizes: Sequence[int], layers: Sequence[int], channels: Sequence[int],
                 small_kernel: Optional[int], dw_ratio: float = 1, ffn_ratio: float = 4,
                 num_classes: Optional[int] = 1000, drop_path_rate: float = 0.0, small_kernel_merged: bool = False,
                 in_channels: int = 3, out_indices: Optional[Union[int, Sequence[int]]] = None,
                 use_checkpoint: bool = False, use_sync_bn: bool = False, norm_intermediate_features: bool = False,
                 drop_rate: float = 0.0):
        super().__init__()
        if not (len(large_kernel_sizes) == len(layers) == len(channels)) or not layers:
            raise ValueError("large_kernel_sizes, layers and channels need one entry per stage, and as many")
        if num_classes is None and out_indices is None:
            raise ValueError("RepLKNet needs num_classes (a classifier) or out_indices (a feature backbone)")
        if num_classes is not None and out_indices is not None:
            raise ValueError("give num_classes (a classifier) or out_indices (a feature backbone), not both")
        if num_classes is not None and norm_intermediate_features:
            raise ValueError("norm_intermediate_features applies to a feature backbone (out_indices), not a classifier")
        self.num_classes = num_classes
        self.out_indices = None if out_indices is None else stage_indices(out_indices, len(layers))
        self.num_stages = len(layers)
        self.num_features = channels[-1]
        width = channels[0]
        self.stem = nn.ModuleList([
            ConvBN(in_channels, width, 3, stride=2, padding=1, relu=True, sync_bn=use_sync_bn),
            ConvBN(width, width, 3, padding=1, groups=width, relu=True, sync_bn=use_sync_bn),
            ConvBN(width, width, 1, padding=0, relu=True, sync_bn=use_sync_bn),
            ConvBN(width, width, 3, stride=2, padding=1, groups=width, relu=True, sync_bn=use_sync_bn),
        ])
        dpr = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()  # also under a meta device
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i, depth in enumerate(layers):
            start = sum(layers[:i])
            self.stages.append(RepLKNetStage(
                channels[i], depth, large_kernel_sizes[i], dpr[start:start + depth], small_kernel, dw_ratio,
                ffn_ratio, small_kernel_merged, norm_intermediate_features, use_sync_bn))
            if i + 1 < len(layers):
                self.transitions.append(nn.Sequential(
                    ConvBN(channels[i], channels[i + 1], 1, padding=0, relu=True, sync_bn=use_sync_bn),
                    ConvBN(channels[i + 1], channels[i + 1], 3, stride=2, padding=1, groups=channels[i + 1],
                           relu=True, sync_bn=use_sync_bn)))
        if num_classes is not None:
            self.norm = _bn(channels[-1], use_sync_bn)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.global_pool = "avg"
            self.head_drop = nn.Dropout(drop_rate)  # timm's dropout before the classifier (no weights)
            # timm's convention: num_classes=0 is the pooled features (as reset_classifier(0))
            self.head = nn.Linear(channels[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.set_grad_checkpointing(use_checkpoint)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute blocks in the backward instead of keeping their activations (timm's name)."""
        self.use_checkpoint = enable
        for stage in self.stages:
            stage.use_checkpoint = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's: a new classifier (0: none); ``global_pool`` "avg", or "" (no pooling: the
        normalized last stage's map, with num_classes 0)."""
        if self.num_classes is None:
            raise ValueError("a feature backbone (out_indices) has no classifier")
        pool = self.global_pool if global_pool is None else global_pool
        if pool not in ("avg", ""):
            raise ValueError(f"global_pool {pool!r}: RepLKNet pools by 'avg', or not at all ('')")
        if pool == "" and num_classes > 0:
            raise ValueError("global_pool '' (no pooling) leaves no vector for a classifier: num_classes must be 0")
        self.global_pool = pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor):
        x, outs = self._stages(x)
        if self.out_indices is not None:
            return outs
        return x

    # The last stage's output and the listed stages' features; one typed body that
    # forward_features and forward share, so that the model also compiles with torch.jit.script.
    def _stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        for j, layer in enumerate(self.stem):
            if j > 0 and self.use_checkpoint and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        outs: List[torch.Tensor] = []
        out_indices = self.out_indices
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if out_indices is not None:  # its own test: TorchScript drops the branch where it is None
                if i in out_indices:
                    outs.append(stage.norm(x))
            for j, transition in enumerate(self.transitions):  # the one after stage i
                if j == i:
                    x = transition(x)
        return x, outs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's: the classifier on the last stage's map; ``pre_logits``: the vector before it."""
        x = self.norm(x)
        if self.global_pool == "avg":
            x = torch.flatten(self.avgpool(x), 1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor):
        x, outs = self._stages(x)
        if self.out_indices is not None:
            return outs
        return self.forward_head(x)

    def merged(self) -> bool:
        """Whether every block is in the deploy structure already (structural_reparam changes
        nothing). A method: torch.jit.script compiles a module's properties, not its other methods."""
        return all(hasattr(m, "lkb_reparam") for m in self.modules() if isinstance(m, ReparamLargeKernelConv))

    def structural_reparam(self) -> "RepLKNet":
        """Fold BN and the small kernel into one large kernel per block (the official deploy
        structure, ``lkb_reparam``). Uses the BN running statistics: the result computes what the
        model computes in eval mode, and refuses a model in training mode. Returns the model."""
        if self.training:
            raise ValueError("RepLKNet.structural_reparam: call model.eval() first; the merged kernels use the "
                             "BatchNorm running statistics")
        for module in self.modules():
            if isinstance(module, ReparamLargeKernelConv):
                module.merge_kernel()
        return self


def stage_indices(out_indices: Union[int, Sequence[int]], stages: int) -> List[int]:
    """timm's ``out_indices``: stage numbers (negative ones from the end), or an int n for the last
    n stages; as a sorted list, the order the stages' features come out in."""
    if not isinstance(out_indices, (list, tuple)):  # an integer of any type: the last n stages
        out_indices = operator.index(out_indices)
        if not 1 <= out_indices <= stages:
            raise ValueError(f"out_indices {out_indices} (the last n stages) must lie in 1..{stages}")
        return list(range(stages - out_indices, stages))
    picked = []
    for i in map(operator.index, out_indices):
        if not -stages <= i < stages:
            raise ValueError(f"out_indices {list(out_indices)} must lie in 0..{stages - 1} (or -{stages}..-1)")
        picked.append(i % stages)
    if len(set(picked)) != len(picked):
        raise ValueError(f"out_indices {list(out_indices)} name a stage twice")
    return sorted(picked)


# The paper's configurations (official create_RepLKNet31B / 31L / XL).
CONFIGS = {
    "replknet_31b": dict(large_kernel_sizes=[31, 29, 27, 13], layers=[2, 2, 18, 2], channels=[128, 256, 512, 1024],
                         small_kernel=5),
    "replknet_31l": dict(large_kernel_sizes=[31, 29, 27, 13], layers=[2, 2, 18, 2], channels=[192, 384, 768, 1536],
                         small_kernel=5),
    "replknet_xl": dict(large_kernel_sizes=[27, 27, 27, 13], layers=[2, 2, 18, 2], channels=[256, 512, 1024, 2048],
                        small_kernel=None, dw_ratio=1.5),
}

_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _create(variant: str, pretrained: bool = False, **kwargs) -> RepLKNet:
    if pretrained:
        raise ValueError(f"{variant}: lkpatch ships no pretrained weights; load an official checkpoint with "
                         "model.load_state_dict(...) or `lkpatch convert CKPT --model " + variant + "`")
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    if "in_chans" in kwargs:  # timm's name for it
        kwargs["in_channels"] = kwargs.pop("in_chans")
    features_only = kwargs.pop("features_only", False)
    if features_only:  # timm's backbone form: every stage's output unless out_indices says otherwise
        kwargs.setdefault("out_indices", (0, 1, 2, 3))
        kwargs.pop("num_classes", None)
    if kwargs.get("out_indices") is not None:  # a backbone (timm drops num_classes=None before we see it)
        kwargs.setdefault("num_classes", None)
    global_pool = kwargs.pop("global_pool", None)
    config = {**CONFIGS[variant], **kwargs}
    model = RepLKNet(**config)
    if global_pool is not None and model.num_classes is not None:  # timm's argument, as reset_classifier takes it
        model.reset_classifier(model.num_classes, global_pool)
    if features_only:  # what timm's features_only models carry: each output's channels and stride
        stages = [dict(num_chs=ch, reduction=4 * 2 ** i, module=f"stages.{i}") for i, ch in enumerate(config["channels"])]
        model.feature_info = FeatureInfo(stages, tuple(model.out_indices))
    model.pretrained_cfg = dict(architecture=variant, input_size=(3, 224, 224), num_classes=model.num_classes,
                                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic",
                                crop_pct=0.875, first_conv="stem.0.conv", classifier="head")
    model.default_cfg = model.pretrained_cfg
    return model


@register_model
def replknet_31b(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-31B: kernels 31/29/27/13, channels 128-1024, small kernel 5."""
    return _create("replknet_31b", pretrained, **kwargs)


@register_model
def replknet_31l(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-31L: kernels 31/29/27/13, channels 192-1536, small kernel 5."""
    return _create("replknet_31l", pretrained, **kwargs)


@register_model
def replknet_xl(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-XL: kernels 27/27/27/13, channels 256-2048, depthwise width 1.5x, no small kernel."""
    return _create("replknet_xl", pretrained, **kwargs)
