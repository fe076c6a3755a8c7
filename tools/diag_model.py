"""Debug: every depthwise layer of a converted model, each pass on the captured tensors vs float64.

  python tools/diag_model.py MODEL SIZE      e.g. python tools/diag_model.py convnext_tiny 64  (needs a GPU)
"""
import argparse, copy
import timm, torch
import lkpatch
from lkpatch import dispatch, _pytorch, _ops

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model", help="a timm model name, e.g. convnext_tiny")
parser.add_argument("size", type=int, help="input image size in pixels")
args = parser.parse_args()
name, size = args.model, args.size
torch.manual_seed(0)
model = timm.create_model(name, num_classes=10).cuda().train()
conv = lkpatch.convert_model(copy.deepcopy(model))
rec = []
def hook(mod, inp, out):
    x = inp[0]
    entry = {"name": mod._n, "x": x.detach().clone(), "w": mod.weight.detach().clone(), "pad": mod.padding,
             "stride": mod.stride, "k": mod.kernel_size, "mult": mod.out_channels // mod.in_channels}
    rec.append(entry)
    out.register_hook(lambda g: entry.__setitem__("g", g.detach().clone()))
for n, m in conv.named_modules():
    if isinstance(m, lkpatch.DepthwiseConv2d):
        m._n = n; m.register_forward_hook(hook)
x = torch.randn(2, 3, size, size, device="cuda")
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
def grads(m, xx):
    m.zero_grad(set_to_none=True); loss = m(xx).float().square().mean(); loss.backward()
    return loss.item(), {n: p.grad.detach().double().clone() for n, p in m.named_parameters() if p.grad is not None}
with dispatch.force("kernel"):
    l1, g1 = grads(conv, x)
l0, g0 = grads(model, x)
m64 = copy.deepcopy(model).double(); l64, g64 = grads(m64, x.double())
def rel(a, b): d = b.norm().item(); return (a - b).norm().item() / (d if d > 0 else 1)
print("loss", l0, l1, l64)
rows = sorted(((rel(g1[k], g64[k]), rel(g0[k], g64[k]), k) for k in g0), reverse=True)[:12]
for r in rows: print(f"grad vs fp64: lkpatch {r[0]:.2e}  pytorch {r[1]:.2e}  {r[2]}")
bad = 0
for e in rec:
    if e["stride"] != (1, 1) or e["mult"] != 1 or "g" not in e: continue
    p = e["pad"]; pads = (p[0], p[0], p[1], p[1])
    xd, wd, gd = e["x"].double(), e["w"].double(), e["g"].double()
    ref = [_pytorch.forward(xd, wd, None, pads), _pytorch.backward_input(gd, wd, xd.shape[2:], pads),
           _pytorch.backward_weight(gd, xd, e["k"], pads)]
    with dispatch.force("kernel"):
        ours = [_ops._forward_cuda(e["x"], e["w"], None, list(pads)), _ops._input_grad_cuda(e["g"], e["w"], list(xd.shape[2:]), list(pads)),
                _ops._weight_grad_cuda(e["g"], e["x"], list(e["k"]), list(pads))]
    errs = [rel(o.double(), r) for o, r in zip(ours, ref)]
    flag = max(errs) > 1e-5
    bad += flag
    if flag or e["name"].endswith("blocks.0.large_kernel.lkb_origin.conv"):
        print(("BAD " if flag else "ok  ") + f"{e['name']} x{tuple(e['x'].shape)} k{e['k']} pads{pads} fwd {errs[0]:.1e} dx {errs[1]:.1e} dw {errs[2]:.1e}")
print("layers with error > 1e-5:", bad)
