#!/usr/bin/env python
"""A training checkpoint -> a checked deploy checkpoint and an ONNX file, and the deploy model's speed.

    python examples/deploy.py runs/r31b/last.pth --ema            # a checkpoint of examples/train.py
    python examples/deploy.py RepLKNet-31B_ImageNet-1K_224.pth --model replknet_31b   # a plain state_dict
    python examples/deploy.py ckpt.pth --model mobilenetv3_large_100 --batch-sizes 1 8 64 --output deploy/

RepLKNet gets its structural re-parameterization (each block's BatchNorms and small kernel merged
into the large kernel: the official deploy layout, ``lkb_reparam``); other models get every
BatchNorm that follows a depthwise convolution folded into it (``lkpatch.fuse_conv_bn``). The
deploy model is converted by lkpatch and checked against the training model in eval mode; the
deploy checkpoint is written atomically, read back into a freshly built deploy model and checked
again. The ONNX file (dynamic batch) is exported from a CPU copy, where the converted layers run
PyTorch's convolution, so it holds standard Conv nodes; onnxruntime, where installed, checks it.
Last, inference is timed with and without lkpatch (batch 1 and 64 by default).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
from typing import Dict, Tuple

import torch
import torch.nn as nn

import common
from common import ExampleError

import lkpatch
from lkpatch import checkpoint

#: where checkpoints keep EMA weights (examples/train.py, timm's CheckpointSaver, others)
EMA_KEYS = tuple(k for k in checkpoint.WRAPPER_KEYS if "ema" in k)

#: max |deploy - reference| / max(1, max |reference|) accepted, fp32 without TF32
TOLERANCE = {"cpu": 1e-4, "cuda": 1e-3}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Commands: see the top of examples/deploy.py.")
    p.add_argument("checkpoint", help="a last.pth of examples/train.py, or a state_dict (also under 'model', "
                   "'state_dict', ... as lkpatch convert finds it)")
    p.add_argument("--model", help="timm model name (default: the one in a train.py checkpoint)")
    p.add_argument("--model-arg", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="constructor arguments (default: those in a train.py checkpoint)")
    p.add_argument("--num-classes", type=int, help="default: from the checkpoint")
    p.add_argument("--ema", action="store_true", help="deploy the EMA weights (a train.py checkpoint's, or under "
                   "'state_dict_ema' as timm saves them)")
    p.add_argument("--output", metavar="DIR", help="where to write NAME.deploy.pth and NAME.onnx "
                   "(default: the checkpoint's folder)")
    p.add_argument("--name", help="file name stem (default: the model name)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--img-size", type=int, help="input resolution (default: the checkpoint's, or the model's)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--opset", type=int, help="ONNX opset (default: torch.onnx's)")
    p.add_argument("--onnx-exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="torch.export-based (default; needs onnxscript) or the older TorchScript-based exporter "
                   "(faster, needs only onnx, deprecated by PyTorch)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="batches timed (default: 1 64)")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], help="timing precision (default: bf16 on a GPU, "
                   "off on the CPU)")
    p.add_argument("--channels-last", action="store_true", help="time in channels_last")
    p.add_argument("--reps", type=int, default=20, help="timed calls per batch size (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per batch size")
    p.add_argument("--no-bench", action="store_true", help="skip the timing")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes) or args.reps < 1 or args.warmup < 0:
        p.error("--batch-sizes and --reps must be at least 1, --warmup at least 0")
    if args.img_size is not None and args.img_size < 1:
        p.error(f"--img-size must be at least 1, got {args.img_size}")
    return args


# ----------------------------------------------------------------------------------- the model

def read_checkpoint(args) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """The state_dict to deploy and what is known about the model (name, arguments, classes)."""
    ckpt = common.load_checkpoint(args.checkpoint)
    info: Dict = {}
    if isinstance(ckpt, dict) and "model_name" in ckpt:  # examples/train.py
        info = {k: ckpt.get(k) for k in ("model_name", "model_args", "num_classes", "img_size", "step")}
    try:  # as lkpatch convert finds them: wrapper keys in order, DDP / torch.compile prefixes stripped
        entries = checkpoint.state_dicts(ckpt)
    except checkpoint.CheckpointError as e:
        raise ExampleError(f"{args.checkpoint}: {e}") from None
    if args.ema:
        entries = [e for e in entries if e.key in EMA_KEYS]
        if not entries:
            raise ExampleError(f"--ema: {args.checkpoint} holds no EMA weights (none under "
                               f"{', '.join(repr(k) for k in EMA_KEYS)}; train with --model-ema)")
    info["weights"] = entries[0].key or "state_dict"
    return entries[0].state_dict, info


def classifier_classes(model: nn.Module, sd: Dict[str, torch.Tensor]):
    """The class count of the checkpoint's classifier, from its weight's shape (timm's cfg names it)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier") if isinstance(cfg, dict) else None
    w = sd.get(f"{head}.weight") if isinstance(head, str) else None
    return int(w.shape[0]) if w is not None and w.dim() >= 1 else None


def is_replknet(model: nn.Module) -> bool:
    return hasattr(model, "structural_reparam")


def build_training_model(args, sd, info) -> Tuple[nn.Module, str, Dict]:
    name = args.model or info.get("model_name")
    if not name:
        raise ExampleError(f"{args.checkpoint} is not a checkpoint of examples/train.py: say which model it "
                           f"holds with --model NAME (and --model-arg for non-default settings)")
    model_args = dict(info.get("model_args") or {}) if name == info.get("model_name") else {}
    model_args.update(common.parse_model_args(args.model_arg))
    if any(".lkb_reparam." in k for k in sd):  # already RepLKNet's deploy layout
        model_args["small_kernel_merged"] = True
    num_classes = args.num_classes or info.get("num_classes")
    if num_classes is None:
        probe = common.create_model(name, **model_args)
        num_classes = classifier_classes(probe, sd) or getattr(probe, "num_classes", None)
    if num_classes is not None:
        model_args["num_classes"] = num_classes
    model = common.create_model(name, **model_args)
    try:
        common.load_strict(model, sd, f"{name} {model_args}")
    except ExampleError as strict_error:
        try:  # BatchNorms already folded (lkpatch convert --reparam, or this script's own output)
            lkpatch.load_checkpoint(model, sd)
        except ValueError:
            raise strict_error from None
        info["folded"] = True
    return model.eval(), name, model_args


def make_deploy(model: nn.Module) -> Tuple[nn.Module, str]:
    """The deploy structure of a trained model (a copy), and what was done."""
    from lkpatch.fuse import find_conv_bn_pairs

    deploy = copy.deepcopy(model).eval()
    if is_replknet(deploy):
        before = sum(1 for n, _ in deploy.named_modules() if n.endswith("lkb_origin"))
        deploy.structural_reparam()
        return deploy, f"structural re-parameterization: {before} large kernels merged with their BN and small kernel"
    pairs = find_conv_bn_pairs(deploy)
    lkpatch.fuse_conv_bn(deploy)
    return deploy, f"{len(pairs)} BatchNorms folded into the depthwise convolutions before them"


def build_deploy_model(name: str, model_args: Dict, method: str) -> nn.Module:
    """An empty deploy-structure model that a deploy checkpoint of this script loads into."""
    if method == "structural_reparam":
        return common.create_model(name, **{**model_args, "small_kernel_merged": True}).eval()
    model = common.create_model(name, **model_args).eval()
    lkpatch.fuse_conv_bn(model)  # the folded structure: biases added, BatchNorms removed
    return model


def load_deploy_checkpoint(path: str) -> nn.Module:
    """A deploy checkpoint of this script as a converted model, ready for inference."""
    ckpt = common.load_checkpoint(path)
    model = build_deploy_model(ckpt["model_name"], ckpt["model_args"], ckpt["deploy"])
    common.load_strict(model, ckpt["model"], ckpt["model_name"])
    return lkpatch.convert_model(model)


# -------------------------------------------------------------------------------------- checks

def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), common.exact_fp32():
        return model(x).float()


def check(label: str, ref: torch.Tensor, out: torch.Tensor, device: torch.device) -> float:
    err = ((out - ref).abs().max() / max(1.0, ref.abs().max().item())).item()
    tol = TOLERANCE[device.type]
    print(f"{label}: max relative error {err:.2e} ({'ok' if err <= tol else 'FAILED'}, tolerance {tol:.0e})",
          flush=True)
    if not err <= tol:
        raise ExampleError(f"{label}: outputs differ by {err:.2e} (> {tol:.0e})")
    return err


def export_onnx(deploy: nn.Module, img_size: int, path: str, opset, exporter: str, overwrite: bool = True) -> None:
    """Export a CPU fp32 copy (the converted layers run F.conv2d there: standard Conv nodes),
    with a dynamic batch dimension, into lkpatch's temporary file beside ``path``; check its opset
    and, where onnxruntime is installed, its outputs; then put it in place (a failed export or
    check leaves the previous file as it was, and nothing else)."""
    with common.checkpoint_writer(path, overwrite=overwrite) as writer:
        _export_checked(deploy, img_size, writer.tmp, opset, exporter)
        writer.commit()
    size = os.path.getsize(path) / 2**20
    print(f"wrote {path} ({size:.1f} MiB)", flush=True)


def _export_checked(deploy: nn.Module, img_size: int, path: str, opset, exporter: str) -> None:
    import warnings

    model = copy.deepcopy(deploy).cpu().float().eval()
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    kwargs = dict(input_names=["input"], output_names=["output"], verbose=False)
    if opset is not None:
        kwargs["opset_version"] = opset
    try:
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (x,), path, dynamic_shapes=({0: batch},), external_data=False, **kwargs)
        else:
            with warnings.catch_warnings():
                # The trace records shapes as constants; the channel checks of the converted
                # layers are constants of the model, the batch is made dynamic below.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                torch.onnx.export(model, (x,), path, dynamo=False, dynamic_axes={"input": {0: "batch"},
                                                                                "output": {0: "batch"}}, **kwargs)
        import onnx
    except ImportError as e:  # the exporters need the onnx package, the dynamo one also onnxscript
        raise ExampleError(f"ONNX export needs 'pip install onnx onnxscript' ({e}); or pass --no-onnx") from e
    # The dynamo exporter writes opset 18 and converts down; where that fails it keeps 18 with a warning.
    written = next((o.version for o in onnx.load(path, load_external_data=False).opset_import
                    if o.domain in ("", "ai.onnx")), None)
    if opset is not None and written != opset:
        hint = " (--onnx-exporter torchscript writes older opsets)" if exporter == "dynamo" else ""
        raise ExampleError(f"--opset {opset}: the {exporter} exporter wrote opset {written} instead, as PyTorch "
                           f"could not convert this model to opset {opset}{hint}; the ONNX file was not written")
    try:
        import onnxruntime as ort
    except ImportError:
        print(f"ONNX opset {written}; onnxruntime is not installed, so it is not run", flush=True)
        return
    onnx_model = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for b in (1, 3):  # another batch than the one exported with: the batch dimension is dynamic
        xb = torch.randn(b, 3, img_size, img_size, generator=torch.Generator().manual_seed(b))
        ref = outputs(model, xb)
        got = torch.from_numpy(onnx_model.run(None, {"input": xb.numpy()})[0])
        worst = max(worst, ((got - ref).abs().max() / max(1.0, ref.abs().max().item())).item())
    ok = worst <= TOLERANCE["cpu"]
    print(f"ONNX opset {written}; onnxruntime, batch 1 and 3: max relative error {worst:.2e} "
          f"({'ok' if ok else 'FAILED'})", flush=True)
    if not ok:
        raise ExampleError(f"the ONNX model's outputs differ from PyTorch's by {worst:.2e}; the ONNX file was not written")


# ------------------------------------------------------------------------------------- timing

def bench(deploy: nn.Module, args, device: torch.device, img_size: int) -> None:
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    models = {"PyTorch": lkpatch.revert_model(copy.deepcopy(deploy)), "lkpatch": deploy}
    for m in models.values():
        m.to(device=device, memory_format=fmt).eval()
    print(f"inference, {img_size} px, amp {args.amp}{', channels_last' if args.channels_last else ''}, "
          f"{device.type}, median of {args.reps} (ms per batch)" + common.cpu_ratio_note(device) + ":", flush=True)
    for b in args.batch_sizes:
        x = torch.randn(b, 3, img_size, img_size, device=device).contiguous(memory_format=fmt)
        ms = {}
        for key, m in models.items():
            def call(m=m):
                with torch.inference_mode(), common.autocast(device, args.amp):
                    m(x)
            try:
                ms[key] = 1e3 * statistics.median(common.time_calls(call, device, args.warmup, args.reps))
            except torch.OutOfMemoryError:
                ms[key] = None
                torch.cuda.empty_cache()
        cells = [f"{k} " + (f"{v:.2f} ms ({b / v * 1e3:.0f} img/s)" if v else "out of memory") for k, v in ms.items()]
        ratio = f": {ms['PyTorch'] / ms['lkpatch']:.2f}x" if all(ms.values()) else ""
        print(f"  batch {b:>3}: " + ", ".join(cells) + ratio, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    if args.amp is None:
        args.amp = "bf16" if device.type == "cuda" else "off"
    common.build_extension(device)

    sd, info = read_checkpoint(args)
    model, name, model_args = build_training_model(args, sd, info)
    img_size = args.img_size or info.get("img_size") or int(
        ((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))[-1])
    step = f", step {info['step']}" if info.get("step") is not None else ""
    print(f"loaded {args.checkpoint}: {name} ({info['weights']} weights{step}), "
          f"{getattr(model, 'num_classes', '?')} classes, {img_size} px", flush=True)

    # the files it will write, checked before the work that leads to them
    out_dir = args.output or os.path.dirname(os.path.abspath(args.checkpoint))
    stem = args.name or name
    ckpt_path = os.path.join(out_dir, f"{stem}.deploy.pth")
    onnx_path = os.path.join(out_dir, f"{stem}.onnx")
    folder = os.path.abspath(out_dir)
    while not os.path.exists(folder):  # --output made below: the folder it would be made in must take files
        folder = os.path.dirname(folder)
    for path in (ckpt_path,) + (() if args.no_onnx else (onnx_path,)):
        made = folder != os.path.abspath(out_dir)
        try:
            checkpoint.check_output_path(os.path.join(folder, os.path.basename(path)) if made else path,
                                         overwrite=args.force or made)
        except checkpoint.CheckpointError as e:
            raise ExampleError(str(e)) from None

    deploy, what = make_deploy(model)
    if info.get("folded"):
        what = "the checkpoint holds the deploy structure already (its BatchNorms folded)"
    method = "structural_reparam" if is_replknet(model) else "fuse_conv_bn"
    print(f"deploy: {what}", flush=True)
    lkpatch.convert_model(deploy)
    report = lkpatch.conversion_report(deploy)
    print(f"lkpatch: {len(report.converted)} of {len(report.layers)} depthwise convolutions converted", flush=True)

    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
    model.to(device)
    deploy.to(device)
    ref = outputs(model, x)
    check("deploy model vs the training model in eval mode", ref, outputs(deploy, x), device)
    del model

    os.makedirs(out_dir, exist_ok=True)
    deploy_args = {**model_args, "small_kernel_merged": True} if method == "structural_reparam" else model_args
    with common.checkpoint_writer(ckpt_path, overwrite=args.force) as writer:  # checked before it is put in place
        written = writer.write({"model": {k: v.detach().cpu() for k, v in deploy.state_dict().items()},
                                "model_name": name, "model_args": deploy_args, "deploy": method,
                                "num_classes": getattr(deploy, "num_classes", None), "img_size": img_size})
        reloaded = load_deploy_checkpoint(written).to(device)
        check(f"{ckpt_path} read back into a new deploy model", ref, outputs(reloaded, x), device)
        del reloaded
        writer.commit()
    print(f"wrote {ckpt_path}", flush=True)

    if not args.no_onnx:
        export_onnx(deploy, img_size, onnx_path, args.opset, args.onnx_exporter, overwrite=args.force)
    if not args.no_bench:
        bench(deploy, args, device, img_size)
    return 0


if __name__ == "__main__":
    common.run(main, "deploy.py")
