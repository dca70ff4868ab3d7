"""The README and the documentation are tested like code: their links point at files, their examples run.

* Every relative link of ``README.md`` and ``docs/**/*.md`` (Markdown links and images, MyST figures, images,
  literal includes, downloads, ``{doc}`` references and toctree entries) names a file that exists, and so does
  every repository path written as inline code (``tests/test_ddp.py``).
* Every ```` ```python ```` block runs, in a temporary directory, the blocks of one page in order in one namespace;
  a block preceded by the line ``<!-- norun -->`` is shown only (e.g. paths that exist after a training run). The
  README's Lightning example runs in ``tests/test_readme.py``.
* Every ```` ```yaml ```` block parses; each ``class_path`` of the library names a class that exists and its
  ``init_args`` are parameters of that class. Every ``--config`` of a shell example is a file or a shipped recipe.

The site itself is built by ``make docs`` (in ``.ci/run``), with warnings as errors.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from confspec_lightning.recipes import resolve_config_args

from helpers import ROOT

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]
NORUN = "<!-- norun -->"

FENCE = re.compile(r"^(`{3,}|:{3,})\s*(\S*)\s*(.*)$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
ROLE = re.compile(r"\{(doc|download)\}`([^`]+)`")
INLINE_CODE = re.compile(r"``.*?``|`[^`]*`")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(page: Path) -> list[tuple[str, str, str, bool]]:
    """The fenced blocks of a page: (kind, argument, body, norun), kind = the info string (``python``, ``{figure}``)."""
    out = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i].strip())
        if not match:
            i += 1
            continue
        fence, kind, argument = match.groups()
        previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        body, i = [], i + 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i])
            i += 1
        out.append((kind, argument, "\n".join(body) + "\n", previous == NORUN))
        i += 1
    return out


def prose(page: Path, inline_code: bool = False) -> str:
    """The page without its code blocks, and without inline code unless asked (there ``[a](b)`` is not a link)."""
    kept, fence, directive = [], None, False
    for line in page.read_text().splitlines():
        match = FENCE.match(line.strip())
        if fence is None and match:
            fence, kind = match.group(1), match.group(2)
            directive = kind.startswith("{") and kind != "{eval-rst}"  # MyST directive: its body is Markdown
            continue
        if fence is not None:
            if line.strip() == fence:
                fence = None
            elif directive and not line.lstrip().startswith(":"):  # not its options
                kept.append(line)
            continue
        kept.append(line)
    if not inline_code:
        kept = [INLINE_CODE.sub("", line) for line in kept]
    return "\n".join(kept)


def link_targets(page: Path) -> list[tuple[str, Path]]:
    """(as written, resolved path) of every relative link of a page."""
    targets = []
    for raw in LINK.findall(prose(page)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", raw) or raw.startswith("#"):  # http:, mailto:, an anchor
            continue
        targets.append((raw, page.parent / raw.split("#")[0]))
    for role, content in ROLE.findall(prose(page, inline_code=True)):
        target = content.rsplit("<", 1)[1].rstrip(">") if content.endswith(">") else content
        if role == "doc":
            base = DOCS if target.startswith("/") else page.parent
            targets.append((content, base / f"{target.lstrip('/')}.md"))
        else:
            targets.append((content, page.parent / target))
    for kind, argument, body, _ in blocks(page):
        if kind in ("{figure}", "{image}", "{literalinclude}", "{include}"):
            targets.append((argument, page.parent / argument))
        elif kind == "{toctree}":
            for entry in body.splitlines():
                entry = entry.strip()
                if entry and not entry.startswith(":"):
                    targets.append((entry, page.parent / f"{entry}.md"))
    return targets


def test_the_pages_are_found():
    names = {page_id(p) for p in PAGES}
    assert {"README.md", "docs/index.md", "docs/explanation/method.md", "docs/changelog.md"} <= names
    assert len(names) > 30


def test_no_table_cell_writes_a_norm_with_escaped_bars():
    """In a Markdown table ``\\|`` is an escaped cell separator: ``$\\|C\\|_2$`` renders as ``|C|_2``, a wrong
    formula without a warning. Table cells write norms as ``\\lVert C \\rVert`` (or the Unicode ‖C‖)."""
    bad = [
        f"{page_id(page)}:{number}"
        for page in PAGES
        for number, line in enumerate(page.read_text().splitlines(), 1)
        if line.lstrip().startswith("|") and any("\\|" in math for math in re.findall(r"\$[^$]*\$", line))
    ]
    assert not bad, f"table rows with \\| inside $...$ (use \\lVert/\\rVert): {bad}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_point_to_files(page):
    missing = [raw for raw, path in link_targets(page) if not path.resolve().exists()]
    assert not missing, f"{page_id(page)} links to files that do not exist: {missing}"


def test_link_check_sees_links_and_catches_a_broken_one(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "See [a](exists.md#part), ![b](missing.png), {doc}`other`, `[not](a-link)` and\n"
        "```{figure} fig.png\n:alt: x\n```\n```python\nx = [1](2)\n```\n"
    )
    (tmp_path / "exists.md").write_text("")
    found = {raw: path.exists() for raw, path in link_targets(page)}
    assert found == {"exists.md#part": True, "missing.png": False, "other": False, "fig.png": False}


BUILD_OUTPUT = "docs/_build"
REPO_PATH = re.compile(r"(?<![}\w])`((?:tests|benchmarks|confspec_lightning|configs|docs)/[\w./-]+)`")


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "changelog.md"], ids=page_id)  # it names old paths
def test_repository_paths_in_the_text_exist(page, monkeypatch):
    """A file named in inline code (`tests/test_ddp.py`, `benchmarks/fairness/RESULTS.md`) exists, or is a shipped
    config by its 0.1 path (`configs/digits/trades_csr.yaml` still resolves)."""
    monkeypatch.chdir(ROOT)
    assert f" {BUILD_OUTPUT}/html" in (ROOT / "Makefile").read_text()  # the one generated folder the docs may name
    missing = []
    for path in REPO_PATH.findall(prose(page, inline_code=True)):
        if path.startswith(BUILD_OUTPUT):  # written by `make docs`; a clean clone has none
            continue
        if not (ROOT / path).exists():
            try:
                resolve_config_args(["--config", path])
            except FileNotFoundError:
                missing.append(path)
    assert not missing, f"{page_id(page)} names files that do not exist: {missing}"


def runnable(page: Path) -> list[str]:
    code = [body for kind, _, body, norun in blocks(page) if kind == "python" and not norun]
    if page.name == "README.md":  # its Lightning example (one real epoch) runs in tests/test_readme.py
        code = [body for body in code if "trainer.fit(model, data)" not in body]
    return code


PYTHON_PAGES = [page for page in PAGES if runnable(page)]


def test_every_page_with_python_examples_runs_them():
    names = {page_id(p) for p in PYTHON_PAGES}
    assert {"docs/how-to/fairness-methods.md", "docs/how-to/lightning-project.md"} <= names


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=page_id)
def test_python_examples_run(page, chdir_tmp):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the examples' tensors are tiny: one thread is faster on a shared machine
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    try:
        for number, code in enumerate(runnable(page), start=1):
            exec(compile(code, f"{page_id(page)} (python block {number})", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def class_paths(node: object) -> list[tuple[str, dict]]:
    """Every (class_path, init_args) of a parsed config."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            found.append((node["class_path"], node.get("init_args") or {}))
        for value in node.values():
            found += class_paths(value)
    elif isinstance(node, list):
        for value in node:
            found += class_paths(value)
    return found


def imported(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_yaml_examples_name_real_classes_and_arguments(page):
    for kind, _, body, _ in blocks(page):
        if kind != "yaml":
            continue
        for path, init_args in class_paths(yaml.safe_load(body)):
            if not path.startswith("confspec_lightning."):
                continue  # torch, lightning, and the reader's own packages (my_package...)
            cls = imported(path)
            parameters = inspect.signature(cls).parameters
            if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
                continue  # the data modules forward their base class's arguments
            unknown = set(init_args) - set(parameters)
            assert not unknown, f"{page_id(page)}: {path} has no argument {sorted(unknown)}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_shell_examples_name_existing_configs(page, monkeypatch):
    monkeypatch.chdir(ROOT)  # paths in the examples are relative to the repository root
    for kind, _, body, _ in blocks(page):
        if kind not in ("bash", "sh", "shell"):
            continue
        for command in body.replace("\\\n", " ").splitlines():
            command = command.split(" #")[0]
            if "--config" not in command:
                continue
            args = shlex.split(command)
            values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--config"]
            for value in values:
                if value.startswith(("my_", "<")) or ("/" not in value and not value.endswith(".yaml")):
                    continue  # the reader's own overlay files
                resolve_config_args(["--config", value])  # raises for a name that is neither file nor recipe
