"""RobustBench model zoo entries as backbones, built by RobustBench's own code (optional extra ``robustbench``).

``RobustBenchModel(name, dataset, threat_model)`` builds the entry's architecture with RobustBench's classes (the
DeepMind/Swish WideResNets, ensembles, ... included) and loads its weights with RobustBench's own
``robustbench.utils.load_model`` from its cache folder, ``<model_dir>/<dataset>/<threat_model>/<name>.pt``
(ensembles: ``<name>.pt_m0.pt``, ``<name>.pt_m1.pt``, ...). Offline, the file must already be there: a missing one is
a clear error naming the path to put it in. With ``download=True`` RobustBench downloads it itself.

Every RobustBench model takes raw pixels in [0, 1] and normalises inside where it needs to, so the module's
input normalisation must be ``none`` (:attr:`RobustBenchModel.normalizes_inputs`).

``pip install 'confspec-lightning[robustbench]'``. RobustBench 1.1.1's package ``__init__`` also imports its
benchmark and data helpers, which need ``autoattack`` (the GitHub package, not PyPI's ``pyautoattack`` it
declares) and ``pkg_resources`` (gone from setuptools >= 81); where those fail, the model zoo and
``robustbench.utils`` (which need neither) are imported without running that ``__init__``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from torch import Tensor, nn

from confspec_lightning.errors import closest
from confspec_lightning.models.weights import load_error, raised_by_torch_load
from confspec_lightning.validation import check_bool, check_choice

RobustBenchDataset = Literal["cifar10", "cifar100", "imagenet"]
RobustBenchThreatModel = Literal["Linf", "L2", "corruptions"]
#: What ``robustbench``'s package ``__init__`` imports that its model zoo does not need.
_INIT_ONLY_IMPORTS = ("autoattack", "pkg_resources")
INSTALL_HINT = "pip install 'confspec-lightning[robustbench]' (PyPI robustbench)"


def robustbench_utils() -> ModuleType:
    """``robustbench.utils`` (``load_model``, the model zoo), imported as described in the module docstring.

    The deprecation notices its dependencies (timm, torch.jit) print on import, which a user cannot act on, are
    silenced.

    Raises:
        ValueError: ``robustbench`` is not installed (how to install it).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return _import_robustbench_utils()


def _import_robustbench_utils() -> ModuleType:
    try:
        return importlib.import_module("robustbench.utils")
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] not in _INIT_ONLY_IMPORTS:
            if error.name is not None and error.name.split(".")[0] == "robustbench":
                raise ValueError(f"RobustBenchModel needs the optional package robustbench: {INSTALL_HINT}.") from error
            raise
    spec = importlib.util.find_spec("robustbench")
    if spec is None or spec.submodule_search_locations is None:  # pragma: no cover - installed but not a package
        raise ValueError(f"RobustBenchModel needs the optional package robustbench: {INSTALL_HINT}.")
    package = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
    sys.modules["robustbench"] = package
    return importlib.import_module("robustbench.utils")


def model_zoo(dataset: str, threat_model: str) -> dict[str, dict[str, Any]]:
    """RobustBench's entries for ``(dataset, threat_model)``: name -> {``model``: builder, ``gdrive_id``: ...}."""
    utils = robustbench_utils()
    enums = importlib.import_module("robustbench.model_zoo.enums")
    return utils.all_models[enums.BenchmarkDataset(dataset)][enums.ThreatModel(threat_model)]


def cache_paths(name: str, dataset: str, threat_model: str, model_dir: str | Path, files: int = 1) -> list[Path]:
    """Where RobustBench keeps an entry's weights.

    ``<model_dir>/<dataset>/<threat_model>/<name>.pt``; an ensemble of ``files``: ``<name>.pt_m<i>.pt``.
    """
    base = Path(model_dir) / dataset / threat_model / f"{name}.pt"
    return [base] if files == 1 else [Path(f"{base}_m{i}.pt") for i in range(files)]


def load_robustbench_model(
    name: str,
    dataset: RobustBenchDataset = "cifar10",
    threat_model: RobustBenchThreatModel = "Linf",
    model_dir: str | Path = "models",
    download: bool = False,
) -> nn.Module:
    """The RobustBench entry ``name`` with its weights, in eval mode (RobustBench's ``load_model``).

    Raises:
        ValueError: an unknown name (the closest names), robustbench not installed, a file torch refuses.
        FileNotFoundError: offline (``download=False``) and the weights are not in the cache: names the path.
    """
    check_choice("robustbench.dataset", dataset, RobustBenchDataset)
    check_choice("robustbench.threat_model", threat_model, RobustBenchThreatModel)
    check_bool("robustbench.download", download)
    entries = model_zoo(dataset, threat_model)
    if name not in entries:
        near = closest(name, list(entries))
        hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else ""
        raise ValueError(
            f"robustbench.name={name!r} is not a RobustBench {dataset} {threat_model} model{hint} ({len(entries)} "
            f"entries, e.g. {', '.join(list(entries)[:4])}; the leaderboard at robustbench.github.io lists them)."
        )
    utils = robustbench_utils()
    timm_name = f"{name.lower().replace('-', '_')}_{dataset}_{threat_model.lower()}"
    gdrive = entries[name].get("gdrive_id")
    if not download and utils.timm.is_model(timm_name):
        raise ValueError(
            f"robustbench.name={name!r} is served by timm from the Hugging Face hub, not from RobustBench's cache "
            "folder: set download: true where the network allows (timm keeps it in its own cache)."
        )
    if not download and gdrive is not None:
        paths = cache_paths(name, dataset, threat_model, model_dir, len(gdrive) if isinstance(gdrive, list) else 1)
        absent = [p for p in paths if not p.is_file()]
        if absent:
            raise FileNotFoundError(
                f"RobustBench model {name!r} ({dataset}, {threat_model}) is not in the cache folder "
                f"model_dir={str(model_dir)!r}: put its weights at {', '.join(str(p) for p in absent)} "
                "(RobustBench's layout <model_dir>/<dataset>/<threat_model>/<name>.pt, as robustbench.utils.load_model "
                "saves it), or set download: true where the network allows."
            )
    try:
        return utils.load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    except Exception as error:
        if raised_by_torch_load(error):  # torch.load(weights_only=True) refused or could not read the file
            path = cache_paths(name, dataset, threat_model, model_dir)[0]
            raise load_error("robustbench", path, error) from error
        raise


class RobustBenchModel(nn.Module):
    """A RobustBench model zoo entry as a backbone (fine-tuning or evaluation), built by RobustBench's own code.

    Its state dict is the RobustBench model's under ``model.``. Inputs are raw pixels in [0, 1]: the model
    normalises inside where it needs to (``normalizes_inputs``), so the module's ``input_normalization`` is ``none``.

    Args:
        name: the RobustBench model name, e.g. ``Zhang2019Theoretically`` (TRADES WRN-34-10) or ``Wu2020Adversarial``.
        dataset: ``cifar10``, ``cifar100`` or ``imagenet``.
        threat_model: ``Linf``, ``L2`` or ``corruptions``.
        model_dir: RobustBench's cache folder (``<model_dir>/<dataset>/<threat_model>/<name>.pt``).
        download: let RobustBench download missing weights (needs the network); offline (default), a missing file
            is an error naming the path to put it in.
    """

    #: The module leaves the normalisation to the model (see :func:`~.normalize.resolve_input_normalization`).
    normalizes_inputs = True
    weights_file: str

    def __init__(
        self,
        name: str,
        dataset: RobustBenchDataset = "cifar10",
        threat_model: RobustBenchThreatModel = "Linf",
        model_dir: str = "models",
        download: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.model = load_robustbench_model(name, dataset, threat_model, model_dir, download)
        #: the file the weights came from (the module evaluates a start model from a file before fine-tuning it)
        self.weights_file = str(cache_paths(name, dataset, threat_model, model_dir)[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
