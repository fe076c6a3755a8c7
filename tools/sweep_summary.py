"""Compact view of a `lkpatch bench --sweep --json F` file: per shape, PyTorch / lkpatch time
ratio of each pass (>1: lkpatch faster). Developer tool for dispatch's rule (not run by CI).

  python tools/sweep_summary.py sweep.json [more.json ...]
"""
import argparse
import json

from lkpatch.bench import result_key

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("sweeps", nargs="+", help="JSON files written by lkpatch bench --sweep --json")
for path in parser.parse_args().sweeps:
    data = json.load(open(path))
    for r in data["rows"]:
        n, c, h, w, kh, kw = r["shape"]
        cells = [f"{p[:2]} {r[result_key('pytorch', f'{p}_ms')] / r[result_key('lkpatch', f'{p}_ms')]:5.2f}"
                 for p in ("fwd", "input_grad", "weight_grad", "bias_grad")]
        print(f"{r['dtype'][:4]} {r['layout'][:4]} {h:3d} {kh:2d}x{kw:<2d} " + " ".join(cells))
