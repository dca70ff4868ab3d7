"""benchmarks/fairness/standard_aa.py: its argument checks (its real run on a finished digits run is part of
tests/benchmarks/test_fairness.py::test_budget_exit_then_resume_without_redoing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import ROOT, load_script

standard_aa = load_script(ROOT / "benchmarks/fairness/standard_aa.py", "standard_aa_benchmark")


def test_runs_are_method_colon_seed():
    assert standard_aa.parse_run("trades_csr_paper_a0.6:2") == ("trades_csr_paper_a0.6", 2)
    for bad in ("trades", "trades:", ":0", "trades:x"):
        with pytest.raises(Exception, match="method:seed"):
            standard_aa.parse_run(bad)


def test_the_attack_list_is_the_standard_autoattack_alone():
    assert standard_aa.standard_attacks(None) == (
        "[{class_path: confspec_lightning.attacks.AutoAttack, init_args: {version: standard}}]"
    )
    assert "n_iter: 2" in standard_aa.standard_attacks(2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--runs", "tradez:0"], "lacks; it has"),
        (["--runs", "trades:0", "--n-iter", "2"], "give them an --output-dir"),
        (["--runs", "trades:0", "--extra=--trainer.max_epochs=1"], "give them an --output-dir"),
        ([], "give --runs"),
    ],
)
def test_bad_arguments_are_refused_with_what_is_accepted(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        standard_aa.main(["--protocol", "digits", *argv])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["cifar10_finetune_alpha", "cifar10_cpu_finetune", "digits"])
def test_the_standard_test_names_the_runs_start_weights(protocol, tmp_path):
    """A fine-tuning run's recipe names a public start file (absent here): the standard test, like the run's own
    fit and test, names the protocol's start model instead, or the CLI refuses the missing file."""
    runner = standard_aa._runner()
    (tmp_path / protocol / "trades_seed0").mkdir(parents=True)
    args = standard_aa.test_arguments(runner, protocol, "trades", 0, tmp_path, None, [])
    weights = [arg for arg in args if arg.startswith("--model.init_args.init_weights=")]
    assert weights == runner.start_weights_args(protocol, tmp_path)
    if protocol == "digits":
        assert weights == []
    else:
        assert len(weights) == 1 and Path(weights[0].split("=", 1)[1]).name in {"trades_pretrained.pt", "last.ckpt"}
    assert args[-2].startswith("--model.init_args.test_attacks=") and "version: standard" in args[-2]


def test_the_cifar10_pages_standard_autoattack_figures_are_the_recorded_ones():
    """docs/benchmarks/cifar10-finetune.md quotes the standard test of each CIFAR-10 run in standard_aa.json as
    "<standard avg> / <worst> against the protocol's <custom avg> / <worst>", with its time."""
    import json

    runs = json.loads((ROOT / "benchmarks/fairness/standard_aa.json").read_text())["runs"]
    page = " ".join((ROOT / "docs/benchmarks/cifar10-finetune.md").read_text().split())
    cifar = {key: row for key, row in runs.items() if key.startswith("cifar10_")}
    assert cifar  # the page's claim needs a record
    for key, row in cifar.items():
        standard, custom = row["standard"], row["custom"]
        quoted = (
            f"{100 * standard['avg']:.2f} / {100 * standard['worst']:.2f} against the protocol's "
            f"{100 * custom['avg']:.2f} / {100 * custom['worst']:.2f}"
        )
        assert quoted in page, (key, quoted)
        assert f"{row['seconds']:.0f} s" in page, key
