"""Helpers the examples share: model arguments, model creation, checkpoints, timing.

Not an example itself; ``train.py``, ``deploy.py`` and ``backbone.py`` import it (Python puts
the script's folder on ``sys.path``, so ``python examples/train.py`` and ``torchrun`` find it).
"""
from __future__ import annotations

import ast
import contextlib
import sys
import os
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from lkpatch.checkpoint import Interrupted, first_line  # Interrupted: a signal during a checkpoint write


class ExampleError(Exception):
    """A problem with the user's input, reported as one line (no traceback)."""


def parse_model_args(items: Optional[Iterable[str]]) -> Dict[str, object]:
    """``["layers=[1,1,1,1]", "drop_path_rate=0.1", "act=gelu"]`` -> keyword arguments (Python
    literals where they parse, else strings)."""
    out: Dict[str, object] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ExampleError(f"--model-arg expects KEY=VALUE (e.g. drop_path_rate=0.1), got '{item}'")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def create_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` (RepLKNet registered by ``import lkpatch``), random weights, with
    errors that name the fix."""
    import timm

    import lkpatch  # noqa: F401 - registers replknet_31b, replknet_31l, replknet_xl with timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:10]}*")[:6]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ExampleError(f"unknown model '{name}' (a timm model name){hint}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError, AssertionError) as e:
        # the model's own complaint about an argument; its first line names it
        raise ExampleError(f"cannot build '{name}' with {kwargs}: {type(e).__name__}: {first_line(e)}") from e


@contextlib.contextmanager
def checkpoint_writer(path: str, overwrite: bool = True):
    """lkpatch's safe writer for ``path`` (its folder made first): ``write`` puts the file in a
    temporary file beside it, ``commit`` renames it into place; a crash, an error or a signal
    before then leaves the previous file intact and nothing else. The mode follows the umask.
    Errors come out as ExampleError."""
    from lkpatch import checkpoint

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:  # SIGTERM (torchrun, SLURM) and SIGHUP too end the write through the writer's cleanup
        with checkpoint.signals_raise(), checkpoint.SafeWriter(path, overwrite=overwrite) as writer:
            yield writer
    except checkpoint.CheckpointError as e:
        raise ExampleError(str(e)) from None


def save_atomic(obj, path: str) -> None:
    """``obj`` written to ``path`` in one step through :func:`checkpoint_writer`."""
    with checkpoint_writer(path) as writer:
        writer.write(obj)
        writer.commit()


def load_checkpoint(path: str):
    """A checkpoint read tensors-only (no code from the file runs), through lkpatch's reader: the
    same errors as ``lkpatch convert`` for a missing, unreadable, corrupt or code-carrying file."""
    from lkpatch import checkpoint

    try:
        return checkpoint.load(path, how_to_allow="save its state_dict from torch.load(path, weights_only=False) "
                                                 "and pass that file")
    except checkpoint.CheckpointError as e:
        raise ExampleError(str(e)) from None


def load_strict(model: nn.Module, state_dict: Dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` whose error lists what does not match, briefly."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
              for k in state_dict if k in own and state_dict[k].shape != own[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if items:
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    if problems:
        raise ExampleError(f"the checkpoint does not match {what}: " + "; ".join(problems)
                           + ". Check --model and --model-arg")
    model.load_state_dict(state_dict, strict=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ExampleError("--device cuda: no CUDA GPU is visible here (use --device cpu)")
    return torch.device(name)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``--amp bf16|fp16``, a no-op for ``off``."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_extension(device: torch.device, quiet: bool = False) -> bool:
    """Build (or load from the cache) lkpatch's CUDA extension before anything is timed, so the
    one-off compile is not counted. Concurrent processes (DDP ranks) wait on the build's file
    lock and load what the first one built. False (with a warning) if it cannot be built: the
    converted layers then run PyTorch's convolution."""
    if device.type != "cuda":
        return False
    import lkpatch.build

    try:
        lkpatch.build.build(quiet=quiet)
        return True
    except Exception as e:  # noqa: BLE001 - any failure means PyTorch's kernels
        print(f"warning: lkpatch's CUDA extension is unavailable, converted layers run PyTorch's "
              f"convolution: {e}", flush=True)
        return False


def cpu_ratio_note(device: torch.device) -> str:
    """Said beside a PyTorch / lkpatch ratio: on the CPU both run PyTorch's convolution."""
    return " (on the CPU both run PyTorch's convolution: the ratio is noise)" if device.type == "cpu" else ""


def time_calls(fn: Callable[[], None], device: torch.device, warmup: int, reps: int) -> List[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then ``reps`` calls each timed alone
    (a host wait before and after each, so every sample is one whole call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def exact_fp32():
    """fp32 matmuls and convolutions without TF32, for equivalence checks."""
    from lkpatch import dispatch
    return dispatch.exact_fp32()


def run(main: Callable[[], int], script: str) -> None:
    """Exit with ``main()``'s status; an ExampleError as one line on stderr and status 1."""
    try:
        sys.exit(main())
    except ExampleError as e:
        print(f"{script}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Interrupted as e:  # a signal around a checkpoint write: the new file complete, or the old one intact
        print(f"{script}: interrupted by {e}; {interrupted_checkpoint(e)}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)


def interrupted_checkpoint(e: Interrupted, previous: str = "") -> str:
    """What a signal during a checkpoint write left: the new file, complete, if its commit was done,
    else the ``previous`` one (its name) as it was."""
    if e.written:
        return f"{e.written} was written in full first"
    return "the checkpoint being written was not kept" + (f", the previous {previous} is intact" if previous else "")
