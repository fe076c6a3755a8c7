"""Developer profiling on the GPU machine (never run by CI).

  python tools/gpu_profile.py overhead        host microseconds per call of each path (tiny shape)
  python tools/gpu_profile.py kernels [S...]  launch forward and weight-grad once per shape, for ncu
      (LKPATCH_PROFILE_DTYPE=bfloat16 for the half-precision kernels, LKPATCH_PROFILE_TF32=1 fp32 on
      the TF32 ones, LKPATCH_PROFILE_CL=1 channels_last tensors, which small maps take natively):
      ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \\
          -k regex:dw_ python tools/gpu_profile.py kernels
  python tools/gpu_profile.py hostbound       host time per fwd+bwd vs its GPU time (small maps)
  python tools/gpu_profile.py perkernel [S...] host time and each kernel's GPU time per fwd+bwd
      (S: a name of SHAPES, or N,C,H,W,K),
      NCHW and channels_last (LKPATCH_PROFILE_DTYPE, default bfloat16; LKPATCH_PROFILE_CL=1
      channels_last only, =0 NCHW only)
  python tools/gpu_profile.py copies [S...]    GPU microseconds and GB/s of the layout copies, both directions
      (LKPATCH_PROFILE_DTYPE, default bfloat16)
  python tools/gpu_profile.py biasgrad        bias gradient: PyTorch's sum vs the kernel, channels_last and NCHW
  python tools/gpu_profile.py routes [N,C,H,W,KH,KW ...]
      whole channels_last layers (forward + both gradients + bias gradient) on each route --
      PyTorch, direct, copies -- and the speed rule's pick: GPU ms (CUDA-graph replay) and each
      step timed alone (LKPATCH_PROFILE_DTYPE, default bfloat16; TF32 off)
  python tools/gpu_profile.py layers [N,C,H,W,KH,KW ...]
      whole layers with a bias (forward + both gradients + bias gradient, the eager path), NCHW
      and channels_last, as the speed rule runs them and as PyTorch does: GPU microseconds
      (CUDA-graph replay, median of 7); the rule's channels_last route in brackets; PyTorch left
      out above 2e10 multiply-adds (LKPATCH_PROFILE_DTYPE, default bfloat16; TF32 off)
  python tools/gpu_profile.py compiled [MODEL [BATCH]]
      a converted timm model's training step (bf16, channels_last) eager against torch.compile,
      graph breaks, and each one's top kernels (default replknet_31b, batch 64)
  python tools/gpu_profile.py modelroutes [MODEL [BATCH]]
      a converted timm model's training step (bf16, channels_last) with the speed rule as it is and
      without its copies route, each beside PyTorch's, and the layers whose route changes (default
      inception_next_tiny, batch 128)
  python tools/gpu_profile.py model [bfloat16|float16|float32]
      RepLKNet-31B training step (batch 64): converted vs without its depthwise convolutions,
      and the converted step's GPU time per kernel (torch.profiler)
  python tools/gpu_profile.py backbone [BATCH [SIZE]]
      RepLKNet-31B as a backbone (four feature maps), bf16 autocast, channels_last, forward +
      backward of the summed maps (default batch 2, 512 x 512): PyTorch, converted, and the floor
      (every stride-1 depthwise conv a per-channel scale), each timed alone and as GPU time
      (CUDA-graph replay); the converted one under torch.compile(mode="reduce-overhead"); then
      batch-1 inference of the re-parameterized backbone
"""
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

import lkpatch
from lkpatch import _pytorch, build, dispatch

SHAPES = {  # name: N, C, H, W, K
    "64x7": (64, 384, 64, 64, 7), "14x27": (64, 512, 14, 14, 27), "7x13": (64, 1024, 7, 7, 13),
    "64x31": (16, 384, 64, 64, 31), "56x7": (64, 96, 56, 56, 7), "56x31": (64, 128, 56, 56, 31),
    "28x29": (64, 256, 28, 28, 29), "2x128": (2, 128, 128, 128, 31),
}


def host_us(fn, n=2000):
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def overhead():
    build.build()
    x = torch.randn(2, 8, 8, 8, device="cuda")
    w = torch.randn(8, 1, 3, 3, device="cuda")
    b = torch.randn(8, device="cuda")
    g = torch.randn(2, 8, 8, 8, device="cuda")
    ext = torch.ops.lkpatch_ext
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    pads = [1, 1, 1, 1]
    rows = []
    with torch.no_grad():
        rows.append(("F.conv2d", host_us(lambda: F.conv2d(x, w, b, 1, 1, 1, 8))))
        rows.append(("lkpatch_ext.dwconv2d (C++ only)", host_us(lambda: ext.dwconv2d(x, w, b, pads))))
        with dispatch.force("kernel"):
            rows.append(("lkpatch.dwconv2d op, no_grad", host_us(lambda: torch.ops.lkpatch.dwconv2d(x, w, b, pads))))
            rows.append(("depthwise_conv2d, no_grad", host_us(lambda: lkpatch.depthwise_conv2d(x, w, b, padding=1))))
            rows.append(("input_grad op", host_us(lambda: torch.ops.lkpatch.dwconv2d_input_grad(g, w, [8, 8], pads))))
        rows.append(("pytorch backward_input", host_us(lambda: _pytorch.backward_input(g, w, (8, 8), pads))))
        rows.append(("dispatch.op_padding", host_us(lambda: dispatch.op_padding(x, w, b, 1, 1, 1))))
        rows.append(("dispatch.use_kernel", host_us(
            lambda: dispatch.use_kernel("forward", x.shape, w.shape[2:], pads, x.dtype))))
    rows.append(("F.conv2d fwd+bwd", host_us(lambda: F.conv2d(xr, wr, br, 1, 1, 1, 8).backward(g), 500)))
    with dispatch.force("kernel"):
        rows.append(("depthwise_conv2d fwd+bwd", host_us(
            lambda: lkpatch.depthwise_conv2d(xr, wr, br, padding=1).backward(g), 500)))
    # A layer as a model calls it: nn.Conv2d against the converted module, bf16 channels_last under
    # autocast from an fp32 input (the cast is part of both).
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8).cuda()
    ours = lkpatch.convert_model(torch.nn.Sequential(copy.deepcopy(conv)))[0]
    xc = torch.randn(2, 8, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()
    gc = torch.randn(2, 8, 8, 8, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    for label, layer in (("nn.Conv2d", conv), ("converted", ours)):
        def step(layer=layer):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(xc)
            y.backward(gc)
        with dispatch.force("kernel"):
            rows.append((f"{label} module fwd+bwd, AMP bf16 CL", host_us(step, 500)))
    for name, us in rows:
        print(f"{name:40s} {us:8.1f} us")


def python_profile():
    """Where the host time of a small forward + backward goes (cProfile)."""
    import cProfile
    import pstats
    build.build()
    x = torch.randn(2, 8, 8, 8, device="cuda", requires_grad=True)
    w = torch.randn(8, 1, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(8, device="cuda", requires_grad=True)
    g = torch.randn(2, 8, 8, 8, device="cuda")
    with dispatch.force("kernel"):
        step = lambda: torch.autograd.grad(lkpatch.depthwise_conv2d(x, w, b, padding=1), (x, w, b), g)
        print(f"fwd+bwd host: {host_us(step, 500):.1f} us")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            step()
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def autograd_variants():
    """Host time of forward + backward through different autograd plumbings (tiny shape)."""
    build.build()
    ext = torch.ops.lkpatch_ext
    x = torch.randn(2, 8, 8, 8, device="cuda", requires_grad=True)
    w = torch.randn(8, 1, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(8, device="cuda", requires_grad=True)
    g = torch.randn(2, 8, 8, 8, device="cuda")
    pads = [1, 1, 1, 1]

    class Direct(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            ctx.save_for_backward(x, w)
            return ext.dwconv2d(x, w, b, pads)

        @staticmethod
        def backward(ctx, gy):
            x, w = ctx.saved_tensors
            return (ext.dwconv2d_input_grad(gy, w, [8, 8], pads), ext.dwconv2d_weight_grad(gy, x, [3, 3], pads),
                    ext.dwconv2d_bias_grad(gy))

    class ViaOps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            ctx.save_for_backward(x, w)
            with torch._C._AutoDispatchBelowAutograd():
                return torch.ops.lkpatch.dwconv2d(x, w, b, pads)

        @staticmethod
        def backward(ctx, gy):
            x, w = ctx.saved_tensors
            return (torch.ops.lkpatch.dwconv2d_input_grad(gy, w, [8, 8], pads),
                    torch.ops.lkpatch.dwconv2d_weight_grad(gy, x, [3, 3], pads),
                    torch.ops.lkpatch.dwconv2d_bias_grad(gy))

    with dispatch.force("kernel"):
        rows = [
            ("F.conv2d", lambda: torch.autograd.grad(F.conv2d(x, w, b, 1, 1, 1, 8), (x, w, b), g)),
            ("depthwise_conv2d (register_autograd)", lambda: torch.autograd.grad(
                lkpatch.depthwise_conv2d(x, w, b, padding=1), (x, w, b), g)),
            ("autograd.Function -> lkpatch ops", lambda: torch.autograd.grad(ViaOps.apply(x, w, b), (x, w, b), g)),
            ("autograd.Function -> C++ ops", lambda: torch.autograd.grad(Direct.apply(x, w, b), (x, w, b), g)),
        ]
        for name, fn in rows:
            print(f"{name:45s} {host_us(fn, 500):8.1f} us")


def kernels(names):
    build.build()
    dtype = getattr(torch, os.environ.get("LKPATCH_PROFILE_DTYPE", "float32"))
    fmt = torch.channels_last if os.environ.get("LKPATCH_PROFILE_CL") == "1" else torch.contiguous_format
    for name in names or SHAPES:
        n, c, h, w, k = SHAPES[name]
        x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
        wt = torch.randn(c, 1, k, k, device="cuda", dtype=dtype)
        g = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
        pads = [k // 2] * 4
        tf32 = bool(os.environ.get("LKPATCH_PROFILE_TF32"))  # fp32 on the TF32 kernels
        torch.ops.lkpatch_ext.dwconv2d(x, wt, None, pads, tf32)
        torch.ops.lkpatch_ext.dwconv2d_weight_grad(g, x, [k, k], pads, tf32)
        torch.cuda.synchronize()
        print("launched", name, flush=True)


def profile_kernels(fn, steps, warmup=0, width=90):
    """GPU milliseconds per call of each kernel fn launches: `warmup` calls, then `steps` under
    torch.profiler ({name: [ms, launches]}, as kernel_ms)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return kernel_ms(prof, steps, width)


def kernel_ms(prof, steps, width=90):
    """GPU milliseconds per step of each kernel in a torch.profiler run: {name: [ms, launches]}."""
    rows = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            name = e.name.replace("void ", "").replace("lkpatch::(anonymous namespace)::", "").replace("lkpatch::", "")
            r = rows.setdefault(name[:width], [0.0, 0])
            r[0] += e.time_range.elapsed_us() / 1e3 / steps
            r[1] += 1
    return rows


def model(amp):
    import timm
    from lkpatch import bench, convert_model
    build.build()
    base = timm.create_model("replknet_31b", num_classes=1000).cuda().train()
    conv = convert_model(copy.deepcopy(base))
    bare = copy.deepcopy(base)  # the depthwise branches removed entirely: the most faster kernels could gain
    for name, mod in list(bare.named_modules()):
        if type(mod).__name__ == "ReparamLargeKernelConv":
            parent = bare.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], torch.nn.Identity())
    print(bench.time_train_steps({"converted": conv, "no_depthwise": bare}, 64, 224, amp, steps=6))
    x = torch.randn(64, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (64,), device="cuda")

    def profiled(net):
        """A training step of ``net`` and its GPU kernel time per step: {name: [ms, launches]}."""
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def step():
            with torch.autocast("cuda", dtype=getattr(torch, amp), enabled=amp != "float32"):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step, profile_kernels(step, 2, warmup=3)

    # GPU idle (step time minus kernel time) that the converted model has beyond the model without
    # its depthwise branches is host time of the converted layers.
    steps = {}
    for name, net in (("converted", conv), ("no_depthwise", bare)):
        steps[name], rows = profiled(net)
        print(f"{name} GPU kernel time per step: {sum(v[0] for v in rows.values()):.1f} ms")
        if name == "converted":
            top = sorted(rows.items(), key=lambda kv: -kv[1][0])[:28]
    for name, fn in steps.items():  # host time to queue one step
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"{name}: host {1e3 * (t1 - t0):.1f} ms to queue a step, {1e3 * (time.perf_counter() - t0):.1f} ms to finish")
    for name, (ms, n) in top:
        print(f"{ms:8.2f} ms {n // 2:5d}x  {name}")


def compiled(name, batch, amp="bfloat16"):
    """A converted model's training step (channels_last, AMP) eager against torch.compile: images/s
    beside PyTorch's eager step, Dynamo's graph breaks, and the kernels whose GPU time per step
    differs most between the two."""
    import timm
    from torch._dynamo.utils import counters
    from lkpatch import bench, convert_model
    build.build()
    base = timm.create_model(name, num_classes=1000).cuda().train().to(memory_format=torch.channels_last)
    conv = convert_model(copy.deepcopy(base))
    comp = torch.compile(conv)
    t0 = time.perf_counter()
    print(bench.time_train_steps({"pytorch": base, "eager": conv, "compiled": comp}, batch, 224, amp,
                                 channels_last=True, steps=6, queue=2))
    print(f"timing took {time.perf_counter() - t0:.0f} s; graph breaks: {dict(counters['graph_break'])}", flush=True)
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    rows = {}
    for key, net in (("eager", conv), ("compiled", comp)):
        def step(net=net):
            with torch.autocast("cuda", dtype=getattr(torch, amp)):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
        rows[key] = profile_kernels(step, 2, warmup=2, width=70)
        print(f"{key}: GPU kernel time per step {sum(v[0] for v in rows[key].values()):.1f} ms, "
              f"{sum(v[1] for v in rows[key].values()) // 2} launches")
    for key in rows:
        top = sorted(rows[key].items(), key=lambda kv: -kv[1][0])[:18]
        print(f"-- {key}: top kernels")
        for kn, (ms, n) in top:
            print(f"{ms:8.2f} ms {n // 2:5d}x  {kn}")


def model_routes(name, batch, amp="bfloat16"):
    """A converted timm model's training step (channels_last, AMP) as the speed rule runs it and
    with the copies route taken from the rule (its channels_last layers then read channels_last or
    run PyTorch's): images/s beside PyTorch's in each run, and the layers whose route differs. The
    copies route adds two Python autograd nodes a layer, host time that a GPU-time rule does not see."""
    import timm
    from lkpatch import bench, convert_model
    build.build()
    base = timm.create_model(name, num_classes=1000).cuda().train().to(memory_format=torch.channels_last)
    conv = convert_model(copy.deepcopy(base))
    copy_us, routes = dispatch._copy_us, {}
    for variant in ("rule", "no copies"):
        dispatch._decisions.clear()
        if variant == "no copies":
            dispatch._copy_us = lambda *args: float("inf")
        try:
            r = bench.time_train_steps({"pytorch": base, "lkpatch": conv}, batch, 224, amp, channels_last=True,
                                       steps=8, queue=3)
            routes[variant] = {key[1:3]: v for key, v in dispatch._decisions.items() if key[0] == "route"}
        finally:
            dispatch._copy_us = copy_us
        print(f"{name} batch {batch} {amp} channels_last, {variant}: PyTorch {r['pytorch_img_per_s']:.0f} img/s, "
              f"lkpatch {r['lkpatch_img_per_s']:.0f} ({r['lkpatch_img_per_s'] / r['pytorch_img_per_s']:.3f}x); "
              f"queued {r['pytorch_queued_img_per_s']:.0f} / {r['lkpatch_queued_img_per_s']:.0f} "
              f"({r['lkpatch_queued_img_per_s'] / r['pytorch_queued_img_per_s']:.3f}x)", flush=True)
    dispatch._decisions.clear()
    for (size, k), route in routes["rule"].items():
        other = routes["no copies"].get((size, k))
        if other != route:
            print(f"  {'x'.join(map(str, size))} {'x'.join(map(str, k))}: {route} -> {other}")


class ChannelScale(torch.nn.Module):
    """What a depthwise conv costs at least: one multiply per element (the floor's stand-in)."""

    def __init__(self, channels):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        return x * self.scale


def without_depthwise(net):
    """``net`` with every stride-1 depthwise nn.Conv2d replaced by a per-channel scale."""
    for name, mod in list(net.named_modules()):
        if (type(mod) is torch.nn.Conv2d and mod.groups == mod.in_channels == mod.out_channels
                and mod.stride == (1, 1)):
            parent, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, leaf, ChannelScale(mod.in_channels))
    return net


def backbone(batch, size):
    from lkpatch import bench
    from lkpatch.models import REPLKNET_CONFIGS, RepLKNet
    build.build()
    torch.manual_seed(0)
    cl = torch.channels_last
    base = RepLKNet(**REPLKNET_CONFIGS["replknet_31b"], num_classes=None, out_indices=[0, 1, 2, 3])
    nets = {"pytorch": base, "converted": lkpatch.convert_model(copy.deepcopy(base)),
            "floor": without_depthwise(copy.deepcopy(base))}
    nets = {k: n.cuda().to(memory_format=cl) for k, n in nets.items()}
    base = nets["pytorch"]
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=cl)

    def train_step(net):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = sum(f.float().sum() for f in net(x))
            loss.backward()
        return step

    def infer_step(net):
        def step():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                net(x1)
        return step

    def alone_ms(fn, n=9):
        for _ in range(3):
            fn()
        return sorted(bench.time_ms(lambda i: fn(), warmup=0, reps=1) for _ in range(n))[n // 2]

    def report(what, fns):
        rows = {k: (alone_ms(f), bench.graph_time_ms(lambda i, f=f: f(), reps=10)) for k, f in fns.items()}
        for k, (a, g) in rows.items():
            print(f"{what} {k}: alone {a:.2f} ms, GPU (graph replay) {g:.2f} ms", flush=True)
        return rows

    for net in nets.values():
        net.train()
    rows = report(f"train {batch}x3x{size}x{size}", {k: train_step(n) for k, n in nets.items()})
    print(f"converted GPU time / floor's: {rows['converted'][1] / rows['floor'][1]:.2f}; "
          f"PyTorch / converted: {rows['pytorch'][1] / rows['converted'][1]:.1f}x", flush=True)
    t0 = time.perf_counter()
    comp = torch.compile(nets["converted"], mode="reduce-overhead")
    step = train_step(comp)

    def marked():
        torch.compiler.cudagraph_mark_step_begin()
        step()
    for _ in range(3):
        marked()
    torch.cuda.synchronize()
    print(f"compiled (reduce-overhead) in {time.perf_counter() - t0:.0f} s: alone {alone_ms(marked):.2f} ms "
          f"(converted's GPU time {rows['converted'][1]:.2f} ms)", flush=True)
    x1 = x[:1].clone(memory_format=cl)
    for net in nets.values():
        net.eval()
    deploy = {"pytorch": copy.deepcopy(base).eval().structural_reparam()}
    deploy["converted"] = lkpatch.convert_model(copy.deepcopy(deploy["pytorch"]))
    deploy["floor"] = without_depthwise(copy.deepcopy(deploy["pytorch"])).cuda().to(memory_format=cl)
    report(f"inference 1x3x{size}x{size}, re-parameterized", {k: infer_step(n) for k, n in deploy.items()})


def hostbound():
    """Host microseconds per forward + backward of a converted layer against its GPU time."""
    import cProfile
    import pstats
    from lkpatch import bench
    build.build()
    for (n, c, h, w, k), dtype in [((64, 1024, 7, 7, 13), torch.float32), ((64, 1024, 7, 7, 13), torch.bfloat16),
                                   ((64, 512, 14, 14, 27), torch.float32)]:
        x = torch.randn(n, c, h, w, device="cuda", dtype=dtype, requires_grad=True)
        wt = torch.randn(c, 1, k, k, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(c, device="cuda", dtype=dtype, requires_grad=True)
        g = torch.randn(n, c, h, w, device="cuda", dtype=dtype)
        with dispatch.force("kernel"):
            step = lambda: torch.autograd.grad(lkpatch.depthwise_conv2d(x, wt, b, padding=k // 2), (x, wt, b), g)
            host = host_us(step, 100)
            gpu = bench.time_ms(lambda i: step(), reps=20)
            synced = []
            for _ in range(20):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                synced.append(start.elapsed_time(end))
            kernels = {name: ms * 1e3 for name, (ms, _) in profile_kernels(step, 20, width=60).items()}  # us per step
            print(f"{n}x{c}x{h}x{w} k{k} {dtype}: host {host:.1f} us per fwd+bwd, queued events {gpu * 1e3:.1f} us, "
                  f"synced events {sorted(synced)[10] * 1e3:.1f} us, kernels {sum(kernels.values()):.1f} us: "
                  + ", ".join(f"{v:.1f} {k}" for k, v in kernels.items()))
            if dtype == torch.float32 and h == 7:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(200):
                    step()
                prof.disable()
                torch.cuda.synchronize()
                pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def perkernel(names):
    """bf16 forward + backward with lkpatch's kernels forced, per shape and memory format: host
    microseconds per step and each kernel's GPU microseconds (torch.profiler)."""
    build.build()
    dtype = getattr(torch, os.environ.get("LKPATCH_PROFILE_DTYPE", "bfloat16"))
    for name in names or ("28x29", "14x27", "7x13"):
        n, c, h, w, k = SHAPES[name] if name in SHAPES else (int(v) for v in name.split(","))
        only = os.environ.get("LKPATCH_PROFILE_CL")
        formats = {"1": (torch.channels_last,), "0": (torch.contiguous_format,)}.get(only, (torch.contiguous_format,
                                                                                      torch.channels_last))
        for fmt in formats:
            x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
            wt = torch.randn(c, 1, k, k, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(c, device="cuda", dtype=dtype, requires_grad=True)
            g = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
            with dispatch.force("kernel"):
                step = lambda: torch.autograd.grad(lkpatch.depthwise_conv2d(x, wt, b, padding=k // 2), (x, wt, b), g)
                host = host_us(step, 100)
                kernels = {kn: ms * 1e3 for kn, (ms, _) in profile_kernels(step, 20, width=60).items()}
            print(f"{name} {dtype} {'CL' if fmt == torch.channels_last else 'NCHW'}: host {host:.1f} us, "
                  f"kernels {sum(kernels.values()):.1f} us: " + ", ".join(f"{v:.1f} {kn}" for kn, v in kernels.items()))


def copies(names):
    """The layout copies alone: each one's GPU microseconds (torch.profiler, mean of 50) and the GB/s
    it moves (read + write), next to a plain clone of the same tensor (the bandwidth to expect)."""
    build.build()
    ext = torch.ops.lkpatch_ext
    dtype = getattr(torch, os.environ.get("LKPATCH_PROFILE_DTYPE", "bfloat16"))
    for name in names or SHAPES:
        n, c, h, w, _ = SHAPES[name]
        x = torch.randn(n, c, h, w, device="cuda", dtype=dtype)
        cl = x.contiguous(memory_format=torch.channels_last)
        mb = 2 * x.numel() * x.element_size() / 1e6
        times = [sum(ms for ms, _ in profile_kernels(fn, 50, warmup=10).values()) * 1e3
                 for fn in (lambda: ext.to_channels_last(x), lambda: ext.to_nchw(cl), lambda: x.clone())]
        print(f"copies {name} {dtype} ({mb:.1f} MB moved): to channels_last {times[0]:.2f} us "
              f"({mb / times[0] * 1e3:.0f} GB/s), to NCHW {times[1]:.2f} us ({mb / times[1] * 1e3:.0f} GB/s); "
              f"PyTorch's clone {times[2]:.2f} us ({mb / times[2] * 1e3:.0f} GB/s)")


ROUTE_LAYERS = [(2, 128, 128, 128, 31, 31), (2, 128, 200, 304, 31, 31), (2, 256, 100, 152, 29, 29),
                (2, 512, 50, 76, 27, 27), (1, 128, 64, 64, 31, 31), (2, 1024, 25, 38, 13, 13), (4, 96, 128, 128, 7, 7),
                (64, 384, 64, 64, 31, 31), (64, 128, 56, 56, 31, 31), (64, 256, 28, 28, 29, 29),
                (64, 128, 56, 56, 61, 5), (64, 128, 56, 56, 5, 61), (3, 64, 97, 131, 17, 17), (8, 256, 64, 64, 13, 13),
                (64, 384, 64, 64, 7, 7), (128, 96, 56, 56, 7, 7), (128, 192, 28, 28, 7, 7), (128, 384, 14, 14, 7, 7),
                (128, 768, 7, 7, 7, 7), (64, 512, 14, 14, 27, 27), (64, 1024, 7, 7, 13, 13)]


def layer_step(layer, dtype, fmt):
    """A whole step of one layer with a bias ('same' padding, random tensors in ``fmt``): forward,
    and the gradients of input, weight and bias (the eager path). Returns (step, pads)."""
    from lkpatch.functional import depthwise_conv2d
    n, c, h, w, kh, kw = layer
    pads = dispatch.explicit_padding("same", (kh, kw))
    x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn_like(x)
    wt = torch.randn(c, 1, kh, kw, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(c, device="cuda", dtype=dtype, requires_grad=True)
    return (lambda i: torch.autograd.grad(depthwise_conv2d(x, wt, b, padding=pads), (x, wt, b), g)), pads


def routes(layers):
    """Each channels_last layer's step on every route, the route forced by replacing the rule's
    decision (dispatch's "route" question) for the run, and the rule's own pick."""
    from lkpatch.bench import graph_time_ms, time_ms
    build.build()
    torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, os.environ.get("LKPATCH_PROFILE_DTYPE", "bfloat16"))
    rule = dispatch._DECIDE["route"]
    for layer in [tuple(int(v) for v in a.split(",")) for a in layers] or ROUTE_LAYERS:
        n, c, h, w, kh, kw = layer
        step, pads = layer_step(layer, dtype, torch.channels_last)
        ms, alone = {}, {}
        try:
            for mode in ("pytorch", "direct", "copies", "rule"):
                dispatch._decisions.clear()
                dispatch._DECIDE["route"] = rule if mode in ("pytorch", "rule") else (lambda *a, m=mode: m)
                with dispatch.force("pytorch" if mode == "pytorch" else "auto"):
                    ms[mode] = graph_time_ms(step, 7)
                    alone[mode] = time_ms(step, reps=7)
                    if mode == "rule":
                        picked = dispatch.channels_last_route((n, c, h, w), (kh, kw), pads, dtype)
        finally:
            dispatch._DECIDE["route"] = rule
            dispatch._decisions.clear()
        print(f"routes {n}x{c}x{h}x{w} {kh}x{kw} {dtype}, GPU ms (alone): " + ", ".join(
            f"{'PyTorch' if m == 'pytorch' else m if m != 'rule' else f'rule ({picked})'} {ms[m]:.3f} ({alone[m]:.3f})"
            for m in ms))
        del step
        torch.cuda.empty_cache()


def layers(specs):
    """Each layer's whole step in both layouts, on the speed rule's path and on PyTorch's."""
    from lkpatch.bench import graph_time_ms
    build.build()
    torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, os.environ.get("LKPATCH_PROFILE_DTYPE", "bfloat16"))
    for layer in [tuple(int(v) for v in a.split(",")) for a in specs] or ROUTE_LAYERS:
        n, c, h, w, kh, kw = layer
        row = []
        for fmt in (torch.contiguous_format, torch.channels_last):
            step, pads = layer_step(layer, dtype, fmt)
            cl = fmt == torch.channels_last
            for impl in ("auto", "pytorch") if n * c * h * w * kh * kw < 2e10 else ("auto",):
                dispatch._decisions.clear()
                with dispatch.force(impl):
                    us = graph_time_ms(step, 7) * 1000
                route = f" ({dispatch.channels_last_route((n, c, h, w), (kh, kw), pads, dtype)})" if cl and impl == "auto" else ""
                row.append(f"{'channels_last' if cl else 'NCHW'} {'lkpatch' if impl == 'auto' else 'PyTorch'}{route} {us:.1f}")
            del step
            torch.cuda.empty_cache()
        print(f"layers {n}x{c}x{h}x{w} {kh}x{kw} {dtype}: " + " | ".join(row), flush=True)


def gpu_us(fn, reps=50):
    """Median GPU microseconds of fn (CUDA events, after warm-up)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def biasgrad():
    """The bias gradient of a channels_last output gradient: PyTorch's sum vs lkpatch's kernel
    (GPU microseconds, CUDA events), and the NCHW pair, over RepLKNet / ConvNeXt activations."""
    build.build()
    ext = torch.ops.lkpatch_ext
    dtype = getattr(torch, os.environ.get("LKPATCH_PROFILE_DTYPE", "bfloat16"))
    for n, c, h in [(64, 128, 56), (64, 96, 56), (64, 256, 28), (64, 192, 28), (64, 512, 14), (64, 384, 14),
                    (64, 1024, 7), (64, 768, 7), (16, 384, 14), (8, 256, 7), (64, 384, 64), (64, 100, 14)]:
        cells = []
        for fmt in (torch.channels_last, torch.contiguous_format):
            g = torch.randn(n, c, h, h, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
            pt, lk = gpu_us(lambda: g.sum((0, 2, 3))), gpu_us(lambda: ext.dwconv2d_bias_grad(g))
            ref = g.double().sum((0, 2, 3))
            err = ((ext.dwconv2d_bias_grad(g).double() - ref).norm() / ref.norm()).item()
            cells.append(f"{'CL' if fmt == torch.channels_last else 'NCHW'} PT {pt:.1f} lk {lk:.1f} (err {err:.1e})")
        print(f"{n}x{c}x{h}x{h} ({n * c * h * h / 1e6:.1f} M): " + "; ".join(cells))


def mismatch():
    """The input-grad op called with an input size that does not match grad_output."""
    build.build()
    x = torch.randn(2, 4, 9, 9, device="cuda")
    w = torch.randn(4, 1, 3, 3, device="cuda")
    for op in (torch.ops.lkpatch_ext.dwconv2d_input_grad, torch.ops.lkpatch.dwconv2d_input_grad):
        try:
            op(x, w, [5, 5], [1, 1, 1, 1])
        except RuntimeError as e:
            print("raised:", str(e).splitlines()[0])


if __name__ == "__main__":
    modes = {"overhead": lambda: overhead(), "kernels": lambda: kernels(sys.argv[2:]),
             "mismatch": lambda: mismatch(), "perkernel": lambda: perkernel(sys.argv[2:]),
             "hostbound": lambda: hostbound(), "model": lambda: model(sys.argv[2] if len(sys.argv) > 2 else "bfloat16"),
             "python": lambda: python_profile(), "autograd": lambda: autograd_variants(),
             "biasgrad": lambda: biasgrad(), "copies": lambda: copies(sys.argv[2:]),
             "routes": lambda: routes(sys.argv[2:]), "layers": lambda: layers(sys.argv[2:]),
             "backbone": lambda: backbone(int(sys.argv[2]) if len(sys.argv) > 2 else 2,
                                          int(sys.argv[3]) if len(sys.argv) > 3 else 512),
             "compiled": lambda: compiled(sys.argv[2] if len(sys.argv) > 2 else "replknet_31b",
                                          int(sys.argv[3]) if len(sys.argv) > 3 else 64),
             "modelroutes": lambda: model_routes(sys.argv[2] if len(sys.argv) > 2 else "inception_next_tiny",
                                                 int(sys.argv[3]) if len(sys.argv) > 3 else 128)}
    if len(sys.argv) < 2 or sys.argv[1] not in modes:
        print(__doc__)
        print("modes:", ", ".join(modes))
        sys.exit(2)
    modes[sys.argv[1]]()
