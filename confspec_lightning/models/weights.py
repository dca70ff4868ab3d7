"""Loading backbone weights for fine-tuning, safely (no pickled code is ever executed).

Accepted files: a Lightning checkpoint (its ``state_dict``; for a ``RobustFairLitModule`` the keys
under ``net.backbone.``), or a plain state dict as saved by ``torch.save(model.state_dict())``,
possibly nested under ``state_dict`` / ``model`` / ``model_state_dict`` and with wrapper prefixes
such as ``module.`` (DataParallel/DDP), ``model.``, ``backbone.``, ``_orig_mod.`` (torch.compile) or a
``Sequential`` index (``0.``, ``1.``). The public checkpoint layouts (TRADES's WideResNet, kuangliu's ResNet-18,
the PreActResNet-18 variants) are renamed by :mod:`confspec_lightning.models.layouts`; normalisation buffers a file
carries (RobustBench's ``mu`` / ``sigma``, a ``RobustFairLitModule``'s ``net.normalize``) are read as the file's
input convention (:class:`~confspec_lightning.models.normalize.RecordedNormalization`), not as weights.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from confspec_lightning.models import layouts
from confspec_lightning.models.normalize import RecordedNormalization
from confspec_lightning.validation import check_choice

#: Prefixes stripped (repeatedly, in any order) until the keys match the backbone's.
KNOWN_PREFIXES = ("net.backbone.", "module.", "model.", "backbone.", "_orig_mod.", "net.", "0.", "1.")
#: Names of the normalisation buffers some files carry (RobustBench's models: ``mu`` / ``sigma``).
NORMALIZATION_BUFFERS = (("mu", "sigma"), ("mean", "std"))
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


def _read_object(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}={str(path)!r}: no such file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to read the file (zip, pickle, seek, decode) names the file
        raise load_error(what, path, error) from error


def _state_of(obj: Any, path: str | Path, what: str) -> dict[str, Tensor]:
    for key in NESTED_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{what}={str(path)!r} holds no state dict (a mapping of parameter names to tensors).")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def read_state_dict(path: str | Path, what: str = "init_weights") -> dict[str, Tensor]:
    """The tensors of a checkpoint or state-dict file, loaded with ``torch.load(weights_only=True)``.

    Errors name the file as ``what=path`` (the config field or option that gave it).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds pickled objects (refused, never executed), is corrupt, or holds no
            state dict.
    """
    return _state_of(_read_object(path, what), path, what)


def strip_prefixes(state: dict[str, Tensor], recognised: Callable[[str], bool]) -> tuple[dict[str, Tensor], list[str]]:
    """Strip known wrapper prefixes as long as that makes more keys ``recognised``.

    A prefix every key has (a wrapper around the whole network, e.g. ``module.`` of ``DataParallel(Sequential(net))``)
    is stripped as long as it recognises no fewer keys.

    Returns:
        The stripped state and the keys left behind (those without the stripped prefix).
    """
    outside: list[str] = []
    while True:
        current = sum(recognised(k) for k in state)
        best, best_matches, common = None, current, None
        for prefix in KNOWN_PREFIXES:
            stripped = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            count = sum(recognised(k) for k in stripped)
            if count > best_matches:
                best, best_matches = prefix, count
            elif common is None and state and len(stripped) == len(state) and count >= current:
                common = prefix
        best = best or common
        if best is None:
            return state, outside
        outside += [k for k in state if not k.startswith(best)]
        state = {k.removeprefix(best): v for k, v in state.items() if k.startswith(best)}


def match_prefixes(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Strip known wrapper prefixes from ``state`` keys as long as that makes more keys match ``expected``."""
    return strip_prefixes(state, expected.__contains__)[0]


def _is_wrapper_path(prefix: str) -> bool:
    """Whether ``prefix`` (``"module.model."``) is made of wrapper prefixes only."""
    while prefix:
        known = next((p for p in KNOWN_PREFIXES if prefix.startswith(p)), None)
        if known is None:
            return False
        prefix = prefix.removeprefix(known)
    return True


def _wrapped_forms(key: str) -> set[str]:
    """``key`` and what it becomes with wrapper prefixes stripped (``module.model.mu`` -> ``model.mu``, ``mu``)."""
    forms, frontier = {key}, [key]
    while frontier:
        current = frontier.pop()
        for prefix in KNOWN_PREFIXES:
            if current.startswith(prefix) and current.removeprefix(prefix) not in forms:
                forms.add(current.removeprefix(prefix))
                frontier.append(current.removeprefix(prefix))
    return forms


def split_normalization(
    state: dict[str, Tensor], lightning_checkpoint: bool, own: set[str] = frozenset()
) -> tuple[dict[str, Tensor], RecordedNormalization | None]:
    """The normalisation a file records, and its other tensors.

    A ``RobustFairLitModule`` checkpoint records ``net.normalize.{mean,std}`` (none: raw inputs); other files may
    carry top-level ``mu`` / ``sigma`` (RobustBench's models that normalise inside) or ``mean`` / ``std`` buffers,
    unless the backbone has them itself (``own``: its keys; e.g. a ``RobustBenchModel``'s ``model.mu``): then they
    are its weights. None: the file records nothing.
    """
    if any(k.startswith("net.backbone.") for k in state):
        mean, std = state.get("net.normalize.mean"), state.get("net.normalize.std")
        rest = {k: v for k, v in state.items() if not k.startswith("net.normalize.")}
        if mean is not None and std is not None:
            return rest, RecordedNormalization(mean.flatten().tolist(), std.flatten().tolist(), "net.normalize")
        if lightning_checkpoint:
            return rest, RecordedNormalization(None, None, "a RobustFairLitModule checkpoint without net.normalize")
        return rest, None
    for mean_name, std_name in NORMALIZATION_BUFFERS:
        found = {}
        for key in state:
            prefix, _, name = key.rpartition(".")
            if (
                name in (mean_name, std_name)
                and _is_wrapper_path(prefix + "." if prefix else "")
                and not (_wrapped_forms(key) & own)
            ):
                found[name] = key
        if set(found) == {mean_name, std_name}:
            mean, std = state[found[mean_name]], state[found[std_name]]
            rest = {k: v for k, v in state.items() if k not in found.values()}
            return rest, RecordedNormalization(
                mean.flatten().tolist(), std.flatten().tolist(), f"{mean_name}/{std_name}"
            )
    return state, None


@dataclass
class LoadedWeights:
    """What :func:`load_backbone_weights` read: the layout, what it dropped, the input convention the file records.

    Attributes:
        path: the file.
        layout: the layout read (see :mod:`~confspec_lightning.models.layouts`).
        detected: the layout was detected from the keys (not forced).
        description: what the file holds, e.g. ``WRN-34-10``.
        tensors: the number of tensors loaded into the backbone.
        dropped: the file's keys not loaded, with the reason.
        normalization: the input normalisation the file records (None: it records none).
    """

    path: str
    layout: str
    detected: bool
    description: str
    tensors: int
    dropped: dict[str, str] = field(default_factory=dict)
    normalization: RecordedNormalization | None = None

    def summary(self) -> str:
        """One line: which layout was read, what was dropped, the recorded normalisation."""
        how = "detected" if self.detected else "forced"
        groups: dict[str, int] = {}
        for key, reason in self.dropped.items():
            group = f"{key.split('.')[0]}.* ({reason})"
            groups[group] = groups.get(group, 0) + 1
        dropped = "; ".join(f"{group}: {count} tensors" for group, count in groups.items()) or "nothing"
        recorded = self.normalization.describe() if self.normalization is not None else "none recorded"
        return (
            f"init_weights={self.path!r}: read layout {self.layout!r} ({how}; {self.description}), "
            f"{self.tensors} tensors loaded; dropped: {dropped}; input normalisation in the file: {recorded}"
        )


def _head(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")


def load_backbone_weights(
    backbone: nn.Module, path: str | Path, layout: layouts.LayoutName = "auto", what: str = "init_weights"
) -> LoadedWeights:
    """Load the weights in ``path`` into ``backbone``, converting a public layout (strict: every tensor used).

    Every weight of the backbone must come from the file and every tensor of the file must be used (except what a
    layout drops, such as TRADES's unused ``sub_block1``), with equal shapes; a file without
    ``num_batches_tracked`` (older torch) keeps the backbone's.

    Args:
        backbone: the network to load into.
        path: the file.
        layout: a layout of :data:`~confspec_lightning.models.layouts.LAYOUTS`, or ``"auto"`` (detected from the
            keys).
        what: the option that named the file, for messages.

    Raises:
        ValueError: an unknown or ambiguous layout, a backbone that computes another function than the file's
            network, missing or unexpected keys or shape mismatches, naming a few of each.
    """
    check_choice(f"{what}_layout", layout, layouts.LayoutName)
    obj = _read_object(path, what)
    lightning_checkpoint = isinstance(obj, Mapping) and "hyper_parameters" in obj
    raw = _state_of(obj, path, what)
    own = backbone.state_dict()
    raw, recorded = split_normalization(raw, lightning_checkpoint, set(own))
    module_checkpoint = any(k.startswith("net.backbone.") for k in raw)
    if module_checkpoint:  # the module's other state (fairness methods, metrics) is not the backbone's
        raw = {k.removeprefix("net.backbone."): v for k, v in raw.items() if k.startswith("net.backbone.")}
    state, outside = strip_prefixes(raw, lambda k: k in own or (layout != "native" and layouts.knows_any(k)))
    name, detected = layout, layout == "auto"
    if detected:
        matches, seen = layouts.detect_layout(set(state), set(own))
        if len(matches) != 1:
            unknown = [k for k in state if k not in own][:5]
            if not matches:
                problem = (
                    f"its layout is not one this library reads (it has {seen}; keys the backbone "
                    f"{type(backbone).__name__} does not have: {_head(unknown)})"
                )
            else:
                problem = (
                    f"its keys fit several layouts that compute different functions ({', '.join(matches)}; it has "
                    f"{seen}) and cannot tell them apart"
                )
            raise ValueError(
                f"{what}={str(path)!r} does not fit the backbone {type(backbone).__name__}: {problem}. Supported "
                f"layouts: {layouts.supported_layouts()}. Force one with {what}_layout: <name> (model.init_args."
                f"{what}_layout), and build the backbone it names."
            )
        name = matches[0]
    chosen = layouts.LAYOUTS[name]
    conversion = chosen.convert(state)
    problem = chosen.check_backbone(backbone, conversion)
    if problem is not None:
        raise ValueError(
            f"{what}={str(path)!r} was read as layout {name!r} ({chosen.sources}), but {problem}. Another layout: "
            f"{what}_layout (supported: {', '.join(layouts.LAYOUTS)})."
        )
    converted = conversion.state
    for key, value in own.items():  # files of older torch have no BatchNorm counters
        if key.endswith("num_batches_tracked") and key not in converted:
            converted[key] = value.clone()
    missing = [k for k in own if k not in converted]
    unexpected = [k for k in converted if k not in own] + conversion.unmatched
    if not module_checkpoint:  # tensors outside the stripped wrapper are weights the backbone would not use
        unexpected += outside
    mismatched = [
        f"{k}: file {tuple(converted[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in converted and converted[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{what}={str(path)!r} does not fit the backbone {type(backbone).__name__} (read as layout {name!r}: "
            f"{conversion.description}; wrong architecture or num_classes?): {len(missing)} missing "
            f"[{_head(missing)}], {len(unexpected)} unexpected [{_head(unexpected)}], {len(mismatched)} with other "
            f"shapes [{_head(mismatched)}]."
        )
    backbone.load_state_dict(converted, strict=True)
    return LoadedWeights(
        path=str(path),
        layout=name,
        detected=detected,
        description=conversion.description,
        tensors=len(converted),
        dropped=conversion.dropped,
        normalization=recorded,
    )
