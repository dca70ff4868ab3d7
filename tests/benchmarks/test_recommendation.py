"""The "Which CSR setting to use" section of the fairness-methods guide: its settings are what the library builds,
and each Δ it quotes is the fairness runner's paired delta computed from benchmarks/fairness/results.json."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from confspec_lightning.fairness import CSR

from helpers import ROOT, load_script


def fairness_runner():
    """benchmarks/fairness/run.py as a module (tests/benchmarks/test_fairness.py loads it under the same name)."""
    return load_script(ROOT / "benchmarks/fairness/run.py", "fairness_benchmark_run")


PAGE = ROOT / "docs/how-to/fairness-methods.md"


def section() -> str:
    text = PAGE.read_text()
    start = text.index("### Which CSR setting to use")
    return text[start : text.index("\n## ", start)]


def test_the_recommended_entries_build_the_settings_the_table_names():
    (block,) = re.findall(r"```yaml\n(.*?)```", section(), flags=re.S)
    scratch, finetune = (CSR(**entry["init_args"]) for entry in yaml.safe_load(block))
    scratch.bind(10)
    finetune.bind(10)
    assert (scratch.form, scratch.alpha, scratch.gamma) == ("paper", 0.6, 0.0)
    assert (scratch.surrogate, scratch.confusion_source) == ("kl", "batch")
    assert (finetune.form, finetune.alpha, finetune.confusion_source) == ("code", 0.3, "streaming")


def settings(csr: CSR) -> dict:
    """A bound CSR's options (what changes its term)."""
    csr.bind(10)
    return {key: value for key, value in vars(csr).items() if isinstance(value, (int, float, str, bool))}


def test_the_recipe_the_section_names_for_fine_tuning_builds_its_recommended_entry():
    from confspec_lightning.recipes import recipe_files

    (name,) = re.findall(r"the recipe `([^`]+)`", section())
    fairness = None
    for path in recipe_files(name):  # a later file's list replaces an earlier one's, as in the CLI
        fairness = (yaml.safe_load(path.read_text()).get("model") or {}).get("init_args", {}).get("fairness", fairness)
    (entry,) = fairness
    assert entry["class_path"] == "confspec_lightning.fairness.CSR"
    (block,) = re.findall(r"```yaml\n(.*?)```", section(), flags=re.S)
    recommended = yaml.safe_load(block)[1]["init_args"]
    assert settings(CSR(**entry["init_args"])) == settings(CSR(**recommended))
    # and it is not the authors' code form, which keeps its own recipe
    authors_form = yaml.safe_load((ROOT / "configs/methods/trades_csr.yaml").read_text())
    (authors,) = authors_form["model"]["init_args"]["fairness"]
    assert settings(CSR(**authors["init_args"]))["confusion_source"] == "epoch_pass"


#: (protocol, method of results.json, Δ worst and Δ avg as the section quotes them)
QUOTED = [
    ("digits_csr", "csr_paper_kl_batch_a0.6_g0", "+16.19 ± 1.65", "+2.17 ± 0.57"),
    ("digits_csr", "csr_paper_kl_batch", "+11.08 ± 4.68", "+1.60"),
    ("digits_csr", "csr_paper_kl_batch_a1_g0", "+15.24 ± 10.82", "+0.42"),
    ("digits_csr", "csr_paper_soft_batch", "-1.90 ± 3.30", None),
    ("digits", "trades_csr", "-0.95 ± 1.65", "-5.60 ± 0.31"),
    ("digits", "wat", "+18.89 ± 5.68", "+5.34 ± 1.47"),
    ("digits_awp", "trades_awp_csr", "-2.86 ± 2.86", "-4.97 ± 0.27"),
    ("digits_awp", "trades_awp_csr_paper_a0.6", "+13.60 ± 4.61", "+3.46 ± 1.37"),
    ("digits_alpha", "csr_paper_kl_batch_a0.6_g0", "+9.29 ± 9.12", "+0.69 ± 0.85"),
    ("cifar10_finetune", "trades_csr_streaming", "+2.33 ± 0.29", "-0.58 ± 0.13"),
    ("cifar10_finetune", "trades_csr", "+0.83 ± 0.29", "-0.33"),
    ("cifar10_finetune", "trades_csr_paper", "+0.67 ± 0.76", "-1.10 ± 0.23"),
    ("cifar10_finetune", "trades_csr_paper_a0.6", "+1.00", "-2.35"),
    ("cifar10_finetune_alpha", "trades_csr_streaming", "+2.33 ± 0.29", "-0.52 ± 0.21"),
    ("cifar10_finetune_alpha", "trades_csr_streaming_a0.6", "+4.17 ± 0.29", "-2.02 ± 0.42"),
    ("cifar10_finetune_alpha", "trades_csr_paper_a0.6", "+0.83 ± 0.29", "-2.18 ± 0.28"),
    ("cifar10_finetune_alpha", "trades_csr_paper_a1", "-0.67 ± 1.76", "-3.07 ± 0.20"),
    ("cifar10_finetune_alpha", "dafa", "+2.33 ± 0.29", "-0.57 ± 0.03"),
    ("cifar10_finetune_alpha", "faal_csr", "+2.67 ± 1.26", "-2.90 ± 0.33"),
]


@pytest.mark.parametrize("protocol,method,worst,average", QUOTED, ids=[f"{p}-{m}" for p, m, *_ in QUOTED])
def test_every_quoted_difference_is_the_recorded_one(protocol, method, worst, average):
    results = json.loads((ROOT / "benchmarks/fairness/results.json").read_text())["protocols"][protocol]
    runner = fairness_runner()
    reference = runner.PROTOCOLS[protocol].reference
    row = runner.deltas(results, [reference, method], reference).splitlines()[-1]
    recorded = [cell.strip() for cell in row.split("|")[2:4]]
    text = " ".join(section().split())
    for quoted, value in zip((worst, average), recorded, strict=True):
        if quoted is not None:  # a mean alone where the section leaves the spread out
            assert value == quoted or value.split(" ± ")[0] == quoted, (method, value, quoted)
            assert quoted in text, quoted


def test_the_pooled_alpha_gains_on_the_digits_csr_page_are_the_recorded_ones():
    """docs/benchmarks/digits-csr.md pools the paired differences of the two digits alpha sweeps (digits_csr and
    its replicate digits_alpha): each quoted "Δ worst / Δ avg" is the mean ± std of the 6 per-seed differences."""
    import statistics

    protocols = json.loads((ROOT / "benchmarks/fairness/results.json").read_text())["protocols"]
    page = (ROOT / "docs/benchmarks/digits-csr.md").read_text()
    for method, label in [
        ("csr_paper_kl_batch_a0.1_g0", "kl batch, alpha 0.1"),
        ("csr_paper_kl_batch", "kl batch, alpha 0.3"),
        ("csr_paper_kl_batch_a0.6_g0", "kl batch, alpha 0.6"),
        ("csr_paper_kl_batch_a1_g0", "kl batch, alpha 1.0"),
    ]:
        pooled = []
        for key in ("worst", "avg"):
            differences = []
            for protocol in ("digits_csr", "digits_alpha"):
                runs = {(r["method"], r["seed"]): r["evaluation"]["attacks"]["autoattack"] for r in protocols[protocol]}
                for seed in (0, 1, 2):
                    differences.append(100 * (runs[method, seed][key] - runs["trades", seed][key]))
            pooled.append(f"{statistics.mean(differences):+.2f} ± {statistics.stdev(differences):.2f}")
        (row,) = [line for line in page.splitlines() if line.startswith(f"| {label} | ") and "/" in line]
        assert row.rstrip(" |").endswith(" / ".join(pooled)), (row, pooled)
        if label != "kl batch, alpha 0.1":  # the recommendation quotes the pooled gains of the other three
            assert " / ".join(pooled) in " ".join(section().split()), pooled


def test_the_alpha_study_table_on_the_cifar10_page_is_the_record():
    """docs/benchmarks/cifar10-finetune.md's alpha-study table: a row per run on record, naming its results.json
    method and seed and quoting its AutoAttack avg, worst class (and which), mean of the 3 weakest classes and the
    difference to TRADES of the same seed."""
    runs = {
        (r["method"], r["seed"]): r["evaluation"]["attacks"]["autoattack"]
        for r in json.loads((ROOT / "benchmarks/fairness/results.json").read_text())["protocols"][
            "cifar10_finetune_alpha"
        ]
    }
    page = (ROOT / "docs/benchmarks/cifar10-finetune.md").read_text()
    start = page.index("## The alpha study")
    rows = [line for line in page[start : page.index("\n## ", start + 1)].splitlines() if re.match(r"\| .*\(`", line)]
    named = [(re.search(r"\(`([^`]+)`\)", row).group(1), int(row.split("|")[2])) for row in rows]
    assert sorted(named) == sorted(runs)  # every run on record has its row, and no row lacks a run
    for (method, seed), row in zip(named, rows, strict=True):
        aa, trades = runs[method, seed], runs.get(("trades", seed))
        weakest = sum(sorted(aa["classwise_acc"])[:3]) / 3
        cells = [str(seed), f"{100 * aa['avg']:.2f}", f"{100 * aa['worst']:.2f} ({aa['worst_class']})"]
        cells.append(f"{100 * weakest:.2f}")
        if method != "trades" and trades is not None:
            cells.append(f"{100 * (aa['worst'] - trades['worst']):+.2f} / {100 * (aa['avg'] - trades['avg']):+.2f}")
        assert [cell.strip() for cell in row.split("|")[2:-1] if cell.strip()] == cells, (method, seed, row)
