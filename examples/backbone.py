#!/usr/bin/env python
"""RepLKNet and ConvNeXt as feature extractors (strides 4, 8, 16, 32) under a segmentation head,
converted by lkpatch, with training steps timed with and without it.

    python examples/backbone.py                     # RepLKNet-31B and convnext_tiny, 512x512, batch 2, bf16
    python examples/backbone.py --replknet replknet_31l --timm convnext_small --size 640 --batch 4
    python examples/backbone.py --device cpu --amp off --size 64 --batch 1 --timm convnext_atto \\
        --replknet-arg layers=[1,1,1,1] channels=[16,32,64,128]        # a quick run on the CPU

A backbone returns one feature map per stage; the head here is a small FPN (lateral 1x1 convs, a
top-down sum, 3x3 convs, every level upsampled to stride 4 and summed, a 1x1 classifier), as
Semantic FPN and UperNet put on RepLKNet and ConvNeXt for ADE20K. For detection, hand the same
list of maps to the detector's neck. In multi-GPU training build RepLKNet with
``use_sync_bn=True`` (or convert its BatchNorms with ``nn.SyncBatchNorm.convert_sync_batchnorm``)
and convert with lkpatch before wrapping the model in DDP.
"""
from __future__ import annotations

import argparse
import copy
import statistics
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import ExampleError

import lkpatch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Commands: see the top of examples/backbone.py.")
    p.add_argument("--replknet", default="replknet_31b", help="RepLKNet configuration (replknet_31b, replknet_31l, "
                   "replknet_xl), or 'none'")
    p.add_argument("--replknet-arg", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides of the configuration, e.g. drop_path_rate=0.3 or layers=[2,2,6,2]")
    p.add_argument("--timm", default="convnext_tiny", help="a timm model taken with features_only=True "
                   "(default: convnext_tiny), or 'none'")
    p.add_argument("--size", type=int, default=512, help="input height and width (default: 512)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=150, help="segmentation classes (ADE20K's 150)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], help="default: bf16 on a GPU, off on the CPU")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute backbone blocks in the backward")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    args = p.parse_args(argv)
    if args.size < 32 or args.size % 32:
        p.error(f"--size {args.size}: use a positive multiple of 32, so that every stride divides it")
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.num_classes < 1:
        p.error("--batch, --steps and --num-classes must be at least 1, --warmup at least 0")
    if args.batch * (args.size // 32) ** 2 < 2:  # the stride-32 map's BatchNorms, in training mode
        p.error(f"--size {args.size} --batch {args.batch}: the stride-32 feature map holds one value per "
                f"channel, which BatchNorm cannot train on; use --size 64 or --batch 2")
    return args


class FPNHead(nn.Module):
    """Semantic-FPN-style head: per-pixel class logits at stride 4 from the four stage maps."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 128):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                          nn.ReLU(inplace=True)) for _ in in_channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):  # top-down: coarse context into the finer maps
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        size = lat[0].shape[-2:]
        out = sum(F.interpolate(s(x), size=size, mode="bilinear", align_corners=False)
                  for s, x in zip(self.smooth, lat))
        return self.classifier(out)


class Segmenter(nn.Module):
    def __init__(self, backbone: nn.Module, in_channels: Sequence[int], num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = FPNHead(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def replknet_backbone(name: str, overrides: Dict) -> nn.Module:
    from lkpatch.models import REPLKNET_CONFIGS, RepLKNet

    if name not in REPLKNET_CONFIGS:
        raise ExampleError(f"--replknet {name}: one of {', '.join(REPLKNET_CONFIGS)} (or 'none')")
    fixed = sorted({"out_indices", "num_classes", "norm_intermediate_features"} & set(overrides))
    if fixed:
        raise ExampleError(f"--replknet-arg {', '.join(fixed)}: set by this example (the FPN head takes the four "
                           f"stages' normalized maps)")
    try:
        return RepLKNet(**{**REPLKNET_CONFIGS[name], **overrides}, num_classes=None, out_indices=[0, 1, 2, 3],
                        norm_intermediate_features=True)  # BN on each output, as the official segmentation code
    except (TypeError, ValueError) as e:
        raise ExampleError(f"--replknet-arg {overrides}: {e}") from e


def timm_backbone(name: str) -> nn.Module:
    """The timm model's features at strides 4, 8, 16 and 32, whichever of its stages give them
    (ConvNeXt: its four stages; ResNets: the last four of five)."""
    reductions = common.create_model(name, features_only=True).feature_info.reduction()
    if not all(r in reductions for r in (4, 8, 16, 32)):
        raise ExampleError(f"--timm {name}: its feature maps have strides {reductions}, not 4, 8, 16 and 32")
    return common.create_model(name, features_only=True,
                               out_indices=tuple(reductions.index(r) for r in (4, 8, 16, 32)))


def describe(model: nn.Module, x: torch.Tensor, amp: str) -> List[int]:
    """Print each stage's map and its stride; return the channel counts."""
    with torch.no_grad(), common.autocast(x.device, amp):
        feats = model(x)
    if not isinstance(feats, (list, tuple)) or len(feats) != 4:
        raise ExampleError("the backbone must return a list of four feature maps")
    for i, f in enumerate(feats):
        print(f"  stage {i}: {f.shape[1]} x {f.shape[2]} x {f.shape[3]} (stride {x.shape[-1] // f.shape[-1]})")
    return [f.shape[1] for f in feats]


def time_steps(seg: nn.Module, args, device: torch.device) -> float:
    """Median milliseconds of a training step: forward, per-pixel cross-entropy, backward, SGD."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    seg.to(device=device, memory_format=fmt).train()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, args.num_classes, (args.batch, args.size, args.size), device=device, generator=g)
    opt = torch.optim.SGD(seg.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    def step():
        with common.autocast(device, args.amp):
            loss = F.cross_entropy(seg(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    return 1e3 * statistics.median(common.time_calls(step, device, args.warmup, args.steps))


def run_one(label: str, backbone: nn.Module, args, device: torch.device) -> None:
    if args.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    lkpatch.convert_model(backbone)
    report = lkpatch.conversion_report(backbone)
    n = sum(p.numel() for p in backbone.parameters())
    print(f"{label} backbone: {n / 1e6:.1f} M parameters; lkpatch: {len(report.converted)} of "
          f"{len(report.layers)} depthwise convolutions converted", flush=True)
    backbone.to(device).eval()
    probe = torch.randn(1, 3, args.size, args.size, device=device)
    channels = describe(backbone, probe, args.amp)
    seg = Segmenter(backbone, channels, args.num_classes)
    baseline = lkpatch.revert_model(copy.deepcopy(seg))
    ms = {"PyTorch": time_steps(baseline, args, device)}
    del baseline
    ms["lkpatch"] = time_steps(seg, args, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"  training step (FPN head, batch {args.batch}, {args.size}x{args.size}, amp {args.amp}"
          f"{', channels_last' if args.channels_last else ''}, median of {args.steps}): "
          f"PyTorch {ms['PyTorch']:.1f} ms, lkpatch {ms['lkpatch']:.1f} ms ({ms['PyTorch'] / ms['lkpatch']:.2f}x)"
          + common.cpu_ratio_note(device), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    if args.amp is None:
        args.amp = "bf16" if device.type == "cuda" else "off"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    common.build_extension(device)
    torch.manual_seed(0)
    todo = []
    if args.replknet.lower() != "none":
        todo.append((args.replknet, replknet_backbone(args.replknet, common.parse_model_args(args.replknet_arg))))
    if args.timm.lower() != "none":
        todo.append((args.timm, timm_backbone(args.timm)))
    if not todo:
        raise ExampleError("nothing to run: --replknet none and --timm none")
    for label, backbone in todo:
        run_one(label, backbone, args, device)
    return 0


if __name__ == "__main__":
    common.run(main, "backbone.py")
