"""What ``confspec`` prints for a bad input: the one message that matters, the closest valid names, exit code 2.

Two kinds of bad input reach the command line:

* a **parse error** (a typo'd option or YAML key, an unknown ``class_path``): jsonargparse reports it as a nest
  of "Does not validate against any of the Union subtypes" blocks; :func:`summarize_parse_error` keeps the
  innermost reason, names where it is, and adds the closest valid names;
* a **rejected value** (alpha=2, eps<0, a missing data root, a corrupt weights file): the library raises a
  ``ValueError``/``TypeError``/``FileNotFoundError`` naming the field and the value, which jsonargparse and
  Lightning wrap in further exceptions; :func:`user_error` finds it in the chain.

``--debug`` (or ``CONFSPEC_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import traceback
from pathlib import Path

#: Exit status of a rejected input (argparse's, for usage errors).
USAGE_EXIT = 2
PACKAGE_DIR = Path(__file__).resolve().parent
#: The exception types the library raises for bad input (others are bugs: their traceback is shown).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError, NotADirectoryError, IsADirectoryError)
#: Wrapper lines of jsonargparse's nested messages that carry no information of their own.
_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value|Expected a <class "
    r"'NoneType'>|Problem with given class_path|Parser key |tip: |usage: )"
)


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` among the arguments or ``CONFSPEC_DEBUG`` set to a true value."""
    return "--debug" in argv or os.environ.get("CONFSPEC_DEBUG", "").lower() in ("1", "true", "yes")


def closest(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """The candidates most like ``name`` (difflib), best first."""
    return difflib.get_close_matches(name, sorted(set(candidates)), n=n, cutoff=0.5)


def _did_you_mean(names: list[str]) -> str:
    return f"; did you mean {' or '.join(repr(n) for n in names)}?" if names else ""


def _import(path: str) -> object | None:
    module, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError):
        return None


def _parameters(class_path: str) -> list[str]:
    cls = _import(class_path)
    if cls is None:
        return []
    try:
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        return []


def summarize_parse_error(message: str, top_level_keys: list[str] = ()) -> str:
    """The innermost reason of a jsonargparse error message, where it is, and the closest valid names.

    The reason comes last, e.g. ``in model.init_args (confspec_lightning.RobustFairLitModule): option 'betta'
    is not accepted; did you mean 'beta'?``.
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keys: list[str] = []
    class_paths: list[str] = []
    reasons: list[str] = []
    given: str | None = None
    for line in lines:
        text = line.removeprefix("- ").strip()
        if match := re.match(r"Given value: (.*)$", text):
            value = match.group(1)
            if len(value) < 80 and not value.startswith(("Namespace(", "NestedArg(", "{", "[")):
                given = value
        if match := re.match(r'Parser key "([^"]+)"', text):
            keys.append(match.group(1))
        if match := re.match(r"Problem with given class_path '([^']+)'", text):
            class_paths.append(match.group(1))
        if not _NOISE.match(text):
            reasons.append(text)
    reason = reasons[-1] if reasons else (lines[-1] if lines else message)
    literal = [r for r in reasons if re.match(r"Expected a typing\.Literal\[(.*)\]$", r)]
    if literal and given is not None and "." not in given and reason.startswith("Expected a dot import path"):
        # a union of names and a class (``objective: trades`` or a class_path): a bare word was meant as a name
        reason = literal[-1]
    reason = re.sub(r"^error:\s*", "", reason)
    where = ""
    if keys:
        where = "in " + ".".join(dict.fromkeys(keys))
    if class_paths:
        where = (where + " " if where else "in ") + f"({class_paths[-1]})"
    if match := re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$", reason):
        reason = f"{match.group(2)!r} is not accepted; choose one of {match.group(1)}"
    elif (match := re.match(r"Expected a typing\.Literal\[(.*)\]$", reason)) and given is not None:
        reason = f"{given!r} is not accepted; choose one of {match.group(1)}"
    elif match := re.search(r"Option '([^']+)' is not accepted", reason):
        reason = f"option {match.group(1)!r} is not accepted" + _did_you_mean(
            closest(match.group(1), _parameters(class_paths[-1]) if class_paths else [])
        )
    elif match := re.search(r"module '([^']+)' has no attribute '([^']+)'", reason):
        module, attribute = match.groups()
        try:
            names = [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
        except ImportError:
            names = []
        reason = f"class_path '{module}.{attribute}' is not accepted: {module} has no {attribute!r}" + _did_you_mean(
            [f"{module}.{n}" for n in closest(attribute, names)]
        )
    elif match := re.search(r"does not accept option '([^']+)'", reason):
        option = match.group(1)
        head = option.split(".")[0]
        reason = reason.rstrip(".") + _did_you_mean(
            [option.replace(head, n, 1) for n in closest(head, list(top_level_keys))]
        )
    return f"{where}: {reason}" if where else reason


def config_file_problem(argv: list[str]) -> str | None:
    """The first ``--config`` file of ``argv`` that is not valid YAML: its path, the YAML library's reason and where.

    jsonargparse reports a YAML error without the file it came from (``in "<unicode string>", line 2``);
    this reads each file given with ``--config``/``-c`` again and names the first one that fails. None if all
    parse (or none is a file).
    """
    import yaml

    values = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    for value in values:
        path = Path(value)
        if not path.is_file():
            continue
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            reason = getattr(error, "problem", None) or str(error).splitlines()[0]
            context = getattr(error, "context", None)
            hint = " (YAML indents with spaces, never tabs)" if "\t" in path.read_text() else ""
            return f"{path}{where}: {(context + ': ') if context else ''}{reason}{hint}"
    return None


def _raised_in_package(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)


def user_error(error: BaseException) -> BaseException | None:
    """The library's own bad-input error in ``error``'s chain (causes, else contexts), the innermost one; else None."""
    seen: set[int] = set()
    found: BaseException | None = None
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, USER_ERRORS) and _raised_in_package(current):
            found = current  # keep walking: the innermost one is the root
        current = current.__cause__ or current.__context__
    return found
