"""Shipped recipes: protocol bases and method overlays, combined on the command line.

A run's config is one **base** per data set and protocol (``digits/base.yaml``, ``cifar10/scratch.yaml``,
``cifar10/finetune.yaml``, ``tinyimagenet/scratch.yaml``: trainer, backbone, threat model, optimiser, data, TRADES
and no fairness method) plus one small **overlay** per method (``methods/trades_csr.yaml``, ``methods/cfa.yaml``,
...; where a protocol needs other settings of a method, e.g. a warm-up scaled to its epochs, its own overlay in
``<protocol>/methods/``), as anomalib combines model and data configs::

    confspec fit --config cifar10/finetune.yaml --config methods/trades_csr.yaml

A **recipe name** (``--config cifar10/finetune_trades_csr``) stands for such a list of files
(``configs/recipes.yaml``); the names of the 0.1 recipes, which were whole files, are recipe names, so they keep
working, also as paths (``--config configs/digits/trades_csr.yaml``).

The run is named after what it combines: the base's logger name plus ``_<stem>`` for each shipped overlay that
follows it (``cifar10_finetune`` + ``methods/trades_csr.yaml`` -> ``runs/cifar10_finetune_trades_csr``), unless
the command line or a file sets the name itself. A user's own overlay (a file outside the package) does not rename
the run. The resolved config is printed by ``--print_config`` and saved as ``config.yaml`` in every run.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from confspec_lightning import errors

#: The folder of the shipped configs (a link to it is the repository's ``configs/``).
RECIPES_DIR = Path(__file__).resolve().parent / "configs"
#: The file that names the shipped combinations.
RECIPES_FILE = RECIPES_DIR / "recipes.yaml"
#: The command-line key that sets the run's name.
NAME_KEY = "--trainer.logger.init_args.name"


@functools.cache
def recipes() -> dict[str, tuple[str, ...]]:
    """Recipe name -> the files it combines, in order (relative to :data:`RECIPES_DIR`)."""
    table = yaml.safe_load(RECIPES_FILE.read_text())
    return {name: tuple(files) for name, files in table.items()}


def recipe_names() -> list[str]:
    """Every recipe name, as ``--config`` takes it (``digits/trades_csr``)."""
    return sorted(recipes())


def config_files() -> list[str]:
    """Every shipped config file (bases and overlays), as ``--config`` takes it (``methods/csr``)."""
    return sorted(
        str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml") if p != RECIPES_FILE
    )


def recipe_files(name: str) -> list[Path]:
    """The files of recipe ``name`` (``digits/trades_csr`` or ``digits/trades_csr.yaml``).

    Raises:
        FileNotFoundError: no such recipe, naming the closest ones.
    """
    key = name.removesuffix(".yaml")
    if key not in recipes():
        raise FileNotFoundError(
            f"recipe {name!r} does not exist{errors._did_you_mean(errors.closest(key, recipe_names()))} "
            f"(the recipes: {', '.join(recipe_names())})."
        )
    return [RECIPES_DIR / f for f in recipes()[key]]


def compose(name_or_files: str | list[str | Path]) -> dict:
    """The config a recipe (or a list of files) gives, merged as jsonargparse merges ``--config`` files.

    Dicts merge key by key; a list replaces the previous one, except that a list item with the same
    ``class_path`` as the previous item at its position keeps the previous ``init_args`` it does not set
    (jsonargparse's rule, e.g. a protocol's warm-up over a method's other settings).
    """
    files = recipe_files(name_or_files) if isinstance(name_or_files, str) else [Path(f) for f in name_or_files]
    config: dict = {}
    for path in files:
        config = _merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return config


def _merge(old: object, new: object) -> object:
    if isinstance(old, dict) and isinstance(new, dict):
        if "class_path" in new and old.get("class_path") not in (None, new["class_path"]):
            return new  # another class: nothing of the old one's arguments carries over
        out = dict(old)
        for key, value in new.items():
            out[key] = _merge(old.get(key), value) if key in old else value
        return out
    if isinstance(old, list) and isinstance(new, list):
        return [
            _merge(old[i], item)
            if i < len(old)
            and isinstance(item, dict)
            and isinstance(old[i], dict)
            and "class_path" in item
            and old[i].get("class_path") == item["class_path"]
            else item
            for i, item in enumerate(new)
        ]
    return new


def _logger_name(path: Path) -> str | None:
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None  # the parser reports the file
    logger = (config.get("trainer") or {}).get("logger") if isinstance(config, dict) else None
    if isinstance(logger, dict):
        name = (logger.get("init_args") or {}).get("name", logger.get("name"))
        return name if isinstance(name, str) else None
    return None


def run_name(files: list[Path]) -> str | None:
    """The run name of ``files`` combined (None: the files name it themselves, or nothing to add).

    The last shipped file that sets a logger name, plus ``_<stem>`` for every shipped file after it.
    """
    name, suffixes = None, []
    for path in files:
        if not path.resolve().is_relative_to(RECIPES_DIR):
            continue
        if (own := _logger_name(path)) is not None:
            name, suffixes = own, []
        elif name is not None:
            suffixes.append(path.stem)
    if name is None or not suffixes:
        return None
    return "_".join([name, *suffixes])


def _shipped(value: str) -> list[Path] | None:
    """The shipped files ``value`` names: a recipe name, a shipped file, or a 0.1 recipe's path; else None."""
    key = value.removesuffix(".yaml")
    if key in recipes():
        return recipe_files(key)
    if (RECIPES_DIR / f"{key}.yaml").is_file():
        return [RECIPES_DIR / f"{key}.yaml"]
    parts = Path(key).parts
    if "configs" in parts:  # configs/digits/trades_csr.yaml: a recipe that was a file in 0.1
        tail = "/".join(parts[len(parts) - parts[::-1].index("configs") :])
        if tail in recipes():
            return recipe_files(tail)
    return None


def resolve_config_args(argv: list[str]) -> list[str]:
    """``--config`` values made files: a path as given, a recipe name as its files, a shipped file by name.

    When shipped files are combined the run's name follows them (:func:`run_name`), inserted after the last
    ``--config`` so that a later ``--trainer.logger.init_args.name`` still wins; not when the command line names
    the run.

    Raises:
        FileNotFoundError: neither a file nor a recipe nor a shipped config, naming the closest names.
    """
    out: list[str] = []
    files: list[Path] = []
    last, i = -1, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        if Path(value).exists() or value.lstrip().startswith(("{", "[")) or ":" in value:  # a file, or inline YAML
            if Path(value).is_file():
                files.append(Path(value))
            out += ["--config", value]
        else:
            shipped = _shipped(value)
            if shipped is None:
                names = errors.closest(value.removesuffix(".yaml"), recipe_names() + config_files())
                raise FileNotFoundError(
                    f"--config {value!r} is neither a file nor a shipped recipe{errors._did_you_mean(names)} "
                    f"(the recipes: {', '.join(recipe_names())}; or a base plus overlays, e.g. --config "
                    "digits/base.yaml --config methods/trades_csr.yaml)."
                )
            files += shipped
            out += [a for f in shipped for a in ("--config", str(f))]
        last = len(out) - 1
    named = (NAME_KEY, "--trainer.logger.name")
    if not files or any(arg in named or arg.startswith(tuple(f"{key}=" for key in named)) for arg in out):
        return out
    name = run_name(files)
    if name is not None:
        out.insert(last + 1, f"{NAME_KEY}={name}")
    return out
