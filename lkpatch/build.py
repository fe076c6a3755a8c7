"""Just-in-time build of lkpatch's CUDA extension (torch.utils.cpp_extension + ninja), cached.

The first CUDA call builds it (about a minute) into
``$LKPATCH_CACHE_DIR`` (default ``~/.cache/lkpatch``), in a folder per torch version, CUDA
version and GPU architecture, under a name that hashes the sources and flags; later processes
load the cached library directly. ``lkpatch build`` does the same ahead of time. Concurrent
builders (DDP ranks) serialize on a file lock that the OS releases if a builder dies.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path
from typing import List, Optional

import torch

EXT_NAMESPACE = "lkpatch_ext"
_SOURCES = ("dwconv_plan.cu", "dwconv_fwd.cu", "dwconv_wgrad.cu", "dwconv_small.cu", "dwconv_channel_tiles.cu",
            "dwconv_bgrad.cu", "dwconv_tc.cu", "dwconv_tc_wgrad.cu", "dwconv_rows_fwd.cu", "dwconv_rows_wgrad.cu",
            "dwconv_layout.cu", "binding.cpp")
_CUDA_FLAGS = ["-O3", "-lineinfo"]  # the C++ standard is torch's choice (C++20 from torch 2.10)
_CXX_FLAGS = ["-O3"]

_lock = threading.Lock()
_state = {"loaded": False, "error": None}


class BuildError(RuntimeError):
    """The CUDA extension could not be built or loaded; the message says how to fix it."""


def csrc_dir() -> Path:
    """The kernel sources: inside the installed package, else the repository's csrc/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "binding.cpp").is_file():
            return candidate
    raise BuildError(f"lkpatch's CUDA sources (csrc/) are missing next to {here}; reinstall lkpatch")


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit folder: $CUDA_HOME / $CUDA_PATH, else where the real nvcc lives.

    ``nvcc`` on PATH may be a wrapper script (torch would then guess its folder's parent), so a
    candidate counts only if it holds both ``bin/nvcc`` and ``include/cuda_runtime.h``.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            # A wrapper script usually execs the real binary: take the path it names.
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            for word in text.replace('"', " ").replace("'", " ").split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(str(Path(word).parent.parent))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def _pip_cuda_includes() -> List[str]:
    """Header folders of pip's CUDA packages (site-packages/nvidia/*/include)."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    found = []
    for root in roots:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    return found


def arch_list() -> str:
    """$TORCH_CUDA_ARCH_LIST, else the visible GPUs' architectures, else 9.0 (H100) without a GPU."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return "9.0"


def cache_dir() -> Path:
    root = Path(os.environ.get("LKPATCH_CACHE_DIR", Path.home() / ".cache" / "lkpatch"))
    arch = arch_list().replace(";", "_").replace(".", "").replace("+", "")
    return root / f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{arch}".replace("+", "_")


def _ext_name() -> str:
    h = hashlib.sha256()
    src = csrc_dir()
    for f in sorted(src.iterdir()):
        if f.suffix in (".cu", ".cuh", ".h", ".cpp"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    h.update(" ".join(_CUDA_FLAGS + _CXX_FLAGS + [arch_list()]).encode())
    return f"lkpatch_ext_{h.hexdigest()[:12]}"


def library_path() -> Path:
    """Where the built library is (or will be) cached."""
    return cache_dir() / _ext_name() / f"{_ext_name()}.so"


def _missing_toolchain() -> Optional[str]:
    if torch.version.cuda is None:
        return "this torch build has no CUDA support; install a CUDA build of torch"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return ("no CUDA toolkit (nvcc and its headers) found; install the CUDA toolkit matching torch's "
                f"CUDA {torch.version.cuda} and set CUDA_HOME to its folder (the one holding bin/nvcc)")
    try:
        import ninja  # noqa: F401
    except ImportError:
        return "the ninja package is missing: pip install ninja"
    return None


def _compile(verbose: bool) -> Path:
    problem = _missing_toolchain()
    if problem:
        raise BuildError(f"cannot build lkpatch's CUDA extension: {problem}")
    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home  # before torch's import of cpp_extension guesses it
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home  # in case it was imported earlier, from a wrapper script
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", arch_list())
    name = _ext_name()
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    src = csrc_dir()
    include_after = [flag for inc in _pip_cuda_includes() for flag in ("-idirafter", inc)]
    cpp_extension.load(
        name=name,
        sources=[str(src / s) for s in _SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=_CXX_FLAGS + include_after,
        extra_cuda_cflags=_CUDA_FLAGS,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return build_dir / f"{name}.so"


@contextlib.contextmanager
def _build_lock(folder: Path):
    """An exclusive OS file lock: held by one process at a time, released if it dies."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lkpatch-build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(verbose: bool = False, force: bool = False, quiet: bool = False) -> Path:
    """Build (or find in the cache) the extension and load it; returns the library's path."""
    with _lock:
        lib = library_path()
        with _build_lock(cache_dir()):
            if force and lib.parent.exists():
                shutil.rmtree(lib.parent)
            if not lib.is_file():
                # We hold the lock, so a torch 'lock' file left here is from a builder that died.
                with contextlib.suppress(FileNotFoundError):
                    (lib.parent / "lock").unlink()
                if not quiet:
                    print(f"lkpatch: building the CUDA extension for sm_{arch_list().replace('.', '')} "
                          f"(once; cached in {lib.parent}) ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                try:
                    lib = _compile(verbose)
                except BuildError:
                    raise
                except Exception as e:  # compiler errors, missing headers, ...
                    raise BuildError(
                        f"building lkpatch's CUDA extension failed: {e}\n"
                        f"Rerun with `lkpatch build --verbose` to see the compiler's output.") from e
                if not quiet:
                    print(f"lkpatch: built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        if not _state["loaded"]:
            torch.ops.load_library(str(lib))
            _state["loaded"] = True
        return lib


def extension_ready() -> bool:
    """True if the kernels can run here: a GPU, and the extension loaded (built on first call).

    A failed build warns once and returns False, so models fall back to PyTorch's convolution.
    """
    if _state["loaded"]:
        return True
    if _state["error"] is not None or not torch.cuda.is_available():
        return False
    if os.environ.get("LKPATCH_NO_BUILD") and not library_path().is_file():
        _state["error"] = "LKPATCH_NO_BUILD is set and no built extension is cached"
        return False
    try:
        build()
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: use PyTorch's kernels
        _state["error"] = str(e)
        warnings.warn(f"lkpatch: CUDA kernels unavailable, using PyTorch's convolution instead. {e}",
                      RuntimeWarning, stacklevel=2)
        return False


def extension_ops():
    """``torch.ops.lkpatch_ext`` with the extension loaded."""
    if not _state["loaded"]:
        build()
    return getattr(torch.ops, EXT_NAMESPACE)


def status() -> dict:
    """What ``lkpatch info`` reports about the build."""
    cuda_home = find_cuda_home()
    nvcc_version = None
    if cuda_home:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                                 text=True, timeout=30).stdout
            nvcc_version = out.strip().splitlines()[-1] if out.strip() else None
    return {
        "cuda_home": cuda_home,
        "nvcc": nvcc_version,
        "arch": arch_list(),
        "library": str(library_path()),
        "built": library_path().is_file(),
        "loaded": _state["loaded"],
        "error": _state["error"],
    }
