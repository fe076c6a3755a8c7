"""Which implementation runs a depthwise convolution. Every such decision is made here.

Three questions, three functions:

* :func:`op_padding` -- does the ``lkpatch::dwconv2d`` op reproduce this ``F.conv2d`` call
  exactly (depthwise, multiplier 1, stride 1, dilation 1, zero padding, CUDA)? It returns
  the explicit ``(top, bottom, left, right)`` padding if so. It runs inside ``torch.compile``
  graphs, so it only looks at tensor metadata.
* :func:`plan` -- which of lkpatch's kernel families would run a pass, whether it reads
  channels_last tensors as they are, and whether its weight-gradient also gives the bias
  gradient. The extension decides that (``dwconv2d_plan`` in ``csrc/dwconv_plan.cu``); this only
  asks it, once per shape.
* :func:`use_kernel` -- for one pass of a supported call, run lkpatch's kernels or PyTorch's?
  The measured speed rule: :func:`estimate_us` models both on the GPU the rule was measured on.

``LKPATCH_IMPL=pytorch`` (or :func:`force`; ``native`` is an older name for it) turns the
kernels off; ``LKPATCH_IMPL=kernel`` runs them wherever they implement the case, ignoring the
speed rule (tests, benchmarks). ``LKPATCH_TENSOR_CORES=never`` keeps every dtype on the
CUDA-core kernels (read by the extension).
"""
from __future__ import annotations

import contextlib
import functools
import operator
import os
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import torch

Pads = Tuple[int, int, int, int]  # (top, bottom, left, right)
PASSES = ("forward", "input_grad", "weight_grad", "bias_grad")
CONV_PASSES = PASSES[:3]

#: dtypes with a CUDA kernel (fp32 exact on CUDA cores, or on TF32 tensor cores where
#: :func:`tf32_pass`; fp16 / bf16 on tensor cores; fp32 accumulation in all of them).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: largest kernel height or width the kernels take.
MAX_KERNEL_SIZE = 63

_ALIASES = {"native": "pytorch"}
_IMPLS = ("auto", "kernel", "pytorch")


def _impl_name(name: str, what: str = "impl") -> str:
    name = _ALIASES.get(name, name)
    if name not in _IMPLS:
        raise ValueError(f"{what} must be one of {', '.join(_IMPLS)} (or native), not {name!r}")
    return name


_impl = _impl_name(os.environ.get("LKPATCH_IMPL", "auto").strip().lower() or "auto", "LKPATCH_IMPL")
# Tests set this to send CPU tensors through the lkpatch ops (whose CPU kernels are PyTorch's),
# so that the op machinery (autograd, fake tensors, compile) is exercised without a GPU.
_route_cpu_through_op = False


def implementation() -> str:
    """The current policy: 'auto', 'kernel' or 'pytorch'."""
    return _impl


@contextlib.contextmanager
def force(impl: str, *, cpu_through_op: bool = False) -> Iterator[None]:
    """Temporarily set the policy ('auto', 'kernel' or 'pytorch'; 'native' means 'pytorch')."""
    global _impl, _route_cpu_through_op
    impl = _impl_name(impl)
    saved = _impl, _route_cpu_through_op
    _impl, _route_cpu_through_op = impl, cpu_through_op
    try:
        yield
    finally:
        _impl, _route_cpu_through_op = saved


def is_integer(v) -> bool:
    """An integer as F.conv2d takes one for a size argument: Python's or numpy's, not a bool, a
    float, an array or a tensor."""
    return (not isinstance(v, (bool, torch.Tensor)) and hasattr(type(v), "__index__")
            and not hasattr(type(v), "__len__"))  # an array, even 0-d; numpy's scalars have no length


def _pair(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """An integer or a tuple / list of 1 or 2 of them as (h, w); ValueError / TypeError for what
    F.conv2d rejects."""
    if isinstance(v, (tuple, list)):
        if len(v) not in (1, 2):
            raise ValueError(f"expected 1 or 2 values, got {len(v)}")
        v = (v[0], v[0]) if len(v) == 1 else (v[0], v[1])
    else:
        v = (v, v)
    if not all(is_integer(e) for e in v):
        raise TypeError(f"expected integers, got {v}")
    return v


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
        return tuple(padding) if all(is_integer(p) for p in padding) else None
    try:
        ph, pw = _pair(padding)
    except (TypeError, ValueError):
        return None
    return (ph, ph, pw, pw)


def op_padding(x, weight, bias, stride, padding, dilation) -> Optional[Pads]:
    """The op's padding if ``lkpatch::dwconv2d`` computes ``F.conv2d(x, weight, bias, stride,
    padding, dilation, groups=C)`` exactly and some pass of it runs on lkpatch's kernel; else None
    (then the caller runs ``F.conv2d``, which also raises PyTorch's own error for bad input)."""
    if _impl == "pytorch" or not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return None
    if x.dim() != 4 or weight.dim() != 4:
        return None
    if not (x.is_cuda or (_route_cpu_through_op and x.device.type == "cpu")):
        return None
    n, c, h, w = x.shape
    # Dtypes as the convolution sees them: under autocast, bf16 activations and fp32 weights
    # are both cast (by the op's autocast registration too), so they do match.
    device = x.device
    autocast = autocast_dtype(device.type)
    dtype = compute_dtype(x, autocast)
    if tuple(weight.shape[:2]) != (c, 1) or weight.device != device or compute_dtype(weight, autocast) != dtype:
        return None
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c,)
                             or bias.device != device or compute_dtype(bias, autocast) != dtype):
        return None
    kh, kw = static_sizes(weight)[2:]
    pads = _stride1_pads(stride, padding, dilation, kh, kw)
    if pads is None:
        return None
    if 0 in (n, c, h, w) or h + pads[0] + pads[1] < kh or w + pads[2] + pads[3] < kw:
        return None  # empty or invalid: PyTorch returns or raises
    if device.type == "cuda" and not use_kernel("any", static_sizes(x), (kh, kw), pads, dtype, channels_last(x)):
        return None
    return pads


def static_sizes(t: torch.Tensor) -> Tuple[int, ...]:
    """``t``'s sizes as numbers, for the plan and the rule. Under ``torch.compile`` with dynamic
    shapes they are symbols: ``operator.index`` makes Dynamo specialize the graph to these values
    (a new size compiles again), as the decisions depend on them."""
    if torch.compiler.is_compiling():
        return tuple(operator.index(d) for d in t.shape)
    return tuple(t.shape)


_geometry: dict = {}


def _stride1_pads(stride, padding, dilation, kh: int, kw: int) -> Optional[Pads]:
    """The explicit padding of a stride-1, dilation-1 call with valid padding, else None; kept per
    argument values (a model's layers repeat a few), as the arguments' checks cost host time."""
    key = (_geometry_key(stride), _geometry_key(padding), _geometry_key(dilation), kh, kw)
    if None in key[:3]:
        return _check_geometry(stride, padding, dilation, kh, kw)
    if key not in _geometry:
        _geometry[key] = _check_geometry(stride, padding, dilation, kh, kw)
    return _geometry[key]


def _geometry_key(a):
    """``a`` as a key that no other argument value shares (1.0 == 1 as keys), or None."""
    if type(a) is int or type(a) is str:
        return a
    if type(a) in (tuple, list) and all(type(e) is int for e in a):
        return tuple(a)
    return None


def _check_geometry(stride, padding, dilation, kh, kw) -> Optional[Pads]:
    try:
        if _pair(stride) != (1, 1) or _pair(dilation) != (1, 1):
            return None
    except (TypeError, ValueError):  # malformed: F.conv2d raises its own error
        return None
    pads = explicit_padding(padding, (kh, kw))
    if pads is None:  # malformed (a bool, a float, an array): F.conv2d raises its own error
        return None
    pads = tuple(operator.index(p) for p in pads)  # numpy's integers as Python's
    return None if min(pads) < 0 else pads


def channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is channels_last in memory (and not NCHW as well, as tensors with C == 1 or
    H == W == 1 are): the layout lkpatch returns its results in."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """Autocast's dtype where it is on for ``device_type``, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def compute_dtype(x: torch.Tensor, autocast: Optional[torch.dtype]) -> torch.dtype:
    """The dtype the convolution computes ``x`` in: ``autocast``'s (None: autocast off), where it
    applies (floating point, except float64)."""
    if autocast is not None and x.is_floating_point() and x.dtype != torch.float64:
        return autocast
    return x.dtype


def output_size(hw: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int]) -> Tuple[int, int]:
    """(OH, OW) of the stride-1 convolution of an (H, W) map with this kernel and padding."""
    return hw[0] + pads[0] + pads[1] - kernel_size[0] + 1, hw[1] + pads[2] + pads[3] - kernel_size[1] + 1


def effective_macs(size: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int]) -> int:
    """Multiply-adds of one pass whose input tap lies inside the image (padding taps excluded)."""
    n, c, h, w = size

    def taps(length, k, before, after):
        return sum(min(k, length + before - o) - max(0, before - o) for o in range(length + before + after - k + 1))
    return n * c * taps(h, kernel_size[0], pads[0], pads[1]) * taps(w, kernel_size[1], pads[2], pads[3])


def pytorch_kernel_class(kernel_size: Sequence[int]) -> str:
    """PyTorch's kernel class in the speed rule: "small" for square kernels up to 7 x 7, which
    cuDNN runs on fast kernels of their own, else "other"."""
    return "small" if kernel_size[0] == kernel_size[1] <= 7 else "other"


def pytorch_macs(size: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int], channels_last: bool,
                 pass_: str = "forward") -> int:
    """The multiply-adds PyTorch's path spends time on: with kernels of the "other" class, every
    tap of the padded window on channels_last (cuDNN's general channels_last depthwise kernels
    compute them: a kernel larger than the map costs all its taps) and for NCHW weight-gradients
    (whose time on small maps follows the window too); elsewhere the taps inside the image
    (:func:`effective_macs`), on which those rates were measured."""
    if pytorch_kernel_class(kernel_size) == "other" and (channels_last or pass_ == "weight_grad"):
        oh, ow = output_size(size[2:], kernel_size, pads)
        return size[0] * size[1] * oh * ow * kernel_size[0] * kernel_size[1]
    return effective_macs(size, kernel_size, pads)


# ---- the plan (asked of the extension) --------------------------------------------------------
class Plan(NamedTuple):
    family: str       # "none", "fma" (exact fp32 arithmetic, CUDA cores), "tc_images", "tc_rows" (tensor cores)
    nhwc: bool        # reads and writes channels_last tensors as they are (else through NCHW copies)
    takes_bias: bool  # the weight-gradient also gives the bias gradient
    why: str = ""     # family "none": why no kernel takes the call
    macs: float = 0.0  # the multiply-adds the kernel's tiles issue (0: "fma" kernels without tiles): the rule's work
    staged: float = 0.0  # the elements its blocks stage into shared memory (tensor cores; else 0): work too


_decisions: dict = {}


def plan(pass_: str, size: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int], dtype: torch.dtype,
         channels_last: bool = False) -> Plan:
    """The extension's plan for one convolution pass ("forward", "input_grad", "weight_grad") on
    the current GPU. ``size``: the input's (N, C, H, W); ``channels_last``: the pass's tensors'
    layout. fp32 passes are planned as TF32 where :func:`tf32_pass` (read per call, as cuDNN does)."""
    tf32 = tf32_pass(dtype)
    return _decided(("plan", pass_, tuple(size), tuple(kernel_size), tuple(pads), dtype, tf32, bool(channels_last)))


# Every decision is plain Python on numbers, made once per key: ("plan" | "route" |
# "reads_channels_last" | "use_kernel", its arguments...). While torch.compile traces, Dynamo runs
# this as it is and keeps the answer as a constant of the graph (it would otherwise guard on the
# cache's contents, which the decision changes).
@torch.compiler.assume_constant_result
def _decided(key):
    found = _decisions.get(key)
    if found is None:
        found = _decisions[key] = _DECIDE[key[0]](*key[1:])
    return found


def _plan_now(pass_, size, kernel_size, pads, dtype, tf32, channels_last) -> Plan:
    return _parse_plan(_query_plan(pass_, size, kernel_size, pads, dtype, tf32, channels_last))


def _parse_plan(text: str) -> Plan:
    family, layout, bias, macs, staged, *why = text.split(" ", 5)
    return Plan(family, layout == "nhwc", bias == "bias", why[0] if why else "", float(macs), float(staged))


@torch.compiler.assume_constant_result
def _query_plan(pass_, size, kernel_size, pads, dtype, tf32, channels_last) -> str:
    if not _extension_ready():
        return "none - - 0 0 lkpatch's CUDA extension is not available"
    from . import _ops
    return _ops.kernels().plan(pass_, list(size), list(kernel_size), list(pads), dtype, tf32, channels_last)


def reads_channels_last(pass_: str, size, kernel_size, pads, dtype: torch.dtype) -> bool:
    """Whether the kernels read this pass's channels_last tensors as they are (no layout copies):
    the bias gradient always; a convolution pass where its plan can and the layer's route
    (:func:`channels_last_route`) is "direct". "all": the forward, input-grad and weight-grad all do."""
    if pass_ == "all":
        return _decided(("reads_channels_last", _impl, tuple(size), tuple(kernel_size), tuple(pads), dtype,
                         tf32_pass(dtype)))
    if pass_ == "bias_grad":
        return dtype in KERNEL_DTYPES
    if not plan(pass_, size, kernel_size, pads, dtype, True).nhwc:
        return False
    return _impl == "kernel" or channels_last_route(size, kernel_size, pads, dtype) == "direct"


def _reads_all_now(impl, size, kernel_size, pads, dtype, tf32) -> bool:
    return all(reads_channels_last(p, size, kernel_size, pads, dtype) for p in CONV_PASSES)


def weight_grad_sums_bias(size, kernel_size, pads, dtype: torch.dtype, channels_last: bool = False) -> bool:
    """Whether the weight-gradient of this call, on lkpatch's kernel, also gives the bias gradient
    (the kernels that walk every staged element of the output gradient anyway)."""
    if not use_kernel("weight_grad", size, kernel_size, pads, dtype, channels_last):
        return False
    p = plan("weight_grad", size, kernel_size, pads, dtype, channels_last)
    return p.takes_bias and (p.nhwc or not channels_last)


def bias_grad_on_kernel(size: Sequence[int], dtype: torch.dtype, channels_last: bool = False,
                        kernel_size: Optional[Sequence[int]] = None, pads: Optional[Sequence[int]] = None) -> bool:
    """Whether a bias gradient runs on lkpatch's kernel. As a pass of its own it does not depend on
    the convolution's kernel or padding; with them given (the eager path's C++ backward, where
    the weight-gradient runs on the kernels too), also wherever the weight-gradient's kernel gives
    it on the way (:func:`weight_grad_sums_bias`): then it costs no pass of its own."""
    if kernel_size is not None and weight_grad_sums_bias(size, kernel_size, pads, dtype, channels_last):
        return True
    return use_kernel("bias_grad", size, (1, 1), (0, 0, 0, 0), dtype, channels_last)


# ---- the speed rule -----------------------------------------------------------------------------
def use_kernel(pass_: str, size: Sequence[int], kernel_size: Sequence[int], pads: Sequence[int],
               dtype: torch.dtype, channels_last: bool = False) -> bool:
    """Run ``pass_`` of this CUDA depthwise convolution on lkpatch's kernel (True) or PyTorch's?

    ``pass_`` is one of PASSES, or "any": does the forward, input-grad or weight-grad run on
    lkpatch's kernel? Or "all": do they all? ``channels_last``: the pass's activation comes in
    (and goes out) channels_last. Each pass goes where the model (:func:`estimate_us`) puts it
    faster, except channels_last layers whose kernels need NCHW copies: those are shared by the
    passes, so the layer goes through NCHW as a whole or not at all (:func:`channels_last_route`);
    and layers bound by host time, which are not split (:func:`host_bound`).
    """
    if _impl == "pytorch":
        return False
    tf32 = tf32_pass(dtype)
    return _decided(("use_kernel", _impl, pass_, tuple(size), tuple(kernel_size), tuple(pads), dtype, tf32,
                     bool(channels_last)))


def _use_kernel_now(impl, pass_: str, size, kernel_size, pads, dtype, tf32, channels_last) -> bool:
    if pass_ in ("any", "all"):  # the bias gradient alone does not take a layer from PyTorch's convolution
        return (any if pass_ == "any" else all)(
            use_kernel(p, size, kernel_size, pads, dtype, channels_last) for p in CONV_PASSES)
    if dtype not in KERNEL_DTYPES or not _extension_ready():
        return False
    if pass_ == "bias_grad":
        return impl == "kernel" or _bias_kernel_faster(size, channels_last)
    q = plan(pass_, size, kernel_size, pads, dtype, channels_last)
    if q.family == "none":
        return False
    if impl == "kernel":
        return True
    if channels_last:
        route = channels_last_route(size, kernel_size, pads, dtype)
        if route != "direct":
            return route == "copies"
    plans = {p: plan(p, size, kernel_size, pads, dtype, channels_last) for p in CONV_PASSES}
    return _on_kernels(size, kernel_size, pads, dtype, channels_last, _as_read(plans, channels_last))[pass_]


def _as_read(plans, channels_last: bool) -> dict:
    """``plans`` as a layer's passes read their tensors: on channels_last (the route "direct"),
    a plan that would need NCHW copies counts as none (that pass is PyTorch's)."""
    if not channels_last:
        return plans
    return {p: q if q.nhwc else q._replace(family="none") for p, q in plans.items()}


def _on_kernels(size, kernel_size, pads, dtype, channels_last: bool, plans) -> dict:
    """Which of the passes whose tensors the kernels read as they are (``plans``, a Plan per
    pass; family "none": PyTorch's) run on them: each where the model puts it faster. A layer
    bound by host time (:func:`host_bound`) is not split: all its passes on the kernels (the C++
    autograd op) where their sum is lower, else all on PyTorch's, as a layer split between the two
    runs the costlier Python autograd path for a GPU-time saving of a few microseconds."""
    args = (size, kernel_size, pads, dtype, channels_last)
    lkpatch = {p: estimate_us("lkpatch", p, *args, q) if q.family != "none" else float("inf") for p, q in plans.items()}
    pytorch = {p: estimate_us("pytorch", p, *args) for p in plans}
    if host_bound(size, kernel_size, pads, channels_last):
        whole = sum(lkpatch.values()) < sum(pytorch.values())
        return {p: whole for p in plans}
    return {p: lkpatch[p] < pytorch[p] for p in plans}


def host_bound(size, kernel_size, pads, channels_last: bool) -> bool:
    """Whether a layer is small enough (``COST["tiny_macs"]``, inside the image and in PyTorch's
    count) for its step to be bound by host time."""
    return max(effective_macs(size, kernel_size, pads), pytorch_macs(size, kernel_size, pads,
                                                                      channels_last)) < COST["tiny_macs"]


def channels_last_route(size, kernel_size, pads, dtype) -> str:
    """How a channels_last layer runs: "direct" (the kernels read channels_last, each pass where
    it is faster, PyTorch's elsewhere), "copies" (every pass on the kernels through NCHW copies:
    into NCHW for the input and the output gradient, back for the output and the input
    gradient) or "pytorch": the fastest by the model, for the three passes together."""
    tf32 = tf32_pass(dtype)
    return _decided(("route", tuple(size), tuple(kernel_size), tuple(pads), dtype, tf32))


def _route_now(size, kernel_size, pads, dtype, tf32) -> str:
    # Each option is timed as it runs: direct, its passes where the rule puts them (those the
    # kernels cannot read channels_last on PyTorch's); copies where the NCHW rule puts every pass
    # on the kernels (a pass on PyTorch's there would pay the copies for nothing).
    args = (size, kernel_size, pads, dtype)
    pytorch = {p: estimate_us("pytorch", p, *args, True) for p in CONV_PASSES}
    options = {"pytorch": sum(pytorch.values())}
    cl_plans = {p: plan(p, *args, True) for p in CONV_PASSES}
    if all(q.family != "none" for q in cl_plans.values()):
        on = _on_kernels(*args, True, _as_read(cl_plans, True))
        options["direct"] = sum(estimate_us("lkpatch", p, *args, True, q) if on[p] else pytorch[p]
                                for p, q in cl_plans.items())
    nchw_plans = {p: plan(p, *args, False) for p in CONV_PASSES}
    if all(q.family != "none" for q in nchw_plans.values()):
        if all(_on_kernels(*args, False, nchw_plans).values()):
            options["copies"] = 4 * _copy_us(size, kernel_size, pads, dtype) + sum(
                estimate_us("lkpatch", p, *args, False, q) for p, q in nchw_plans.items())
    return min(options, key=options.get)


_DECIDE = {"plan": _plan_now, "route": _route_now, "reads_channels_last": _reads_all_now,
           "use_kernel": _use_kernel_now}


# The model behind the rule, in one place. GPU microseconds of one pass: a fixed cost per call,
# the bytes it must move at a sustained bandwidth, and its arithmetic at a rate per path --
# summed, since the kernels stage before they compute. Calibrated on an H100 (docs/kernels.md,
# "The speed rule", has the sweep that set these numbers and how to rerun it).
COST = {
    # sustained bandwidth, bytes per microsecond (read + write)
    "bandwidth": 2.6e6,
    # lkpatch: the kernels issue the multiply-adds of their plan (Plan.macs, counted by the
    # extension from its tiles) at these rates (per microsecond): the tensor-core families, and
    # the CUDA-core kernel that stages 32 channels of a tile ("fma_channels": channels_last in any
    # dtype, and the NCHW fp16 / bf16 weight-gradient; its plan counts its tiles); the other
    # CUDA-core kernels ("fma") run the effective multiply-adds.
    # "_nhwc": the images family's channels_last weight-gradient (maps up to 16 x 16), slower per tile.
    "tc_images": {"half": (9.6e8, 9.9e5), "half_wgrad": (6.5e8, 7.7e5), "half_wgrad_nhwc": (1.75e9, 3.5e5),
                  "tf32": (2.4e7, 0), "tf32_wgrad": (6.2e7, 0)},
    # The rows family: (multiply-adds, staged elements (Plan.staged)) per microsecond, by layout --
    # its small channels_last tiles stage more per output, through registers.
    "tc_rows": {"half": (2.7e8, 6.4e5), "half_wgrad": (1.36e8, 1.06e6), "half_nhwc": (1.7e8, 6.7e5),
                "half_wgrad_nhwc": (1.4e8, 6.0e5), "tf32": (1.5e7, 0), "tf32_wgrad": (2.3e7, 0)},
    "fma": 4.7e6,
    "fma_channels": {"pass": 1.5e7, "wgrad": 8.5e6},
    "lkpatch_call_us": 8.0,
    "copy_call_us": 4.0,
    # PyTorch (cuDNN): multiply-adds (pytorch_macs) per microsecond by layout, pass and kernel: "small"
    # for square kernels up to 7 x 7, which have fast kernels of their own; "_fp32" for fp32.
    "pytorch": {
        "nchw": {
            "forward": {"small": 1.4e6, "other": 1.1e6, "small_fp32": 0.85e6, "other_fp32": 1.3e6},
            "input_grad": {"small": 1.1e6, "other": 0.68e6, "small_fp32": 0.65e6, "other_fp32": 0.98e6},
            "weight_grad": {"small": 0.7e6, "other": 0.51e6, "small_fp32": 0.42e6, "other_fp32": 0.62e6}},
        "channels_last": {
            "forward": {"small": 5.4e6, "other": 0.22e6, "small_fp32": 3.1e6, "other_fp32": 0.22e6},
            "input_grad": {"small": 2.2e6, "other": 0.48e6, "small_fp32": 1.7e6, "other_fp32": 0.52e6},
            "weight_grad": {"small": 6.2e6, "other": 0.17e6, "small_fp32": 0.85e6, "other_fp32": 0.12e6}},
    },
    "pytorch_call_us": 6.0,
    # Below this many multiply-adds (effective ones, and PyTorch's) a layer is bound by host time
    # per call: it is not split between the two paths (_on_kernels).
    "tiny_macs": 5e6,
}


def estimate_us(path: str, pass_: str, size, kernel_size, pads, dtype, channels_last: bool,
                the_plan: Optional[Plan] = None) -> float:
    """The modelled GPU time of one convolution pass on ``path`` ("lkpatch" or "pytorch")."""
    n, c, h, w = size
    oh, ow = output_size((h, w), kernel_size, pads)
    elem = dtype.itemsize
    moved = n * c * (h * w + oh * ow) * elem
    macs = effective_macs(size, kernel_size, pads)
    if path == "pytorch":
        kind = pytorch_kernel_class(kernel_size) + ("_fp32" if dtype == torch.float32 else "")
        rate = COST["pytorch"]["channels_last" if channels_last else "nchw"][pass_][kind]
        return COST["pytorch_call_us"] + moved / COST["bandwidth"] + pytorch_macs(size, kernel_size, pads,
                                                                                   channels_last, pass_) / rate
    key = rate_key(the_plan.family, pass_, dtype, the_plan.nhwc, the_plan.macs > 0)
    work = macs if key == ("fma",) else the_plan.macs
    macs_rate, staged_rate = rates(key)
    staging = the_plan.staged / staged_rate if staged_rate else 0.0
    return COST["lkpatch_call_us"] + moved / COST["bandwidth"] + work / macs_rate + staging


def rate_key(family: str, pass_: str, dtype: torch.dtype, nhwc: bool, tiles: bool) -> Tuple[str, ...]:
    """Where COST keeps the rate of lkpatch's kernels of ``family`` on a pass: ("fma",) for the
    CUDA-core kernels whose plan counts no tiles (``tiles`` false: timed by effective
    multiply-adds), else a family and a kind (timed by ``Plan.macs``)."""
    wgrad = pass_ == "weight_grad"
    if family == "fma":
        return ("fma_channels", "wgrad" if wgrad else "pass") if tiles else ("fma",)
    kind = ("tf32" if dtype == torch.float32 else "half") + ("_wgrad" if wgrad else "")
    return (family, kind + "_nhwc" if nhwc and kind + "_nhwc" in COST[family] else kind)


def rates(key: Tuple[str, ...]) -> Tuple[float, Optional[float]]:
    """COST's rates under ``key`` (from :func:`rate_key`): work per microsecond, and staged elements
    per microsecond where the group times them (the tensor-core families; else None)."""
    rate = functools.reduce(operator.getitem, key, COST)
    return rate if isinstance(rate, tuple) else (rate, None)


def _copy_us(size, kernel_size, pads, dtype) -> float:
    """One layout copy of an activation-sized tensor (lkpatch's tiled NHWC <-> NCHW copy)."""
    n, c, h, w = size
    elem = dtype.itemsize
    return COST["copy_call_us"] + 2 * n * c * h * w * elem / COST["bandwidth"]


# PyTorch's sum over a channels_last output gradient took more GPU time than lkpatch's kernel at
# every size measured; below about a million elements both are bound by host time. On NCHW maps
# the two are close, and the kernel takes only large maps.
def _bias_kernel_faster(size, channels_last: bool) -> bool:
    n, c, h, w = size
    if channels_last:
        return n * c * h * w >= 1_000_000
    return h * w >= 56 * 56 and n * c * h * w >= 16_000_000


# ---- TF32 and the extension ---------------------------------------------------------------------
def tf32_pass(dtype: torch.dtype) -> bool:
    """Whether fp32 passes may run on TF32 tensor cores: PyTorch allows TF32 convolutions
    (``torch.backends.cudnn.conv.fp32_precision == "tf32"`` from torch 2.9, else
    ``torch.backends.cudnn.allow_tf32``; both on by default) on an sm_80+ GPU. Read per call, as
    cuDNN reads it. The extension's plan then says which passes use TF32 (the others stay exact)."""
    return dtype == torch.float32 and _conv_tf32_allowed() and not _tensor_cores_off()


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 matrix products and convolutions without TF32 for a block (equivalence checks)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with conv_tf32(False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


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


# A constant of the graph under torch.compile (Dynamo cannot call the switch's getter); a compiled
# model reads it when it is traced.
@torch.compiler.assume_constant_result
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
