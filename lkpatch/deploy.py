"""The deploy structure of a model, and loading the checkpoints ``lkpatch convert`` writes.

``lkpatch.load_checkpoint(model, path)`` loads either kind of file into a model built as for
training: a checkpoint whose keys fit the model as it is loads as it is; one written with
``--reparam`` (BatchNorms folded into the depthwise convolutions, or RepLKNet's merged kernels)
first puts the model into that structure, with the same function the command used.
"""
from __future__ import annotations

import copy
import errno
import itertools
import os
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

from . import checkpoint as ckpt_io


def reparameterize(model: nn.Module) -> nn.Module:
    """The deploy structure, in place: RepLKNet's own structural re-parameterization for every
    RepLKNet in the model (the model itself, or a backbone inside it: the official deploy layout),
    and every other BatchNorm that follows a depthwise convolution folded into it. The model must
    be in eval mode (both use the BatchNorm running statistics). Returns the model, as
    ``convert_model`` and ``fuse_conv_bn`` do."""
    to_deploy_structure(model)
    return model


def to_deploy_structure(model: nn.Module) -> Optional[str]:
    """:func:`reparameterize`, returning what was done (for the command's report); None where
    the model has nothing to re-parameterize (it is left as it is)."""
    from .fuse import _find_pairs, _fold_pairs, _refuse_training_norms, _refuse_unfoldable, _warn_untraced

    _refuse_unfoldable(model, "reparameterize", "re-parameterize")
    # RepLKNets (the outermost ones) keep the official deploy layout: their kernels merged, their
    # other BatchNorms as they are; pairs elsewhere in the model are folded.
    reps = [name for name, m in model.named_modules() if hasattr(m, "structural_reparam")]
    reps = [r for r in reps if not any(r != o and (o == "" or r.startswith(o + ".")) for o in reps)]
    found, traced = _find_pairs(model)
    pairs = [(c, b) for c, b in found if not any(r == "" or c.startswith(r + ".") or b.startswith(r + ".") for r in reps)]
    if not traced:
        _warn_untraced(pairs)  # only for the pairs it folds
    reps = [r for r in reps if not getattr(model.get_submodule(r), "merged", lambda: False)()]  # deploy: nothing to do
    if not reps and not pairs:
        return None
    _refuse_training_norms(model, pairs, "reparameterize")
    done = []
    for name in reps:
        model.get_submodule(name).structural_reparam()
    if reps:
        where = "" if reps == [""] else f" ({len(reps)} inside the model)"
        done.append(f"structural re-parameterization{where} (BN and small kernel merged into the large kernel)")
    if pairs:
        _fold_pairs(model, pairs)
        done.append(f"{len(pairs)} BatchNorm(s) folded into the depthwise convolution before them")
    return "; ".join(done)


def load_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Any], *, key: Optional[str] = None,
                    allow_pickled_code: bool = False) -> nn.Module:
    """Load a checkpoint into ``model`` strictly; for a ``lkpatch convert --reparam`` file, first
    put ``model`` in eval mode and into the deploy structure (:func:`reparameterize`). Returns
    ``model``.

    ``checkpoint``: a path (PyTorch or safetensors file, read tensors-only unless
    ``allow_pickled_code``) or a loaded object: a state_dict, or a dict holding one under
    ``model``, ``state_dict``, ... (``key`` picks one; default the first found). ``module.`` and
    ``_orig_mod.`` key prefixes are ignored. ``model`` may be converted or not.

    A missing file raises FileNotFoundError; a file that cannot be read as a checkpoint, or that
    fits neither the model nor its deploy structure, ValueError.
    """
    obj = checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "checkpoint does not exist", path)
        try:
            obj = ckpt_io.load(path, allow_pickled_code=allow_pickled_code,
                               how_to_allow="pass allow_pickled_code=True")
        except ckpt_io.CheckpointError as e:  # unreadable, not a checkpoint, pickled code
            raise ValueError(str(e)) from None
    try:
        entries = ckpt_io.state_dicts(obj)
    except ckpt_io.CheckpointError as e:
        raise ValueError(str(e)) from None
    if key is None:
        entry = entries[0]
    else:
        found = [e for e in entries if e.key == key]
        if not found:
            raise KeyError(f"no state_dict under {key!r}; the checkpoint has {[e.key for e in entries]}")
        entry = found[0]
    ckpt_io.fit_prefix(entry, model.state_dict())
    as_is = ckpt_io.mismatch(model.state_dict(), entry.state_dict)
    if as_is is None:
        model.load_state_dict(entry.state_dict, strict=True)
        return model
    deploy = _deploy_state_dict(model)
    if deploy is not None:  # a checkpoint that fits neither leaves the model as it was
        ckpt_io.fit_prefix(entry, deploy)
        problem = ckpt_io.mismatch(deploy, entry.state_dict)
        if problem:
            raise ValueError(f"the checkpoint fits neither the model nor its deploy structure (the model is "
                             f"unchanged). Against the model: {as_is}; against its deploy structure: {problem}")
    model.eval()
    done = to_deploy_structure(model) or "no BatchNorm to fold"
    ckpt_io.fit_prefix(entry, model.state_dict())
    problem = ckpt_io.mismatch(model.state_dict(), entry.state_dict)
    if problem:
        raise ValueError(f"the checkpoint fits neither the model nor its deploy structure ({done}; the model is "
                         f"now in eval mode and that structure): {problem}")
    model.load_state_dict(entry.state_dict, strict=True)
    return model


def _deploy_state_dict(model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The state_dict ``model`` would have in the deploy structure, its tensors on the meta device
    (keys and shapes, no memory), ``model`` untouched; None where the structure cannot be built
    without real values."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    try:
        trial = copy.deepcopy(model, memo).eval()
        reparameterize(trial)
    except Exception:  # noqa: BLE001 -- a model whose re-parameterization reads values
        return None
    return trial.state_dict()
