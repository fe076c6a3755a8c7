"""Which implementation runs a depthwise convolution. Every such decision is made here.

Two questions, two functions:

* :func:`op_padding` -- does the ``lkpatch::dwconv2d`` op reproduce this ``F.conv2d`` call
  exactly (depthwise, multiplier 1, stride 1, dilation 1, zero padding, CUDA)? It returns
  the explicit ``(top, bottom, left, right)`` padding if so. It runs inside ``torch.compile``
  graphs, so it only looks at tensor metadata.
* :func:`use_kernel` -- for one pass (forward, input-grad, weight-grad, bias-grad) of a
  supported call, run lkpatch's CUDA kernel or PyTorch's? The kernel must implement the
  case and, by the measured rule below, be faster than PyTorch on it.

``LKPATCH_IMPL=native`` (or :func:`force`) turns the kernels off; ``LKPATCH_IMPL=kernel``
runs them wherever they implement the case, ignoring the speed rule (tests, benchmarks).
``LKPATCH_TENSOR_CORES=never`` keeps every dtype on the CUDA-core kernels (benchmarks).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch

Pads = Tuple[int, int, int, int]  # (top, bottom, left, right)
PASSES = ("forward", "input_grad", "weight_grad", "bias_grad")

#: dtypes with a CUDA kernel (fp32 exact on CUDA cores, or on TF32 tensor cores where
#: :func:`tf32_pass`; fp16 / bf16 on tensor cores where
#: :func:`tensor_core_pass`, else CUDA cores; fp32 accumulation in all of them).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: largest kernel height or width the kernels take.
MAX_KERNEL_SIZE = 63
#: largest element count of one (N*C) plane stack the kernels index with 32-bit math per plane.
_MAX_PLANE = 2**31 - 1

_IMPLS = ("auto", "kernel", "native")
_impl = os.environ.get("LKPATCH_IMPL", "auto").strip().lower() or "auto"
if _impl not in _IMPLS:
    raise ValueError(f"LKPATCH_IMPL must be one of {', '.join(_IMPLS)}, not {_impl!r}")
# Tests set this to send CPU tensors through the lkpatch ops (whose CPU kernels are PyTorch's),
# so that the op machinery (autograd, fake tensors, compile) is exercised without a GPU.
_route_cpu_through_op = False


def implementation() -> str:
    """The current policy: 'auto', 'kernel' or 'native'."""
    return _impl


@contextlib.contextmanager
def force(impl: str, *, cpu_through_op: bool = False) -> Iterator[None]:
    """Temporarily set the policy ('auto', 'kernel' or 'native')."""
    global _impl, _route_cpu_through_op
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}, not {impl!r}")
    saved = _impl, _route_cpu_through_op
    _impl, _route_cpu_through_op = impl, cpu_through_op
    try:
        yield
    finally:
        _impl, _route_cpu_through_op = saved


def _pair(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """An int or a 1- or 2-sequence as (h, w); ValueError/TypeError for what F.conv2d rejects."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) not in (1, 2):
        raise ValueError(f"expected 1 or 2 values, got {len(v)}")
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def explicit_padding(padding, kernel_size: Sequence[int], dilation=1) -> Optional[Pads]:
    """A padding argument as (top, bottom, left, right), or None if malformed.

    Takes ``F.conv2d``'s forms and a 4-tuple, which is returned as it is. 'same' follows
    PyTorch: the odd pixel of an even kernel goes to the bottom/right.
    """
    dh, dw = _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            th, tw = dh * (kernel_size[0] - 1), dw * (kernel_size[1] - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        return None
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        return tuple(padding) if all(isinstance(p, int) for p in padding) else None
    try:
        ph, pw = _pair(padding)
    except (TypeError, ValueError):
        return None
    return (ph, ph, pw, pw)


def op_padding(x, weight, bias, stride, padding, dilation) -> Optional[Pads]:
    """The op's padding if ``lkpatch::dwconv2d`` computes ``F.conv2d(x, weight, bias, stride,
    padding, dilation, groups=C)`` exactly and some pass of it runs on lkpatch's kernel; else None
    (then the caller runs ``F.conv2d``, which also raises PyTorch's own error for bad input)."""
    if _impl == "native" or not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return None
    if x.dim() != 4 or weight.dim() != 4:
        return None
    if not (x.is_cuda or (_route_cpu_through_op and x.device.type == "cpu")):
        return None
    n, c, h, w = x.shape
    # Dtypes as the convolution sees them: under autocast, bf16 activations and fp32 weights
    # are both cast (by the op's autocast registration too), so they do match.
    device = x.device
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    dtype = _effective_dtype(x, autocast)
    if tuple(weight.shape[:2]) != (c, 1) or weight.device != device or _effective_dtype(weight, autocast) != dtype:
        return None
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c,)
                             or bias.device != device or _effective_dtype(bias, autocast) != dtype):
        return None
    try:
        if _pair(stride) != (1, 1) or _pair(dilation) != (1, 1):
            return None
    except (TypeError, ValueError):  # malformed: F.conv2d raises its own error
        return None
    kh, kw = weight.shape[2], weight.shape[3]
    pads = explicit_padding(padding, (kh, kw))
    if pads is None or min(pads) < 0:
        return None
    if n == 0 or c == 0 or h + pads[0] + pads[1] < kh or w + pads[2] + pads[3] < kw:
        return None  # empty or invalid: PyTorch returns or raises
    if device.type == "cuda" and not use_kernel(
            "any", (n, c, h, w), (kh, kw), pads, dtype,
            not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):
        return None
    return pads


def _effective_dtype(x: torch.Tensor, autocast: Optional[torch.dtype]) -> torch.dtype:
    """The dtype the convolution computes in: ``autocast``'s (None: autocast off), where it applies."""
    if autocast is not None and x.is_floating_point() and x.dtype != torch.float64:
        return autocast
    return x.dtype


def output_size(hw: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int]) -> Tuple[int, int]:
    """(OH, OW) of the stride-1 convolution of an (H, W) map with this kernel and padding."""
    return hw[0] + pads[0] + pads[1] - kernel_size[0] + 1, hw[1] + pads[2] + pads[3] - kernel_size[1] + 1


def _longest_side(size: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int]) -> int:
    """The longest side of the input and output maps: what sends a pass to the small-map kernels
    (csrc: ``small_map_tiles``, up to 16, or 32 for the half-type weight-gradient)."""
    return max(*size[2:], *output_size(size[2:], kernel_size, pads))


def kernel_unsupported_reason(size: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int],
                              dtype: torch.dtype) -> Optional[str]:
    """Why lkpatch's CUDA kernel cannot compute this stride-1 depthwise case (None if it can)."""
    n, c, h, w = size
    kh, kw = kernel_size
    if dtype not in KERNEL_DTYPES:
        return f"no kernel for {str(dtype).replace('torch.', '')}"
    if not (1 <= kh <= MAX_KERNEL_SIZE and 1 <= kw <= MAX_KERNEL_SIZE):
        return f"kernel {kh}x{kw} is larger than {MAX_KERNEL_SIZE}"
    oh, ow = output_size((h, w), kernel_size, pads)
    if max(h * w, oh * ow) > _MAX_PLANE or n * c > _MAX_PLANE or max(pads) > 4096:
        return "too large for the kernel's indexing"
    return None


_decisions: dict = {}


def use_kernel(pass_: str, size: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int],
               dtype: torch.dtype, channels_last: bool = False) -> bool:
    """Run ``pass_`` of this CUDA depthwise convolution on lkpatch's kernel (True) or PyTorch's?

    ``pass_`` is one of PASSES, or "any": does the forward, input-grad or weight-grad run on
    lkpatch's kernel? Or "all": do they all?
    ``channels_last``: the pass's activation comes in (and goes out) channels_last.
    """
    key = (_impl, pass_, tuple(size), tuple(kernel_size), tuple(pads), dtype, channels_last)
    decision = _decisions.get(key)
    if decision is None:
        decision = _decisions[key] = _decide(pass_, size, kernel_size, pads, dtype, channels_last)
    return decision


def _decide(pass_, size, kernel_size, pads, dtype, channels_last) -> bool:
    if pass_ == "any":  # the bias gradient alone does not take a layer from PyTorch's convolution
        return any(use_kernel(p, size, kernel_size, pads, dtype, channels_last) for p in PASSES[:3])
    if pass_ == "all":
        return all(use_kernel(p, size, kernel_size, pads, dtype, channels_last) for p in PASSES[:3])
    if _impl == "native" or kernel_unsupported_reason(size, kernel_size, pads, dtype) is not None:
        return False
    if not _extension_ready():
        return False
    return _impl == "kernel" or _faster_than_native(pass_, size, kernel_size, pads, dtype, channels_last)


def effective_macs(size: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int]) -> int:
    """Multiply-adds of one pass whose input tap lies inside the image (padding taps excluded)."""
    n, c, h, w = size

    def taps(length, k, before, after):
        return sum(min(k, length + before - o) - max(0, before - o) for o in range(length + before + after - k + 1))
    return n * c * taps(h, kernel_size[0], pads[0], pads[1]) * taps(w, kernel_size[1], pads[2], pads[3])


# Below these multiply-adds (taps inside the image) a pass is bound by host time per call, which
# is lower for PyTorch's path (H100: 8x64x28x28 with 7x7, 18 M, lost every pass; 64x512x14x14
# with 1x7, 39 M, won the bf16 forward; 16x128x56x56 with 3x3, 58 M, won all but the bias grad).
_TINY_MACS = {"forward": 30_000_000, "input_grad": 25_000_000, "weight_grad": 25_000_000}
# PyTorch's sum over a channels_last output gradient (over N, H, W) took more GPU time than
# lkpatch's kernel at every size measured (H100, bf16: 10.0 vs 5.5 us at 3.2 M elements, 146.7 vs
# 52.5 at 25.7 M); as separate calls both are bound by host time up to about 2.5 M. From 1 M
# elements the kernel takes it.
_CL_BIAS_ELEMENTS = 1_000_000


def _faster_than_native(pass_: str, size: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int],
                        dtype: torch.dtype = torch.float32, channels_last: bool = False) -> bool:
    """The measured rule: where lkpatch's kernel beat PyTorch's on an H100 (README, "When lkpatch
    uses its kernel"; GPU time of back-to-back calls, ``lkpatch bench --passes``). Small maps need
    larger kernels to win, thin kernels (one side <= 3) lose the weight gradient, and tiny problems
    are decided by host time. Most of lkpatch's kernels read NCHW, so a channels_last pass costs
    two layout copies: that loses to cuDNN's channels_last kernels on small kernels (H100, N 64,
    maps 14-56, 3x3-9x9, bf16 and fp32): below 9x9 in the forward and below 7x7 in the fp32
    gradients. Half-precision gradients stay with cuDNN below 9x9 too: its 7x7 input-grad lost
    alone, but a layer whose forward runs cuDNN pays for every pass lkpatch takes from it
    (separate calls, the copies), and timm's convnext_tiny trained 7% slower so. Where the kernels
    take channels_last as it is (:func:`native_channels_last`), 7x7 won (bf16 forward + backward,
    N 64: 14x14 maps 0.129 vs 0.214 ms, 7x7 maps 0.087 vs 0.138) and 3x3 lost.
    """
    n, c, h, w = size
    area = h * w
    kmin, kmax = min(kernel_size), max(kernel_size)
    half = dtype in (torch.float16, torch.bfloat16)
    if pass_ == "bias_grad":  # a plain reduction
        if channels_last:  # read as it is
            return n * c * area >= _CL_BIAS_ELEMENTS
        return area >= 56 * 56 and n * c * area >= 16_000_000  # close either way: only large maps
    if channels_last:
        native = native_channels_last(pass_, size, kernel_size, pads, dtype)
        if kmin < (7 if native or (not half and pass_ != "forward") else 9):
            return False
    if effective_macs(size, kernel_size, pads) < _TINY_MACS[pass_]:
        return False
    if tensor_core_pass(pass_, size, dtype):  # fp16 / bf16 sweep: N 64, C 256-1024, maps 7-56
        if pass_ == "forward":
            return area >= 28 * 28 or (kmax >= 5 if area >= 14 * 14 else kmin >= 7)
        if pass_ == "input_grad":
            return area >= 14 * 14 or kmin >= 5
        return max(h, w) <= 32 or kmin >= 5 or kmax >= 31 or (area >= 56 * 56 and kmin >= 3)
    # CUDA-core kernels: fp32, fp16 / bf16 under 8 images, and half weight-grads on narrow maps.
    if pass_ == "weight_grad":
        if kmin <= 3:
            return kmax >= 31 or (area >= 56 * 56 and not (kmin == 1 and kmax <= 7))
        return True
    if area >= 28 * 28:
        return True
    if area >= 14 * 14:
        return kmin >= 5
    return kmin >= (9 if pass_ == "forward" and not half else 7)


# The channels_last kernels (blocks of channels x 16 images, transposed in shared memory) cost
# more per tap than the NCHW ones -- they build each channel's banded fragments for 16 images,
# not 32 -- while the layout copies they save cost the same per element. On an H100 (bf16, N 64,
# GPU time per forward + backward) they won at 49 taps a pixel (7x7 maps, 13x13 kernel: 0.105 ms
# vs 0.128 through NCHW) and lost at 196 (14x14 maps, 27x27: 198 us of kernels vs 166 us).
_NATIVE_CL_TAPS = 100


def native_channels_last(pass_: str, size: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int],
                         dtype: torch.dtype) -> bool:
    """Whether the kernels take this pass's channels_last tensors as they are, without layout
    copies. They can for every bias gradient, and for fp16 / bf16 passes on tensor cores
    (:func:`tensor_core_pass`) whose input and output maps are at most 16 x 16 (``DwShape::nhwc``
    in csrc/, which this mirrors); of those, they do where they were measured faster than the
    NCHW kernels with layout copies: up to ``_NATIVE_CL_TAPS`` taps inside the image per output
    pixel (RepLKNet's 7 x 7 stage, ConvNeXt's 14 x 14 and 7 x 7 ones; not RepLKNet's 14 x 14 with
    27 x 27). "all": the forward, input-grad and weight-grad (they decide alike)."""
    key = ("native_channels_last", pass_, tuple(size), tuple(kernel_size), tuple(pads), dtype)
    decision = _decisions.get(key)
    if decision is None:
        decision = _decisions[key] = _native_channels_last(pass_, size, kernel_size, pads, dtype)
    return decision


def _native_channels_last(pass_, size, kernel_size, pads, dtype) -> bool:
    if pass_ == "all":
        return all(native_channels_last(p, size, kernel_size, pads, dtype) for p in PASSES[:3])
    if pass_ == "bias_grad":
        return dtype in KERNEL_DTYPES
    if not tensor_core_pass(pass_, size, dtype):
        return False
    n, c, h, w = size
    oh, ow = output_size((h, w), kernel_size, pads)
    if _longest_side(size, kernel_size, pads) > 16:
        return False
    if pass_ != "weight_grad" and (n + 15) // 16 > 65535:  # the forward's grid: 16-image slices
        return False
    return effective_macs(size, kernel_size, pads) <= _NATIVE_CL_TAPS * n * c * oh * ow


def bias_grad_on_kernel(size: Sequence[int], dtype: torch.dtype, channels_last: bool = False,
                        kernel_size: Optional[Sequence[int]] = None, pads: Optional[Sequence[int]] = None) -> bool:
    """Whether a bias gradient runs on lkpatch's kernel. As a pass of its own it does not depend on
    the convolution's kernel or padding; with them given (the eager path's C++ backward, where
    the weight-gradient runs on the kernels too), also wherever the weight-gradient's kernel gives
    it on the way (:func:`weight_grad_sums_bias`): then it costs no pass of its own."""
    layer = None if kernel_size is None else (tuple(kernel_size), tuple(pads))
    key = ("bias_grad_on_kernel", _impl, tuple(size), dtype, channels_last, layer,
           dtype == torch.float32 and tf32_pass(dtype))
    decision = _decisions.get(key)
    if decision is None:
        decision = _decisions[key] = ((layer is not None
                                       and weight_grad_sums_bias(size, kernel_size, pads, dtype, channels_last))
                                      or use_kernel("bias_grad", size, (1, 1), (0, 0, 0, 0), dtype, channels_last))
    return decision


def weight_grad_sums_bias(size: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int],
                          dtype: torch.dtype, channels_last: bool = False) -> bool:
    """Whether the weight-gradient of this call, on lkpatch's kernel, also gives the bias
    gradient: the tensor-core kernels that walk every staged element of the output gradient anyway
    -- the small-map ones (fp16 / bf16 maps up to 32 x 32, TF32 up to 16 x 16; 8+ images; and
    channels_last where the weight-gradient takes it natively) and TF32's banded one, in its
    rounding pass (csrc: ``dwconv2d_weight_grad_takes_bias``, which this mirrors)."""
    if not use_kernel("weight_grad", size, kernel_size, pads, dtype, channels_last):
        return False
    if channels_last:  # else the weight-gradient runs on NCHW copies, with no bias gradient
        return native_channels_last("weight_grad", size, kernel_size, pads, dtype)
    if dtype in (torch.float16, torch.bfloat16):
        return tensor_core_pass("weight_grad", size, dtype) and _longest_side(size, kernel_size, pads) <= 32
    return tf32_pass(dtype) and _tf32_weight_grad_fits(size, kernel_size, pads)


def _tf32_weight_grad_fits(size: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int]) -> bool:
    """Whether the TF32 weight-gradient runs on tensor cores (csrc: ``dwconv2d_tc_weight_grad_fits``
    and the banded kernel's plan, which this mirrors): 8+ images; maps up to 16 x 16, or from
    20 x 20 in area where an image's staged output-gradient plane and input rows fit in 100 KB
    (about 100 x 100; less where the GPU gives a block less) and the kernel in 64 tiles of
    32 x 32."""
    n, c, h, w = size
    kh, kw = kernel_size
    if n < 8 or c > 65535:
        return False
    if _longest_side(size, kernel_size, pads) <= 16:
        return True
    oh, ow = output_size((h, w), kernel_size, pads)
    if oh * ow < 400:
        return False
    jt, it = (1 if kw <= 16 else 2), (2 if kh <= 16 else 4)  # tiles of 16 jt kernel columns, 8 it rows
    owp = -(-ow // 16) * 16
    gpitch = owp + (4 if owp // 4 % 2 == 0 else 0)  # floats a staged output-gradient row
    rows, xw = min(h, 8 * it - 1 + oh), owp + 16 * jt + 16  # staged input rows, floats each
    tiles = -(-kw // (16 * jt)) * -(-kh // (8 * it))
    return tiles <= 64 and ((oh + 1) * gpitch + rows * xw) * 4 <= min(100 * 1024, _block_smem_limit())


def _block_smem_limit() -> int:
    """Bytes of shared memory a block may opt in to on the current GPU (csrc's
    ``max_smem_optin``); unbounded where it cannot be read (no GPU, an older torch)."""
    if not torch.cuda.is_available():
        return 1 << 30
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", 1 << 30)


def tensor_core_pass(pass_: str, size: Sequence[int], dtype: torch.dtype) -> bool:
    """Whether the CUDA kernels run this fp16 / bf16 pass on tensor cores: 8 or more images, an
    sm_80+ GPU; the weight-grad only on maps up to 32 x 32 or from 20 x 20 in area. The kernels
    make this choice themselves (csrc/dwconv_tc*.cu); the speed rule mirrors it. ``size`` is the
    input's (N, C, H, W). fp32 passes the kernels run in TF32 (:func:`tf32_pass`) are not
    counted here: the speed rule judges them by the exact kernels', which the TF32 kernels beat
    on the shapes timed (README), so it errs towards cuDNN for them."""
    if dtype not in (torch.float16, torch.bfloat16) or size[0] < 8 or _tensor_cores_off():
        return False
    h, w = size[2], size[3]
    return pass_ != "weight_grad" or max(h, w) <= 32 or h * w >= 400


def tf32_pass(dtype: torch.dtype) -> bool:
    """Whether fp32 passes may run on TF32 tensor cores: PyTorch allows TF32 convolutions
    (``torch.backends.cudnn.conv.fp32_precision == "tf32"`` from torch 2.9, else
    ``torch.backends.cudnn.allow_tf32``; both on by default) on an sm_80+ GPU. Read per call, as
    cuDNN reads it. Then the forward and input-grad (8+ images; maps up to 16 x 16, or from
    28 x 28 with 9+ taps a row) and the weight-grad (8+ images; maps up to 16 x 16, or from
    20 x 20 in area) use TF32; the bias gradient and the rest stay exact fp32, where the
    CUDA-core kernels were as fast."""
    return dtype == torch.float32 and _conv_tf32_allowed() and not _tensor_cores_off()


@contextlib.contextmanager
def conv_tf32(enabled: bool) -> Iterator[None]:
    """Set PyTorch's TF32 switch for convolutions (cuDNN's, which :func:`tf32_pass` follows) for a
    block, restoring it after."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _conv_tf32_allowed() -> bool:
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is not None:
        try:
            return getter("cuda", "conv") == "tf32"
        except (RuntimeError, TypeError):
            pass
    return torch._C._get_cudnn_allow_tf32()


@torch.compiler.assume_constant_result
def _tensor_cores_off() -> bool:
    return _tensor_cores_off_once()


@functools.lru_cache(maxsize=None)
def _tensor_cores_off_once() -> bool:
    # Read once per process, as the extension reads LKPATCH_TENSOR_CORES: tf32_pass asks on every
    # fp32 call, and the device query costs host time.
    if os.environ.get("LKPATCH_TENSOR_CORES", "").strip().lower().startswith("n"):
        return True
    return not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8


def kernels_ready() -> bool:
    """Whether lkpatch's CUDA extension is loaded or loads here (built on first use)."""
    return _extension_ready()


@torch.compiler.assume_constant_result
def _extension_ready() -> bool:
    from . import build
    return build.extension_ready()
