"""The ``lkpatch`` command: convert, demo, info, build, bench."""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from . import checkpoint as ckpt_io
from .checkpoint import CheckpointError

#: max |converted - original| / max(1, max |original|) accepted by the equivalence check
TOLERANCE = {"cpu": 1e-4, "cuda": 1e-3}


class CLIError(Exception):
    """An error reported as one line on stderr."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _say(msg: str = "") -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def _step(what: str):
    """Progress for a step that may take a while: 'what ...' then its time."""
    print(f"{what} ...", end="", flush=True)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", flush=True)
        raise
    print(f" {time.perf_counter() - t0:.1f} s", flush=True)


# ----------------------------------------------------------------------------------------- models

def _parse_model_args(items: Sequence[str]) -> Dict[str, object]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise CLIError(f"--model-arg expects KEY=VALUE (e.g. num_classes=10), got '{item}'")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a bare string
    return out


def build_model(name: str, model_args: Dict[str, object]) -> nn.Module:
    """A timm model (RepLKNet included) or ``torchvision:NAME``, with random weights."""
    from . import models  # noqa: F401 - registers RepLKNet with timm

    try:
        if name.startswith("torchvision:"):
            import torchvision

            tv_name = name.split(":", 1)[1]
            if tv_name not in torchvision.models.list_models():
                raise CLIError(f"unknown torchvision model '{tv_name}' (see torchvision.models.list_models())")
            return torchvision.models.get_model(tv_name, weights=None, **model_args)
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:6]
            hint = f"; similar names: {', '.join(close)}" if close else ""
            raise CLIError(f"unknown model '{name}' (a timm name, or torchvision:NAME){hint}")
        return timm.create_model(name, pretrained=False, **model_args)
    except TypeError as e:
        raise CLIError(f"cannot build '{name}' with {model_args}: {e}") from e


def _input_size(model: nn.Module, override: Optional[int]) -> int:
    if override:
        return override
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-1]) if size else 224


def _classifier_mismatch(model: nn.Module, sd: Dict[str, torch.Tensor]) -> Optional[int]:
    """The checkpoint's class count when only the classifier's shape differs from the model's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier") if isinstance(cfg, dict) else None
    if not isinstance(head, str):
        return None
    own = model.state_dict()
    bad = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    weight = sd.get(f"{head}.weight")
    if bad and all(k.startswith(head + ".") for k in bad) and weight is not None and weight.dim() >= 1:
        return int(weight.shape[0])
    return None


def load_strict(model: nn.Module, sd: Dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def listed(label, items):
            return f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})" if items else ""
        parts = [p for p in (listed("missing", missing), listed("unexpected", unexpected),
                             listed("with another shape", shapes)) if p]
        raise CLIError(f"the checkpoint does not match {what}: " + "; ".join(parts)
                       + ". Check --model (and --model-arg for non-default settings)")
    model.load_state_dict(sd, strict=True)


def _make_model(name: str, model_args: Dict[str, object], sd: Dict[str, torch.Tensor]) -> nn.Module:
    from .models import REPLKNET_CONFIGS

    if name in REPLKNET_CONFIGS and any(".lkb_reparam." in k for k in sd):
        model_args = {"small_kernel_merged": True, **model_args}  # a deploy checkpoint
    model = build_model(name, model_args)
    classes = _classifier_mismatch(model, sd)
    if classes is not None and "num_classes" not in model_args:
        _say(f"the checkpoint's classifier has {classes} classes; building {name} with num_classes={classes}")
        model = build_model(name, {**model_args, "num_classes": classes})
    return model


# ------------------------------------------------------------------------------------ equivalence

@contextlib.contextmanager
def _exact_fp32():
    """Compare in full fp32: TF32 off for the duration (it is on by default for convolutions)."""
    from . import dispatch
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with dispatch.conv_tf32(False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _outputs(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    with torch.no_grad(), _exact_fp32():
        out = model(x)
    if isinstance(out, torch.Tensor):
        return [out.float()]
    if isinstance(out, (list, tuple)):
        return [o.float() for o in out if isinstance(o, torch.Tensor)]
    if isinstance(out, dict):
        return [o.float() for o in out.values() if isinstance(o, torch.Tensor)]
    raise CLIError(f"cannot compare the model's output of type {type(out).__name__}")


def relative_error(ref: List[torch.Tensor], out: List[torch.Tensor]) -> float:
    """max |out - ref| over every output, relative to max(1, max |ref|)."""
    err = 0.0
    for r, o in zip(ref, out):
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        err = max(err, (o - r).abs().max().item() / scale if r.numel() else 0.0)
    return err


def _check(label: str, ref, out, device: str) -> float:
    err = relative_error(ref, out)
    ok = err <= TOLERANCE[device]
    _say(f"{label}: max relative error {err:.2e} ({'ok' if ok else 'FAILED'}, tolerance {TOLERANCE[device]:.0e})")
    if not ok:
        raise CLIError(f"{label}: outputs differ by {err:.2e} (> {TOLERANCE[device]:.0e}); nothing written")
    return err


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA GPU is available here")
    return name


def reparameterize(model: nn.Module) -> str:
    """The deploy structure: RepLKNet's own structural re-parameterization, else BN folded into
    the depthwise convolutions before it. Returns what was done."""
    from .fuse import find_conv_bn_pairs, fuse_conv_bn

    if hasattr(model, "structural_reparam"):
        model.structural_reparam()
        return "structural re-parameterization (BN and small kernel merged into the large kernel)"
    pairs = find_conv_bn_pairs(model)
    fuse_conv_bn(model)
    return f"{len(pairs)} BatchNorm(s) folded into the depthwise convolution before them"


# ------------------------------------------------------------------------------------ subcommands

def _default_output(path: Path, reparam: bool) -> Path:
    suffix = ".deploy.pth" if reparam else ".lkpatch.pth"
    return path.with_name(path.name.rsplit(".", 1)[0] + suffix if "." in path.name else path.name + suffix)


def cmd_convert(args) -> int:
    from .convert import conversion_report, convert_model

    src = Path(args.checkpoint)
    out_path = Path(args.output) if args.output else _default_output(src, args.reparam)
    if out_path.exists() and src.exists() and os.path.samefile(out_path, src):
        raise CLIError("the output is the input checkpoint; lkpatch convert never modifies its input")
    if out_path.exists() and not args.force:
        raise CLIError(f"output '{out_path}' exists; pass --force to overwrite it")
    model_args = _parse_model_args(args.model_arg)
    device = _device(args.device)

    with _step(f"loading '{src}'"):
        obj = ckpt_io.load(str(src), allow_pickled_code=args.unsafe_load_pickle_runs_code)
    if isinstance(obj, nn.Module):  # only reachable with the opt-in flag
        _say(f"'{src}' holds a pickled {type(obj).__name__}; converting its state_dict")
        obj = obj.state_dict()
    entries = ckpt_io.state_dicts(obj)
    if not args.model:
        raise CLIError("--model NAME is required (a timm name such as replknet_31b, or torchvision:NAME)")

    for index, entry in enumerate(entries):
        where = f"'{entry.key}'" if entry.key else "the state_dict"
        prefix = f" ({entry.prefix!r} prefix)" if entry.prefix else ""
        with _step(f"building {args.model} for {where}{prefix}"):
            model = _make_model(args.model, model_args, entry.state_dict)
            load_strict(model, entry.state_dict, args.model)
            model.eval().to(device)
        size = _input_size(model, args.input_size)
        chans = int(model_args.get("in_chans", model_args.get("in_channels", 3)))
        x = torch.randn(args.batch, chans, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        with _step(f"reference forward ({args.batch}x{chans}x{size}x{size}, {device})"):
            ref = _outputs(model, x)
        convert_model(model)
        if index == 0:
            _say(conversion_report(model).table())
        _check(f"converted {where}", ref, _outputs(model, x), device)
        if args.reparam:
            with _step("re-parameterizing"):
                done = reparameterize(model)
            _say(done)
            _check(f"re-parameterized {where}", ref, _outputs(model, x), device)
        new_sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        entry.state_dict = _keep_dtypes(entry.state_dict, new_sd)

    result = ckpt_io.replace_state_dicts(obj, entries)
    with _step(f"writing '{out_path}'"):
        ckpt_io.save_atomic(result, str(out_path), overwrite=args.force)
    if args.reparam and isinstance(result, dict) and "optimizer" in result:
        _say("note: the optimizer state refers to the training structure; it is kept as it was")
    _say(f"wrote {out_path}")
    return 0


def _keep_dtypes(old: Dict[str, torch.Tensor], new: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Tensors keep the checkpoint's dtypes; new ones (merged kernels, biases) take its float dtype."""
    floats = [v.dtype for v in old.values() if v.is_floating_point()]
    default = max(set(floats), key=floats.count) if floats else torch.float32
    return {k: v.to(old[k].dtype) if k in old else (v.to(default) if v.is_floating_point() else v)
            for k, v in new.items()}


def cmd_demo(args) -> int:
    from .convert import conversion_report, convert_model

    device = _device(args.device)
    torch.manual_seed(0)
    with _step(f"[1/5] building {args.model} with random weights"):
        model = build_model(args.model, {}).eval()
        reference_model = copy.deepcopy(model)
        model.to(device)
    size = args.size or _input_size(model, None)
    x = torch.randn(args.batch, 3, size, size, device=device)
    with _step(f"[2/5] native forward, {args.batch}x3x{size}x{size} on {device}"):
        ref = _outputs(model, x)
    with _step("[3/5] convert_model"):
        convert_model(model)
    _say(conversion_report(model).table())
    _check("converted model vs native", ref, _outputs(model, x), device)
    with tempfile.TemporaryDirectory(prefix="lkpatch-demo-") as tmp:
        path = os.path.join(tmp, f"{args.model}.pth")
        with _step(f"[4/5] saving the converted model's state_dict to {path} and loading it into a fresh model"):
            ckpt_io.save_atomic({"model": model.state_dict()}, path)
            loaded = ckpt_io.state_dicts(ckpt_io.load(path))[0].state_dict
            load_strict(reference_model, loaded, args.model)
            reference_model.to(device)
        _check("reloaded checkpoint (unconverted model) vs converted", ref, _outputs(reference_model, x), device)
    if device == "cuda":
        _say(f"[5/5] training steps (batch {args.batch}, {size} px, SGD), native vs converted:")
        _demo_timing(reference_model, model, args.batch, size)
    else:
        _say("[5/5] no CUDA GPU here: the converted model ran PyTorch's convolution; timings need a GPU")
    _say("demo finished: same weights, same outputs")
    return 0


def _demo_timing(native: nn.Module, converted: nn.Module, batch: int, size: int) -> None:
    """Training steps (SGD) of both models on random data; they train, so time on copies."""
    from .bench import time_train_steps

    for amp in ("float32", "bfloat16"):
        models = {"native": copy.deepcopy(native), "lkpatch": copy.deepcopy(converted)}
        r = time_train_steps(models, batch, size, amp, steps=5, warmup=2, queue=0)
        label = "bf16 autocast" if amp == "bfloat16" else "fp32"
        _say(f"  {label:13s}: PyTorch {r['native_img_per_s']:7.1f} img/s, lkpatch {r['lkpatch_img_per_s']:7.1f} img/s "
             f"({r['lkpatch_img_per_s'] / r['native_img_per_s']:.2f}x)")
        del models
        torch.cuda.empty_cache()


def cmd_info(args) -> int:
    import timm
    import torchvision

    from . import __version__, build, dispatch

    rows = [("lkpatch", __version__), ("python", platform.python_version()), ("torch", torch.__version__),
            ("torch CUDA", torch.version.cuda or "none (CPU build)"), ("torchvision", torchvision.__version__),
            ("timm", timm.__version__)]
    cuda = torch.cuda.is_available()
    rows.append(("GPU", ", ".join(f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                                  for i in range(torch.cuda.device_count())) if cuda else "none"))
    st = build.status()
    rows += [("CUDA toolkit", st["cuda_home"] or "not found (set CUDA_HOME)"), ("nvcc", st["nvcc"] or "not found"),
             ("target arch", st["arch"]), ("extension", ("built: " if st["built"] else "not built yet: ") + st["library"])]
    if st["error"]:
        rows.append(("build error", st["error"].splitlines()[0]))
    impl = dispatch.implementation()
    for dtype in ("float32", "float16", "bfloat16", "float64"):
        rows.append((f"path {dtype}", _path_for(getattr(torch, dtype), cuda, st["built"] or st["loaded"], impl)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        _say(f"{k.ljust(width)}  {v}")
    return 0


def _path_for(dtype: torch.dtype, cuda: bool, built: bool, impl: str) -> str:
    from . import dispatch

    if dtype not in dispatch.KERNEL_DTYPES:
        return "PyTorch F.conv2d (no lkpatch kernel for this dtype)"
    if not cuda:
        return "PyTorch F.conv2d (no CUDA GPU)"
    if impl == "native":
        return "PyTorch F.conv2d (LKPATCH_IMPL=native)"
    where = "lkpatch kernel" + (" (forced)" if impl == "kernel" else " where faster, per pass (stride 1, dilation 1)")
    if dtype == torch.float32:
        arith = ("TF32 tensor cores on small maps and on large maps and kernels (PyTorch allows TF32 convolutions), else exact fp32"
                 if dispatch.tf32_pass(dtype) else "exact fp32 (CUDA cores)")
    elif dispatch.tensor_core_pass("forward", (8, 1, 9, 9), dtype):
        arith = "tensor cores from 8 images, else CUDA cores; fp32 accumulation"
    else:
        arith = "CUDA cores, fp32 accumulation"
    return f"{where}, {arith}" + ("" if built else "; builds on first use")


def cmd_build(args) -> int:
    from . import build

    lib = build.build(verbose=args.verbose, force=args.force)
    _say(f"lkpatch extension: {lib}")
    return 0


def _bench(argv: Sequence[str]) -> int:
    from . import bench

    return bench.main(list(argv))


# ------------------------------------------------------------------------------------------ main

def make_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="full tracebacks and compiler output")
    parser = _Parser(prog="lkpatch", parents=[common],
                     description="Fast depthwise convolution for large-kernel CNNs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("convert", parents=[common], help="check and convert a checkpoint",
                       description="Load CKPT into MODEL strictly, convert it, check that outputs match, write OUT.")
    p.add_argument("checkpoint", metavar="CKPT", help="a state_dict, or a dict holding one (model, state_dict, model_ema)")
    p.add_argument("--model", "-m", metavar="NAME", help="timm model name (replknet_31b, ...) or torchvision:NAME")
    p.add_argument("-o", "--output", metavar="OUT", help="default: CKPT with .lkpatch.pth (.deploy.pth with --reparam)")
    p.add_argument("--reparam", action="store_true",
                   help="write the deploy structure: RepLKNet's structural re-parameterization, else BN folded into "
                        "the depthwise conv before it")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="model constructor argument (repeatable)")
    p.add_argument("--input-size", type=int, help="image size of the check's random input (default: the model's)")
    p.add_argument("--batch", type=int, default=2, help="batch of the check's random input (default 2)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where to run the check")
    p.add_argument("--unsafe-load-pickle-runs-code", action="store_true",
                   help="allow a checkpoint holding pickled Python objects (a whole model): loading it RUNS CODE "
                        "FROM THE FILE; only for files you trust")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", parents=[common], help="the main job on RepLKNet-31B with random weights")
    p.add_argument("--model", default="replknet_31b", help="default replknet_31b")
    p.add_argument("--batch", type=int, default=None, help="default 1 on CPU, 16 on a GPU")
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's, 224)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", parents=[common], help="versions, toolkit, extension, which path each dtype takes")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("build", parents=[common], help="compile the CUDA extension ahead of time")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    p.set_defaults(func=cmd_build)

    sub.add_parser("bench", help="op and model timings on this GPU (lkpatch bench --help)", add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or "-v" in argv
    try:
        if argv and argv[0] == "bench":
            return _bench(argv[1:])
        parser = make_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        args.verbose = getattr(args, "verbose", False)
        if args.command == "demo" and args.batch is None:
            args.batch = 16 if _device(args.device) == "cuda" else 1
        return args.func(args)
    except KeyboardInterrupt:
        print("lkpatch: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse
        return e.code if isinstance(e.code, int) else 2
    except Exception as e:  # noqa: BLE001 - one line unless --verbose
        if verbose:
            traceback.print_exc()
        known = isinstance(e, (CLIError, CheckpointError)) or type(e).__name__ == "BuildError"
        lines = str(e).strip().splitlines() or [type(e).__name__]
        msg = " ".join(l.strip() for l in lines) if known else f"{type(e).__name__}: {lines[0]}"
        hint = "" if verbose or known else " (rerun with --verbose for the traceback)"
        print(f"lkpatch: error: {msg}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
