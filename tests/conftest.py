import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lkpatch
from lkpatch import build, dispatch

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


@pytest.hookimpl(tryfirst=True)  # before -m deselects tests
def pytest_itemcollected(item):
    """A test that needs the extension is ``slow``: the build before it takes about a minute on 2
    cores where it is not cached, so ``-m "not slow"`` leaves the build out."""
    if _needs_extension(item):
        item.add_marker(pytest.mark.slow)


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected tests
def pytest_collection_modifyitems(config, items):
    """GPU tests skip without a GPU; the extension is built before the first test that needs it."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
    _build_extension(config, items)


def _needs_extension(item) -> bool:
    """A test that builds or loads lkpatch's CUDA extension: it asks for the ``extension``
    fixture, or it is a ``cuda`` test and a GPU is here."""
    return "extension" in getattr(item, "fixturenames", ()) or \
        ("cuda" in item.keywords and torch.cuda.is_available())


def _build_extension(config, items) -> None:
    """Build the CUDA extension once, before the first test, where a selected test needs it and
    it is not cached yet -- saying so, as it takes about a minute on 2 cores. A separate process
    builds it, so the tests see the same state as with a cached build."""
    if config.option.collectonly or os.environ.get("LKPATCH_NO_BUILD") or build._missing_toolchain():
        return
    if not any(_needs_extension(item) for item in items) or build.library_path().is_file():
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")

    def say(text):
        if reporter is not None:
            reporter.write_line(text, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    say(f"building lkpatch's CUDA extension for sm_{build.arch_list().replace('.', '')} (once; about a minute "
        f"on 2 cores; cached in {build.library_path().parent}) ...")
    package_root = str(Path(lkpatch.__file__).resolve().parents[1])  # the lkpatch under test
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from lkpatch import build; build.build(quiet=True)"],
                          capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        say(f"built in {time.perf_counter() - t0:.0f} s")
    else:  # the tests that need the extension report the whole error
        last = "\n".join(proc.stderr.strip().splitlines()[-2:])
        say(f"the build failed after {time.perf_counter() - t0:.0f} s:\n{last}")


@pytest.fixture
def extension() -> Path:
    """lkpatch's CUDA extension, built (see ``_build_extension``; loaded once per process)."""
    return build.build(quiet=True)


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


@pytest.fixture
def one_thread():
    """Tiny models run faster on one intra-op thread than on two contending for a shared CPU."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def run_cli(capsys, *argv):
    """``lkpatch ARGV`` in this process: (exit status, stdout, stderr)."""
    from lkpatch.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def digest(path) -> str:
    """sha256 of a file's bytes."""
    import hashlib
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()
