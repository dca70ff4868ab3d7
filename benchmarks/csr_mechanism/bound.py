"""CSR's worst-class bound against trained runs: each term per run, and how the test worst class follows them.

Jin et al. (ICLR 2025) bound the worst-class robust error by nu ||C_gamma||_2 (training robust confusion matrix with
margin gamma, nu <= sqrt(K)) plus a PAC-Bayesian complexity term (Neyshabur, Bhojanapalli & Srebro, ICLR 2018,
Theorem 1, with the class-wise sample size m_min). For every run (a ``confspec fit`` checkpoint and its saved
config) this computes, from the model and its training split (``confspec_lightning.evaluation.bound``):

* C_gamma of the training split under the config's evaluation PGD (PGD-20 on CE, seeded), additive margin gamma
  (z_y <= max_{i != y} z_i + gamma counts), per-class rates; ||C_gamma||_2, ||C_gamma||_1, ||C_0||_2;
* nu: sqrt(K) (the paper's upper value) and ||C||_1 / ||C||_2 of the training matrix (plug-in);
* the layers as operators on their actual input sizes (BatchNorm and input normalisation folded as diagonal
  scalings), the spectral complexity prod ||W||_2^2 sum ||W||_F^2 / ||W||_2^2 (Neyshabur et al.) and
  prod ||W||_2 (sum (||W^T||_{2,1} / ||W||_2)^(2/3))^(3/2) (Bartlett et al., NeurIPS 2017);
* m_min, B (input radius), d, h and the bound sqrt(K) ||C_gamma||_2 + sqrt((B^2 d^2 h ln(dh) SC + ln(d m_min /
  delta)) / (gamma^2 m_min)), the O(.) constant taken as 1 (the paper's constants are unknown);

and the test worst-class robust error (PGD-20) from the run's evaluation report (else computed). Across runs:
Spearman's rho (and Kendall's tau) of the test worst-class error with each term, with a seeded bootstrap 95 %
interval over runs. Writes ``bound.json`` and ``BOUND.md`` next to this file (``--output-dir``).

Command sequence (resumable; ``--time-budget`` exits 3 when spent, rerun the same command to continue):

    # 1. the digits alpha sweep (the fairness runner's digits_alpha protocol: TRADES = alpha 0, paper form
    #    kl/batch at alpha 0.1, 0.3, 0.6, 1.0, gamma 0; seeds 0-2): trains what is missing through
    #    benchmarks/fairness/run.py's runner (same recipes and run directories,
    #    benchmarks/fairness/runs/digits_alpha/<method>_seed<k>/), tests it, records it in results.json, then
    #    computes the terms
    python benchmarks/csr_mechanism/bound.py --sweep digits_alpha --fit-missing --time-budget 540
    # 2. the CIFAR-10 fine-tuning runs (cifar10_finetune_alpha: TRADES, code form streaming at alpha 0.3, 0.6,
    #    paper form at alpha 0.3, 0.6, 1; seeds 0-2), with the training-set attack on 500 training images per class
    python benchmarks/csr_mechanism/bound.py --sweep cifar10_finetune_alpha --fit-missing --train-limit 5000 \\
        --time-budget 540
    # any run directories (fairness-runner layout <dir>/fit/, or a confspec log directory):
    python benchmarks/csr_mechanism/bound.py --runs NAME=RUN_DIR NAME=RUN_DIR ...
    python benchmarks/csr_mechanism/bound.py --report-only
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUDGET_EXIT = 3
BATCH = 250
#: (key, label) of the terms correlated with the test worst-class error, in table order.
TERMS = (
    ("train_spectral_norm", "training ‖C_γ‖₂"),
    ("train_spectral_norm_gamma0", "training ‖C_0‖₂"),
    ("train_worst_error", "training worst-class margin error ‖C_γ‖₁"),
    ("nu_train", "ν of the training matrix (‖C_γ‖₁/‖C_γ‖₂)"),
    ("log10_neyshabur", "log10 spectral complexity (Neyshabur)"),
    ("log10_bartlett", "log10 spectral complexity (Bartlett)"),
    ("log10_product", "log10 ∏‖W_i‖₂"),
    ("ratio_sum", "Σ‖W_i‖_F²/‖W_i‖₂²"),
    ("log10_complexity_term", "log10 complexity term"),
    ("bound", "bound, ν = √K"),
    ("bound_nu_train", "bound, ν of the training matrix"),
    ("m_min", "m_min"),
    ("alpha", "CSR α"),
)


def _script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


#: The fairness runner (standard library only at import): it trains missing sweep runs, and its time budget is ours.
FAIRNESS = _script(ROOT / "benchmarks/fairness/run.py", "fairness_run")
Budget = FAIRNESS.Budget
BudgetExhausted = FAIRNESS.BudgetExhausted
#: Sweeps: (fairness protocol, its methods that vary CSR's alpha (TRADES = alpha 0), seeds). digits_alpha: TRADES and
#: the paper form at alpha 0.1-1.0; cifar10_finetune_alpha: TRADES and both forms at each alpha (not DAFA, FAAL).
SWEEPS = {
    name: (
        name,
        [m for m in FAIRNESS.PROTOCOLS[name].methods if m == "trades" or ("csr" in m and "faal" not in m)],
        FAIRNESS.PROTOCOLS[name].seeds,
    )
    for name in ("digits_alpha", "cifar10_finetune_alpha")
}


# ------------------------------------------------------------------ statistics
def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties given their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the (average-tie) ranks; NaN when a vector is constant or n < 2."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 2:
        return math.nan
    ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    norm = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / norm if norm > 0 else math.nan


def bootstrap_interval(
    a: list[float], b: list[float], statistic=spearman, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, int]:
    """Percentile bootstrap interval of ``statistic(a, b)`` over the runs (pairs resampled with replacement).

    Resamples where the statistic is undefined (a constant resample) are dropped; returns (low, high, kept).
    """
    rng = random.Random(seed)
    n = len(a)
    values = []
    for _ in range(resamples):
        index = [rng.randrange(n) for _ in range(n)]
        value = statistic([a[i] for i in index], [b[i] for i in index])
        if not math.isnan(value):
            values.append(value)
    if not values:
        return math.nan, math.nan, 0
    values.sort()
    tail = (1 - level) / 2

    def quantile(q: float) -> float:
        position = q * (len(values) - 1)
        low = math.floor(position)
        high = min(low + 1, len(values) - 1)
        return values[low] + (values[high] - values[low]) * (position - low)

    return quantile(tail), quantile(1 - tail), len(values)


def kendall(a: list[float], b: list[float]) -> float:
    import torch

    from confspec_lightning.functional import kendall_tau

    return kendall_tau(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))


def analyse(rows: dict[str, dict], resamples: int = 2000, seed: int = 0) -> dict:
    """Per term: Spearman's rho with the test worst-class error, its bootstrap interval, Kendall's tau."""
    names = sorted(rows)
    target = [rows[n]["test_worst_error"] for n in names]
    result = {"runs": names, "terms": {}}
    for key, _ in TERMS:
        values = [float(rows[n].get(key, math.nan)) for n in names]
        low, high, kept = bootstrap_interval(values, target, resamples=resamples, seed=seed)
        result["terms"][key] = {
            "spearman": spearman(values, target),
            "ci95": [low, high],
            "resamples_kept": kept,
            "kendall": kendall(values, target) if len(names) > 1 else math.nan,
        }
    return result


#: fewer runs than this get no verdict: a bootstrap over 4 or 5 runs resamples a handful of distinct points, and a
#: perfect rank order of 4 runs happens by chance once in 12 (two-sided), yet its interval collapses to [-1, -1]
MIN_VERDICT_RUNS = 6


def verdict(analysis: dict) -> str:
    """Does a lower training ||C_gamma||_2 go with a lower test worst-class error, at this number of runs?"""
    term = analysis["terms"]["train_spectral_norm"]
    rho, (low, high) = term["spearman"], term["ci95"]
    n = len(analysis["runs"])
    if math.isnan(rho):
        return f"undetermined ({n} runs: the correlation is undefined)."
    if n < MIN_VERDICT_RUNS:
        return (
            f"too few runs to say ({n}, fewer than {MIN_VERDICT_RUNS}: over so few runs neither ρ = {rho:+.2f} nor "
            "its bootstrap interval means anything)."
        )
    if low > 0:
        return (
            f"yes: across {n} runs a lower training ‖C_γ‖₂ goes with a lower test worst-class robust error "
            f"(Spearman ρ = {rho:+.2f}, 95 % bootstrap interval [{low:+.2f}, {high:+.2f}] above 0)."
        )
    if high < 0:
        return (
            f"no, the opposite: across {n} runs a lower training ‖C_γ‖₂ goes with a higher test worst-class error "
            f"(ρ = {rho:+.2f}, interval [{low:+.2f}, {high:+.2f}] below 0)."
        )
    return (
        f"not shown: across {n} runs ρ = {rho:+.2f} with a 95 % bootstrap interval [{low:+.2f}, {high:+.2f}] that "
        "contains 0."
    )


# ------------------------------------------------------------------ one run
def locate(run_dir: Path) -> tuple[Path, Path, Path]:
    """(log directory, last.ckpt, config.yaml) of a fairness-runner run (``<dir>/fit``) or a confspec log dir."""
    log = run_dir / "fit" if (run_dir / "fit").is_dir() else run_dir
    return log, log / "checkpoints" / "last.ckpt", log / "config.yaml"


def csr_alpha(config: Path) -> float:
    """alpha of the run's CSR (0 without CSR: the base objective alone, e.g. TRADES)."""
    import yaml

    data = yaml.safe_load(config.read_text()) or {}
    fairness = ((data.get("model") or {}).get("init_args") or {}).get("fairness") or []
    for entry in fairness:
        if str(entry.get("class_path", "")).endswith(".CSR"):
            return float((entry.get("init_args") or {}).get("alpha", 0.3))
    return 0.0


def test_worst_from_report(run_dir: Path, log: Path, attack: str) -> dict | None:
    """The test worst-class error under ``attack`` from the run's evaluation report, if it has one."""
    evaluation = None
    if (run_dir / "result.json").is_file():
        evaluation = json.loads((run_dir / "result.json").read_text()).get("evaluation")
    if evaluation is None:
        from confspec_lightning.runs import latest_report

        with contextlib.suppress(FileNotFoundError):
            evaluation = json.loads(latest_report(log, "last").read_text())
    if not evaluation or evaluation.get("stage") != "test" or attack not in evaluation.get("attacks", {}):
        return None
    accuracies = evaluation["attacks"][attack]["classwise_acc"]
    return {"test_worst_error": 1.0 - min(accuracies), "test_source": f"evaluation report ({attack})"}


def confusion_pass(module, net, x, y, gammas, state_file: Path, budget: Budget, seed: int) -> dict:
    """Error counts of the eval attack's adversarial examples, one (K, K) matrix per margin gamma (additive),
    in batches; the counts so far are saved after every batch (resumable)."""
    import torch

    from confspec_lightning import functional as CF

    k = module.num_classes
    if state_file.is_file():
        state = torch.load(state_file, weights_only=True)
    else:
        zeros = {f"{g:g}": torch.zeros(k, k, dtype=torch.long) for g in gammas}
        state = {"next": 0, "errors": zeros, "counts": torch.zeros(k, dtype=torch.long)}
    while state["next"] < len(y):
        budget.check()
        start = state["next"]
        xb, yb = x[start : start + BATCH], y[start : start + BATCH]
        generator = torch.Generator().manual_seed(seed + start)
        x_adv = module.eval_attack.perturb(net, xb, yb, "ce", generator=generator).detach()
        with torch.no_grad():
            logits = net(x_adv)
        counts = torch.zeros(k, dtype=torch.long)
        for g in gammas:
            pred = CF.margin_predictions(logits, yb, g, "additive")
            CF.accumulate_confusion_(state["errors"][f"{g:g}"], counts.zero_(), pred, yb)
        state["counts"] += CF.counts_per_class(yb, k)
        state["next"] = start + len(yb)
        torch.save(state, state_file)
    return state


def stratified(x, y, limit: int | None):
    """The first ceil(limit / K) images of every class, in split order (all images when ``limit`` is None)."""
    import torch

    if limit is None or limit >= len(y):
        return x, y
    per_class = -(-limit // (int(y.max()) + 1))
    rank = torch.zeros_like(y)
    for c in y.unique():
        where = (y == c).nonzero().flatten()
        rank[where] = torch.arange(len(where))
    keep = (rank < per_class).nonzero().flatten()
    return x[keep], y[keep]


def compute_run(name: str, run_dir: Path, args: argparse.Namespace, budget: Budget, work: Path) -> dict:
    import yaml

    from confspec_lightning import functional as CF
    from confspec_lightning.evaluation import bound as BT

    mechanism = _script(HERE / "run.py", "csr_mechanism_run")
    log, checkpoint, config = locate(run_dir)
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    saved = yaml.safe_load(config.read_text())
    # a fit's saved config also holds the subcommand's options (ckpt_path, weights_only): the model alone is built
    saved = {key: value for key, value in saved.items() if key in ("seed_everything", "trainer", "model", "data")}
    loadable = work / f"{name}.config.yaml"
    loadable.write_text(yaml.safe_dump(saved, sort_keys=False))
    with contextlib.chdir(ROOT):  # saved configs name data paths relative to the repository
        module, datamodule = mechanism.load_module(
            str(loadable), str(checkpoint), ["--model.init_args.init_weights=null", *args.extra]
        )
        x, y = stratified(*mechanism.probe_set(datamodule, "train", None), args.train_limit)
    net = module.net.eval()
    k = module.num_classes
    train = confusion_pass(module, net, x, y, (args.gamma, 0.0), work / f"{name}.train.pt", budget, args.seed)
    counts = train["counts"]
    rates = CF.confusion_from_counts(train["errors"][f"{args.gamma:g}"], counts, normalize=True)
    rates0 = CF.confusion_from_counts(train["errors"]["0"], counts, normalize=True)
    test = test_worst_from_report(run_dir, log, args.test_attack)
    if test is None:  # PGD-20 (the config's eval attack) per class on the test split
        with contextlib.chdir(ROOT):
            x_test, y_test = stratified(*mechanism.probe_set(datamodule, "test", None), args.test_limit)
        state = confusion_pass(module, net, x_test, y_test, (0.0,), work / f"{name}.test.pt", budget, args.seed + 1)
        errors = CF.classwise_error(state["errors"]["0"], state["counts"])
        test = {
            "test_worst_error": float(errors.max()),
            "test_source": f"computed: {module.eval_attack.describe()} on {len(y_test)} test images",
        }
    budget.check()
    layers = BT.layer_operators(net, x[:1].float())
    norms = [layer.norms() for layer in layers]
    complexity = BT.spectral_complexity(
        [n["spectral"] for n in norms], [n["frobenius"] for n in norms], [n["l21"] for n in norms]
    )
    depth, width = len(layers), max(layer.width for layer in layers)
    radius = BT.input_radius(x.float(), module.eval_attack.eps, module.eval_attack.norm)
    terms = BT.bound_terms(
        rates, counts, complexity["log10_neyshabur"], depth=depth, width=width, input_radius=radius, gamma=args.gamma
    )
    return {
        "run_dir": str(run_dir),
        "checkpoint_sha256": mechanism.sha256(str(checkpoint)),
        "alpha": csr_alpha(config),
        "classes": k,
        "train_images": len(y),
        "train_attack": module.eval_attack.describe(),
        "gamma": args.gamma,
        "train_spectral_norm": terms["spectral_norm"],
        "train_spectral_norm_gamma0": float(CF.spectral_norm(rates0)),
        "train_worst_error": terms["l1_norm"],
        **{key: terms[key] for key in ("nu_sqrt_k", "nu_train", "m_min", "m", "complexity", "log10_complexity_term")},
        "bound": terms["bound"],
        "bound_nu_train": terms["bound_nu_train"],
        **complexity,
        "depth": depth,
        "width": width,
        "input_radius": radius,
        "layers": [
            {"name": layer.name, "kind": layer.kind, "input": list(layer.input_shape), "folded": layer.folded, **n}
            for layer, n in zip(layers, norms, strict=True)
        ],
        **test,
        "seconds": time.perf_counter() - start,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "code": mechanism.code_version(),
    }


# ------------------------------------------------------------------ reporting
HEADER = """# CSR's worst-class bound against trained runs

Produced by `benchmarks/csr_mechanism/bound.py` (its docstring and `--help` give the commands). Jin et al. (ICLR
2025) bound the worst-class robust error by ν‖C_γ‖₂ plus a PAC-Bayesian model-complexity term. Per run, from the
trained model and its training split (`confspec_lightning.evaluation.bound`):

* **C_γ**: robust confusion matrix of the training split (per-class rates, zero diagonal) under the config's
  evaluation PGD (PGD-20 on CE, seeded); a sample counts when z_y ≤ max_{i≠y} z_i + γ (additive margin, the
  paper's formula). ‖C_γ‖₂ = σ_max, ‖C_γ‖₁ = the training worst-class margin error; ‖C_0‖₂ without margin.
* **ν**: the paper's upper value √K, and the plug-in ‖C_γ‖₁/‖C_γ‖₂ of the training matrix (with it ν‖C_γ‖₂ is
  just ‖C_γ‖₁: the paper's ν relates the population matrix's norms, which a run does not give).
* **Layers as operators** on their actual input sizes: a Conv2d with its stride, padding, dilation and groups
  (σ_max by Lanczos on AᵀA with `conv2d`/`conv_transpose2d`; ‖A‖_F and ‖Aᵀ‖_{2,1} exactly from the row norms,
  each kernel tap counted at the output positions where it meets the input), a Linear as its matrix. Eval-mode
  BatchNorm and the input normalisation are folded in as diagonal scalings (into the conv they follow, else into
  the next layer's input channels); biases and shifts are left out, pooling counts as 1-Lipschitz, identity skips
  are not layers (on a residual network the formula is a complexity measure, not the theorem's).
* **Spectral complexity**: SC = ∏ᵢ‖Wᵢ‖₂² Σᵢ‖Wᵢ‖_F²/‖Wᵢ‖₂² (Neyshabur, Bhojanapalli & Srebro, ICLR 2018,
  Theorem 1) and ∏ᵢ‖Wᵢ‖₂ (Σᵢ(‖Wᵢᵀ‖_{2,1}/‖Wᵢ‖₂)^{2/3})^{3/2} (Bartlett, Foster & Telgarsky, NeurIPS 2017).
* **Bound** = √K‖C_γ‖₂ + √((B² d² h ln(dh) SC + ln(d m_min/δ)) / (γ² m_min)), δ = 0.05: Neyshabur et al.'s
  term with m → m_min (the smallest training class count), B = max‖x‖₂ + ε√n (l_inf; ≤ √n) the radius of the
  perturbed inputs, d = layers, h = the largest layer width (max of inputs and outputs). **Unknown**: the O(·)
  constant (taken as 1) and the paper's exact adversarial complexity term; the value is vacuous (≫ 1) and is used
  for its ranking across runs only.

The test worst-class robust error is 1 − the lowest class accuracy under PGD-20 on the test split (from the run's
evaluation report). Across runs: Spearman's ρ of the test worst-class error with each term, a 95 % percentile
bootstrap interval over runs (2000 resamples, seeded) and Kendall's τ_b. Positive ρ = a larger term goes with a
worse test worst class (what the bound predicts).
"""


def fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def report(results: dict, path: Path) -> None:
    rows = results.get("runs", {})
    lines = [HEADER]
    if not rows:
        lines += ["No run computed yet.", ""]
        path.write_text("\n".join(lines))
        return
    groups: dict[str, dict[str, dict]] = {}
    for name, row in rows.items():
        groups.setdefault(row.get("group", "runs"), {})[name] = row
    for group, members in groups.items():
        first = next(iter(members.values()))
        lines += [
            f"## `{group}`",
            "",
            f"γ = {first['gamma']:g}; training attack {first['train_attack']} on {first['train_images']} training "
            f"images; {first['depth']} layers, h = {first['width']}, B = {first['input_radius']:.2f}; machine "
            f"{first['machine']}, code `{first['code']}`.",
            "",
            "| run | α | test worst err | train ‖C_γ‖₂ | train ‖C_0‖₂ | train ‖C_γ‖₁ | ν train | √K | m_min "
            "| log10 SC (N) | log10 SC (B) | log10 complexity | bound (√K) |",
            "|---|" + "---|" * 12,
        ]
        for name in sorted(members, key=lambda n: (members[n]["alpha"], n)):
            r = members[name]
            bound = fmt(r["bound"]) if r["bound"] < 1e6 else f"{r['bound']:.3g}"
            lines.append(
                f"| {name} | {r['alpha']:g} | {fmt(r['test_worst_error'])} | {fmt(r['train_spectral_norm'])} | "
                f"{fmt(r['train_spectral_norm_gamma0'])} | {fmt(r['train_worst_error'])} | {fmt(r['nu_train'])} | "
                f"{fmt(r['nu_sqrt_k'])} | {r['m_min']:.0f} | {fmt(r['log10_neyshabur'], 2)} | "
                f"{fmt(r.get('log10_bartlett', math.nan), 2)} | {fmt(r['log10_complexity_term'], 2)} | "
                f"{bound} |"
            )
        lines.append("")
        if len(members) < 3:
            lines += ["(fewer than 3 runs: no correlation reported)", ""]
            continue
        analysis = analyse(members)
        results.setdefault("analysis", {})[group] = analysis
        lines += [
            f"Rank correlation with the test worst-class robust error ({len(members)} runs):",
            "",
            "| term | Spearman ρ | 95 % bootstrap interval | Kendall τ_b |",
            "|---|---|---|---|",
        ]
        for key, label in TERMS:
            t = analysis["terms"][key]
            lines.append(
                f"| {label} | {fmt(t['spearman'], 2)} | [{fmt(t['ci95'][0], 2)}, {fmt(t['ci95'][1], 2)}] | "
                f"{fmt(t['kendall'], 2)} |"
            )
        lines += ["", f"Does a lower training ‖C_γ‖₂ predict a better test worst class? {verdict(analysis)}", ""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------ main
def selected_runs(args: argparse.Namespace) -> list[tuple[str, str, Path, tuple[str, str, int] | None]]:
    """(name, group, run directory, (protocol, method, seed) when the fairness runner can make it)."""
    runs = []
    if args.sweep:
        protocol, methods, seeds = SWEEPS[args.sweep]
        for seed in seeds:
            for method in methods:
                directory = args.runs_root / protocol / f"{method}_seed{seed}"
                runs.append((f"{args.sweep}/{method}_seed{seed}", args.sweep, directory, (protocol, method, seed)))
    for item in args.runs:
        if "=" not in item:
            raise SystemExit(f"--runs: {item!r} is not NAME=RUN_DIR")
        name, directory = item.split("=", 1)
        runs.append((name, args.group, Path(directory), None))
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Command sequence") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sweep", choices=list(SWEEPS), help="a fairness-runner sweep (runs under --runs-root)")
    parser.add_argument("--runs", nargs="+", default=[], help="NAME=RUN_DIR (a run's directory); repeatable")
    parser.add_argument("--group", default="runs", help="the report section of --runs (default: runs)")
    parser.add_argument("--runs-root", type=Path, default=ROOT / "benchmarks/fairness/runs")
    parser.add_argument("--fit-missing", action="store_true", help="train and test missing sweep runs first")
    parser.add_argument("--gamma", type=float, default=0.1, help="margin gamma (additive, logits; default 0.1)")
    parser.add_argument("--train-limit", type=int, default=None, help="N/K first images per class (default: all)")
    parser.add_argument("--test-limit", type=int, default=None, help="N/K per class, when computed")
    parser.add_argument("--test-attack", default="pgd20", help="the report's attack for the test worst class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", action="append", default=[], help="one more config argument (repeatable)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; exit 3 when spent (resumable)")
    parser.add_argument("--output-dir", type=Path, default=HERE, help="where bound.json and BOUND.md go")
    parser.add_argument("--work-dir", type=Path, default=None, help="partial passes (default: <runs-root>/bound)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not (0 < args.gamma < 1):
        parser.error("--gamma must lie in (0, 1) (the additive margin of confspec_lightning.functional)")
    results_file, report_file = args.output_dir / "bound.json", args.output_dir / "BOUND.md"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"runs": {}}
    from confspec_lightning.io import atomic_write_text

    def save() -> None:
        atomic_write_text(results_file, json.dumps(results, indent=1))
        report(results, report_file)
        atomic_write_text(results_file, json.dumps(results, indent=1))  # with the analysis

    if args.report_only:
        save()
        print(f"wrote {report_file}", flush=True)
        return
    if not (args.sweep or args.runs):
        parser.error("give --sweep or --runs (or --report-only)")
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    budget = Budget(args.time_budget)
    work = args.work_dir or args.runs_root / "bound"
    missing = []
    try:
        for name, group, directory, origin in selected_runs(args):
            _, checkpoint, config = locate(directory)
            ready = checkpoint.is_file() and config.is_file()
            if origin is not None:  # a sweep run is ready once the runner has tested it
                ready = ready and (directory / "result.json").is_file()
            if not ready:
                if not (args.fit_missing and origin):
                    missing.append(name)
                    continue
                result = FAIRNESS.stamp(FAIRNESS.run_one(*origin, args.runs_root, budget, []), FAIRNESS.code_version())
                FAIRNESS.record_fitted(origin[0], result, "bound")
            if origin is not None:  # the terms go beside the run's record: it must be this directory's run
                try:
                    FAIRNESS.check_recorded(origin[0], json.loads((directory / "result.json").read_text()))
                except ValueError as error:
                    raise SystemExit(f"[bound] {name}: {error}") from None
            key = f"{name}|{args.gamma:g}|{args.train_limit}|{args.seed}"
            stored = results["runs"].get(name)
            if stored and stored.get("key") == key and stored.get("checkpoint_sha256") == _sha(checkpoint):
                print(f"[bound] {name}: on record", flush=True)
                continue
            print(f"[bound] {name} ...", flush=True)
            row = compute_run(name.replace("/", "_"), directory, args, budget, work / group)
            row.update({"key": key, "group": group})
            results["runs"][name] = row
            save()
            print(
                f"[bound] {name}: test worst {row['test_worst_error']:.3f}, train ||C||_2 "
                f"{row['train_spectral_norm']:.3f}, log10 SC {row['log10_neyshabur']:.2f} ({row['seconds']:.0f} s)",
                flush=True,
            )
    except BudgetExhausted:
        save()
        print("[bound] time budget spent; run the same command again to continue.", flush=True)
        sys.exit(BUDGET_EXIT)
    save()
    if missing:
        print(
            f"[bound] no checkpoint/evaluation yet for {', '.join(missing)}: rerun with --fit-missing (see --help)",
            flush=True,
        )
    print(f"wrote {report_file}", flush=True)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    main()
