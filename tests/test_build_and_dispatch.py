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

    def compile_to_ptx(name):
        return subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "--ptx", str(src / name),
                               "-o", str(tmp_path / f"{name}.ptx")], capture_output=True, text=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for name, proc in zip(kernel_files, pool.map(compile_to_ptx, kernel_files)):
            assert proc.returncode == 0, f"{name}:\n{proc.stderr[-3000:]}"
            assert ".entry" in (tmp_path / f"{name}.ptx").read_text(), name  # it holds kernels


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


@pytest.mark.parametrize("pass_,size,k,expected", [
    ("forward", (64, 384, 64, 64), (31, 31), True),    # large maps: always the kernel
    ("forward", (64, 384, 56, 56), (3, 3), True),
    ("forward", (32, 256, 7, 7), (13, 13), False),     # tiny problem: PyTorch's lower host time
    ("forward", (64, 1024, 7, 7), (13, 13), True),
    ("forward", (64, 1024, 7, 7), (7, 7), False),      # 7x7 maps: kernels from 9x9 (forward)
    ("input_grad", (64, 1024, 7, 7), (7, 7), True),    # and from 7x7 (input-grad)
    ("input_grad", (64, 1024, 7, 7), (5, 5), False),
    ("forward", (8, 64, 14, 14), (5, 5), False),       # tiny
    ("forward", (64, 512, 14, 14), (5, 5), True),      # 14x14 maps: from 5x5
    ("forward", (64, 512, 14, 14), (1, 7), False),
    ("forward", (64, 256, 28, 28), (3, 3), True),      # 28x28 maps and larger: every kernel
    ("input_grad", (32, 256, 7, 7), (3, 3), False),
    ("input_grad", (64, 512, 14, 14), (27, 27), True),
    ("input_grad", (8, 64, 28, 28), (7, 7), False),    # tiny
    ("weight_grad", (32, 256, 56, 56), (1, 7), False),  # thin kernels: PyTorch's weight-grad wins
    ("weight_grad", (32, 256, 56, 56), (1, 11), True),
    ("weight_grad", (32, 256, 28, 28), (3, 3), False),
    ("weight_grad", (64, 256, 28, 28), (1, 31), True),
    ("weight_grad", (64, 1024, 7, 7), (5, 5), True),
    ("weight_grad", (8, 64, 28, 28), (7, 7), False),   # tiny
    ("bias_grad", (64, 96, 56, 56), (1, 1), True),
    ("bias_grad", (16, 128, 56, 56), (1, 1), False),   # too few elements
    ("bias_grad", (64, 96, 28, 28), (1, 1), False),
])
def test_measured_rule(pass_, size, k, expected):
    pads = ((k[0] - 1) // 2, k[0] // 2, (k[1] - 1) // 2, k[1] // 2)
    assert dispatch._faster_than_native(pass_, size, k, pads) is expected


def test_unsupported_reasons():
    assert dispatch.kernel_unsupported_reason((1, 1, 8, 8), (3, 3), (1, 1, 1, 1), torch.float32) is None
    assert "float64" in dispatch.kernel_unsupported_reason((1, 1, 8, 8), (3, 3), (1, 1, 1, 1), torch.float64)
    assert "63" in dispatch.kernel_unsupported_reason((1, 1, 80, 80), (65, 3), (0, 0, 1, 1), torch.float32)


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


@pytest.mark.parametrize("pass_,k,dtype,expected", [
    ("forward", (7, 7), torch.bfloat16, False),      # cuDNN's channels_last forward wins below 9x9
    ("forward", (9, 9), torch.bfloat16, True),
    ("forward", (7, 7), torch.float32, False),
    ("weight_grad", (7, 7), torch.float16, False),    # and its half weight-grad
    ("weight_grad", (9, 9), torch.bfloat16, True),
    ("weight_grad", (7, 7), torch.float32, True),     # not its fp32 weight-grad from 7x7
    ("weight_grad", (5, 5), torch.float32, False),
    ("input_grad", (7, 7), torch.float32, True),      # nor its input-grad from 7x7
    ("input_grad", (5, 5), torch.float32, False),
    ("input_grad", (7, 7), torch.bfloat16, False),    # half precision: every pass below 9x9
    ("input_grad", (9, 9), torch.bfloat16, True),
    ("bias_grad", (1, 1), torch.float32, True),       # read channels_last as it is: 19 M elements
])
def test_measured_rule_channels_last(pass_, k, dtype, expected):
    pads = ((k[0] - 1) // 2, k[0] // 2, (k[1] - 1) // 2, k[1] // 2)
    assert dispatch._faster_than_native(pass_, (64, 96, 56, 56), k, pads, dtype, channels_last=True) is expected


@pytest.mark.parametrize("pass_,size,k,expected", [
    ("forward", (32, 256, 7, 7), (13, 13), False),     # tiny problem
    ("forward", (64, 1024, 7, 7), (7, 7), True),       # 7x7 maps: from 7x7 (forward), 5x5 (input-grad)
    ("forward", (64, 1024, 7, 7), (5, 5), False),
    ("input_grad", (64, 1024, 7, 7), (5, 5), True),
    ("input_grad", (64, 1024, 7, 7), (3, 3), False),
    ("forward", (16, 1024, 7, 7), (13, 13), True),
    ("forward", (64, 512, 14, 14), (3, 3), False),     # tensor cores on 14x14 maps: from 5 taps wide
    ("forward", (64, 512, 14, 14), (1, 7), True),
    ("forward", (32, 256, 14, 14), (13, 13), True),
    ("forward", (32, 256, 28, 28), (5, 5), True),
    ("forward", (64, 256, 56, 56), (3, 3), True),
    ("input_grad", (32, 256, 14, 14), (1, 7), False),  # tiny
    ("input_grad", (64, 512, 14, 14), (3, 3), True),
    ("weight_grad", (32, 256, 28, 28), (3, 3), True),
    ("weight_grad", (64, 128, 56, 56), (3, 3), True),
    ("weight_grad", (64, 128, 40, 40), (3, 3), False),
    ("weight_grad", (32, 256, 28, 28), (5, 5), True),
    ("weight_grad", (64, 512, 14, 14), (1, 7), True),   # maps up to 32x32: images as K, every kernel wins
    ("weight_grad", (64, 256, 28, 28), (1, 7), True),
    ("weight_grad", (64, 96, 56, 56), (1, 7), False),   # larger maps: thin kernels lose the weight-grad
    ("weight_grad", (4, 256, 56, 56), (3, 3), True),   # 4 images: no tensor cores, the fp32 rule
])
def test_measured_rule_tensor_cores(monkeypatch, pass_, size, k, expected):
    monkeypatch.setattr(dispatch, "_tensor_cores_off", lambda: False)  # as on an sm_80+ GPU
    pads = ((k[0] - 1) // 2, k[0] // 2, (k[1] - 1) // 2, k[1] // 2)
    assert dispatch._faster_than_native(pass_, size, k, pads, torch.bfloat16) is expected


def test_tensor_core_passes(monkeypatch):
    monkeypatch.setattr(dispatch, "_tensor_cores_off", lambda: False)
    assert dispatch.tensor_core_pass("forward", (8, 4, 14, 14), torch.float16)
    assert not dispatch.tensor_core_pass("forward", (7, 4, 14, 14), torch.float16)    # under 8 images
    assert not dispatch.tensor_core_pass("forward", (64, 4, 14, 14), torch.float32)   # fp32: tf32_pass
    assert dispatch.tensor_core_pass("weight_grad", (64, 4, 14, 14), torch.bfloat16)       # small maps
    assert dispatch.tensor_core_pass("weight_grad", (64, 4, 18, 18), torch.bfloat16)       # up to 32x32
    assert not dispatch.tensor_core_pass("weight_grad", (64, 4, 6, 40), torch.bfloat16)
    assert dispatch.tensor_core_pass("forward", (64, 4, 7, 7), torch.bfloat16)            # small maps
    assert dispatch.tensor_core_pass("forward", (64, 4, 3, 20), torch.bfloat16)           # and narrow ones
    assert dispatch.tensor_core_pass("weight_grad", (64, 4, 28, 28), torch.bfloat16)
    monkeypatch.setattr(dispatch, "_tensor_cores_off", lambda: True)
    assert not dispatch.tensor_core_pass("forward", (64, 4, 56, 56), torch.bfloat16)


def test_native_channels_last(monkeypatch):
    """Which channels_last passes the kernels take without layout copies: fp16 / bf16 on tensor
    cores (8+ images, sm_80+), input and output maps up to 16 x 16, up to 100 taps a pixel; every
    bias gradient."""
    monkeypatch.setattr(dispatch, "_tensor_cores_off", lambda: False)  # as on an sm_80+ GPU
    monkeypatch.setattr(dispatch, "_decisions", {})
    native = dispatch.native_channels_last
    for pass_ in ("forward", "input_grad", "weight_grad", "all"):
        assert native(pass_, (64, 1024, 7, 7), (13, 13), (6, 6, 6, 6), torch.bfloat16)  # 49 taps a pixel
        assert native(pass_, (64, 384, 14, 14), (7, 7), (3, 3, 3, 3), torch.float16)
        assert native(pass_, (8, 3, 16, 5), (9, 27), (4, 4, 11, 11), torch.float16)  # output 16 x 1
        assert native(pass_, (64, 512, 14, 14), (3, 3), (2, 2, 1, 1), torch.bfloat16)  # output 16 x 14
        assert not native(pass_, (64, 512, 14, 14), (27, 27), (13, 13, 13, 13), torch.bfloat16)  # 196 taps
        assert not native(pass_, (7, 1024, 7, 7), (13, 13), (6, 6, 6, 6), torch.bfloat16)  # under 8 images
        assert not native(pass_, (64, 1024, 7, 7), (13, 13), (6, 6, 6, 6), torch.float32)  # fp32
        assert not native(pass_, (64, 512, 17, 14), (3, 3), (1, 1, 1, 1), torch.bfloat16)  # a side over 16
        assert not native(pass_, (64, 512, 14, 14), (3, 3), (3, 2, 1, 1), torch.bfloat16)  # output 17 rows
    # the forward's grid holds up to 65535 slices of 16 images; the weight-grad's has no such limit
    assert native("forward", (16 * 65535, 8, 7, 7), (7, 7), (3, 3, 3, 3), torch.bfloat16)
    for pass_ in ("forward", "input_grad", "all"):
        assert not native(pass_, (16 * 65535 + 1, 8, 7, 7), (7, 7), (3, 3, 3, 3), torch.bfloat16)
    assert native("weight_grad", (16 * 65535 + 1, 8, 7, 7), (7, 7), (3, 3, 3, 3), torch.bfloat16)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert native("bias_grad", (64, 512, 56, 56), (1, 1), (0, 0, 0, 0), dtype)
    monkeypatch.setattr(dispatch, "_tensor_cores_off", lambda: True)
    monkeypatch.setattr(dispatch, "_decisions", {})
    assert not native("forward", (64, 1024, 7, 7), (13, 13), (6, 6, 6, 6), torch.bfloat16)


@pytest.mark.parametrize("pass_,size,k,expected", [
    ("forward", (64, 384, 14, 14), (7, 7), True),       # ConvNeXt's 14 x 14 and 7 x 7 stages
    ("input_grad", (64, 768, 7, 7), (7, 7), True),
    ("weight_grad", (64, 768, 7, 7), (7, 7), True),
    ("forward", (64, 1024, 7, 7), (13, 13), True),      # RepLKNet's 7 x 7 stage
    ("forward", (64, 512, 14, 14), (5, 5), False),      # under 7 x 7: cuDNN
    ("weight_grad", (64, 512, 14, 14), (3, 3), False),
    ("forward", (64, 512, 14, 14), (27, 27), True),     # through NCHW (not native): the copies' rule
    ("forward", (64, 256, 28, 28), (7, 7), False),
    ("bias_grad", (64, 512, 14, 14), (1, 1), True),     # read as it is: from 1 M elements
    ("bias_grad", (8, 256, 14, 14), (1, 1), False),
])
def test_measured_rule_native_channels_last(monkeypatch, pass_, size, k, expected):
    monkeypatch.setattr(dispatch, "_tensor_cores_off", lambda: False)
    monkeypatch.setattr(dispatch, "_decisions", {})
    pads = ((k[0] - 1) // 2, k[0] // 2, (k[1] - 1) // 2, k[1] // 2)
    assert dispatch._faster_than_native(pass_, size, k, pads, torch.bfloat16, channels_last=True) is expected


def test_any_pass_decision(monkeypatch):
    """op_padding asks whether any pass runs on the kernel: one cached decision over PASSES."""
    monkeypatch.setattr(dispatch, "_extension_ready", lambda: True)
    monkeypatch.setattr(dispatch, "_decisions", {})
    pads = (15, 15, 15, 15)
    assert dispatch.use_kernel("any", (64, 384, 64, 64), (31, 31), pads, torch.float32)
    # channels_last half precision 3x3: every convolution pass stays with cuDNN; the bias gradient
    # alone would take the kernel, but does not take the layer from PyTorch's convolution
    small = (1, 1, 1, 1)
    assert not any(dispatch.use_kernel(p, (64, 96, 56, 56), (3, 3), small, torch.bfloat16, True)
                   for p in dispatch.PASSES[:3])
    assert dispatch.use_kernel("bias_grad", (64, 96, 56, 56), (3, 3), small, torch.bfloat16, True)
    assert not dispatch.use_kernel("any", (64, 96, 56, 56), (3, 3), small, torch.bfloat16, True)
    with dispatch.force("kernel"):
        assert dispatch.use_kernel("any", (64, 96, 56, 56), (3, 3), small, torch.bfloat16, True)
    with dispatch.force("native"):
        assert not dispatch.use_kernel("any", (64, 384, 64, 64), (31, 31), pads, torch.float32)


def test_all_pass_decision(monkeypatch):
    """The eager path's C++ autograd op takes a call only where the forward, input-grad and
    weight-grad all run on the kernel (the bias gradient is decided on its own)."""
    monkeypatch.setattr(dispatch, "_extension_ready", lambda: True)
    monkeypatch.setattr(dispatch, "_decisions", {})
    cases = [((64, 384, 64, 64), (31, 31), (15, 15, 15, 15), torch.bfloat16),  # every pass
             ((64, 512, 7, 7), (5, 5), (2, 2, 2, 2), torch.bfloat16),  # forward stays with PyTorch
             ((64, 96, 56, 56), (1, 3), (0, 0, 1, 1), torch.float32)]  # thin kernel: weight-grad does
    for size, k, pads, dtype in cases:
        passes = [dispatch.use_kernel(p, size, k, pads, dtype) for p in dispatch.PASSES[:3]]
        assert dispatch.use_kernel("all", size, k, pads, dtype) == all(passes)
    assert dispatch.use_kernel("all", *cases[0])
    assert not dispatch.use_kernel("all", *cases[1]) and not dispatch.use_kernel("all", *cases[2])
    with dispatch.force("kernel"):
        assert dispatch.use_kernel("all", *cases[1])


def test_bias_gradient_rides_on_the_small_map_weight_gradient(monkeypatch):
    """A bias gradient that is a pass of its own stays with PyTorch on small NCHW maps; where the
    eager C++ backward's weight-gradient runs a tensor-core kernel that sums the bias gradient on
    the way (the small-map ones, channels_last ones the kernels take natively too; TF32's banded
    one), it is lkpatch's. Not in channels_last through NCHW copies, fp32 without TF32, under 8
    images, on half-type maps over 32, or where TF32 stays on CUDA cores (maps over 16 and under
    20 x 20 in area, or too large to stage)."""
    monkeypatch.setattr(dispatch, "_extension_ready", lambda: True)
    monkeypatch.setattr(dispatch, "_tensor_cores_off", lambda: False)
    monkeypatch.setattr(dispatch, "_decisions", {})
    on = dispatch.bias_grad_on_kernel
    k, pads = (27, 27), (13, 13, 13, 13)
    assert not on((64, 512, 14, 14), torch.bfloat16)  # a pass of its own
    assert on((64, 512, 14, 14), torch.bfloat16, False, k, pads)
    assert on((64, 256, 28, 28), torch.float16, False, (29, 29), (14, 14, 14, 14))
    big = (64, 128, 56, 56)  # the banded weight-gradient kernel: the bias gradient's own rule
    assert not dispatch.weight_grad_sums_bias(big, (31, 31), (15, 15, 15, 15), torch.bfloat16)
    assert on(big, torch.bfloat16, False, (31, 31), (15, 15, 15, 15)) == on(big, torch.bfloat16)
    assert not on((4, 512, 14, 14), torch.bfloat16, False, k, pads)  # CUDA cores
    # channels_last through NCHW copies (196 taps a pixel): the bias gradient's own rule
    assert not dispatch.weight_grad_sums_bias((64, 512, 14, 14), k, pads, torch.bfloat16, True)
    assert on((64, 512, 14, 14), torch.bfloat16, True, k, pads) == on((64, 512, 14, 14), torch.bfloat16, True)
    # ... and natively (49 taps a pixel): on the weight-gradient's kernel, in half types only
    assert dispatch.weight_grad_sums_bias((64, 1024, 7, 7), (13, 13), (6, 6, 6, 6), torch.bfloat16, True)
    assert on((64, 1024, 7, 7), torch.float16, True, (13, 13), (6, 6, 6, 6))
    assert not dispatch.weight_grad_sums_bias((4, 1024, 7, 7), (13, 13), (6, 6, 6, 6), torch.bfloat16, True)
    with dispatch.conv_tf32(True):
        assert not dispatch.weight_grad_sums_bias((64, 1024, 7, 7), (13, 13), (6, 6, 6, 6), torch.float32, True)
    with dispatch.conv_tf32(True):
        assert on((64, 512, 14, 14), torch.float32, False, k, pads)
        assert on((64, 256, 28, 28), torch.float32, False, (29, 29), (14, 14, 14, 14))  # banded, TF32
        assert on(big, torch.float32, False, (31, 31), (15, 15, 15, 15))
        assert not dispatch.weight_grad_sums_bias((64, 256, 18, 18), (7, 7), (3, 3, 3, 3), torch.float32)  # CUDA cores
        assert not dispatch.weight_grad_sums_bias((8, 4, 256, 256), (31, 31), (15, 15, 15, 15), torch.float32)
        assert dispatch.weight_grad_sums_bias((8, 4, 96, 96), (31, 31), (15, 15, 15, 15), torch.float32)
        # staged in 102,384 bytes: within the 100 KB budget, not within a 99 KB GPU's block
        for limit_kb, fits in ((227, True), (99, False)):
            monkeypatch.setattr(dispatch, "_block_smem_limit", lambda: limit_kb * 1024)
            assert dispatch._tf32_weight_grad_fits((16, 8, 98, 98), (13, 13), (6, 6, 6, 6)) == fits
    with dispatch.conv_tf32(False):  # exact fp32: the CUDA-core kernels
        assert not on((64, 512, 14, 14), torch.float32, False, k, pads)


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
