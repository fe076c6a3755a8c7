import math
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lkpatch import dispatch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The official RepLKNet code's reference outputs and key lists: tests/data (a folder of
    the same files elsewhere with LKPATCH_SHARED_DATA)."""
    return Path(os.environ.get("LKPATCH_SHARED_DATA") or REPO / "tests" / "data")


@pytest.fixture
def shared_data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"reference data not found at {d} (tests/data, or set LKPATCH_SHARED_DATA)")
    return d


tf32 = dispatch.conv_tf32  # PyTorch's TF32 switch for convolutions, set for a block


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 convolutions exact (no TF32) unless a test asks for TF32 with ``tf32(True)``: the fp32
    checks compare against float64 at 1e-5, for lkpatch's kernels and PyTorch's alike."""
    with tf32(False):
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# --- helpers the test files share (import them: ``from conftest import rel_err``) ---------------

def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 (inf if ``a`` is not finite)."""
    a, ref = a.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    den = ref.norm().item()
    return (a - ref).norm().item() / (den if den > 0 else 1.0)


class OpLog(TorchDispatchMode):
    """Names of the ATen / custom ops that run (``lkpatch::dwconv2d``, ...)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))

    def count(self, name):
        return self.names.count(name)


def op_route():
    """CPU tensors through the ``lkpatch::`` ops (whose CPU kernels are PyTorch's), as CUDA ones go."""
    return dispatch.force("auto", cpu_through_op=True)
