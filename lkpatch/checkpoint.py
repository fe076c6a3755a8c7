"""Reading and writing checkpoints: the state_dicts inside a checkpoint file (PyTorch or
safetensors), and safe writes (temporary file, fsync, rename; removed on errors and signals)."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import pickle
import re
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.nn as nn

#: keys under which training scripts (timm, DeiT, mmcv, the official RepLKNet code, PyTorch's
#: tutorials, ...) keep weights
WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "module", "model_state_dict",
                "ema_state_dict")

#: key prefixes added by wrappers (DistributedDataParallel / DataParallel, torch.compile), stripped
#: in any nesting and put back on write
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
DDP_PREFIX = "module."

FORMATS = ("torch", "safetensors")


class CheckpointError(Exception):
    """A checkpoint that cannot be read or written; the message says why."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived; ``signum`` says which (exit status 128 + signum).
    ``written``: the file a :class:`SafeWriter` had put in place before it, if any (complete)."""

    def __init__(self, signum: int, written: Optional[str] = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.written = written


@dataclasses.dataclass
class StateDictEntry:
    """One state_dict found in a checkpoint: where it sits, and its tensors without wrapper prefixes."""
    key: Optional[str]           # wrapper key, or None when the file is the state_dict (or model) itself
    prefix: str                  # the wrapper prefixes every key had ("module.", "_orig_mod.module.", ...)
    state_dict: Dict[str, torch.Tensor]
    from_module: bool = False    # taken from a pickled nn.Module (written back as its state_dict)


# ------------------------------------------------------------------------------------------ reading

def file_format(path: str) -> str:
    """'torch' or 'safetensors', from the file's first bytes (its name where they say neither)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head[:4] == b"PK\x03\x04":  # torch.save's zip
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8:
        return "safetensors"  # an 8-byte header length (any first byte), then the JSON header
    if head[:1] == b"\x80":  # a legacy torch.save pickle
        return "torch"
    return "safetensors" if str(path).endswith(".safetensors") else "torch"


def format_for(path: str, default: str = "torch") -> str:
    """The format a file of this name is written in: by its extension, else ``default``."""
    name = str(path).lower()
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith((".pth", ".pt", ".ckpt", ".pth.tar", ".bin")):
        return "torch"
    return default


def _safe_globals() -> list:
    """Plain-data classes that training scripts pickle into checkpoints (timm's CheckpointSaver
    stores its argparse.Namespace); ``torch.load(weights_only=True)`` rebuilds them without
    running any other code from the file."""
    import argparse
    import pathlib

    allowed = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
               pathlib.PureWindowsPath]
    try:  # numpy scalars (a metric saved as np.float64) and their dtypes
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        allowed += [core.multiarray.scalar, np.dtype]
        allowed += [t for t in vars(getattr(np, "dtypes", object)).values() if isinstance(t, type)]
    except Exception:  # noqa: BLE001 - numpy missing or laid out differently: no numpy scalars
        pass
    return allowed


def _torch_load(path: Path, weights_only: bool) -> Any:
    # an open file, not the name: torch.load reads any file named *.safetensors as safetensors
    with open(path, "rb") as fh:
        if not weights_only:
            return torch.load(fh, map_location="cpu", weights_only=False)
        scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        if scoped is None:
            torch.serialization.add_safe_globals(_safe_globals())
            return torch.load(fh, map_location="cpu", weights_only=True)
        with scoped(_safe_globals()):
            return torch.load(fh, map_location="cpu", weights_only=True)


def load(path: str, *, allow_pickled_code: bool = False,
         how_to_allow: str = "rerun with --unsafe-load-pickle-runs-code") -> Any:
    """A checkpoint file on the CPU: a safetensors file's tensors, or ``torch.load``, tensors and
    plain data only unless ``allow_pickled_code`` (which runs code from the file). ``how_to_allow``:
    the caller's way to allow it, said where a file holds pickled code (default: the command's flag)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{path}' is not a file")
    try:
        fmt = file_format(str(p))
    except OSError as e:
        raise CheckpointError(f"cannot read '{path}': {describe_os_error(e)}") from e
    if fmt == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise CheckpointError(f"'{path}' is a safetensors file: pip install safetensors") from e
        try:
            return load_file(str(p), device="cpu")
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends
            raise CheckpointError(f"cannot read '{path}': not a safetensors file, or truncated ({first_line(e)})") from e
    try:
        return _torch_load(p, weights_only=not allow_pickled_code)
    except pickle.UnpicklingError as e:
        match = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if match and not allow_pickled_code:
            raise CheckpointError(
                f"'{path}' holds a pickled Python object ({match.group(1)}), not only tensors; torch.load("
                f"weights_only=True) refuses it. Only if you trust the file, {how_to_allow} "
                f"(this runs code from the file)") from e
        raise CheckpointError(f"cannot read '{path}': not a PyTorch checkpoint, or corrupted") from e
    except OSError as e:
        raise CheckpointError(f"cannot read the checkpoint: {describe_os_error(e, path)}") from e
    except Exception as e:  # noqa: BLE001 - torch.load fails on garbage in many ways (KeyError, EOFError, ...)
        raise CheckpointError(f"cannot read '{path}': not a PyTorch checkpoint, or truncated ({first_line(e)})") from e


def safetensors_metadata(path: str) -> Optional[Dict[str, str]]:
    """The metadata of a safetensors file (None for other files)."""
    if file_format(path) != "safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


def first_line(e: BaseException) -> str:
    """An exception's first line (its type's name where it has no text): for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def strip_prefixes(sd: Dict[str, torch.Tensor]):
    """(prefix, state_dict without it): every wrapper prefix that all keys share, in any nesting
    (``module._orig_mod.`` from DDP around a compiled model, ``_orig_mod.module.``, ...)."""
    prefix = ""
    keys = list(sd)
    while keys:
        common = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p, len(prefix)) for k in keys)), None)
        if common is None:
            break
        prefix += common
    return prefix, ({k[len(prefix):]: v for k, v in sd.items()} if prefix else dict(sd))


_strip = strip_prefixes


def _entry(key: Optional[str], value: Any) -> Optional[StateDictEntry]:
    if isinstance(value, nn.Module):  # only reachable after loading with pickled code allowed
        return StateDictEntry(key, *strip_prefixes(value.state_dict()), from_module=True)
    if _is_state_dict(value):
        return StateDictEntry(key, *strip_prefixes(value))
    return None


def state_dicts(obj: Any) -> List[StateDictEntry]:
    """Every state_dict in a loaded checkpoint: the object itself, or under the wrapper keys. A
    pickled nn.Module (at the top or under a wrapper key) counts by its state_dict."""
    top = _entry(None, obj)
    if top is not None:
        return [top]
    entries = []
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            entry = _entry(key, obj.get(key))
            if entry is not None:
                entries.append(entry)
    if not entries:
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"no state_dict found: the checkpoint is {what}; expected a state_dict, an nn.Module "
                              f"or a dict holding one under {', '.join(repr(k) for k in WRAPPER_KEYS)}")
    return entries


def restored(entry: StateDictEntry) -> Dict[str, torch.Tensor]:
    """The entry's state_dict with its prefix put back."""
    return {entry.prefix + k: v for k, v in entry.state_dict.items()}


def replace_state_dicts(obj: Any, entries: List[StateDictEntry]) -> Any:
    """``obj`` with each entry's state_dict put back where it came from (prefix restored; a pickled
    module replaced by its state_dict); other entries of a wrapper dict are kept as they are."""
    if len(entries) == 1 and entries[0].key is None:
        return restored(entries[0])
    out = dict(obj)
    for entry in entries:
        out[entry.key] = restored(entry)
    return out


def fit_prefix(entry: StateDictEntry, model_keys) -> bool:
    """Where the keys match the model only without leading components they all share (a
    Lightning module's ``model.``; up to three), move those into the entry's prefix. Returns
    whether it did."""
    want = set(model_keys)
    keys = list(entry.state_dict)
    if not keys or _fits(keys, want):
        return False
    extra = ""
    for _ in range(3):
        heads = {k.split(".", 1)[0] for k in keys}
        if len(heads) != 1 or not all("." in k for k in keys):
            return False
        head = heads.pop() + "."
        extra += head
        keys = [k[len(head):] for k in keys]
        if _fits(keys, want):
            entry.state_dict = {k[len(extra):]: v for k, v in entry.state_dict.items()}
            entry.prefix += extra
            return True
    return False


# PyTorch's BatchNorm loads a state_dict without its num_batches_tracked (keeping its own), as
# older and hand-filtered checkpoints are: strict loading does not ask for it.
def _optional(key: str) -> bool:
    return key.rpartition(".")[2] == "num_batches_tracked"


def _fits(keys, want) -> bool:
    keys = set(keys)
    return keys <= want and all(k in keys or _optional(k) for k in want)


def mismatch(own: Dict[str, torch.Tensor], sd: Dict[str, torch.Tensor]) -> Optional[str]:
    """What keeps ``sd`` from loading strictly into a model whose state_dict is ``own`` (None: nothing)."""
    missing = [k for k in own if k not in sd and not _optional(k)]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    # load_state_dict would cast integer weights into the model's floats without a word
    types = [f"{k} {str(sd[k].dtype).replace('torch.', '')}" for k in sd
             if k in own and own[k].is_floating_point() and not (sd[k].is_floating_point() or sd[k].is_complex())]
    if not (missing or unexpected or shapes or types):
        return None

    def listed(label, items):
        return f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})" if items else ""
    return "; ".join(p for p in (listed("missing", missing), listed("unexpected", unexpected),
                                 listed("with another shape", shapes),
                                 listed("not floating point where the model's are", types)) if p)


# ------------------------------------------------------------------------------------------ writing

def describe_os_error(e: OSError, path: Optional[str] = None) -> str:
    """'no space left on device: PATH' -- errno's words first, so the cause leads the message."""
    words = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    words = words[:1].lower() + words[1:]
    where = path or e.filename
    return f"{words}: '{where}'" if where else words


def _umask() -> int:
    """The process umask: read from /proc where it is there (setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_path(path: str, *, overwrite: bool, source: Optional[str] = None) -> Path:
    """Everything that would stop a write to ``path``, checked before any work: the file that
    will be written (an existing symbolic link is followed). Raises CheckpointError."""
    target = Path(path)
    if target.is_symlink() and not target.exists():
        raise CheckpointError(f"output '{path}' is a symbolic link to '{os.readlink(target)}', which does not "
                              f"exist; remove the link or give another name")
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    if target.is_dir():
        raise CheckpointError(f"output '{path}' is a directory; give a file name")
    if source is not None and target.exists() and Path(source).exists() and os.path.samefile(target, source):
        raise CheckpointError("the output is the input checkpoint; lkpatch convert never modifies its input")
    if target.exists() and not overwrite:
        raise CheckpointError(f"output '{path}' exists; pass --force to overwrite it")
    if target.exists() and not stat.S_ISREG(target.stat().st_mode):
        raise CheckpointError(f"output '{path}' exists and is not a regular file")
    folder = target.parent
    if not folder.exists():
        raise CheckpointError(f"output folder '{folder}' does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"output folder '{folder}' is not a directory")
    try:  # the real test: root passes os.access, a read-only mount does not take files
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno == errno.ENOENT:  # the folder is there, but its file system makes no files (/proc)
            raise CheckpointError(f"cannot write in output folder '{folder}': it takes no new files") from e
        raise CheckpointError(f"cannot write in output folder: {describe_os_error(e, str(folder))}") from e
    return target


class _Sink:
    """The file object torch.save writes through. torch turns an exception raised in a write into
    'RuntimeError: [enforce fail ...] unexpected pos' and goes on writing, so the first one is kept
    (re-raised once torch.save returns) and later writes are dropped."""

    def __init__(self, fh):
        self.fh = fh
        self.error: Optional[BaseException] = None

    def write(self, data) -> int:
        if self.error is not None:
            return len(data)
        try:
            return self.fh.write(data)
        except BaseException as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.fh.flush()


def _serialize(obj: Any, fmt: str, fh, metadata: Optional[Dict[str, str]]) -> None:
    sink = _Sink(fh)
    try:
        if fmt == "safetensors":
            from safetensors.torch import save

            data = save(_flat_tensors(obj), metadata=metadata)
            for start in range(0, len(data), 1 << 24):
                sink.write(memoryview(data)[start:start + (1 << 24)])
        else:
            torch.save(obj, sink)
        sink.flush()
    except BaseException:
        if sink.error is not None:
            raise sink.error from None
        raise
    if sink.error is not None:
        raise sink.error


def _flat_tensors(obj: Any) -> Dict[str, torch.Tensor]:
    """A flat {name: tensor} for safetensors: contiguous, no two sharing memory (tied weights)."""
    if not _is_state_dict(obj):
        raise CheckpointError("safetensors holds one flat state_dict of tensors")
    seen, out = set(), {}
    for k, v in obj.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        if v.numel() and ptr in seen:
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return out


class SafeWriter:
    """A checkpoint written to a temporary file beside ``path``, fsynced, and renamed into place
    only by :meth:`commit`: ``path`` is the old file or the complete new one, never half-written.
    Leaving the ``with`` block without a commit (an error, a signal) removes the temporary file.
    The file's mode follows the umask; a replaced file keeps its mode. Without ``overwrite`` an
    existing file is an error, also one that appears meanwhile."""

    def __init__(self, path: str, *, overwrite: bool = False, source: Optional[str] = None):
        self.path = path
        self.overwrite = overwrite
        self.target = check_output_path(path, overwrite=overwrite, source=source)
        self.tmp: Optional[str] = None
        self.committed = False

    def __enter__(self) -> "SafeWriter":
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent)
            os.close(fd)
            if self.target.exists():
                mode = stat.S_IMODE(self.target.stat().st_mode)
            else:
                mode = 0o666 & ~_umask()
            os.chmod(self.tmp, mode)
        except OSError as e:
            self._remove()
            raise CheckpointError(f"cannot create a temporary file: {describe_os_error(e, str(self.target.parent))}") from e
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self._remove()

    def _remove(self) -> None:
        if self.tmp and os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def write(self, obj: Any, fmt: str = "torch", metadata: Optional[Dict[str, str]] = None) -> str:
        """Serialize ``obj`` into the temporary file (returned, for checks before the commit)."""
        try:
            with open(self.tmp, "wb") as fh:
                _serialize(obj, fmt, fh, metadata)
                os.fsync(fh.fileno())
        except OSError as e:
            raise CheckpointError(describe_os_error(e, self.path) + "; nothing was written") from e
        return self.tmp

    def commit(self) -> None:
        """Put the written file in place. A signal meanwhile (under :func:`signals_raise`) is
        raised once it is done, as an :class:`Interrupted` that names the file if it is in place."""
        with _signals_deferred():
            self._commit()

    def _commit(self) -> None:
        try:
            if self.overwrite:
                os.replace(self.tmp, self.target)
            else:
                try:
                    os.link(self.tmp, self.target)  # fails if the target appeared meanwhile: never clobbers
                except FileExistsError:
                    raise CheckpointError(f"output '{self.path}' exists; pass --force to overwrite it") from None
                except OSError as e:  # file systems without hard links
                    if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
                        raise
                    if self.target.exists():
                        raise CheckpointError(f"output '{self.path}' exists; pass --force to overwrite it") from None
                    os.replace(self.tmp, self.target)
                else:
                    os.unlink(self.tmp)
            self.committed = True
            if threading.current_thread() is threading.main_thread():
                _signals.written = self.path
            _fsync_folder(self.target.parent)
        except OSError as e:
            raise CheckpointError(describe_os_error(e, self.path) + "; nothing was written") from e


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: str, *, overwrite: bool = False, fmt: str = "torch",
                metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``obj`` to ``path`` through :class:`SafeWriter` in one step."""
    with SafeWriter(path, overwrite=overwrite) as writer:
        writer.write(obj, fmt, metadata)
        writer.commit()


class _SignalState:
    """What :func:`signals_raise`'s handler needs to know (signal handlers are the process's):
    whether a :meth:`SafeWriter.commit` is under way, a signal that arrived meanwhile, and the file
    the last commit put in place."""

    def __init__(self):
        self.depth = 0         # signals_raise blocks entered
        self.deferring = 0     # commits under way
        self.pending: Optional[int] = None
        self.written: Optional[str] = None


_signals = _SignalState()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """A signal inside is raised at the end, so that a commit is done or not done, never half (a
    file in place that the writer would count as not written). With an error on the way out,
    the error wins and the signal is dropped. Only the main thread, where the handler runs,
    defers: a commit in another thread leaves the main thread's signals as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _signals.deferring += 1
    done = False
    try:
        yield
        done = True
    finally:
        _signals.deferring -= 1
        signum = _signals.pending if _signals.deferring == 0 else None
        if _signals.deferring == 0:
            _signals.pending = None
    if done and signum is not None:
        raise Interrupted(signum, _signals.written)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread for the duration,
    so ``finally`` blocks (the temporary file's removal) run; further signals are ignored while
    that cleanup runs; a signal during a :meth:`SafeWriter.commit` is raised once the commit is
    done. Elsewhere than the main thread, nothing changes."""
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    sigs = [getattr(signal, n) for n in names if hasattr(signal, n)]

    def handler(signum, frame):
        for s in sigs:
            signal.signal(s, signal.SIG_IGN)
        if _signals.deferring:
            _signals.pending = signum
            return
        raise Interrupted(signum, _signals.written)

    if _signals.depth == 0:
        _signals.pending = _signals.written = None
    _signals.depth += 1
    saved = {}
    try:
        try:
            for s in sigs:
                previous = signal.getsignal(s)
                if previous is signal.SIG_IGN:  # nohup and the like: keep ignoring
                    continue
                saved[s] = previous
                signal.signal(s, handler)
        except ValueError:  # not the main thread
            pass
        yield
    finally:
        _signals.depth -= 1
        for s, previous in saved.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
