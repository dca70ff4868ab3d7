"""Loading backbone weights for fine-tuning, safely (no pickled code is ever executed).

Accepted files: a Lightning checkpoint (its ``state_dict``; for a ``RobustFairLitModule`` the keys
under ``net.backbone.``), or a plain state dict as saved by ``torch.save(model.state_dict())``,
possibly nested under ``state_dict`` / ``model`` / ``model_state_dict`` and with wrapper prefixes
such as ``module.`` (DataParallel/DDP), ``model.``, ``backbone.`` or ``_orig_mod.`` (torch.compile).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

#: Prefixes stripped (repeatedly, in any order) until the keys match the backbone's.
KNOWN_PREFIXES = ("net.backbone.", "module.", "model.", "backbone.", "_orig_mod.", "net.")
NESTED_KEYS = ("state_dict", "model_state_dict", "model")
#: Source files of torch.load: an exception raised in them is a failure to read the file.
TORCH_LOAD_FILES = ("torch/serialization.py", "torch/_weights_only_unpickler.py")


def raised_by_torch_load(error: BaseException) -> bool:
    """Whether ``error`` was raised inside ``torch.load`` (reading the file), not by code run afterwards."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith(TORCH_LOAD_FILES):
            return True
        tb = tb.tb_next
    return False


def load_error(what: str, path: str | Path, error: BaseException) -> ValueError:
    """A clear ``ValueError`` for a file ``torch.load(weights_only=True)`` could not read, naming ``what=path``.

    Pickled Python objects (a class or function the safe unpickler refuses) and corrupt or truncated files
    get different messages.
    """
    detail = (str(error).splitlines() or [type(error).__name__])[0]
    if isinstance(error, pickle.UnpicklingError) and "global" in str(error).lower():
        return ValueError(
            f"{what}={str(path)!r} holds pickled Python objects, which are refused for safety (torch.load "
            f"weights_only=True; nothing in it was executed). Save a plain state dict instead: "
            f"torch.save(model.state_dict(), path), or load it with weights_only=False only if you trust its source. "
            f"Detail: {detail}"
        )
    return ValueError(
        f"{what}={str(path)!r} is not a readable torch file (corrupt or truncated?): {type(error).__name__}: {detail}"
    )


def read_state_dict(path: str | Path, what: str = "init_weights") -> dict[str, Tensor]:
    """The tensors of a checkpoint or state-dict file, loaded with ``torch.load(weights_only=True)``.

    Errors name the file as ``what=path`` (the config field or option that gave it).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds pickled objects (refused, never executed), is corrupt, or holds no
            state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}={str(path)!r}: no such file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to read the file (zip, pickle, seek, decode) names the file
        raise load_error(what, path, error) from error
    for key in NESTED_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{what}={str(path)!r} holds no state dict (a mapping of parameter names to tensors).")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def match_prefixes(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Strip known wrapper prefixes from ``state`` keys as long as that makes more keys match ``expected``."""
    while True:
        matches = sum(k in expected for k in state)
        best, best_matches = None, matches
        for prefix in KNOWN_PREFIXES:
            stripped = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            count = sum(k in expected for k in stripped)
            if count > best_matches:
                best, best_matches = stripped, count
        if best is None:
            return state
        state = best


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load the weights in ``path`` into ``backbone`` (strict: every tensor must match by name and shape).

    Raises:
        ValueError: missing or unexpected keys or shape mismatches (a different architecture), naming a
            few of each.
    """
    own = backbone.state_dict()
    state = match_prefixes(read_state_dict(path), set(own))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:

        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        raise ValueError(
            f"init_weights={str(path)!r} does not fit the backbone {type(backbone).__name__} (wrong architecture or "
            f"num_classes?): {len(missing)} missing [{head(missing)}], {len(unexpected)} unexpected "
            f"[{head(unexpected)}], {len(mismatched)} with other shapes [{head(mismatched)}]."
        )
    backbone.load_state_dict(state, strict=True)
