"""The just-in-time build and the dispatch rules, on the CPU."""
import concurrent.futures
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lkpatch import build, dispatch


def _fake_toolkit(root):
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\necho fake\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_cuda_home_seen_through_a_wrapper_script(tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    wrapper = wrappers / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrappers))
    monkeypatch.setattr(build.glob, "glob", lambda pattern: [])  # hide /usr/local/cuda-*
    monkeypatch.setattr(build.os.path, "isfile", lambda p, _f=os.path.isfile: _f(p) and "/usr/local" not in p)
    assert build.find_cuda_home() == str(toolkit)


def test_cuda_home_env_wins(tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "tk")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert build.find_cuda_home() == str(toolkit)


def test_missing_toolkit_gives_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "find_cuda_home", lambda: None)
    monkeypatch.setenv("LKPATCH_CACHE_DIR", str(tmp_path))
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: the message is about torch instead")
    with pytest.raises(build.BuildError, match="CUDA_HOME"):
        build.build(quiet=True, force=True)


def test_arch_and_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    monkeypatch.setenv("LKPATCH_CACHE_DIR", str(tmp_path))
    assert build.arch_list() == "8.0;9.0"
    folder = build.cache_dir()
    assert folder.parent == tmp_path and "sm80_90" in folder.name and torch.__version__.split("+")[0] in folder.name
    # the library name changes with the sources and flags, so a stale build is never loaded
    assert build.library_path().name.startswith("lkpatch_ext_")


def test_sources_ship_with_the_package():
    src = build.csrc_dir()
    for name in build._SOURCES:
        assert (src / name).is_file()


@pytest.mark.slow  # the build: about a minute on 2 cores, before the first test, where not cached
@pytest.mark.skipif(build.find_cuda_home() is None or torch.version.cuda is None,
                    reason="needs nvcc and a CUDA build of torch")
def test_extension_builds_and_registers_its_ops(extension):
    """Builds (or finds cached) the extension -- no GPU needed -- and checks the op schemas."""
    assert extension == build.library_path() and extension.is_file()
    for name in ("dwconv2d", "dwconv2d_input_grad", "dwconv2d_weight_grad", "dwconv2d_bias_grad"):
        assert hasattr(torch.ops.lkpatch_ext, name)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and build.find_cuda_home() is None, reason="needs nvcc")
def test_kernel_files_compile_without_torch(tmp_path):
    """csrc's kernel files are plain CUDA C++17: nvcc alone compiles them, no torch headers.

    nvcc's front end checks each whole file, host code included, down to PTX; the extension
    build (test above) runs the rest of the compilation, ptxas and the host compiler."""
    nvcc = os.path.join(build.find_cuda_home(), "bin", "nvcc")
    src = build.csrc_dir()
    kernel_files = [name for name in build._SOURCES if name.endswith(".cu")]
    assert kernel_files

    def compile_to_ptx(name):  # unoptimized: the same checks and kernels, in a quarter of the time
        return subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "--ptx", "-Xcicc", "-O0", str(src / name),
                               "-o", str(tmp_path / f"{name}.ptx")], capture_output=True, text=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for name, proc in zip(kernel_files, pool.map(compile_to_ptx, kernel_files)):
            assert proc.returncode == 0, f"{name}:\n{proc.stderr[-3000:]}"
            text = (src / name).read_text()
            if "launch(" in text or "<<<" in text:  # it launches kernels: it holds them
                assert ".entry" in (tmp_path / f"{name}.ptx").read_text(), name


def _brute_effective_macs(size, k, pads):
    n, c, h, w = size
    x = torch.ones(1, 1, h, w, dtype=torch.float64)
    ones = torch.ones(1, 1, *k, dtype=torch.float64)
    return int(F.conv2d(F.pad(x, (pads[2], pads[3], pads[0], pads[1])), ones).sum().item()) * n * c


@pytest.mark.parametrize("size,k,pads", [((2, 3, 14, 14), (27, 27), (13, 13, 13, 13)),
                                          ((1, 1, 9, 5), (4, 7), (1, 2, 3, 3)),
                                          ((1, 2, 7, 7), (1, 11), (0, 0, 5, 5)),
                                          ((1, 1, 3, 3), (3, 3), (3, 3, 3, 3))])
def test_effective_macs_counts_taps_inside_the_image(size, k, pads):
    assert dispatch.effective_macs(size, k, pads) == _brute_effective_macs(size, k, pads)


@pytest.mark.parametrize("padding,k,expected", [
    (3, (7, 7), (3, 3, 3, 3)), ((1, 2), (3, 5), (1, 1, 2, 2)), ("valid", (5, 5), (0, 0, 0, 0)),
    ("same", (7, 7), (3, 3, 3, 3)), ("same", (4, 6), (1, 2, 2, 3)), ((1, 2, 3, 4), (3, 3), (1, 2, 3, 4)),
    ("bogus", (3, 3), None)])
def test_explicit_padding(padding, k, expected):
    assert dispatch.explicit_padding(padding, k) == expected


def test_same_padding_matches_pytorch():
    x = torch.randn(1, 3, 11, 12, dtype=torch.float64)
    w = torch.randn(3, 1, 4, 6, dtype=torch.float64)
    pt, pb, pl, pr = dispatch.explicit_padding("same", (4, 6))
    assert torch.equal(F.conv2d(x, w, padding="same", groups=3),
                       F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, groups=3))


def test_cpu_tensors_never_take_the_op():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3)
    assert dispatch.op_padding(x, w, None, 1, 1, 1) is None
    with dispatch.force("auto", cpu_through_op=True):
        assert dispatch.op_padding(x, w, None, 1, 1, 1) == (1, 1, 1, 1)
        assert dispatch.op_padding(x, w, None, 2, 1, 1) is None          # stride
        assert dispatch.op_padding(x, w, None, 1, 1, 2) is None          # dilation
        assert dispatch.op_padding(x, torch.randn(8, 1, 3, 3), None, 1, 1, 1) is None  # multiplier
        assert dispatch.op_padding(x.double(), w, None, 1, 1, 1) is None  # dtype mismatch: PyTorch raises
    with dispatch.force("native", cpu_through_op=True):
        assert dispatch.op_padding(x, w, None, 1, 1, 1) is None


def test_force_rejects_unknown_policies():
    with pytest.raises(ValueError, match="impl must be"):
        with dispatch.force("fast"):
            pass


def test_env_policy_is_validated():
    code = "import lkpatch"
    env = dict(os.environ, LKPATCH_IMPL="bogus")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "LKPATCH_IMPL" in res.stderr


needs_extension = pytest.mark.skipif(build.find_cuda_home() is None or torch.version.cuda is None,
                                     reason="needs nvcc and a CUDA build of torch")
H100 = [132, 227 * 1024, 9]  # multiprocessors, shared memory a block may opt in to, compute capability


def described_plan(device=H100):
    """dispatch's plan query answered by the extension for a described GPU (no GPU needed)."""
    def query(pass_, size, kernel_size, pads, dtype, tf32, channels_last):
        return build.extension_ops().plan(pass_, list(size), list(kernel_size), list(pads), dtype, tf32,
                                          channels_last, device)
    return query


@pytest.fixture
def h100(monkeypatch, extension):
    """dispatch as on an H100: the extension's plans for it, its TF32 switch, fresh decisions."""
    monkeypatch.setattr(dispatch, "_query_plan", described_plan())
    monkeypatch.setattr(dispatch, "_extension_ready", lambda: True)
    monkeypatch.setattr(dispatch, "_tensor_cores_off", lambda: False)
    monkeypatch.setattr(dispatch, "_decisions", {})


@needs_extension
@pytest.mark.parametrize("size", [(2, 3, 0, 5), (2, 3, 5, 0), (2, 3, 0, 0)])
def test_an_empty_map_has_no_plan(h100, size):
    """An empty map that padding would give an output: no kernel takes it (the planner divided by
    zero there), and the call goes to F.conv2d, whose error it gets."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for cl in (False, True):
            for pass_ in dispatch.CONV_PASSES:
                q = dispatch.plan(pass_, size, (3, 3), (2, 2, 2, 2), dtype, cl)
                assert q.family == "none" and "empty" in q.why, (pass_, dtype, cl, q)
    x, w = torch.randn(*size), torch.randn(3, 1, 3, 3)
    with dispatch.force("auto", cpu_through_op=True):
        assert dispatch.op_padding(x, w, None, 1, 2, 1) is None


@needs_extension
def test_plan_families(h100):
    """The extension's plan: the images family for 8+ images on NCHW where the rule below gives it
    the call (channels_last on maps up to 16, with the bias gradient from the weight-gradient), the
    rows family for every other tensor-core call in either layout, exact fp32 on CUDA cores (reading channels_last where the
    kernel is small), and the CUDA-core kernels that read channels_last for small and thin kernels."""
    plan, bf, f32 = dispatch.plan, torch.bfloat16, torch.float32
    big, same31, same7 = (64, 384, 64, 64), (15,) * 4, (3,) * 4
    assert plan("forward", big, (31, 31), same31, bf)[:4] == ("tc_images", False, False, "")
    assert plan("weight_grad", (64, 1024, 7, 7), (13, 13), (6,) * 4, bf, True)[:4] == ("tc_images", True, True, "")
    assert plan("weight_grad", (64, 1024, 7, 7), (13, 13), (6,) * 4, bf)[:4] == ("tc_images", False, True, "")
    for pass_ in dispatch.CONV_PASSES:
        want = ("tc_rows", False, pass_ == "weight_grad", "")  # the weight-gradient sums the bias too
        assert plan(pass_, (4, 384, 64, 64), (31, 31), same31, bf)[:4] == want
        assert plan(pass_, big, (7, 7), same7, torch.float16, True)[:2] == (
            "fma" if pass_ == "weight_grad" else "tc_rows", True)
        assert plan(pass_, (1, 8, 200, 304), (61, 5), (30, 30, 2, 2), bf, True).family == "tc_rows"
        assert plan(pass_, big, (7, 7), same7, f32)[:4] == ("fma", False, False, "")
        # exact fp32 channels_last: read as it is (the weight-gradient sums the bias too); the
        # weight-gradient of a kernel over 49 taps through NCHW copies
        assert plan(pass_, big, (7, 7), same7, f32, True)[:4] == ("fma", True, pass_ == "weight_grad", "")
        assert plan(pass_, big, (9, 9), (4,) * 4, f32, True)[:4] == ("fma", pass_ != "weight_grad", False, "")
        # thin kernels and up to 25 taps, channels_last: the CUDA-core kernels that read it, in every dtype
        assert plan(pass_, big, (1, 11), (0, 0, 5, 5), bf, True)[:2] == ("fma", True)
        assert plan(pass_, big, (15, 1), (7, 7, 0, 0), bf, True)[:2] == ("fma", True)
        # NCHW half types: the weight-gradient of thin kernels and up to 15 taps over 512+
        # planes on the channel tiles too (summing the bias), the other passes on tensor cores
        assert plan(pass_, (64, 192, 28, 28), (1, 11), (0, 0, 5, 5), bf)[:3] == (
            ("fma", False, True) if pass_ == "weight_grad" else ("tc_images", False, False))
        assert plan(pass_, (64, 96, 56, 56), (3, 5), (1, 1, 2, 2), bf).family == (
            "fma" if pass_ == "weight_grad" else "tc_images")
        assert plan(pass_, (64, 128, 56, 56), (5, 5), (2,) * 4, bf).family == "tc_images"  # 25 taps
        assert plan(pass_, (1, 64, 200, 200), (1, 9), (0, 0, 4, 4), bf).family == "tc_rows"  # 64 planes
        assert plan(pass_, (64, 384, 7, 7), (1, 11), (0, 0, 5, 5), bf).family == "tc_images"  # a small map
        assert plan(pass_, (1, 512, 100, 7), (3, 3), (1,) * 4, bf).family == "tc_rows"  # a narrow one
        assert plan(pass_, (64, 192, 28, 28), (1, 11), (0, 0, 5, 5), f32).family == "fma"  # exact: NCHW's own
        assert plan(pass_, (64, 192, 28, 28), (1, 11), (0, 0, 5, 5), f32).macs == 0
        # ... but the weight-gradient of fewer than 32 channels on tc_rows
        assert plan(pass_, (128, 12, 56, 56), (1, 11), (0, 0, 5, 5), bf, True)[:2] == (
            "fma" if pass_ != "weight_grad" else "tc_rows", True)
        # 7 x 7 in half types: the forward and input-gradient on tc_rows, the weight-gradient on fma
        assert plan(pass_, big, (7, 7), same7, bf, True)[:2] == (
            "fma" if pass_ == "weight_grad" else "tc_rows", True)
        assert plan(pass_, big, (5, 5), (2,) * 4, bf, True)[:2] == ("fma", True)
    with dispatch.conv_tf32(True):
        assert plan("forward", (4, 384, 64, 64), (31, 31), same31, f32).family == "tc_rows"
        assert plan("forward", (4, 384, 64, 64), (7, 7), same7, f32).family == "fma"  # exact is as fast
        assert plan("forward", (4, 384, 64, 64), (7, 7), same7, f32, True)[:4] == ("fma", True, False, "")
        assert plan("weight_grad", (64, 8, 98, 98), (13, 13), (6,) * 4, f32)[:4] == ("tc_images", False, True, "")
    # Between the families on NCHW maps above 16 x 16, by the images family's empty image slots
    # and how it stages a row: 16-byte units (56, 64 wide) on images only with full 16-image
    # tiles; 8-byte units (60), which the rows family shifts, unless half its slots are empty;
    # 4-byte units (58, 30) with full tiles on maps up to 32 wide; odd widths (shifted by both)
    # on maps up to 32 wide. The weight-gradient stays on the images family.
    for n, w, family in ((64, 56, "tc_images"), (16, 64, "tc_images"), (8, 56, "tc_rows"), (24, 64, "tc_rows"),
                         (56, 56, "tc_rows"), (64, 60, "tc_images"), (12, 60, "tc_images"), (8, 60, "tc_rows"),
                         (64, 58, "tc_rows"), (64, 30, "tc_images"), (24, 30, "tc_rows"), (64, 55, "tc_rows"),
                         (64, 57, "tc_rows"), (64, 33, "tc_rows"), (64, 31, "tc_images"), (8, 27, "tc_images")):
        assert plan("forward", (n, 96, 56, w), (7, 7), same7, bf).family == family, (n, w)
        assert plan("input_grad", (n, 96, 56, w), (7, 7), same7, bf).family == family, (n, w)
        assert plan("weight_grad", (n, 96, 56, w), (7, 7), same7, bf).family == "tc_images"
    assert plan("forward", (8, 96, 14, 14), (7, 7), same7, bf).family == "tc_images"  # small maps keep it
    # the input-gradient decides on the output gradient's rows: 54 wide (4-byte units) without padding
    assert plan("forward", (64, 96, 56, 60), (7, 7), (0,) * 4, bf).family == "tc_images"
    assert plan("input_grad", (64, 96, 56, 60), (7, 7), (0,) * 4, bf).family == "tc_rows"
    assert plan("forward", (64, 1024, 7, 7), (13, 13), (6,) * 4, bf).family == "tc_images"
    with dispatch.conv_tf32(True):
        assert plan("forward", (64, 96, 57, 57), (13, 13), (6,) * 4, f32).family == "tc_images"
    none = plan("forward", big, (3, 64), (1, 1, 31, 32), bf)
    assert none.family == "none" and "63" in none.why and none.macs == 0
    # One image of a 7 x 7 map with 63 x 63: blocks of 8 channels would not fit shared memory, and
    # the 48 of them would leave most SMs idle; the rows family splits its blocks to a channel.
    for pass_ in ("forward", "input_grad"):
        assert plan(pass_, (1, 384, 7, 7), (63, 63), (31,) * 4, bf).family == "tc_rows"


@needs_extension
@pytest.mark.parametrize("knob,families", [("never", "tc_rows tc_rows tc_rows tc_images"),
                                           ("always", "tc_images tc_images tc_images tc_images")])
def test_images_knob_overrides_the_rule(extension, knob, families):
    """LKPATCH_IMAGES, read once per process: on maps above 16 x 16, never -- the images family
    only where the rows family cannot take the call; always -- its forward wherever it fits. Small
    maps keep their kernels either way. The rule would give: images, rows, images, images."""
    code = ("import torch; from lkpatch import build\n"
            "def family(pass_, n, side):\n"
            "    return build.extension_ops().plan(pass_, [n, 96, side, side], [7, 7], [3] * 4, torch.bfloat16,\n"
            f"                                      False, False, {H100}).split()[0]\n"
            "print(family('forward', 64, 56), family('forward', 8, 56), family('weight_grad', 64, 56),\n"
            "      family('forward', 64, 14))\n")
    res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, LKPATCH_IMAGES=knob),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == families.split(), res.stdout


@needs_extension
def test_plan_counts_the_tiles_work(h100):
    """The work the speed rule times is the extension's count of what its tiles issue: whole
    16-row by 8-column tiles with the zero band, and weight-gradient taps in 16-column by 8-row
    tiles (one row tile for kernels up to 8 rows, two up to 16)."""
    plan, bf = dispatch.plan, torch.bfloat16
    n, c, h, w = 4, 96, 128, 128
    for kh in (7, 8, 9, 16):
        q = plan("weight_grad", (n, c, h, w), (kh, 7), (kh // 2, (kh - 1) // 2, 3, 3), bf)
        assert q.family == "tc_rows"
        assert q.macs == n * c * h * w * 16 * (8 if kh <= 8 else 16)
    # forward, rows family: every row band of 16, 8-column tiles, 16-column k-steps: 7 wide -> one step
    q = plan("forward", (n, c, h, w), (7, 7), (3,) * 4, bf)
    assert q.family == "tc_rows" and q.macs == c * n * h * w * 7 * 16
    q = plan("forward", (n, c, 100, 100), (31, 31), (15,) * 4, bf)
    assert q.macs == c * n * 112 * 104 * 31 * 16 * 3
    assert plan("forward", (n, c, h, w), (7, 7), (3,) * 4, torch.float32).macs == 0  # exact fp32: fma


@needs_extension
def test_plan_follows_the_gpu(monkeypatch, extension):
    """What the plan reads of the GPU: no tensor cores before sm_80; shared memory per block."""
    monkeypatch.setattr(dispatch, "_extension_ready", lambda: True)
    monkeypatch.setattr(dispatch, "_tensor_cores_off", lambda: False)
    for device, family in (([80, 96 * 1024, 7], "fma"), ([108, 163 * 1024, 8], "tc_rows")):
        monkeypatch.setattr(dispatch, "_decisions", {})
        monkeypatch.setattr(dispatch, "_query_plan", described_plan(device))
        assert dispatch.plan("forward", (2, 64, 128, 128), (31, 31), (15,) * 4, torch.bfloat16).family == family
    # the TF32 banded weight-gradient stages a whole 98 x 98 plane: 102,384 bytes, too much for a
    # GPU that gives a block 99 KB, so that one runs the rows family
    for kb, family in ((227, "tc_images"), (99, "tc_rows")):
        monkeypatch.setattr(dispatch, "_decisions", {})
        monkeypatch.setattr(dispatch, "_query_plan", described_plan([132, kb * 1024, 9]))
        with dispatch.conv_tf32(True):
            assert dispatch.plan("weight_grad", (16, 8, 98, 98), (13, 13), (6,) * 4, torch.float32).family == family


@needs_extension
def test_plan_query_without_a_gpu(extension):
    """On this machine's current device (none here, or a real one) the query answers, never raises."""
    text = build.extension_ops().plan("forward", [2, 8, 16, 16], [3, 3], [1, 1, 1, 1], torch.bfloat16, False, True)
    family, layout, bias = text.split(" ")[:3]
    assert family in ("none", "fma", "tc_images", "tc_rows") and layout in ("-", "nhwc", "nchw")
    if not torch.cuda.is_available():
        assert text == "none - - 0 0 no CUDA device"
    assert build.extension_ops().plan("forward", [2, 8, 16, 16], [3, 3], [1, 1, 1, 1], torch.float64, False,
                                      False, H100) == "none - - 0 0 no kernel for Double"

@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_rule_takes_large_kernels(h100, dtype, channels_last):
    """Large kernels on large maps: every pass on lkpatch's kernels, in every dtype and layout (the
    kernels are 10-100x faster there); exact fp32 channels_last layers go through NCHW copies, and
    so do half types on two 200 x 304 maps (the NCHW tiles stage less per output: 0.65 ms and four
    copies against 1.03 ms read directly, on an H100)."""
    for size, k in (((64, 384, 64, 64), (31, 31)), ((2, 128, 200, 304), (31, 31)), ((64, 128, 56, 56), (61, 5)),
                    ((1, 128, 64, 64), (31, 31))):
        pads = dispatch.explicit_padding("same", k)
        assert all(dispatch.use_kernel(p, size, k, pads, dtype, channels_last) for p in dispatch.CONV_PASSES), \
            (size, k)
        if channels_last:
            route = dispatch.channels_last_route(size, k, pads, dtype)
            assert route in ("direct", "copies")
            if dtype == torch.float32 or size == (2, 128, 200, 304):
                assert route == "copies"


@needs_extension
def test_rule_keeps_host_bound_layers_whole(h100):
    """A layer under a few million multiply-adds is bound by host time: its passes all run on one
    path (the extension's C++ autograd op, or PyTorch's), never split, which would run the costlier
    Python autograd path. The whole layer goes where the model's sum is lower: the smallest to
    PyTorch (its fixed cost per call is lower), a tall kernel on a tiny map to the kernels (its
    PyTorch gradients walk the padded window: 181 us of GPU time against 20 on an H100)."""
    for size, k in (((8, 64, 14, 14), (5, 5)), ((2, 32, 28, 28), (7, 7)), ((1, 16, 7, 7), (3, 3)),
                    ((32, 96, 7, 7), (31, 3)), ((16, 192, 7, 7), (5, 5))):
        pads = dispatch.explicit_padding("same", k)
        assert dispatch.host_bound(size, k, pads, False)
        picks = {dispatch.use_kernel(p, size, k, pads, torch.bfloat16, False) for p in dispatch.CONV_PASSES}
        assert len(picks) == 1, (size, k)
    pads_1x3 = (1, 1, 1, 1)
    assert not dispatch.use_kernel("any", (1, 16, 7, 7), (3, 3), pads_1x3, torch.bfloat16, False)
    assert dispatch.use_kernel("all", (32, 96, 7, 7), (31, 3), (15, 15, 1, 1), torch.bfloat16, False)
    # channels_last: through copies only where the NCHW rule then runs every pass on the kernels
    assert dispatch.channels_last_route((32, 96, 7, 7), (31, 3), (15, 15, 1, 1), torch.bfloat16) == "copies"
    assert dispatch.channels_last_route((8, 64, 14, 14), (5, 5), (2, 2, 2, 2), torch.bfloat16) == "pytorch"


@needs_extension
def test_direct_route_leaves_passes_it_cannot_read_to_pytorch(h100):
    """A channels_last layer read directly: a pass whose plan would need NCHW copies runs on
    PyTorch's path (copies for one pass cost what the route avoids), as the route's sum counts it.
    ConvNeXt's stage 3 at batch 128: the weight-gradient's channels_last grid is too small."""
    size, k, pads = (128, 384, 14, 14), (7, 7), (3,) * 4
    assert dispatch.channels_last_route(size, k, pads, torch.bfloat16) == "direct"
    assert not dispatch.plan("weight_grad", size, k, pads, torch.bfloat16, True).nhwc
    assert not dispatch.use_kernel("weight_grad", size, k, pads, torch.bfloat16, True)
    assert dispatch.use_kernel("forward", size, k, pads, torch.bfloat16, True)
    assert not dispatch.reads_channels_last("all", size, k, pads, torch.bfloat16)


@needs_extension
def test_rule_counts_pytorchs_padded_taps(h100):
    """A kernel much larger than a small map: few taps land inside the image, but cuDNN's
    channels_last kernels, and its NCHW weight-gradient, spend time on the whole padded window
    (63 x 63 on 7 x 7, batch 1: 4.7 ms for PyTorch's NCHW layer on an H100, 0.6 for lkpatch's), so
    the rule takes lkpatch's kernels in both layouts."""
    size, k, pads = (1, 384, 7, 7), (63, 63), (31,) * 4
    window = 384 * 49 * 63 * 63
    assert dispatch.pytorch_macs(size, k, pads, True) == window
    assert dispatch.pytorch_macs(size, k, pads, False) == dispatch.effective_macs(size, k, pads) == 384 * 49 * 49
    assert dispatch.pytorch_macs(size, k, pads, False, "weight_grad") == window
    assert dispatch.pytorch_macs((1, 384, 7, 7), (7, 7), (3,) * 4, False, "weight_grad") == \
        dispatch.effective_macs((1, 384, 7, 7), (7, 7), (3,) * 4)  # small kernels: cuDNN's own
    for channels_last in (False, True):
        assert all(dispatch.use_kernel(p, size, k, pads, torch.bfloat16, channels_last)
                   for p in dispatch.CONV_PASSES)
    # Exact fp32 reads channels_last only up to 15 x 15: the layer takes the NCHW kernels through
    # copies (16 images: 0.26-0.30 ms a pass on PyTorch against 0.03-0.06 through copies on an H100).
    size = (16, 48, 7, 7)
    with dispatch.conv_tf32(False):
        assert dispatch.channels_last_route(size, k, pads, torch.float32) == "copies"
        assert all(dispatch.use_kernel(p, size, k, pads, torch.float32, True) for p in dispatch.CONV_PASSES)


@needs_extension
def test_channels_last_fma_plan_counts_its_tiles(h100):
    """The CUDA-core kernel reading channels_last reports the multiply-adds its tiles issue: blocks
    of 32 channels, 8 x 32 output tiles (16 x 16 for a k x 1 kernel), every tap; the rule times
    that work, so channels past a multiple of 32 and a map's ragged tiles cost what they cost."""
    bf, same = torch.bfloat16, lambda k: dispatch.explicit_padding("same", k)
    for size, k, tiles in (((64, 192, 28, 28), (1, 11), 64 * 6 * 4 * 1), ((64, 192, 28, 28), (11, 1), 64 * 6 * 2 * 2),
                           ((2, 40, 9, 70), (5, 5), 2 * 2 * 2 * 3)):
        for pass_ in dispatch.CONV_PASSES:
            q = dispatch.plan(pass_, size, k, same(k), bf, True)
            assert q[:2] == ("fma", True)
            assert q.macs == tiles * 32 * 256 * k[0] * k[1]
    assert dispatch.plan("forward", (64, 192, 28, 28), (1, 11), (0, 0, 5, 5), torch.float32).macs == 0  # NCHW fma
    # 12 channels fill a 32-channel block as 32 do: the estimates differ by the bytes alone
    def estimate(c):
        size, k, pads = (128, c, 56, 56), (1, 11), (0, 0, 5, 5)
        return dispatch.estimate_us("lkpatch", "forward", size, k, pads, bf, True,
                                    dispatch.plan("forward", size, k, pads, bf, True))

    bytes_apart = 128 * (32 - 12) * 56 * 56 * 2 * bf.itemsize
    assert estimate(32) - estimate(12) == pytest.approx(bytes_apart / dispatch.COST["bandwidth"])


@needs_extension
def test_tensor_core_plans_count_what_they_stage(h100):
    """The tensor-core plans report the elements their blocks stage: for the rows family's NCHW
    forward of 2 x 128 x 128 x 128 with 31 x 31 (bf16), 256 blocks (128 channels, two images, all
    128 columns) that each take both 64-row tiles, one after the other: 94 rows x 176 columns for
    the first, the 64 rows that follow for the second, and a B table of 31 rows x 64 entries once.
    Its channels_last tiles (4 channels of 32 x 64 outputs) stage more per output for the same
    multiply-adds, which the rule times; the CUDA-core kernels report none."""
    size, k, pads, bf = (2, 128, 128, 128), (31, 31), (15,) * 4, torch.bfloat16
    nchw, cl = (dispatch.plan("forward", size, k, pads, bf, layout) for layout in (False, True))
    assert nchw.family == cl.family == "tc_rows" and nchw.macs == cl.macs
    assert nchw.staged == 256 * ((94 + 64) * 176 + 31 * 64)
    assert cl.staged > 1.5 * nchw.staged
    assert dispatch.estimate_us("lkpatch", "forward", size, k, pads, bf, True, cl) > \
        dispatch.estimate_us("lkpatch", "forward", size, k, pads, bf, False, nchw)
    for pass_ in dispatch.CONV_PASSES:
        assert dispatch.plan(pass_, (64, 384, 64, 64), k, pads, bf).staged > 0  # the images family
        assert dispatch.plan(pass_, size, k, pads, torch.float32).staged == 0   # exact fp32: fma


@needs_extension
def test_rows_forward_blocks_of_few_images(h100):
    """With one image, the rows family's NCHW forward (bf16, an H100's 132 SMs) takes a channel a
    block, and splits a block's 16-row bands only while the grid stays within a block an SM, as its
    staged elements show: 1 x 128 x 64 x 64 with 31 x 31 in 128 blocks of all 64 rows (94 staged
    rows of 112 columns, a B table of 31 x 64), not 256 of 32 rows; 1 x 32 x 128 x 38 with 27 x 27
    in 32 x 4 blocks of 32 rows (58 staged rows each), not 32 x 8 of 16."""
    bf = torch.bfloat16
    assert dispatch.plan("forward", (1, 128, 64, 64), (31, 31), (15,) * 4, bf).staged == 128 * (94 * 112 + 31 * 64)
    assert dispatch.plan("forward", (1, 32, 128, 38), (27, 27), (13,) * 4, bf).staged == \
        32 * 4 * (58 * 112 + 27 * 64)


@needs_extension
def test_channels_last_small_maps_where_the_grid_fills_the_gpu(h100):
    """On channels_last maps up to 16 x 16 the images family's kernels take 8 channels of 16
    images a block (forward, input-gradient) or 4 channels of all images (weight-gradient, a block
    per group of up to 16 kernel rows reaching the map); with fewer blocks than the H100's 132 SMs
    the pass goes through NCHW copies (plan: fma, not channels_last, whose NCHW plan is the images
    family's per-channel kernels), where there are as many it reads channels_last as it is."""
    plan, bf, same = dispatch.plan, torch.bfloat16, lambda k: ((k - 1) // 2, k // 2) * 2
    for size, k, fwd, wgrad in (((64, 48, 14, 14), 29, False, False),     # 6 x 4 and 12 x 2 blocks
                                ((16, 1056, 14, 14), 7, True, True),      # 132 x 1, 264 x 1
                                ((16, 1048, 14, 14), 7, False, True),     # 131 x 1, 262 x 1
                                ((8, 528, 7, 7), 13, False, True),        # 66 x 1, 132 x 1
                                ((8, 524, 7, 7), 13, False, False),       # 66 x 1, 131 x 1
                                ((128, 384, 14, 14), 7, True, False),     # 48 x 8, 96 x 1 (ConvNeXt-T)
                                ((128, 768, 7, 7), 7, True, True)):       # 96 x 8, 192 x 1
        for pass_, direct in (("forward", fwd), ("input_grad", fwd), ("weight_grad", wgrad)):
            want = ("tc_images", True) if direct else ("fma", False)
            assert plan(pass_, size, (k, k), same(k), bf, True)[:2] == want, (size, k, pass_)
            assert plan(pass_, size, (k, k), same(k), bf).family == "tc_images"  # NCHW: the images family


@needs_extension
def test_rule_gives_small_map_channels_last_weight_grads_to_pytorch(h100):
    """The images family's channels_last weight-gradient of a 7 x 7 kernel on ConvNeXt-T's 7 x 7
    maps (batch 128) took 85 us on an H100 against PyTorch's 55: the rule gives that pass to
    PyTorch and keeps the forward and input-gradient."""
    size = (128, 768, 7, 7)
    assert dispatch.plan("weight_grad", size, (7, 7), (3,) * 4, torch.bfloat16, True).family == "tc_images"
    assert not dispatch.use_kernel("weight_grad", size, (7, 7), (3,) * 4, torch.bfloat16, True)
    assert dispatch.use_kernel("forward", size, (7, 7), (3,) * 4, torch.bfloat16, True)
    # a large kernel on the same maps stays on lkpatch (RepLKNet-31B's 27 x 27: 87 us against 6.3 ms)
    assert dispatch.use_kernel("weight_grad", (64, 512, 14, 14), (27, 27), (13,) * 4, torch.bfloat16, True)


@needs_extension
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_decisions_under_torch_compile_with_dynamic_shapes(h100, fmt):
    """What a compiled converted layer asks while Dynamo traces it with dynamic (symbolic) sizes,
    decisions not made yet: the sizes become numbers, and every answer is eager mode's."""
    def ask(x, w):
        size, k, pads = dispatch.static_sizes(x), dispatch.static_sizes(w)[2:], (7, 7, 2, 2)
        return (dispatch.use_kernel("any", size, k, pads, torch.bfloat16, dispatch.channels_last(x)),
                dispatch.use_kernel("all", size, k, pads, torch.bfloat16, dispatch.channels_last(x)),
                dispatch.reads_channels_last("all", size, k, pads, torch.bfloat16),
                dispatch.channels_last_route(size, k, pads, torch.bfloat16))

    answers = []

    def traced(x, w):
        answers.append(ask(x, w))
        return x + 1

    compiled = torch.compile(traced, backend="eager", dynamic=True, fullgraph=True)
    torch._dynamo.reset()
    for n, h in ((16, 40), (3, 57)):
        x = torch.randn(n, 48, h, h + 3).contiguous(memory_format=fmt)
        w = torch.randn(48, 1, 15, 5)
        compiled(x, w)
        dispatch._decisions.clear()
        assert answers.pop() == ask(x, w)


@needs_extension
def test_rule_any_all_and_policies(h100):
    """op_padding asks "any" pass, the eager C++ autograd op "all" of them; decisions are cached
    per shape; LKPATCH_IMPL's policies override the rule."""
    size, k, pads = (64, 96, 56, 56), (3, 3), (1, 1, 1, 1)
    passes = [dispatch.use_kernel(p, size, k, pads, torch.bfloat16) for p in dispatch.CONV_PASSES]
    assert dispatch.use_kernel("any", size, k, pads, torch.bfloat16) == any(passes)
    assert dispatch.use_kernel("all", size, k, pads, torch.bfloat16) == all(passes)
    with dispatch.force("kernel"):
        assert dispatch.use_kernel("all", size, k, pads, torch.bfloat16, True)
        assert dispatch.reads_channels_last("all", size, k, pads, torch.bfloat16)  # the rows family
    with dispatch.force("pytorch"):
        assert not dispatch.use_kernel("any", (64, 384, 64, 64), (31, 31), (15,) * 4, torch.bfloat16)
    with dispatch.force("native"):  # the older name
        assert dispatch.implementation() == "pytorch"
    assert not dispatch.use_kernel("forward", size, k, pads, torch.float64)


@needs_extension
def test_bias_gradient_from_the_weight_gradient_follows_the_plan(h100):
    """Where the weight-gradient's kernel (by the plan) also gives the bias gradient -- the
    images family's small-map ones, NCHW and channels_last, TF32's banded one, the rows family's
    and the CUDA-core one that reads channels_last -- no bias pass of its own runs; elsewhere the
    bias gradient's own rule decides."""
    k, pads = (27, 27), (13,) * 4
    on = dispatch.bias_grad_on_kernel
    assert not on((64, 512, 14, 14), torch.bfloat16)  # a pass of its own: too small a map
    assert on((64, 512, 14, 14), torch.bfloat16, False, k, pads)
    assert on((64, 1024, 7, 7), torch.float16, True, (13, 13), (6,) * 4)
    assert dispatch.weight_grad_sums_bias((4, 512, 14, 14), k, pads, torch.bfloat16)  # rows family
    assert dispatch.weight_grad_sums_bias((64, 384, 64, 64), (7, 7), (3,) * 4, torch.bfloat16, True)  # fma, NHWC
    assert not dispatch.weight_grad_sums_bias((64, 384, 64, 64), (7, 7), (3,) * 4, torch.bfloat16)  # NCHW fma
    with dispatch.conv_tf32(True):
        assert dispatch.weight_grad_sums_bias((64, 256, 28, 28), (29, 29), (14,) * 4, torch.float32)
    with dispatch.conv_tf32(False):
        assert not dispatch.weight_grad_sums_bias((64, 256, 28, 28), (29, 29), (14,) * 4, torch.float32)


def test_tf32_follows_pytorch(monkeypatch):
    """fp32 passes take TF32 exactly where PyTorch lets its convolutions do so."""
    from conftest import tf32
    monkeypatch.setattr(dispatch, "_tensor_cores_off", lambda: False)
    with tf32(True):
        assert dispatch.tf32_pass(torch.float32)
        assert not dispatch.tf32_pass(torch.bfloat16)  # half types are on tensor cores anyway
        conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
        if conv is not None:  # torch 2.9+: the per-operator setting
            torch.backends.cudnn.conv.fp32_precision = "ieee"
            try:
                assert not dispatch.tf32_pass(torch.float32)
            finally:
                torch.backends.cudnn.conv.fp32_precision = conv
        monkeypatch.setattr(dispatch, "_tensor_cores_off", lambda: True)  # no sm_80 GPU
        assert not dispatch.tf32_pass(torch.float32)
    monkeypatch.setattr(dispatch, "_tensor_cores_off", lambda: False)
    with tf32(False):
        assert not dispatch.tf32_pass(torch.float32)
