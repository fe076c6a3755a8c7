"""Reading and writing checkpoints: the state_dicts inside a checkpoint file, and atomic writes."""
from __future__ import annotations

import dataclasses
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

#: keys under which training scripts (timm, DeiT, mmcv, the official RepLKNet code, ...) keep weights
WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "module")

DDP_PREFIX = "module."


class CheckpointError(Exception):
    """A checkpoint that cannot be read or written; the message says why."""


@dataclasses.dataclass
class StateDictEntry:
    """One state_dict found in a checkpoint: where it sits, and its tensors without a DDP prefix."""
    key: Optional[str]           # wrapper key, or None when the file is the state_dict itself
    prefix: str                  # "module." when every key had it, else ""
    state_dict: Dict[str, torch.Tensor]


def load(path: str, *, allow_pickled_code: bool = False) -> Any:
    """``torch.load`` on the CPU, tensors-only unless ``allow_pickled_code`` (which runs code from the file)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{path}' is not a file")
    try:
        return torch.load(p, map_location="cpu", weights_only=not allow_pickled_code)
    except pickle.UnpicklingError as e:
        match = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if match and not allow_pickled_code:
            raise CheckpointError(
                f"'{path}' holds a pickled Python object ({match.group(1)}), not only tensors; torch.load("
                f"weights_only=True) refuses it. Only if you trust the file, rerun with --unsafe-load-pickle-runs-code "
                f"(this runs code from the file)") from e
        raise CheckpointError(f"cannot read '{path}': not a PyTorch checkpoint, or corrupted") from e
    except Exception as e:  # noqa: BLE001 - torch.load fails on garbage in many ways (KeyError, EOFError, ...)
        raise CheckpointError(f"cannot read '{path}': not a PyTorch checkpoint, or truncated ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _strip(sd: Dict[str, torch.Tensor]):
    if sd and all(k.startswith(DDP_PREFIX) for k in sd):
        return DDP_PREFIX, {k[len(DDP_PREFIX):]: v for k, v in sd.items()}
    return "", dict(sd)


def state_dicts(obj: Any) -> List[StateDictEntry]:
    """Every state_dict in a loaded checkpoint: the object itself, or under the wrapper keys."""
    if _is_state_dict(obj):
        return [StateDictEntry(None, *_strip(obj))]
    entries = []
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                entries.append(StateDictEntry(key, *_strip(obj[key])))
    if not entries:
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"no state_dict found: the checkpoint is {what}; expected a state_dict or a dict "
                              f"holding one under {', '.join(repr(k) for k in WRAPPER_KEYS)}")
    return entries


def replace_state_dicts(obj: Any, entries: List[StateDictEntry]) -> Any:
    """``obj`` with each entry's state_dict put back where it came from (prefix restored); other
    entries of a wrapper dict are kept as they are."""
    def restored(entry):
        return {entry.prefix + k: v for k, v in entry.state_dict.items()}

    if len(entries) == 1 and entries[0].key is None:
        return restored(entries[0])
    out = dict(obj)
    for entry in entries:
        out[entry.key] = restored(entry)
    return out


def save_atomic(obj: Any, path: str, *, overwrite: bool = False) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: ``path`` is either the old
    file or the complete new one, never half-written. Without ``overwrite`` an existing file is
    an error (also one that appears while writing)."""
    target = Path(path)
    if target.is_dir():
        raise CheckpointError(f"output '{path}' is a directory")
    if target.exists() and not overwrite:
        raise CheckpointError(f"output '{path}' exists; pass --force to overwrite it")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(f"output folder '{folder}' does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if the target appeared meanwhile: never clobbers
            except FileExistsError:
                raise CheckpointError(f"output '{path}' exists; pass --force to overwrite it") from None
            except OSError:  # file systems without hard links
                if target.exists():
                    raise CheckpointError(f"output '{path}' exists; pass --force to overwrite it") from None
                os.replace(tmp, target)
    except OSError as e:
        raise CheckpointError(f"cannot write '{path}': {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
