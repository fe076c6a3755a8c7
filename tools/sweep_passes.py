"""Per-pass GPU times of lkpatch's kernels and PyTorch's, on named layers and random ones: the
data behind the speed rule's model (``lkpatch.dispatch.COST``) and the check of its decisions.

    python tools/sweep_passes.py --random 150 --seed 0 --json sweep.json

Each pass (forward, input-grad, weight-grad) runs alone, captured in a CUDA graph and replayed
(GPU time, median of --reps), on PyTorch's path and on lkpatch's kernels forced on (layout copies
included where the plan needs them); each row also records the plan and the model's estimates.
"""
from __future__ import annotations

import argparse
import json
import random
import sys

import torch

from lkpatch import _pytorch, dispatch
from lkpatch.bench import graph_time_ms

NAMED = [  # (N, C, H, W, KH, KW)
    (64, 384, 64, 64, 7, 7), (64, 96, 56, 56, 7, 7), (64, 384, 64, 64, 31, 31), (64, 128, 56, 56, 31, 31),
    (64, 256, 28, 28, 29, 29), (64, 512, 14, 14, 27, 27), (64, 1024, 7, 7, 13, 13), (64, 128, 56, 56, 61, 5),
    (64, 128, 56, 56, 5, 61), (64, 192, 28, 28, 1, 11), (64, 192, 28, 28, 11, 1),
    (2, 128, 128, 128, 31, 31), (2, 128, 200, 304, 31, 31), (2, 256, 100, 152, 29, 29), (2, 512, 50, 76, 27, 27),
    (1, 128, 64, 64, 31, 31), (4, 96, 128, 128, 7, 7), (2, 1024, 25, 38, 13, 13),
]
DTYPES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "tf32": (torch.float32, True),
          "fp32": (torch.float32, False)}


def random_case(rng: random.Random):
    """A layer as users have them: batch sizes of training and fine-tuning, channel counts of
    real networks, maps of the stages, square / band / decomposed kernels."""
    n = rng.choice([1, 2, 4, 8, 16, 32, 64, 128])
    c = rng.choice([16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024])
    h = rng.choice([7, 14, 28, 56, 64, 112, 128] + ([200, 256, 320] if n <= 4 else []))
    w = h if rng.random() < 0.7 else rng.choice([7, 14, 28, 38, 56, 76, 152, 304])
    kind = rng.random()
    if kind < 0.45:
        kh = kw = rng.choice([3, 5, 7, 9, 11, 13, 17, 21, 27, 29, 31, 51, 63])
    elif kind < 0.75:
        k = rng.choice([5, 7, 11, 13, 21, 31, 51, 61])
        kh, kw = (1, k) if rng.random() < 0.5 else (k, 1)
    else:
        a, b = rng.choice([3, 5, 7]), rng.choice([13, 21, 31, 51, 61])
        kh, kw = (a, b) if rng.random() < 0.5 else (b, a)
    return n, c, h, w, kh, kw


def fits(case, elem, budget_elems):
    n, c, h, w, kh, kw = case
    return n * c * h * w <= budget_elems and dispatch.effective_macs(case[:4], case[4:], pads_of(case)) <= 8e9


def pads_of(case):
    return dispatch.explicit_padding("same", case[4:])


def time_case(case, dtype, tf32, channels_last, reps):
    n, c, h, w, kh, kw = case
    pads = pads_of(case)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    wt = torch.randn(c, 1, kh, kw, device="cuda", dtype=dtype) / (kh * kw) ** 0.5
    g = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    runs = {
        "pytorch": {"forward": lambda i: _pytorch.forward(x, wt, None, pads),
                    "input_grad": lambda i: _pytorch.backward_input(g, wt, (h, w), pads),
                    "weight_grad": lambda i: _pytorch.backward_weight(g, x, (kh, kw), pads)},
        "lkpatch": {"forward": lambda i: torch.ops.lkpatch.dwconv2d(x, wt, None, pads),
                    "input_grad": lambda i: torch.ops.lkpatch.dwconv2d_input_grad(g, wt, (h, w), pads),
                    "weight_grad": lambda i: torch.ops.lkpatch.dwconv2d_weight_grad(g, x, (kh, kw), pads)},
    }
    row = {"shape": list(case), "dtype": str(dtype).replace("torch.", ""), "tf32": tf32,
           "layout": "channels_last" if channels_last else "nchw", "pads": list(pads),
           "effective_macs": dispatch.effective_macs(case[:4], case[4:], pads)}
    with dispatch.conv_tf32(tf32), dispatch.force("kernel"):
        for p in dispatch.CONV_PASSES:
            q = dispatch.plan(p, case[:4], case[4:], pads, dtype, channels_last)
            row[f"plan_{p}"] = q.family + ("" if q.nhwc or not channels_last else "/nchw")
            row[f"macs_{p}"] = q.macs
            row[f"staged_{p}"] = q.staged
            row[f"model_lkpatch_{p}_us"] = dispatch.estimate_us("lkpatch", p, case[:4], case[4:], pads, dtype,
                                                                channels_last, q)
            row[f"model_pytorch_{p}_us"] = dispatch.estimate_us("pytorch", p, case[:4], case[4:], pads, dtype,
                                                                channels_last)
            for path in ("pytorch", "lkpatch"):
                if path == "lkpatch" and q.family == "none":
                    continue
                row[f"{path}_{p}_ms"] = graph_time_ms(runs[path][p], reps)
    with dispatch.conv_tf32(tf32):
        dispatch._decisions.clear()
        row["rule_kernel"] = dispatch.use_kernel("forward", case[:4], case[4:], pads, dtype, channels_last)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", type=int, default=100, help="random layers (each in a random dtype and layout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--named", action="store_true", help="also the named layers, in --layouts")
    ap.add_argument("--named-dtypes", default="bf16", help="comma-separated dtypes of the named layers (default bf16)")
    ap.add_argument("--named-max-batch", type=int, default=None, help="only the named layers with at most this batch")
    ap.add_argument("--layers", nargs="*", default=[], metavar="N,C,H,W,KH,KW",
                    help="also these layers, in the named layers' dtypes and --layouts")
    ap.add_argument("--layouts", default="nchw,channels_last", help="layouts of the named layers and --layers")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    layouts = [{"nchw": False, "channels_last": True}[name] for name in args.layouts.split(",")]
    chosen = [tuple(int(v) for v in spec.split(",")) for spec in args.layers]
    if args.named:
        chosen = [case for case in NAMED if args.named_max_batch is None or case[0] <= args.named_max_batch] + chosen
    todo = [(case, dt, cl) for dt in args.named_dtypes.split(",") for case in chosen for cl in layouts]
    named = len(todo)
    while len(todo) < args.random + named:
        case, dt, cl = random_case(rng), rng.choice(list(DTYPES)), rng.random() < 0.5
        if fits(case, 4, 64 << 20):
            todo.append((case, dt, cl))
    rows = []
    for i, (case, dt, cl) in enumerate(todo):
        dtype, tf32 = DTYPES[dt]
        try:
            row = time_case(case, dtype, tf32, cl, args.reps)
        except Exception as e:  # keep the sweep going; the row says what failed
            row = {"shape": list(case), "dtype": dt, "layout": "channels_last" if cl else "nchw", "error": repr(e)}
        rows.append(row)
        torch.cuda.empty_cache()
        pt = sum(row.get(f"pytorch_{p}_ms") or 0 for p in dispatch.CONV_PASSES)
        lk = sum(row.get(f"lkpatch_{p}_ms") or 0 for p in dispatch.CONV_PASSES)
        print(f"{i:4d} {case} {dt} {'cl' if cl else 'nchw'}: pytorch {pt:.3f} lkpatch {lk:.3f} ms "
              f"{row.get('plan_forward', '')}/{row.get('plan_weight_grad', '')} rule={row.get('rule_kernel')}"
              + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
