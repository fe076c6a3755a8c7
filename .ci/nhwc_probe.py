"""Launch the small-map forward and weight-grad once per shape and layout (bf16), for ncu:
    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats -k regex:dw_tc_small \\
        python .ci/nhwc_probe.py
"""
import torch

from lkpatch import build

ext = build.extension_ops()
for n, c, h, k in [(64, 512, 14, 27), (64, 1024, 7, 13)]:
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(n, c, h, h, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=fmt)
        w = torch.randn(c, 1, k, k, device="cuda", dtype=torch.bfloat16)
        p = [k // 2] * 4
        y = ext.dwconv2d(x, w, None, p)
        ext.dwconv2d_weight_grad(y, x, [k, k], p)
torch.cuda.synchronize()
