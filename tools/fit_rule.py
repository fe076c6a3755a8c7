"""Fits the speed rule's rates (lkpatch.dispatch.COST) to a sweep from tools/sweep_passes.py and
reports how the rule's decisions compare with the measured times.

    python tools/fit_rule.py sweep.json [more.json ...]          # fitted rates, then the check

The check: for every pass of every layer, the path the rule picks against the faster measured
one; a pick more than 5% slower (and 5 us) is a miss, listed with both times.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from lkpatch import dispatch

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load(paths):
    rows = []
    for p in paths:
        rows += [r for r in json.load(open(p))["rows"] if "error" not in r]
    return rows


def parts(r, p):
    n, c, h, w, kh, kw = r["shape"]
    pads = tuple(r["pads"])
    dtype = DT[r["dtype"]]
    elem = dtype.itemsize
    oh, ow = dispatch.output_size((h, w), (kh, kw), pads)
    moved = n * c * (h * w + oh * ow) * elem
    return (n, c, h, w), (kh, kw), pads, dtype, moved


def tile_work(r, p, size, k, pads, dtype, what="macs"):
    """The multiply-adds the pass's tiles issue ("macs") or the elements its blocks stage
    ("staged"): as recorded, else the plan's (the layout the sweep ran: NCHW where channels_last
    went through the copies)."""
    if r.get(f"{what}_{p}") is not None:
        return r[f"{what}_{p}"]
    read_cl = r["layout"] == "channels_last" and "/" not in r.get(f"plan_{p}", "")
    return getattr(dispatch.plan(p, size, k, pads, dtype, read_cl), what)


def fit_pair(points):
    """(multiply-adds, staged elements) per microsecond for times left = macs / a + staged / b,
    least squares relative to each time; one term alone where both do not come out positive."""
    def solve(cols):
        m = [[sum(pt[i] * pt[j] / pt[2] ** 2 for pt in points) for j in cols] for i in cols]
        v = [sum(pt[i] / pt[2] for pt in points) for i in cols]
        if len(cols) == 1:
            return [v[0] / m[0][0]] if m[0][0] else [0.0]
        det = m[0][0] * m[1][1] - m[0][1] * m[1][0]
        if not det:
            return [-1.0, -1.0]
        return [(v[0] * m[1][1] - v[1] * m[0][1]) / det, (m[0][0] * v[1] - m[1][0] * v[0]) / det]

    def err(c):
        return sum(((pt[0] * c[0] + pt[1] * c[1]) / pt[2] - 1) ** 2 for pt in points)
    fits = []
    both = solve([0, 1])
    if min(both) > 0:
        fits.append(both)
    fits += [[solve([0])[0], 0.0], [0.0, solve([1])[0]]]
    best = min((c for c in fits if max(c) > 0), key=err)
    return tuple(1 / c if c > 0 else 0 for c in best), err(best) / len(points)


def fit(rows):
    C = dispatch.COST
    groups, pairs = {}, {}
    for r in rows:
        cl = r["layout"] == "channels_last"
        for p in dispatch.CONV_PASSES:
            size, k, pads, dtype, moved = parts(r, p)
            macs = dispatch.effective_macs(size, k, pads)
            pt = r.get(f"pytorch_{p}_ms")
            if pt:
                pt_macs = dispatch.pytorch_macs(size, k, pads, cl, p)
                kind = dispatch.pytorch_kernel_class(k) + ("_fp32" if dtype == torch.float32 else "")
                left = pt * 1e3 - C["pytorch_call_us"] - moved / C["bandwidth"]
                if left > 0.2 * pt * 1e3:
                    groups.setdefault(("pytorch", "channels_last" if cl else "nchw", p, kind), []).append(pt_macs / left)
            lk = r.get(f"lkpatch_{p}_ms")
            fam = r.get(f"plan_{p}", "")
            if lk and fam and "/" not in fam and max(macs, pt_macs if pt else 0) >= C["tiny_macs"]:
                left = lk * 1e3 - C["lkpatch_call_us"] - moved / C["bandwidth"]
                if left > 0.2 * lk * 1e3:
                    tiles = tile_work(r, p, size, k, pads, dtype)
                    key = dispatch.rate_key(fam, p, dtype, cl, tiles > 0)
                    work = macs if key == ("fma",) else tiles
                    if dispatch.rates(key)[1] is not None:
                        pairs.setdefault(key, []).append((work, tile_work(r, p, size, k, pads, dtype, "staged"), left))
                    else:
                        groups.setdefault(key, []).append(work / left)
    for key, v in sorted(groups.items()):
        print(f"{'/'.join(key):40s} n={len(v):3d} median {statistics.median(v):.3g}  "
              f"q25 {statistics.quantiles(v, n=4)[0] if len(v) > 1 else v[0]:.3g}")
    for key, v in sorted(pairs.items()):
        (a, b), e = fit_pair(v)
        print(f"{'/'.join(key):40s} n={len(v):3d} (macs, staged) per us ({a:.3g}, {b:.3g})  rms rel. error {e ** 0.5:.2f}")


def check(rows):
    misses, total = [], 0
    for r in rows:
        cl = r["layout"] == "channels_last"
        size, k, pads, dtype, _ = parts(r, "forward")
        dispatch._decisions.clear()
        with dispatch.conv_tf32(r.get("tf32", False)):
            # the rule's pick per pass (a layer bound by host time as a whole), on the sweep's plans
            plans = {p: dispatch.Plan(r[f"plan_{p}"].split("/")[0], "/" not in r[f"plan_{p}"], False,
                                      macs=tile_work(r, p, size, k, pads, dtype),
                                      staged=tile_work(r, p, size, k, pads, dtype, "staged"))
                     for p in dispatch.CONV_PASSES if r.get(f"plan_{p}")}
            if len(plans) < len(dispatch.CONV_PASSES):
                continue
            on = dispatch._on_kernels(size, k, pads, dtype, cl, plans)
            for p in dispatch.CONV_PASSES:
                pt, lk = r.get(f"pytorch_{p}_ms"), r.get(f"lkpatch_{p}_ms")
                if pt is None or lk is None:
                    continue
                total += 1
                pick_lk = on[p]
                got, best = (lk if pick_lk else pt), min(lk, pt)
                if got > 1.05 * best and got - best > 0.005:
                    misses.append((r["shape"], r["dtype"], r["layout"], p, "lk" if pick_lk else "pt", pt, lk))
    print(f"{len(misses)} misses of {total} passes")
    for m in misses:
        print("  ", m)


def plan_as_on_h100():
    """Without a GPU, the extension plans for an H100 (the GPU the rates were fitted on)."""
    from lkpatch import build
    h100 = [132, 227 * 1024, 9]  # multiprocessors, shared memory a block may opt in to, compute capability
    dispatch._query_plan = lambda p, size, k, pads, dtype, tf32, cl: build.extension_ops().plan(
        p, list(size), list(k), list(pads), dtype, tf32, cl, h100)
    dispatch._extension_ready = lambda: True
    dispatch._tensor_cores_off = lambda: False


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", help="JSON files written by tools/sweep_passes.py")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        plan_as_on_h100()
    rows = load(args.sweeps)
    fit(rows)
    check(rows)
