"""Sphinx configuration of the confspec-lightning documentation (``make docs``; pages in Markdown through MyST)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from pathlib import Path

from sphinx.util.nodes import make_refnode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package as it is in this checkout, installed or not

import confspec_lightning  # noqa: E402

project = "confspec-lightning"
author = "confspec-lightning contributors"
copyright = "2026, confspec-lightning contributors"
version = release = confspec_lightning.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax shipped with the site: formulas render without network
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# Markdown: $...$ and $$...$$ math, \begin{align} environments, ::: fences, {attribution} etc.; no network
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# API reference from the docstrings (Google style, with Sphinx roles)
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False  # Lightning's own docstrings (Trainer, LightningModule hooks) are not ours to render
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# Every internal cross-reference must resolve; only names of other projects are let through (no intersphinx:
# the build runs offline).
nitpicky = True
_EXTERNAL = (
    r"torch|lightning|pytorch_lightning|lightning_fabric|torchmetrics|torchvision|numpy|np|jsonargparse|"
    r"typing|typing_extensions|collections|pathlib|os|io|enum|abc|argparse|contextlib|contextvars|dataclasses|"
    r"logging|signal|threading|types|matplotlib|robustbench|autoattack|sklearn|PIL|yaml|builtins|Tensor|nn"
)
nitpick_ignore_regex = [
    (r"py:.*", rf"({_EXTERNAL})(\..*)?"),
    # builtins and typing names as they appear in signatures
    (
        r"py:.*",
        r"(int|float|str|bool|bytes|dict|list|tuple|set|frozenset|object|type|None|Ellipsis|"
        r"Any|Callable|Iterable|Iterator|Sequence|Mapping|Literal|Optional|Union|IO|NamedTuple|"
        r"Exception|BaseException|ValueError|TypeError|RuntimeError|FloatingPointError|SystemExit|"
        r"KeyError|FileNotFoundError|OSError|PathLike|Path|Generator|ContextManager)",
    ),
]

html_theme = "furo"
html_title = f"confspec-lightning {release}"
html_static_path: list[str] = []
html_theme_options = {"navigation_with_keys": True}
pygments_style = "sphinx"


# --------------------------------------------------------------------------- autodoc hooks
# The package documents its public objects at their public paths (``confspec_lightning.attacks.AttackConfig``);
# docstrings also name them by the module that defines them (``confspec_lightning.attacks.config.AttackConfig``),
# relative to the current module (``~.noise.SampleNoise``), or name helpers the reference does not show. Such a
# reference resolves to the documented object it *is* (the same Python object), else to the nearest documented
# module or class that holds it. A name that does not exist in the package stays unresolved and fails the build.

PACKAGE = "confspec_lightning"
_MISSING = object()


def _import_dotted(name: str) -> object:
    """The object a dotted name means in the package (a module, a class, a function, an attribute), or _MISSING."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return _MISSING
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = inspect.getattr_static(obj, attr, _MISSING) if inspect.isclass(obj) else getattr(obj, attr, _MISSING)
            if obj is _MISSING:
                return _MISSING
        return obj
    return _MISSING


def _key(obj: object) -> object:
    """What makes two names the same object (functions through staticmethod/classmethod/property wrappers)."""
    for attr in ("__func__", "fget"):
        obj = getattr(obj, attr, None) or obj
    return id(obj) if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj) else None


def _documented(env) -> dict[object, tuple[str, str, str]]:
    """id(object) -> (docname, anchor, role) of every documented module, class, function and method."""
    index = getattr(env, "_confspec_documented", None)
    if index is None:
        domain = env.domains["py"]
        index = {}
        for name, entry in domain.modules.items():
            index.setdefault(_key(_import_dotted(name)), (entry.docname, entry.node_id, "mod"))
        for name, entry in domain.objects.items():
            if entry.aliased:
                continue
            key = _key(_import_dotted(name))
            if key is not None:
                index.setdefault(key, (entry.docname, entry.node_id, entry.objtype))
        index.pop(None, None)
        env._confspec_documented = index
    return index


def _candidates(node) -> list[str]:
    target = node["reftarget"].lstrip("~")
    module, cls = node.get("py:module") or "", node.get("py:class") or ""
    relative = target.startswith(".")
    target = target.lstrip(".")
    scopes = []
    if module:
        parts = module.split(".")
        if cls:
            scopes.append(f"{module}.{cls}")
        scopes += [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    # the module whose docstring holds the reference (objects are documented at their public path, so the
    # defining module is only known from the source file: ".../confspec_lightning/evaluation/report.py:docstring")
    source = (node.source or "").split(":docstring of ")[0]
    if source.endswith(".py") and f"/{PACKAGE}/" in source:
        defining = PACKAGE + "." + source.rsplit(f"/{PACKAGE}/", 1)[1].removesuffix(".py").replace("/", ".")
        defining = defining.removesuffix(".__init__")
        scopes += [f"{defining}.{cls}"] if cls else []
        scopes.append(defining)
    names = [] if relative else [target]
    names += [f"{scope}.{target}" for scope in scopes]
    return names


def _resolve_internal(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    for name in _candidates(node):
        obj = _import_dotted(name)
        if obj is _MISSING:
            continue
        documented = _documented(env)
        # the documented object itself, else the nearest documented module or class holding it
        parts = name.split(".")
        for depth in range(len(parts), 0, -1):
            holder = obj if depth == len(parts) else _import_dotted(".".join(parts[:depth]))
            hit = documented.get(_key(holder))
            if hit is not None:
                docname, anchor, _ = hit
                return make_refnode(app.builder, node["refdoc"], docname, anchor, contnode)
        return contnode  # exists, but nothing of it is documented: plain text
    return None


def _public_bases(app, name, obj, options, bases: list) -> None:
    """Show a private base class (``_ResNet``) as its own bases: the reference names public classes only."""
    i = 0
    while i < len(bases):
        if bases[i].__name__.startswith("_") and bases[i].__module__.startswith(PACKAGE):
            bases[i : i + 1] = list(bases[i].__bases__)
        else:
            i += 1


_ATTRIBUTE_KINDS = {"attribute", "data", "property"}


def _keep_attribute_text(app, what, name, obj, options, lines) -> None:
    """Keep attribute docstrings as written: here they are prose, never napoleon's ``type: description``.

    ``#: where an evaluation ... writes (None: the logger's directory)`` would otherwise lose its first words to a
    type. This hook runs before napoleon (saving the lines) and after it (restoring them).
    """
    if what not in _ATTRIBUTE_KINDS:
        return
    saved = app.env.temp_data.setdefault("confspec_attribute_lines", {})
    if id(lines) in saved:
        lines[:] = saved.pop(id(lines))
    else:
        saved[id(lines)] = list(lines)


def _dataclass_defaults(app, what, name, obj, options, signature, return_annotation):
    """Show a dataclass field's default factory as a call (``dict()``), not as ``<factory>``, which no parser reads."""
    if not signature or "<factory>" not in signature or not dataclasses.is_dataclass(obj):
        return None
    for field in dataclasses.fields(obj):
        if field.init and field.default_factory is not dataclasses.MISSING:
            signature = signature.replace("<factory>", f"{getattr(field.default_factory, '__name__', 'factory')}()", 1)
    return signature, return_annotation


def setup(app) -> None:
    """Connect the hooks above."""
    app.connect("missing-reference", _resolve_internal)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("autodoc-process-signature", _dataclass_defaults)
    app.connect("autodoc-process-docstring", _keep_attribute_text, priority=400)
    app.connect("autodoc-process-docstring", _keep_attribute_text, priority=600)
