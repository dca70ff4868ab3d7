"""The README's Lightning-project example runs as written."""

from __future__ import annotations

import re

from helpers import ROOT


def test_readme_lightning_example_runs(chdir_tmp, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (example,) = [b for b in blocks if "trainer.fit(model, data)" in b]
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "Per-class accuracy (test split" in out
    assert namespace["model"].fairness[0].confusion_source == "streaming"


def test_readme_names_the_two_commands_and_ci_uses_one():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci/run").read_text()
