"""``lkpatch bench``: lkpatch's kernels against PyTorch's, timed in the same run.

Op mode (default): per shape, milliseconds of the forward and of forward + backward (input,
weight and bias gradients) for PyTorch (``F.conv2d``) and lkpatch (kernels forced on), their
ratio, and the fraction of the fp32 floor -- the multiply-adds whose taps land inside the input,
over the fp32 rate measured on this GPU with a large SGEMM. ``--passes`` adds each pass alone,
the numbers behind ``dispatch``'s rule. Model mode (``--model NAME``): training-step images/s of
a timm model, unconverted and converted, each step timed alone and steps queued back to back.
Timing: CUDA events, warm-up, median of repeats queued back to back, inputs rotated so that
small ones do not sit in L2. "GPU PT / GPU lk": forward +
backward captured in a CUDA graph and replayed, the GPU's time without the host's (which bounds
small layers timed alone).
``--plot FILE.png`` draws PyTorch against lkpatch per layer and per model (matplotlib:
``pip install 'lkpatch[plot]'``); with ``--from RESULTS.json ...`` it re-plots saved ``--json``
results, no GPU needed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import checkpoint

# The default rows: RepLKNet-31B's stages, ConvNeXt-T's first stage, and a 64x64 map.
DEFAULT_SHAPES = [
    (64, 384, 64, 64, 31, 31), (64, 384, 64, 64, 7, 7), (64, 128, 56, 56, 31, 31), (64, 256, 28, 28, 29, 29),
    (64, 512, 14, 14, 27, 27), (64, 1024, 7, 7, 13, 13), (64, 96, 56, 56, 7, 7),
]
DTYPES = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def time_ms(fn: Callable[[int], None], n_inputs: int = 1, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of ``fn(i)`` (i cycles over the input sets), timed with CUDA events.

    The repeats are queued back to back, as a training loop queues its layers: the host's time
    per call shows only where it exceeds the GPU's (a host wait after each call would add the
    launch latency to every sample).
    """
    for i in range(warmup):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(i % n_inputs)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def graph_time_ms(fn: Callable[[int], None], reps: int = 20) -> Optional[float]:
    """Median milliseconds of replaying ``fn(0)`` captured in a CUDA graph: the GPU's time alone,
    as a layer inside a busy network (or under ``torch.compile(mode="reduce-overhead")``) costs.
    None where the capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn(0)
    except RuntimeError:
        return None
    return time_ms(lambda i: graph.replay(), reps=reps)


def measured_fp32_tflops() -> float:
    """fp32 rate of this GPU: a large SGEMM with TF32 off."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(8192, 8192, device="cuda")
        b = torch.randn(8192, 8192, device="cuda")
        ms = time_ms(lambda i: torch.mm(a, b), warmup=2, reps=5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2 * 8192**3 / ms / 1e9


def bench_shape(shape, dtype, channels_last: bool, reps: int, passes: bool) -> Dict:
    from . import _pytorch, dispatch
    from .functional import depthwise_conv2d

    n, c, h, w, kh, kw = shape
    pads = dispatch.explicit_padding("same", (kh, kw))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    elem = torch.tensor([], dtype=dtype).element_size()
    n_inputs = max(1, min(4, (256 << 20) // max(1, n * c * h * w * elem)))
    xs = [torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
          for _ in range(n_inputs)]
    wt = (torch.randn(c, 1, kh, kw, device="cuda", dtype=dtype) / (kh * kw) ** 0.5).requires_grad_()
    b = torch.randn(c, device="cuda", dtype=dtype).requires_grad_()
    g = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)

    def pytorch(i):  # what an unconverted nn.Conv2d runs
        return _pytorch.forward(xs[i], wt, b, pads)

    def ours(i):  # what a converted layer runs (kernels forced on by `timed`)
        return depthwise_conv2d(xs[i], wt, b, padding=pads)

    def fwd(f):
        def run(i):
            with torch.no_grad():
                f(i)
        return run

    def fwd_bwd(f):  # the three gradients, nothing accumulated into .grad
        def run(i):
            torch.autograd.grad(f(i), (xs[i], wt, b), g)
        return run

    def timed(run, f):  # lkpatch's forward and backward both with its kernels forced on
        if f is pytorch:
            return run
        def forced(i):
            with dispatch.force("kernel"):
                run(i)
        return forced

    row = {"shape": [n, c, h, w, kh, kw], "dtype": str(dtype).replace("torch.", ""),
           "layout": "channels_last" if channels_last else "nchw",
           "effective_gflop_fwd_bwd": 3 * 2 * dispatch.effective_macs((n, c, h, w), (kh, kw), pads) / 1e9,
           "plan": {p: _plan_text(dispatch.plan(p, (n, c, h, w), (kh, kw), pads, dtype, channels_last))
                    for p in dispatch.CONV_PASSES}}
    for key, f in (("pytorch", pytorch), ("lkpatch", ours)):
        row[f"{key}_fwd_ms"] = time_ms(timed(fwd(f), f), n_inputs, reps=reps)
    for key, f in (("pytorch", pytorch), ("lkpatch", ours)):
        row[f"{key}_fwd_bwd_ms"] = time_ms(timed(fwd_bwd(f), f), n_inputs, reps=reps)
    for key, f in (("pytorch", pytorch), ("lkpatch", ours)):
        row[f"{key}_fwd_bwd_gpu_ms"] = graph_time_ms(timed(fwd_bwd(f), f), reps)
    if passes:
        x0 = xs[0].detach()
        with dispatch.force("kernel"):
            row["lkpatch_input_grad_ms"] = time_ms(
                lambda i: torch.ops.lkpatch.dwconv2d_input_grad(g, wt.detach(), (h, w), pads), reps=reps)
            row["lkpatch_weight_grad_ms"] = time_ms(
                lambda i: torch.ops.lkpatch.dwconv2d_weight_grad(g, x0, (kh, kw), pads), reps=reps)
            row["lkpatch_bias_grad_ms"] = time_ms(lambda i: torch.ops.lkpatch.dwconv2d_bias_grad(g), reps=reps)
        row["pytorch_input_grad_ms"] = time_ms(
            lambda i: _pytorch.backward_input(g, wt.detach(), (h, w), pads), reps=reps)
        row["pytorch_weight_grad_ms"] = time_ms(
            lambda i: _pytorch.backward_weight(g, x0, (kh, kw), pads), reps=reps)
        row["pytorch_bias_grad_ms"] = time_ms(lambda i: _pytorch.backward_bias(g), reps=reps)
    return row


def _plan_text(plan) -> str:
    """A pass's kernel family, with "/nchw" where its kernels read NCHW only (a channels_last
    layer's pass then goes through layout copies): "tc_rows", "fma", "tc_images/nchw"."""
    return plan.family + ("" if plan.nhwc or plan.family == "none" else "/nchw")


def bench_model(name: str, batch: int, size: int, amp: str, channels_last: bool, steps: int, queue: int = 3,
                compiled: bool = False) -> Dict:
    """Training steps (forward, loss, backward, SGD) per second, unconverted vs converted: each
    step alone, and ``queue`` steps queued back to back (:func:`time_train_steps`). ``compiled``:
    also the converted model under ``torch.compile`` (keys ``lkpatch_compiled_*``)."""
    import timm

    from . import convert_model

    base = timm.create_model(name, num_classes=1000).cuda().train()
    out = {"model": name, "batch": batch, "size": size, "amp": amp, "queue": queue,
           "layout": "channels_last" if channels_last else "nchw"}
    models = {"pytorch": base, "lkpatch": convert_model(copy.deepcopy(base))}
    if compiled:
        models["lkpatch_compiled"] = torch.compile(models["lkpatch"])
    out.update(time_train_steps(models, batch, size, amp, channels_last, steps, queue=queue))
    return out


def queued_ms(fn: Callable[[], None], n: int) -> float:
    """Milliseconds per call of ``fn`` with ``n`` calls queued back to back after one that fills
    the queue: a training loop's steady state, where the host queues a step while the GPU runs
    the one before (CUDA events; one host wait at the end, plus any that ``fn`` itself makes)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def time_train_steps(models: Dict[str, torch.nn.Module], batch: int, size: int, amp: str, channels_last: bool = False,
                     steps: int = 10, warmup: int = 3, queue: int = 3) -> Dict[str, float]:
    """``{key}_step_ms`` and ``{key}_img_per_s`` of an SGD training step for each model (CUDA):
    the median of ``steps`` steps each timed alone (the GPU idle when it starts, the host waiting
    for it at the end); and ``{key}_queued_step_ms`` / ``{key}_queued_img_per_s``: the median of
    ``steps`` samples of ``queue`` steps queued back to back (:func:`queued_ms`), as a training
    loop without a host wait per step runs them (0: not timed). Under float16 the GradScaler
    reads its inf check on the host every step, as it does in training, so there queued steps
    still wait once a step.

    The models' samples alternate, so clock and thermal drift during the run affects them alike.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=fmt)
    step_fns = {}
    for key, model in models.items():
        model = model.to(memory_format=fmt).train()
        y = torch.randint(0, getattr(model, "num_classes", None) or 1000, (batch,), device="cuda")
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == "float16")

        def step(model=model, opt=opt, scaler=scaler, y=y):
            with torch.autocast("cuda", dtype=DTYPES.get(amp, torch.float32), enabled=amp != "float32"):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        step_fns[key] = step
        for _ in range(warmup):
            step()
    samples = {(key, kind): [] for key in step_fns for kind in ("", "queued_")}
    for _ in range(steps):
        for key, step in step_fns.items():
            samples[key, ""].append(time_ms(lambda i: step(), warmup=0, reps=1))
            if queue:
                samples[key, "queued_"].append(queued_ms(step, queue))
    out = {}
    for (key, kind), times in samples.items():
        if times:
            out[f"{key}_{kind}step_ms"] = statistics.median(times)
            out[f"{key}_{kind}img_per_s"] = batch / out[f"{key}_{kind}step_ms"] * 1e3
    return out


def sweep_shapes(n: int = 32, c: int = 256) -> List[tuple]:
    """The grid behind dispatch's rule: square maps x square and band kernels."""
    shapes = []
    for h in (7, 14, 28, 56, 112):
        for k in (3, 5, 7, 9, 13, 17, 21, 27, 31, 51):
            if k <= 2 * h + 1 and (h < 112 or k <= 31):
                shapes.append((n, c, h, h, k, k))
        for k in (7, 11, 31, 51):
            shapes += [(n, c, h, h, 1, k), (n, c, h, h, k, 1)]
    return shapes


def _shape(text: str):
    parts = [int(v) for v in text.replace("x", ",").split(",")]
    if len(parts) == 5:
        parts.append(parts[4])
    if len(parts) != 6:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected N,C,H,W,K or N,C,H,W,KH,KW")
    return tuple(parts)


def format_table(rows: List[Dict], peak_tflops: float) -> str:
    head = ["N x C x H x W, kernel", "dtype", "layout", "fwd PT", "fwd lk", "fwd+bwd PT", "fwd+bwd lk", "speed-up",
            "% fp32 floor", "GPU PT", "GPU lk"]
    lines = [head]
    for r in rows:
        n, c, h, w, kh, kw = r["shape"]
        floor_ms = r["effective_gflop_fwd_bwd"] / peak_tflops
        lines.append([f"{n}x{c}x{h}x{w}, {kh}x{kw}", r["dtype"], r["layout"], f"{r['pytorch_fwd_ms']:.3f}",
                      f"{r['lkpatch_fwd_ms']:.3f}", f"{r['pytorch_fwd_bwd_ms']:.3f}", f"{r['lkpatch_fwd_bwd_ms']:.3f}",
                      f"{r['pytorch_fwd_bwd_ms'] / r['lkpatch_fwd_bwd_ms']:.2f}x",
                      f"{100 * floor_ms / r['lkpatch_fwd_bwd_ms']:.0f}%",
                      _ms(r.get("pytorch_fwd_bwd_gpu_ms")), _ms(r.get("lkpatch_fwd_bwd_gpu_ms"))])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(v.rjust(wd) for v, wd in zip(row, widths)) for row in lines]
    text.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(text)


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_passes(rows: List[Dict]) -> str:
    out = ["per pass, ms (PyTorch / lkpatch):"]
    for r in rows:
        if "lkpatch_weight_grad_ms" not in r:
            continue
        n, c, h, w, kh, kw = r["shape"]
        cells = [f"{p} {r[f'pytorch_{p}_ms']:.3f}/{r[f'lkpatch_{p}_ms']:.3f}"
                 for p in ("fwd", "input_grad", "weight_grad", "bias_grad")]
        out.append(f"  {n}x{c}x{h}x{w} {kh}x{kw} {r['dtype']} {r['layout']}: " + ", ".join(cells))
    return "\n".join(out)


# --- plots of the results -----------------------------------------------------------------------

PYTORCH = "pytorch"  # the prefix of PyTorch's results in the JSON (lkpatch's: "lkpatch")


def result_key(side: str, metric: str) -> str:
    """The JSON key of one side's result: ``result_key("pytorch", "fwd_bwd_ms")``; side is
    ``"pytorch"`` or ``"lkpatch"``."""
    return f"{PYTORCH if side == 'pytorch' else side}_{metric}"


def _git_commit() -> Optional[str]:
    """The commit of the lkpatch checkout being run (``+dirty`` with local changes), or None
    for an installed copy."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(repo, ".git")):
        return None
    try:
        out = subprocess.run(["git", "-C", repo, "describe", "--always", "--dirty=+dirty", "--abbrev=7"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


class PlotError(RuntimeError):
    """The plot cannot be drawn; the message says why."""


def load_results(paths: Sequence[str]) -> Dict:
    """Several ``lkpatch bench --json`` files as one result: their op rows and model rows in
    order, and each distinct device / torch / commit stamp."""
    merged = {"rows": [], "models": [], "stamps": []}
    for path in paths:
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError) as e:
            raise PlotError(f"cannot read {path}: {e}") from e
        if not isinstance(data, dict) or not (data.get("rows") or data.get("models")):
            raise PlotError(f"{path} holds no `lkpatch bench --json` results (no rows or models)")
        merged["rows"] += data.get("rows") or []
        merged["models"] += data.get("models") or []
        stamp = _stamp(data)
        if stamp not in merged["stamps"]:
            merged["stamps"].append(stamp)
    return merged


def _stamp(result: Dict) -> str:
    parts = [result.get("device") or "unknown GPU", f"torch {result.get('torch') or '?'}"]
    if result.get("commit"):
        parts.append(f"lkpatch {result['commit']}")
    return ", ".join(parts)


def _layer_label(row: Dict) -> str:
    n, c, h, w, kh, kw = row["shape"]
    layout = " channels_last" if row.get("layout") == "channels_last" else ""
    return f"{n}×{c}×{h}×{w}, {kh}×{kw}  {row.get('dtype', '')}{layout}"


def _model_label(model: Dict) -> str:
    layout = " channels_last" if model.get("layout") == "channels_last" else ""
    return f"{model['model']}  {model.get('amp', '')}{layout}, batch {model.get('batch', '?')}"


def plot_results(result: Dict, path: str) -> str:
    """Draw ``result`` (``lkpatch bench``'s JSON, or :func:`load_results` of several) into the
    image file ``path``: per layer, PyTorch's and lkpatch's forward + backward time (ms, log
    scale) with lkpatch's speed-up; per model, training images/s of each (steps alone, and
    queued where timed). Returns the file's name (``.png`` added where ``path`` has no extension)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotError("plotting needs matplotlib: pip install 'lkpatch[plot]'") from e

    rows = [r for r in result.get("rows") or [] if result_key("lkpatch", "fwd_bwd_ms") in r]
    models = [m for m in result.get("models") or [] if result_key("lkpatch", "img_per_s") in m]
    if not rows and not models:
        raise PlotError("nothing to plot: the results hold no op rows and no model rows")
    colors = {"pytorch": "#8c8c8c", "lkpatch": "#d62728"}
    row_inches = 0.5 if len(rows) <= 30 else 0.22  # a --sweep has hundreds of rows
    heights = [0.9 + row_inches * len(rows)] * bool(rows) + [0.9 + 0.6 * len(models)] * bool(models)
    fig = Figure(figsize=(12, 1.0 + sum(heights)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(heights), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    stamps = result.get("stamps") or [_stamp(result)]
    fig.suptitle("lkpatch bench: " + "; ".join(stamps), fontsize=10)

    if rows:
        ax = axes[0]
        y = list(range(len(rows)))
        pt = [r[result_key("pytorch", "fwd_bwd_ms")] for r in rows]
        lk = [r[result_key("lkpatch", "fwd_bwd_ms")] for r in rows]
        ax.barh([v - 0.2 for v in y], pt, height=0.38, color=colors["pytorch"], label="PyTorch (F.conv2d)")
        ax.barh([v + 0.2 for v in y], lk, height=0.38, color=colors["lkpatch"], label="lkpatch")
        for v, a, b in zip(y, pt, lk):
            ax.annotate(f"{a / b:.1f}×", (max(a, b), v), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(right=max(pt + lk) * 3)
        ax.set_yticks(y)
        ax.set_yticklabels([_layer_label(r) for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("forward + backward, ms (log scale; lower is faster)")
        ax.set_title("per layer", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    if models:
        ax = axes[-1]
        queued = any(result_key("lkpatch", "queued_img_per_s") in m for m in models)
        kinds = [("", "steps alone")] + [("queued_", "steps queued")] * queued
        width = 0.8 / (2 * len(kinds))
        y = list(range(len(models)))
        i = 0
        for kind, what in kinds:
            for side, name in (("pytorch", "PyTorch"), ("lkpatch", "lkpatch")):
                vals = [m.get(result_key(side, f"{kind}img_per_s"), 0.0) for m in models]
                pos = [v - 0.4 + width * (i + 0.5) for v in y]
                ax.barh(pos, vals, height=width * 0.95, color=colors[side], alpha=1.0 if not kind else 0.55,
                        hatch="//" if kind else None, label=f"{name}, {what}")
                if side == "lkpatch":
                    for p, m, v in zip(pos, models, vals):
                        base = m.get(result_key("pytorch", f"{kind}img_per_s"))
                        if base and v:
                            ax.annotate(f"{v / base:.2f}×", (v, p), xytext=(4, 0), textcoords="offset points",
                                        va="center", fontsize=8)
                i += 1
        ax.set_yticks(y)
        ax.set_yticklabels([_model_label(m) for m in models], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(right=max(m.get(result_key(side, f"{kind}img_per_s"), 0.0) for m in models
                              for side in ("pytorch", "lkpatch") for kind, _ in kinds) * 1.15)
        ax.set_xlabel("training images / s (higher is faster)")
        ax.set_title("per model (training step)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    fig.tight_layout()
    path = _plot_path(path)
    _write_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format=os.path.splitext(path)[1][1:]))
    return path


def _plot_path(path: str) -> str:
    """The file --plot writes: a name without an extension gets .png, as matplotlib gives it."""
    return path if os.path.splitext(path)[1] else path + ".png"


def _write_file(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path`` that then replaces it: never a
    half-written file."""
    with checkpoint.SafeWriter(path, overwrite=True) as writer:
        write(writer.tmp)
        writer.commit()


def _write_json(result: Dict, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)

    _write_file(path, write)


def _plot(result: Dict, path: str, source: str) -> int:
    """plot_results with its failures as one line: exit status 0 or 1."""
    try:
        written = plot_results(result, path)
    except PlotError as e:
        print(f"lkpatch: error: {e}", file=sys.stderr)
        return 1
    except checkpoint.CheckpointError as e:  # the image's file: its folder, its permissions
        print(f"lkpatch: error: cannot plot {source} into {path}: {e}", file=sys.stderr)
        return 1
    except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError, OSError) as e:
        # rows that are not lkpatch bench's, or a path the image cannot be written to
        print(f"lkpatch: error: cannot plot {source} into {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lkpatch bench", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=_shape, help="N,C,H,W,K or N,C,H,W,KH,KW (default: RepLKNet and ConvNeXt layers)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32"])
    parser.add_argument("--channels-last", action="store_true", help="also time channels_last inputs")
    parser.add_argument("--passes", action="store_true", help="also time each backward pass alone")
    parser.add_argument("--sweep", action="store_true", help="time every pass on the grid behind dispatch's rule")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--model", help="model mode: a timm model name (e.g. replknet_31b)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--amp", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--compile", action="store_true",
                        help="model mode: also time the converted model under torch.compile")
    parser.add_argument("--queue", type=int, default=3,
                        help="model mode: steps queued back to back per queued sample (0: each step alone only)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw PyTorch vs lkpatch per layer and per model into this image (needs matplotlib)")
    parser.add_argument("--from", dest="from_json", nargs="+", metavar="RESULTS.json",
                        help="with --plot: plot these saved --json results instead of timing (no GPU needed)")
    args = parser.parse_args(argv)
    if args.from_json:
        if not args.plot:
            parser.error("--from needs --plot FILE.png")
        try:
            result = load_results(args.from_json)
        except PlotError as e:
            print(f"lkpatch: error: {e}", file=sys.stderr)
            return 1
        return _plot(result, args.plot, ", ".join(args.from_json))
    if args.plot:
        try:
            import matplotlib  # noqa: F401  -- before the timings, not after
        except ImportError:
            print("lkpatch: error: plotting needs matplotlib: pip install 'lkpatch[plot]'", file=sys.stderr)
            return 1
    try:  # where the results go, checked before the timings rather than after them
        for path in ([args.json] if args.json else []) + ([_plot_path(args.plot)] if args.plot else []):
            checkpoint.check_output_path(path, overwrite=True)
    except checkpoint.CheckpointError as e:
        print(f"lkpatch: error: {e}", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("lkpatch: error: bench needs a CUDA GPU", file=sys.stderr)
        return 1
    from . import build, dispatch

    build.build()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "commit": _git_commit()}
    if args.model:
        for layout in ([False, True] if args.channels_last else [False]):
            r = bench_model(args.model, args.batch, args.size, args.amp, layout, args.reps, max(0, args.queue),
                            args.compile)
            result.setdefault("models", []).append(r)
            line = (f"{r['model']} batch {r['batch']} {r['size']}px {r['amp']} {r['layout']}: PyTorch "
                    f"{r['pytorch_img_per_s']:.0f} img/s, lkpatch {r['lkpatch_img_per_s']:.0f} img/s "
                    f"({r['lkpatch_img_per_s'] / r['pytorch_img_per_s']:.2f}x)")
            if "lkpatch_compiled_img_per_s" in r:
                line += (f", compiled {r['lkpatch_compiled_img_per_s']:.0f} img/s "
                         f"({r['lkpatch_compiled_img_per_s'] / r['pytorch_img_per_s']:.2f}x)")
            if r["queue"]:
                line += (f"; steps queued {r['queue']} at a time: PyTorch {r['pytorch_queued_img_per_s']:.0f} img/s, "
                         f"lkpatch {r['lkpatch_queued_img_per_s']:.0f} img/s "
                         f"({r['lkpatch_queued_img_per_s'] / r['pytorch_queued_img_per_s']:.2f}x)")
                if "lkpatch_compiled_queued_img_per_s" in r:
                    line += f", compiled {r['lkpatch_compiled_queued_img_per_s']:.0f} img/s"
            print(line)
    else:
        peak = measured_fp32_tflops()
        result["fp32_tflops_sgemm"] = peak
        rows = []
        for dtype in args.dtype:
            for layout in ([False, True] if args.channels_last else [False]):
                for shape in args.shapes or (sweep_shapes() if args.sweep else DEFAULT_SHAPES):
                    if max(shape[4:]) > dispatch.MAX_KERNEL_SIZE:
                        continue
                    with dispatch.conv_tf32(dtype == "tf32"):  # "float32" rows: exact, both sides
                        rows.append(bench_shape(shape, DTYPES[dtype], layout, args.reps, args.passes or args.sweep))
                    rows[-1]["dtype"] = dtype
                    torch.cuda.empty_cache()
        result["rows"] = rows
        print(f"{result['device']}, torch {result['torch']}; fp32 SGEMM {peak:.1f} TFLOP/s; times in ms, median "
              f"of {args.reps}; PT = F.conv2d, lk = lkpatch kernels")
        print(format_table(rows, peak))
        if args.passes or args.sweep:
            print(format_passes(rows))
    if args.json:
        try:
            _write_json(result, args.json)
        except checkpoint.CheckpointError as e:
            print(f"lkpatch: error: {e}", file=sys.stderr)
            return 1
    if args.plot:
        return _plot(result, args.plot, "the results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
