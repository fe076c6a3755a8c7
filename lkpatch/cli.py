"""The ``lkpatch`` command: convert, demo, info, build, bench."""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import os
import platform
import re
import signal
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


_line = {"step_open": False}  # a step's 'what ...' line is waiting for its time


def _say(msg: str = "") -> None:
    if _line["step_open"]:  # a message from inside a step ends the step's line; its time follows on its own line
        print(flush=True)
        _line["step_open"] = False
    print(msg, flush=True)


@contextlib.contextmanager
def _step(what: str):
    """Progress for a step that may take a while: 'what ...' then its time."""
    print(f"{what} ...", end="", flush=True)
    _line["step_open"] = True
    t0 = time.perf_counter()

    def end(result: str) -> None:
        print(f" {result}" if _line["step_open"] else f"{what}: {result}", flush=True)
        _line["step_open"] = False

    try:
        yield
    except BaseException:
        end("failed")
        raise
    end(f"{time.perf_counter() - t0:.1f} s")


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
            if not re.fullmatch(r"[A-Za-z_][\w.:/-]*", value):  # a malformed literal, not a bare word
                raise CLIError(f"--model-arg {key}: '{value}' is neither a Python literal (a number, string, list, "
                               f"tuple, dict, True, False, None) nor a bare word") from None
            out[key] = value  # a bare string
    return out


def check_model_name(name: str) -> None:
    """CLIError unless ``name`` is a timm model (RepLKNet included) or ``torchvision:NAME``; builds nothing."""
    from . import models  # noqa: F401 - registers RepLKNet with timm

    if name.startswith("torchvision:"):
        import torchvision

        tv_name = name.split(":", 1)[1]
        if tv_name not in torchvision.models.list_models():
            raise CLIError(f"unknown torchvision model '{tv_name}' (see torchvision.models.list_models())")
        return
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:6]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise CLIError(f"unknown model '{name}' (a timm name, or torchvision:NAME){hint}")


def build_model(name: str, model_args: Dict[str, object]) -> nn.Module:
    """A timm model (RepLKNet included) or ``torchvision:NAME``, with random weights."""
    check_model_name(name)
    try:
        if name.startswith("torchvision:"):
            import torchvision

            return torchvision.models.get_model(name.split(":", 1)[1], weights=None, **model_args)
        import timm

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


def load_strict(model: nn.Module, sd: Dict[str, torch.Tensor], what: str, path: str = "PATH") -> None:
    from .deploy import _deploy_state_dict

    problem = ckpt_io.mismatch(model.state_dict(), sd)
    if problem:
        deploy = _deploy_state_dict(model)
        if deploy is not None and ckpt_io.mismatch(deploy, sd) is None:
            raise CLIError(f"the checkpoint holds {what}'s deploy structure (BatchNorms folded, as `lkpatch convert "
                           f"--reparam` writes it): it needs no converting; load it with "
                           f"lkpatch.load_checkpoint(model, '{path}'), which puts the model in that structure first")
        raise CLIError(f"the checkpoint does not match {what}: {problem}. Check --model (and --model-arg for "
                       f"non-default settings)")
    model.load_state_dict(sd, strict=True)


def _make_model(name: str, model_args: Dict[str, object], entry: ckpt_io.StateDictEntry,
                quiet: bool = False) -> nn.Module:
    """``name`` built for ``entry``'s state_dict: RepLKNet's deploy structure for its deploy keys,
    the checkpoint's class count, and a leading key component the model lacks moved to the prefix."""
    from .models import REPLKNET_CONFIGS

    if name in REPLKNET_CONFIGS and any(".lkb_reparam." in k for k in entry.state_dict):
        model_args = {"small_kernel_merged": True, **model_args}  # a deploy checkpoint
    model = build_model(name, model_args)
    if ckpt_io.fit_prefix(entry, model.state_dict()) and not quiet:
        _say(f"the keys carry a prefix the model lacks: '{entry.prefix}' (kept in the output)")
    classes = _classifier_mismatch(model, entry.state_dict)
    if classes is not None and "num_classes" not in model_args:
        if not quiet:
            _say(f"the checkpoint's classifier has {classes} classes; building {name} with num_classes={classes}")
        model = build_model(name, {**model_args, "num_classes": classes})
    return model


# ------------------------------------------------------------------------------------ equivalence

def _exact_fp32():
    """Compare in full fp32: TF32 off for the duration (it is on by default for convolutions)."""
    from . import dispatch
    return dispatch.exact_fp32()


def _outputs(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Every tensor in the model's output, nested lists, tuples and dicts included (a detector's
    list of dicts of boxes and scores)."""
    with torch.no_grad(), _exact_fp32():
        out = model(x)
    found: List[torch.Tensor] = []

    def walk(o) -> None:
        if isinstance(o, torch.Tensor):
            found.append(o.float())
        elif isinstance(o, (list, tuple)):
            for item in o:
                walk(item)
        elif isinstance(o, dict):
            for item in o.values():
                walk(item)

    walk(out)
    return found


def relative_error(ref: List[torch.Tensor], out: List[torch.Tensor]) -> float:
    """max |out - ref| over every output, relative to max(1, max |ref|) of the finite values; inf
    where the outputs differ in number, shape, or where (or which) values are not finite."""
    if len(ref) != len(out) or any(r.shape != o.shape for r, o in zip(ref, out)):
        return float("inf")
    err = 0.0
    for r, o in zip(ref, out):
        finite = torch.isfinite(r)
        if not torch.equal(finite, torch.isfinite(o)):
            return float("inf")
        if not finite.all():  # NaN / inf at the same places: the same there, and compare the rest
            if not torch.equal(r[~finite].nan_to_num(), o[~finite].nan_to_num()):
                return float("inf")
            r, o = r[finite], o[finite]
        if r.numel():
            err = max(err, (o - r).abs().max().item() / max(1.0, r.abs().max().item()))
    return err


def file_tolerance(sd: Dict[str, torch.Tensor], device: str) -> float:
    """The check's tolerance for a model whose weights are ``sd``'s values: the device's, or twice
    the machine epsilon of the least precise floating dtype stored (fp16 2e-3, bf16 1.6e-2), which
    leaves room for the rounding of merged (re-parameterized) weights to that dtype."""
    eps = [torch.finfo(v.dtype).eps for v in sd.values() if v.is_floating_point()]
    return max([TOLERANCE[device]] + [2 * e for e in eps])


def _check(label: str, ref, out, tolerance: float, path: str = "") -> float:
    if not any(r.numel() for r in ref):  # nothing to compare is no check
        raise CLIError(f"{label}: the original model's output holds no values on the check's random input, so "
                       "the conversion cannot be checked (a detector that finds nothing there: lower its score "
                       "threshold with --model-arg, e.g. box_score_thresh=0 for torchvision's); nothing written")
    err = relative_error(ref, out)
    ok = err <= tolerance
    where = f"; {path}" if path else ""
    _say(f"{label}: max relative error {err:.2e} ({'ok' if ok else 'FAILED'}, tolerance {tolerance:.1e}){where}")
    if not ok:
        raise CLIError(f"{label}: outputs differ by {err:.2e} (> {tolerance:.1e}); nothing written")
    return err


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA GPU is available here")
    return name


class _KernelUse:
    """Counts, during forwards, the converted layers whose forward ran lkpatch's CUDA kernel."""

    def __init__(self, model: nn.Module):
        from .modules import DepthwiseConv2d

        self.layers = [m for m in model.modules() if isinstance(m, DepthwiseConv2d)]
        self.kernel = self.calls = 0
        self.device = "cpu"

    def _hook(self, module, inputs):
        from . import dispatch
        from .modules import tf_same_padding

        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return
        self.calls += 1
        self.device = x.device.type
        try:  # the dispatch rule's own answer for this call's forward
            padding = (tf_same_padding(x.shape[-2:], module.weight.shape[-2:], module.stride, module.dilation)
                       if module.tf_same_padding else module.padding)
            pads = dispatch.op_padding(x, module.weight, module.bias, module.stride, padding, module.dilation)
            cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            if x.is_cuda and pads is not None and dispatch.use_kernel("forward", x.shape, module.weight.shape[2:],
                                                                      pads, x.dtype, cl):
                self.kernel += 1
        except Exception:  # noqa: BLE001 - a report only; the forward itself decides
            pass

    @contextlib.contextmanager
    def watch(self):
        handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def describe(self) -> str:
        if not self.layers:
            return "no converted layer"
        if self.device != "cuda":
            return "path: PyTorch's F.conv2d on the CPU (lkpatch's kernels need a CUDA GPU)"
        if self.kernel == self.calls:
            return f"path: lkpatch's CUDA kernels in all {self.calls} converted layers"
        return (f"path: lkpatch's CUDA kernels in {self.kernel} of {self.calls} converted layers, PyTorch's "
                f"convolution in the others (strides the kernels lack, shapes where PyTorch's is faster, or no "
                f"extension: see lkpatch info)")


def _checked_outputs(model: nn.Module, x: torch.Tensor):
    """The model's outputs, and which path its converted layers ran."""
    use = _KernelUse(model)
    with use.watch():
        out = _outputs(model, x)
    return out, use.describe()


# ------------------------------------------------------------------------------------ subcommands

def _default_output(path: Path, fmt: str = "torch") -> Path:
    """--reparam's output beside the checkpoint: its name with .deploy.pth or .deploy.safetensors."""
    suffix = ".deploy" + (".safetensors" if fmt == "safetensors" else ".pth")
    stem = path.name
    for _ in range(2):  # one extension, or two where the last is .tar (timm's model_best.pth.tar)
        base, dot, last = stem.rpartition(".")
        if not (dot and base):
            break
        stem = base
        if last.lower() != "tar":
            break
    return path.with_name(stem + suffix)


def _output_format(requested: Optional[str], out_path: Path, in_fmt: str) -> str:
    by_name = ckpt_io.format_for(str(out_path), default=None)
    if requested and by_name and requested != by_name:
        raise CLIError(f"--format {requested}, but '{out_path}' is named as a {by_name} file; rename it or drop --format")
    return requested or by_name or in_fmt


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@dataclasses.dataclass
class _Checked:
    """What the written file is compared with: the original checkpoint's model's outputs."""
    key: Optional[str]
    x: torch.Tensor
    ref: List[torch.Tensor]


def cmd_convert(args) -> int:
    with ckpt_io.signals_raise():
        return _convert(args)


def _convert(args) -> int:
    from .convert import conversion_report, convert_model

    # --- everything that can be checked before the (possibly long) work -----------------------
    src = Path(args.checkpoint)
    if not src.exists():
        raise CLIError(f"checkpoint '{src}' does not exist")
    if not src.is_file():
        raise CLIError(f"checkpoint '{src}' is not a file")
    if not args.model:
        raise CLIError("--model NAME is required (a timm name such as replknet_31b, or torchvision:NAME)")
    model_args = _parse_model_args(args.model_arg)
    check_model_name(args.model)
    device = _device(args.device)
    try:
        in_fmt = ckpt_io.file_format(str(src))
    except OSError as e:
        raise CLIError(f"cannot read the checkpoint: {ckpt_io.describe_os_error(e, str(src))}") from e
    writer = out_fmt = None
    if args.output or args.reparam:
        out_path = Path(args.output) if args.output else _default_output(src, args.format or in_fmt)
        out_fmt = _output_format(args.format, out_path, in_fmt)
        writer = ckpt_io.SafeWriter(str(out_path), overwrite=args.force, source=str(src))
    elif args.format:
        raise CLIError("--format sets the written file's format; nothing is written without -o OUT or --reparam")

    # --- the original checkpoint's model, converted (and re-parameterized) ---------------------
    with _step(f"loading '{src}'"):
        obj = ckpt_io.load(str(src), allow_pickled_code=args.unsafe_load_pickle_runs_code)
    entries = ckpt_io.state_dicts(obj)
    for entry in entries:
        if entry.from_module:
            where = f" under '{entry.key}'" if entry.key else ""
            _say(f"'{src}' holds a pickled model{where}; the output holds its state_dict (loads with weights_only=True)")
    if out_fmt == "safetensors" and (len(entries) > 1 or entries[0].key is not None):
        others = [str(k) for k in obj if k != entries[0].key] if isinstance(obj, dict) else []
        _say(f"safetensors holds one state_dict of tensors: writing '{entries[0].key}'"
             + (f"; not written: {', '.join(others)}" if others else ""))
        entries = entries[:1]

    checked: List[_Checked] = []
    for index, entry in enumerate(entries):
        where = f"'{entry.key}'" if entry.key else "the state_dict"
        prefix = f" ({entry.prefix!r} prefix)" if entry.prefix else ""
        with _step(f"building {args.model} for {where}{prefix}"):
            model = _make_model(args.model, model_args, entry)
            load_strict(model, entry.state_dict, args.model, str(src))
            model.eval().to(device)
        size = _input_size(model, args.input_size)
        chans = int(model_args.get("in_chans", model_args.get("in_channels", 3)))
        x = torch.randn(args.batch, chans, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        with _step(f"original model's forward ({args.batch}x{chans}x{size}x{size}, {device})"):
            try:
                ref = _outputs(model, x)
            except RuntimeError as e:  # the model's own complaint about the check's input
                raise CLIError(f"{args.model} does not run on the check's {args.batch}x{chans}x{size}x{size} input "
                               f"({ckpt_io.first_line(e)}); give --input-size a size the model takes") from e
        convert_model(model)
        if index == 0:
            _say(conversion_report(model).table())
        out, path = _checked_outputs(model, x)
        _check(f"converted {where} vs original", ref, out, TOLERANCE[device], path)
        if args.reparam:
            from .deploy import to_deploy_structure

            with _step("re-parameterizing"):
                done = to_deploy_structure(model)
            if done is None:
                raise CLIError(f"--reparam: {args.model} has nothing to re-parameterize (no BatchNorm follows a "
                               f"depthwise convolution, and no structural re-parameterization is left: a deploy "
                               f"checkpoint has none); nothing written. "
                               f"Without --reparam the converted model loads the checkpoint as it is")
            _say(done)
            out, path = _checked_outputs(model, x)
            _check(f"re-parameterized {where} vs original", ref, out, TOLERANCE[device], path)
        new_sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        entry.state_dict = _keep_dtypes(entry.state_dict, new_sd)
        checked.append(_Checked(entry.key, x, ref))
        del model

    if writer is None:
        _say("the weights are unchanged by design: a converted model loads the original checkpoint as it is, so "
             "nothing was written (-o OUT writes a copy; --reparam writes the deploy structure)")
        return 0

    # --- write, then check the written bytes before putting the file in place -----------------
    result = ckpt_io.replace_state_dicts(obj, entries)
    metadata = None
    if out_fmt == "safetensors":
        result = ckpt_io.restored(entries[0])
        metadata = (ckpt_io.safetensors_metadata(str(src)) if in_fmt == "safetensors" else None) or {"format": "pt"}
    with writer:
        with _step(f"writing '{out_path}' ({out_fmt})"):
            tmp = writer.write(result, out_fmt, metadata)
        _check_written(tmp, args, model_args, checked, device)
        writer.commit()
    if args.reparam and isinstance(result, dict) and "optimizer" in result:
        _say("note: the optimizer state refers to the training structure; it is kept as it was")
    _say(f"wrote {out_path}")
    if args.reparam:
        _say(f"load it with: lkpatch.load_checkpoint(model, '{out_path}')  (model built as for training; it is put "
             f"in eval mode and the deploy structure first)")
    return 0


def _check_written(tmp: str, args, model_args, checked: List[_Checked], device: str) -> None:
    """A fresh model built from the written file (its stored dtypes, through lkpatch.load_checkpoint),
    converted, against the original checkpoint's model on the same input."""
    from .convert import convert_model
    from .deploy import load_checkpoint

    written = ckpt_io.state_dicts(ckpt_io.load(tmp, allow_pickled_code=args.unsafe_load_pickle_runs_code))
    for item in checked:
        entry = next((e for e in written if e.key == item.key), None) if len(written) > 1 else written[0]
        where = f"'{item.key}'" if item.key else "the state_dict"
        if entry is None:
            raise CLIError(f"the written file lacks {where}; nothing written")
        with _step(f"loading {where} from the written file into a fresh {args.model}"):
            model = _make_model(args.model, model_args, entry, quiet=True)
            try:
                load_checkpoint(model, ckpt_io.restored(entry))
            except ValueError as e:
                raise CLIError(f"the written file does not load into a fresh {args.model}: {e}; nothing written") from e
            convert_model(model.eval()).to(device)
        out, path = _checked_outputs(model, item.x)
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in entry.state_dict.values() if v.is_floating_point()})
        _check(f"written file ({'/'.join(dtypes) or 'no float'} weights) vs original", item.ref, out,
               file_tolerance(entry.state_dict, device), path)
        del model


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
    with _step(f"[2/5] PyTorch forward, {args.batch}x3x{size}x{size} on {device}"):
        ref = _outputs(model, x)
    with _step("[3/5] convert_model"):
        convert_model(model)
    _say(conversion_report(model).table())
    out, path = _checked_outputs(model, x)
    _check("converted model vs PyTorch", ref, out, TOLERANCE[device], path)
    with tempfile.TemporaryDirectory(prefix="lkpatch-demo-") as tmp:
        path = os.path.join(tmp, f"{args.model}.pth")
        with _step(f"[4/5] saving the converted model's state_dict to {path} and loading it into a fresh model"):
            ckpt_io.save_atomic({"model": model.state_dict()}, path)
            loaded = ckpt_io.state_dicts(ckpt_io.load(path))[0].state_dict
            load_strict(reference_model, loaded, args.model)
            reference_model.to(device)
        _check("reloaded checkpoint (unconverted model) vs converted", ref, _outputs(reference_model, x),
               TOLERANCE[device])
    if device == "cuda":
        _say(f"[5/5] training steps (batch {args.batch}, {size} px, SGD), PyTorch vs converted:")
        _demo_timing(reference_model, model, args.batch, size)
    else:
        _say("[5/5] no CUDA GPU here: the converted model ran PyTorch's convolution; timings need a GPU")
    _say("demo finished: same weights, same outputs")
    return 0


def _demo_timing(original: nn.Module, converted: nn.Module, batch: int, size: int) -> None:
    """Training steps (SGD) of both models on random data; they train, so time on copies."""
    from .bench import time_train_steps

    for amp in ("float32", "bfloat16"):
        models = {"pytorch": copy.deepcopy(original), "lkpatch": copy.deepcopy(converted)}
        r = time_train_steps(models, batch, size, amp, steps=5, warmup=2, queue=0)
        label = "bf16 autocast" if amp == "bfloat16" else "fp32"
        _say(f"  {label:13s}: PyTorch {r['pytorch_img_per_s']:7.1f} img/s, lkpatch {r['lkpatch_img_per_s']:7.1f} img/s "
             f"({r['lkpatch_img_per_s'] / r['pytorch_img_per_s']:.2f}x)")
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
    if impl == "pytorch":
        return "PyTorch F.conv2d (LKPATCH_IMPL=pytorch)"
    where = "lkpatch kernel" + (" (forced)" if impl == "kernel" else " where faster, per pass (stride 1, dilation 1)")
    if dtype == torch.float32:
        arith = ("TF32 tensor cores where the kernels' plan takes it (PyTorch allows TF32 convolutions), else exact fp32"
                 if dispatch.tf32_pass(dtype) else "exact fp32 (CUDA cores)")
    elif not dispatch._tensor_cores_off():
        arith = "tensor cores (any batch, NCHW or channels_last), fp32 accumulation"
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
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lkpatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("convert", parents=[common], help="check a checkpoint on the converted model; write the deploy structure",
                       description="Load CKPT into MODEL strictly, convert it, check that outputs match. With --reparam "
                                   "or -o, write OUT, read it back into a fresh model and check that too before "
                                   "putting it in place.")
    p.add_argument("checkpoint", metavar="CKPT",
                   help="a PyTorch or safetensors file: a state_dict, or a dict holding one (model, state_dict, ...)")
    p.add_argument("--model", "-m", metavar="NAME", help="timm model name (replknet_31b, ...) or torchvision:NAME")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="write OUT (default with --reparam: CKPT with .deploy.pth or .deploy.safetensors; without "
                        "--reparam nothing is written unless OUT is given)")
    p.add_argument("--format", choices=ckpt_io.FORMATS,
                   help="OUT's format (default: from OUT's extension, else CKPT's format)")
    p.add_argument("--reparam", action="store_true",
                   help="write the deploy structure: RepLKNet's structural re-parameterization, else BN folded into "
                        "the depthwise conv before it")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists (it keeps its file mode)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="model constructor argument (repeatable)")
    p.add_argument("--input-size", type=_positive_int, help="image size of the check's random input (default: the model's)")
    p.add_argument("--batch", type=_positive_int, default=2, help="batch of the check's random input (default 2)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                   help="where the check runs (default auto: the GPU where there is one, so lkpatch's kernels run)")
    p.add_argument("--unsafe-load-pickle-runs-code", action="store_true",
                   help="allow a checkpoint holding pickled Python objects (a whole model): loading it RUNS CODE "
                        "FROM THE FILE; only for files you trust")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", parents=[common], help="the main job on RepLKNet-31B with random weights")
    p.add_argument("--model", default="replknet_31b", help="default replknet_31b")
    p.add_argument("--batch", type=_positive_int, default=None, help="default 1 on CPU, 16 on a GPU")
    p.add_argument("--size", type=_positive_int, default=None, help="image size (default: the model's, 224)")
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
        command = [a for a in argv if a not in ("--verbose", "-v")]
        if command and command[0] == "bench":  # its own parser; lkpatch's --verbose before it is dropped
            return _bench(command[1:])
        parser = make_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        args.verbose = getattr(args, "verbose", False)
        if args.command == "demo" and args.batch is None:
            args.batch = 16 if _device(args.device) == "cuda" else 1
        return args.func(args)
    except ckpt_io.Interrupted as e:  # a written file is in place only once it was checked
        done = f" after writing '{e.written}' (complete and checked)" if e.written else "; nothing written"
        print(f"lkpatch: interrupted by {signal.Signals(e.signum).name}{done}", file=sys.stderr)
        return 128 + e.signum
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
