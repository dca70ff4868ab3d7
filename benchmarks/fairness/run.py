"""Fairness methods side by side: one protocol, a list of methods x seeds, one table and one figure.

Every run is a shipped recipe (``<data set>/<method>``: the protocol's base config plus the method's overlay,
``configs/recipes.yaml``) plus the protocol's own overlay, trained
with ``confspec fit`` and evaluated with ``confspec test`` (final weights, ``last.ckpt``; CFA evaluates
its averaged weights) on the protocol's test images: clean, PGD-20, CW-20 and AutoAttack, per class.
Seeds change the initialisation, the attack noise and the data order; the data split stays fixed, so
every run is tested on the same images.

    python benchmarks/fairness/run.py --protocol digits                     # 8 methods x seeds 0 1 2
    python benchmarks/fairness/run.py --protocol cifar10_cpu                # 6 methods x seed 0
    python benchmarks/fairness/run.py --protocol digits --time-budget 540   # stop after ~9 minutes
    python benchmarks/fairness/run.py --report-only                         # tables from saved results

Resumable: a finished run (its ``result.json``) is never redone; an interrupted fit resumes from its
``last.ckpt`` (written every epoch). ``--time-budget`` splits a sweep into chunks for machines with a
per-command limit: the current step is stopped when the budget runs out and the script exits with
code 3; run the same command again to continue. Writes ``results.json`` (all protocols),
``RESULTS.md`` and ``<protocol>_classwise.png`` next to this file.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS_JSON = HERE / "results.json"
RESULTS_MD = HERE / "RESULTS.md"
BUDGET_EXIT = 3
#: confspec's exit status after a SIGTERM/SIGUSR1 (``confspec_lightning.checkpointing.PREEMPTION_EXIT_CODE``):
#: last.ckpt saved, the run resumes. Not imported: that module imports Lightning (~6 s at every runner start);
#: tests/benchmarks/test_fairness.py checks that the two agree.
PREEMPTED_EXIT = 75
#: How the evaluation attacks draw their random starts (PGD, CW) and seeds (AutoAttack): ``per-sample`` (keyed by each
#: image's index in its split, ``confspec_lightning.attacks.noise``: since commit 754686c) or ``per-batch`` (one
#: generator stream per test batch, before it). The training is the same under both, the draws are not (the
#: digits_alpha replicate moved TRADES classes by up to 2 images under AutoAttack, by at most 1 when clean):
#: so :func:`deltas` pairs runs of one scheme only. Every run records its scheme (``evaluation_noise``).
EVALUATION_NOISE = "per-sample"

LABELS = {
    "trades": "TRADES",
    "trades_csr": "TRADES + CSR",
    "trades_csr_streaming": "TRADES + CSR (streaming)",
    "csr_code_streaming": "CSR code form (counts, streaming)",
    "csr_paper_kl_batch": "CSR paper form (kl, batch)",
    "csr_paper_kl_ema": "CSR paper form (kl, ema 0.9)",
    "csr_paper_kl_streaming": "CSR paper form (kl, streaming)",
    "csr_paper_soft_batch": "CSR paper form (soft, batch)",
    "trades_csr_paper": "TRADES + CSR (paper form)",
    "trades_awp": "TRADES-AWP",
    "trades_awp_csr": "TRADES-AWP + CSR",
    "mart": "MART",
    "dafa": "DAFA",
    "frl_rw": "FRL (RW)",
    "frl_rwrm": "FRL (RWRM)",
    "faal": "FAAL",
    "faal_csr": "FAAL + CSR",
    "cfa": "CFA",
    "cfa_no_fawa": "CFA without FAWA",
    "wat": "WAT",
}


@dataclass
class Protocol:
    """How every method of a protocol is trained and evaluated."""

    description: str
    configs: str  # the recipe of a method is <configs><method> (configs/recipes.yaml; prefix included)
    methods: list[str]
    seeds: list[int]
    overlays: list[str] = field(default_factory=list)  # extra --config files, relative to HERE
    fairness: dict[str, str] = field(default_factory=dict)  # method -> replacement `fairness:` YAML list
    variants: dict[str, str] = field(default_factory=dict)  # method -> the config it changes (with `fairness`)
    base: tuple[str, str] | None = None  # (protocol, method): fine-tune from its seed-0 final weights
    init_weights: str | None = None  # fine-tune from these committed backbone weights (relative to the repository)
    reference: str = "trades"  # the method every other one is compared with (paired by seed)


def csr_fairness(**init_args: object) -> str:
    """The `fairness:` YAML list of one CSR with these init_args (for protocol variants).

    Every option is written out: jsonargparse merges a list entry's init_args with those of the entry of the
    same class_path in the base config, so an option left out would keep the base config's (code-form) value.
    The options not given take CSR's own defaults (None = the chosen form's default), read from its signature.
    """
    import inspect

    from confspec_lightning.fairness import CSR

    defaults = {name: p.default for name, p in inspect.signature(CSR).parameters.items()}
    full = {**defaults, **init_args}
    args = ", ".join(f"{key}: {'null' if value is None else value}" for key, value in full.items())
    return f"      - class_path: confspec_lightning.fairness.CSR\n        init_args: {{{args}}}\n"


#: digits_csr: the CSR forms, and alpha x gamma of a form (method name -> CSR init_args).
CSR_FORMS = {
    "csr_code_streaming": {"form": "code", "confusion_source": "streaming"},
    "csr_paper_kl_batch": {"form": "paper", "surrogate": "kl", "confusion_source": "batch"},
    "csr_paper_kl_ema": {"form": "paper", "surrogate": "kl", "confusion_source": "ema", "ema_decay": 0.9},
    "csr_paper_kl_streaming": {"form": "paper", "surrogate": "kl", "confusion_source": "streaming"},
    "csr_paper_soft_batch": {"form": "paper", "surrogate": "soft", "confusion_source": "batch"},
}
#: The form whose alpha x gamma grid digits_csr sweeps (the better of CSR_FORMS on the forms sweep).
GRID_FORM = "csr_paper_kl_batch"
CSR_GRID = {
    f"{GRID_FORM}_a{alpha:g}_g{gamma:g}": {**CSR_FORMS[GRID_FORM], "alpha": alpha, "gamma": gamma}
    for alpha in (0.1, 0.3, 0.6, 1.0)
    for gamma in (0.0, 0.1)
    if (alpha, gamma) != (0.3, 0.0)  # = the form itself (alpha 0.3, gamma 0)
}
for _name, _args in CSR_GRID.items():
    LABELS[_name] = f"{LABELS[GRID_FORM]} α={_args['alpha']:g} γ={_args['gamma']:g}"

#: cifar10_finetune: CSR's paper form and code form (streaming) at larger alpha (the digits sweep's best was 0.6).
FINETUNE_ALPHAS = {
    "trades_csr_paper_a0.6": {"form": "paper", "alpha": 0.6},
    "trades_csr_paper_a1": {"form": "paper", "alpha": 1.0},
    "trades_csr_streaming_a0.6": {"alpha": 0.6, "confusion_source": "streaming"},
}
LABELS.update(
    {
        "trades_csr_paper_a0.6": "TRADES + CSR (paper form) α=0.6",
        "trades_csr_paper_a1": "TRADES + CSR (paper form) α=1",
        "trades_csr_streaming_a0.6": "TRADES + CSR (streaming) α=0.6",
        "trades_awp_csr_paper_a0.6": "TRADES-AWP + CSR (paper form) α=0.6",
    }
)

PROTOCOLS: dict[str, Protocol] = {
    "digits": Protocol(
        description=(
            "scikit-learn 8x8 digits (1797 images; 1167 train / 270 validation / 360 test, stratified, split "
            "seed 0), DigitsCNN width 32, 30 epochs, SGD 0.05 (Nesterov, cosine), batch 64; l_inf eps 0.2, "
            "training attack 10 steps of 0.05; TRADES beta 6 (FRL: 1.5). The shipped digits recipes "
            "(`digits/base.yaml` + the method's overlay), unchanged except the AutoAttack version (overlay "
            "`digits.yaml`: APGD-CE + APGD-T, the two strongest parts of the standard ensemble; the full "
            "ensemble takes ~2 min per model on a CPU core)."
        ),
        configs="digits/",
        methods=["trades", "trades_csr", "frl_rw", "frl_rwrm", "faal", "faal_csr", "cfa", "cfa_no_fawa", "wat"],
        seeds=[0, 1, 2],
        overlays=["digits.yaml"],
        fairness={
            "cfa_no_fawa": "      - class_path: confspec_lightning.fairness.CFA\n"
            "        init_args: {warmup_epochs: 3, weight_average: false}\n"
        },
        variants={"cfa_no_fawa": "cfa"},
    ),
    "digits_csr": Protocol(
        description=(
            "The digits protocol (same data, model, schedule, threat model and AutoAttack APGD-CE + APGD-T) for "
            "CSR's forms: the code form (G-weighted adversarial CE, hard counts, streaming source) and the paper "
            "form (alpha sigma_max(L) of a surrogate confusion matrix, differentiated through) with the kl "
            "surrogate from the batch's own matrix, an EMA (decay 0.9) or last epoch's stream, and with the soft "
            f"surrogate (batch); then alpha in {{0.1, 0.3, 0.6, 1.0}} x gamma in {{0, 0.1}} of `{GRID_FORM}`. Every "
            "variant is the recipe `digits/trades_csr` with its `fairness:` list replaced (alpha 0.3, gamma 0 "
            "unless named); TRADES is `digits/trades`."
        ),
        configs="digits/",
        methods=["trades", *CSR_FORMS, *CSR_GRID],
        seeds=[0, 1, 2],
        overlays=["digits.yaml"],
        fairness={name: csr_fairness(**args) for name, args in {**CSR_FORMS, **CSR_GRID}.items()},
        variants={name: "trades_csr" for name in {**CSR_FORMS, **CSR_GRID}},
    ),
    "digits_awp": Protocol(
        description=(
            "The digits protocol (same data, model, schedule, threat model and AutoAttack APGD-CE + APGD-T) for "
            "the CSR paper's second base, TRADES-AWP (adversarial weight perturbation, gamma 0.005, no warm-up): "
            "the recipes `digits/trades_awp` and `digits/trades_awp_csr` (CSR code form, alpha 0.3, epoch pass), "
            "and `digits/trades_awp_csr` with the setting recommended for training from scratch (paper form, kl "
            "surrogate, batch source, alpha 0.6)."
        ),
        configs="digits/",
        methods=["trades_awp", "trades_awp_csr", "trades_awp_csr_paper_a0.6"],
        seeds=[0, 1, 2],
        overlays=["digits.yaml"],
        fairness={"trades_awp_csr_paper_a0.6": csr_fairness(form="paper", alpha=0.6)},
        variants={"trades_awp_csr_paper_a0.6": "trades_awp_csr"},
        reference="trades_awp",
    ),
    "cifar10_cpu": Protocol(
        description=(
            "CIFAR-10, reduced to run on 2 CPU cores: the JPEG-q75 archive (`../shared/data/cifar10_q75`), "
            "200 training images per class, 30 per class held out for validation, 30 test images per class "
            "(300); a small CNN (DigitsCNN, 3 input channels, width 32); 6 epochs, SGD 0.1 divided by 10 "
            "at epochs 4 and 5, batch 128; l_inf eps 8/255, training attack 3 steps of 3/255; TRADES beta 6 "
            "(FRL: 1.5); CFA's calibration from epoch 2 (of 6; 10 of 100 in the full config). The shipped "
            "recipes `cifar10/scratch_*` (`cifar10/scratch.yaml` + the method's overlay) with the overlay "
            "`cifar10_cpu.yaml`. AutoAttack: APGD-CE only."
        ),
        configs="cifar10/scratch_",
        methods=["trades", "trades_csr", "frl_rwrm", "faal", "cfa", "wat"],
        seeds=[0],
        overlays=["cifar10_cpu.yaml"],
        fairness={
            "cfa": "      - class_path: confspec_lightning.fairness.CFA\n        init_args: {warmup_epochs: 2}\n"
        },
    ),
    "cifar10_cpu_finetune": Protocol(
        description=(
            "The CSR paper's main protocol (fine-tuning a TRADES model for 2 epochs), reduced to 2 CPU cores: "
            "every method starts from the final TRADES model of the `cifar10_cpu` protocol (seed 0; trained "
            "first if missing) and is fine-tuned with the shipped recipes `cifar10/finetune_*` (2 epochs; "
            "lr 0.001, FAAL 0.01 then 0.001) on the same data, small CNN and 3-step training attack as "
            "`cifar10_cpu` (overlay `cifar10_cpu_finetune.yaml`). AutoAttack: APGD-CE only."
        ),
        configs="cifar10/finetune_",
        methods=["trades", "trades_csr", "frl_rwrm", "faal", "faal_csr", "cfa", "wat"],
        seeds=[0],
        overlays=["cifar10_cpu_finetune.yaml"],
        base=("cifar10_cpu", "trades"),
    ),
    "cifar10_pretrain": Protocol(
        description=(
            "One TRADES model on the full CIFAR-10 training set (JPEG-q75 archive, `../shared/data/cifar10_q75`) "
            "less 300 images per class held out for validation (47000 images), the starting point of the "
            "`cifar10_finetune` protocol. Backbone, epochs and schedule in the overlay `cifar10_pretrain.yaml` "
            "(chosen by the equal-time pilot `benchmarks/cifar10_pretrain/pilot.py`); TRADES-10 (l_inf 8/255, "
            "step 2/255, beta 6), SGD 0.1 momentum 0.9 wd 5e-4, batch 128, cosine schedule. Test: the fixed "
            "stratified subset of 200 test images per class (2000), PGD-20, CW-20 and AutoAttack APGD-CE + "
            "APGD-T."
        ),
        configs="cifar10/scratch_",
        methods=["trades"],
        seeds=[0],
        overlays=["cifar10_pretrain.yaml"],
    ),
    "cifar10_finetune": Protocol(
        description=(
            "The CSR paper's main protocol (Table 1: fine-tune a TRADES model for 2 epochs) on 2 CPU cores: every "
            "method starts from the committed `cifar10_pretrain` model (`benchmarks/cifar10_pretrain/`) and is "
            "fine-tuned with the shipped recipes `cifar10/finetune_*` (2 epochs on the full training set of "
            "47000 images; SGD lr 0.001, momentum 0.9, wd 5e-4, batch 128; FAAL lr 0.01 then 0.001; TRADES-10, "
            "l_inf 8/255) with the pretraining's backbone and data (overlay `cifar10_finetune.yaml`): the 300 "
            "held-out images per class are every method's validation split (FRL, WAT, CFA use it). Test: the same "
            "2000 test images as `cifar10_pretrain`, PGD-20, CW-20 and AutoAttack APGD-CE + APGD-T."
        ),
        configs="cifar10/finetune_",
        methods=[
            "trades",
            "trades_csr",
            "trades_csr_streaming",
            "trades_csr_paper",
            "frl_rwrm",
            "faal",
            "faal_csr",
            "cfa",
            "wat",
            "dafa",
            *FINETUNE_ALPHAS,
        ],
        seeds=[0, 1, 2],
        overlays=["cifar10_finetune.yaml"],
        fairness={
            "trades_csr_streaming": csr_fairness(alpha=0.3, confusion_source="streaming"),
            **{name: csr_fairness(**args) for name, args in FINETUNE_ALPHAS.items()},
        },
        variants={
            "trades_csr_streaming": "trades_csr",
            **{name: "trades_csr_paper" if "paper" in name else "trades_csr" for name in FINETUNE_ALPHAS},
        },
        init_weights="benchmarks/cifar10_pretrain/trades_pretrained.pt",
    ),
}


#: The CIFAR-10 fine-tuning study again, every run evaluated with per-sample noise (EVALUATION_NOISE): TRADES, CSR's
#: code form (streaming) and paper form at alpha 0.3, 0.6 and 1.0, and the two baselines closest to CSR, so that the
#: alpha settings are paired with TRADES runs of the same evaluation (issue 27).
PROTOCOLS["cifar10_finetune_alpha"] = replace(
    PROTOCOLS["cifar10_finetune"],
    description=(
        "The `cifar10_finetune` protocol (same start model, data, 2-epoch recipes, test images and attacks) for "
        "CSR's weight alpha, with every run evaluated under per-sample noise: TRADES; CSR's code form with the "
        "streaming source at alpha 0.3 and 0.6; the paper form at alpha 0.3, 0.6 and 1.0; DAFA and FAAL + CSR."
    ),
    methods=[
        "trades",
        "trades_csr_streaming",
        "trades_csr_streaming_a0.6",
        "trades_csr_paper",
        "trades_csr_paper_a0.6",
        "trades_csr_paper_a1",
        "dafa",
        "faal_csr",
    ],
)

#: The digits alpha sweep of digits_csr again (TRADES = alpha 0, the paper form kl/batch at alpha 0.1, 0.3, 0.6, 1.0,
#: gamma 0), evaluated with per-sample noise: a replicate at newer code, and the runs the bound analysis of
#: benchmarks/csr_mechanism/bound.py reads (issue 27).
PROTOCOLS["digits_alpha"] = replace(
    PROTOCOLS["digits_csr"],
    description=(
        "The `digits_csr` protocol (same data, model, schedule, threat model and AutoAttack APGD-CE + APGD-T) for "
        "CSR's weight alpha alone, trained again and evaluated with per-sample noise: TRADES (alpha 0) and the "
        "paper form (kl surrogate, batch source, gamma 0) at alpha 0.1, 0.3, 0.6 and 1.0. A replicate of those "
        "`digits_csr` rows at newer code; `benchmarks/csr_mechanism/bound.py --sweep digits_alpha` computes the "
        "terms of CSR's worst-class bound on these runs."
    ),
    methods=[
        "trades",
        "csr_paper_kl_batch_a0.1_g0",
        "csr_paper_kl_batch",
        "csr_paper_kl_batch_a0.6_g0",
        "csr_paper_kl_batch_a1_g0",
    ],
)


# ------------------------------------------------------------------- results
@contextlib.contextmanager
def locked_results():
    """Exclusive access to ``results.json`` (sweeps of several protocols may run at once)."""
    with (HERE / ".results.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.is_file() else {"protocols": {}, "commands": {}}
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recorded_runs(protocol: str) -> dict[tuple[str, int], dict]:
    """(method, seed) -> result of the runs of ``protocol`` already in ``results.json``."""
    with locked_results() as stored:
        return {(r["method"], r["seed"]): r for r in stored["protocols"].get(protocol, [])}


def record(protocol: str, result: dict) -> None:
    """Add one finished run to ``results.json`` (atomically) and rewrite ``RESULTS.md``: a sweep cut short
    still leaves every finished run on record, and a fresh checkout resumes from it."""
    from confspec_lightning.io import atomic_write_text

    with locked_results() as stored:
        runs = stored["protocols"].get(protocol, [])
        runs = [r for r in runs if (r["method"], r["seed"]) != (result["method"], result["seed"])] + [result]
        stored["protocols"][protocol] = sorted(runs, key=lambda r: (r["method"], r["seed"]))
        stored["commands"][protocol] = f"python benchmarks/fairness/run.py --protocol {protocol}"
        atomic_write_text(RESULTS_JSON, json.dumps(stored, indent=1))
        write_report(stored["protocols"], stored["commands"], stored.get("notes"))


def record_fitted(protocol: str, result: dict, tool: str) -> None:
    """Record a run that ``tool`` (standard_aa.py, bound.py) trained because its directory was missing.

    The tool goes on to read that directory's model, so its record must be this run: a record left by a run whose
    directory is gone (trained at other code, or merged from another checkout) is replaced, and the tool says so.
    """
    previous = recorded_runs(protocol).get((result["method"], result["seed"]))
    if previous is not None:
        print(
            f"[{tool}] {protocol}/{result['method']}_seed{result['seed']}: results.json held a run at code "
            f"{previous.get('code')} whose directory is gone; replacing it with this one (code {result.get('code')}), "
            f"the model {tool} reads",
            flush=True,
        )
    record(protocol, result)


def check_recorded(protocol: str, result: dict) -> dict | None:
    """The results.json record of the run whose ``result.json`` is ``result`` (None when none is on record).

    A run directory can hold another model than the one on record (trained again at other code, or the record
    merged from another checkout): its evaluation then differs, and reading it beside the record would mix two
    runs. Raises ``ValueError`` naming the first attack and class that differ.
    """
    stored = recorded_runs(protocol).get((result["method"], result["seed"]))
    if stored is None:
        return None
    for attack, entry in stored["evaluation"]["attacks"].items():
        recorded = entry["classwise_acc"]
        have = result["evaluation"]["attacks"].get(attack, {}).get("classwise_acc")
        if have != recorded:
            detail = "not evaluated there"
            if have is not None:
                cls = next(i for i, (a, b) in enumerate(zip(have, recorded, strict=True)) if a != b)
                detail = f"class {cls}: {have[cls]:.4f} there, {recorded[cls]:.4f} on record"
            raise ValueError(
                f"{protocol}/{result['method']} seed {result['seed']}: the run directory holds another run than "
                f"results.json records (code {stored.get('code')}); {attack} accuracy, {detail}. Train it again "
                "into an empty directory (the runner records it), or analyse it as an unrecorded run."
            )
    return stored


def stamp(result: dict, code: str) -> dict:
    """``result`` with what results.json records beside it: the machine, the code and the evaluation noise."""
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    result["code"] = code
    result["evaluation_noise"] = EVALUATION_NOISE
    return result


def code_version() -> str:
    """The commit the runs are made with, ``+changes`` when the library, the configs or this benchmark's files
    differ from it (results.json and RESULTS.md do not count): runs are comparable only when the training
    code is the same. ``unknown`` outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=7", "HEAD")
        changed = git(
            "status",
            "--porcelain",
            "--",
            "confspec_lightning",
            "configs",
            "benchmarks/fairness/*.yaml",
            "benchmarks/fairness/run.py",
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+changes" if changed else commit


# ------------------------------------------------------------------- running
class BudgetExhausted(Exception):
    """The time budget ran out; the sweep continues on the next invocation."""


class Budget:
    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise :class:`BudgetExhausted` once the budget is spent (between units of resumable work)."""
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise BudgetExhausted


def confspec(args: list[str], log: Path, budget: Budget) -> float:
    """Run ``python -m confspec_lightning ARGS`` within the budget; its wall time in seconds."""
    remaining = budget.remaining()
    if remaining is not None and remaining < 30:
        raise BudgetExhausted
    start = time.perf_counter()
    with log.open("a") as handle:
        handle.write(f"\n$ confspec {' '.join(args)}\n")
        handle.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "confspec_lightning", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # Lightning stops at the next step; last.ckpt is the epoch's
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise BudgetExhausted from None
    if code == PREEMPTED_EXIT:  # signalled from outside (a scheduler, a user): saved, resumed by the next call
        print(f"confspec was stopped by a signal and saved its last.ckpt; see {log}", flush=True)
        raise BudgetExhausted
    if code != 0:
        raise SystemExit(f"confspec {' '.join(args)} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def common_args(protocol: str, method: str, seed: int, run_dir: Path) -> list[str]:
    spec = PROTOCOLS[protocol]
    config = spec.variants.get(method, method)
    from confspec_lightning.recipes import recipe_files  # the library's table (configs/recipes.yaml)

    args = [arg for path in recipe_files(f"{spec.configs}{config}") for arg in ("--config", str(path))]
    for overlay in spec.overlays:
        args += ["--config", str(HERE / overlay)]
    if method in spec.fairness:
        fairness = run_dir / "fairness.yaml"
        fairness.write_text("model:\n  init_args:\n    fairness:\n" + spec.fairness[method])
        args += ["--config", str(fairness)]
    return [
        *args,
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.save_dir={run_dir.parent}",
        f"--trainer.logger.init_args.name={run_dir.name}",
        "--trainer.enable_progress_bar=false",
    ]


def start_weights_args(protocol: str, out: Path) -> list[str]:
    """The ``init_weights`` argument of a fine-tuning protocol's runs (none for the others): the base protocol's
    model under ``out``, or the committed start model. Every command of such a run (fit, test, a later standard
    AutoAttack test) names it, since the recipe's own ``init_weights`` is a public file this checkout may lack."""
    spec = PROTOCOLS[protocol]
    if spec.base is not None:
        init = out / spec.base[0] / f"{spec.base[1]}_seed0" / "fit" / "checkpoints" / "last.ckpt"
        return [f"--model.init_args.init_weights={init}"]
    if spec.init_weights is None:
        return []
    init = ROOT / spec.init_weights
    if not init.is_file():
        raise SystemExit(
            f"{init} is missing: run `python benchmarks/fairness/run.py --protocol cifar10_pretrain`, then "
            "`python benchmarks/cifar10_pretrain/export.py` (it writes these weights)."
        )
    return [f"--model.init_args.init_weights={init}"]


def run_one(protocol: str, method: str, seed: int, out: Path, budget: Budget, extra: list[str]) -> dict:
    """Fit (resuming an interrupted fit) and test one method/seed; a finished run is read back."""
    run_dir = out / protocol / f"{method}_seed{seed}"
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    progress_file = run_dir / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {"fit_seconds": 0.0}
    log = run_dir / "log.txt"
    args = common_args(protocol, method, seed, run_dir) + extra
    base = PROTOCOLS[protocol].base
    if base is not None:
        run_one(base[0], base[1], 0, out, budget, extra)  # the model every method fine-tunes
    args += start_weights_args(protocol, out)
    last = run_dir / "fit" / "checkpoints" / "last.ckpt"
    if not progress.get("fit_done"):
        resume = [f"--ckpt_path={last}"] if last.is_file() else []
        start = time.perf_counter()
        try:
            confspec(["fit", *args, "--trainer.logger.init_args.version=fit", *resume], log, budget)
        finally:
            progress["fit_seconds"] += time.perf_counter() - start
            progress_file.write_text(json.dumps(progress))
        if not (run_dir / "fit" / "classwise_val.json").is_file():  # written by on_fit_end only
            raise SystemExit(
                f"confspec fit exited without finishing training (interrupted, e.g. by SIGTERM?); see {log}. "
                "Run the same command again to resume from last.ckpt."
            )
        progress["fit_done"] = True
        progress_file.write_text(json.dumps(progress))
    test_seconds = confspec(
        ["test", *args, "--trainer.logger.init_args.version=test", f"--ckpt_path={last}"], log, budget
    )
    from confspec_lightning.runs import latest_report

    evaluation = json.loads(latest_report(run_dir / "fit", "last").read_text())  # <run>/evaluation/last[-n]/
    epochs = json.loads((run_dir / "fit" / "classwise_val.json").read_text()).get("epoch", 0) + 1
    result = {
        "protocol": protocol,
        "method": method,
        "seed": seed,
        "fit_seconds": progress["fit_seconds"],
        "epochs": epochs,
        "test_seconds": test_seconds,
        "evaluation": evaluation,
    }
    result_file.write_text(json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------ reporting
def attack_columns(results: list[dict]) -> list[str]:
    names = results[0]["evaluation"]["attacks"]
    return [a for a in ("clean", "pgd20", "autoattack") if a in names]


def table(results: list[dict], methods: list[str]) -> str:
    from confspec_lightning.evaluation.report import format_mean_std

    attacks = attack_columns(results)
    titles = {"clean": "clean", "pgd20": "PGD-20", "autoattack": "AutoAttack"}
    head = ["method", "seeds"]
    for attack in attacks:
        head += [f"{titles[attack]} avg", f"{titles[attack]} worst"]
    head += ["‖C‖₂ (AA)", "‖C‖₁ (AA)", "train s/epoch (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        cells = [LABELS.get(method, method), str(len(runs))]
        for attack in attacks:
            cells.append(format_mean_std([r["evaluation"]["attacks"][attack]["avg"] for r in runs], scale=100))
            cells.append(format_mean_std([r["evaluation"]["attacks"][attack]["worst"] for r in runs], scale=100))
        norms = [r["evaluation"]["attacks"][attacks[-1]]["confusion_spectral_norm"] for r in runs]
        cells.append(f"{statistics.mean(norms):.3f}")
        # ||C||_1 of the per-class error rates = the worst class's robust error
        cells.append(f"{statistics.mean(1.0 - r['evaluation']['attacks'][attacks[-1]]['worst'] for r in runs):.3f}")
        cells.append(f"{statistics.median(r['fit_seconds'] / r['epochs'] for r in runs):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluation_noise(run: dict) -> str:
    """The run's evaluation noise scheme (:data:`EVALUATION_NOISE`); ``unknown`` for a record without one."""
    return run.get("evaluation_noise", "unknown")


def deltas(results: list[dict], methods: list[str], reference: str = "trades") -> str:
    """Worst-class and average robust accuracy (last attack) of each method minus the reference's.

    Paired by seed: each difference is a mean over the seeds that both methods have run (a sweep in
    progress has more seeds of some methods than of others), ± the standard deviation of the per-seed
    differences when there are several. A seed whose two runs were evaluated under different noise schemes
    (:data:`EVALUATION_NOISE`) is not paired; the row says so.
    """
    from confspec_lightning.evaluation.report import format_mean_std

    attack = attack_columns(results)[-1]

    def by_seed(method: str, key: str) -> dict[int, float]:
        return {r["seed"]: 100 * r["evaluation"]["attacks"][attack][key] for r in results if r["method"] == method}

    noise = {(r["method"], r["seed"]): evaluation_noise(r) for r in results}

    lines = [
        f"| method | Δ worst ({attack}) vs {LABELS[reference]} | Δ avg ({attack}) | paired seeds |",
        "|---|---|---|---|",
    ]
    for method in methods:
        if method == reference:
            continue
        common = sorted(by_seed(method, "worst").keys() & by_seed(reference, "worst").keys())
        seeds = [s for s in common if noise[method, s] == noise[reference, s]]  # one evaluation scheme per pair
        apart = [s for s in common if s not in seeds]
        note = f" (not paired, other evaluation noise: seed {', '.join(map(str, apart))})" if apart else ""
        if not seeds:
            if apart:
                lines.append(f"| {LABELS.get(method, method)} | | | {note.strip()} |")
            continue
        cells = []
        for key in ("worst", "avg"):
            ours, theirs = by_seed(method, key), by_seed(reference, key)
            differences = [ours[s] - theirs[s] for s in seeds]
            cells.append(format_mean_std(differences, signed=True))
        lines.append(f"| {LABELS.get(method, method)} | {cells[0]} | {cells[1]} | {', '.join(map(str, seeds))}{note} |")
    return "\n".join(lines)


def classwise_means(results: list[dict], method: str, attack: str) -> list[float]:
    """Per-class accuracy (%) of ``method`` under ``attack``, mean over its seeds ([] when it has not run)."""
    runs = [r["evaluation"]["attacks"][attack]["classwise_acc"] for r in results if r["method"] == method]
    return [100 * statistics.mean(values) for values in zip(*runs, strict=True)]


def classwise_table(results: list[dict], methods: list[str], weakest: int = 3) -> str:
    """Per-class robust accuracy (last attack) of each method, mean over its seeds, and the mean of the
    ``weakest`` lowest classes of that row: near the floor one image in 200 moves the worst class by 0.5
    points, and the weakest few classes together say more than the single worst one."""
    attack = attack_columns(results)[-1]
    class_names = results[0]["evaluation"]["class_names"]
    head = ["method", "seeds", *class_names, f"mean of the {weakest} weakest"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        accs = classwise_means(results, method, attack)
        if not accs:
            continue
        seeds = sum(r["method"] == method for r in results)
        bottom = statistics.mean(sorted(accs)[:weakest])
        cells = [LABELS.get(method, method), str(seeds), *(f"{a:.1f}" for a in accs), f"{bottom:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results: list[dict], methods: list[str], path: Path, title: str) -> None:
    """Grouped bars: per-class robust accuracy (the strongest attack run), mean over seeds, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attack = attack_columns(results)[-1]
    class_names = results[0]["evaluation"]["class_names"]
    present = [m for m in methods if any(r["method"] == m for r in results)]
    width = 0.8 / max(len(present), 1)
    fig, ax = plt.subplots(figsize=(min(16, max(8, 1.2 * len(class_names))), 5))
    for i, method in enumerate(present):
        accs = classwise_means(results, method, attack)
        positions = [c + (i - (len(present) - 1) / 2) * width for c in range(len(class_names))]
        ax.bar(positions, accs, width, label=LABELS.get(method, method))
    ax.set_xticks(range(len(class_names)), class_names, rotation=30 if len(class_names) > 10 else 0)
    ax.set_ylabel(f"{attack} accuracy (%)")
    ax.set_title(title)
    ax.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tradeoff_figure(all_results: dict[str, list[dict]], protocol: str, path: Path, reference: str | None) -> None:
    """Worst-class vs average robust accuracy (last attack), one point per method with its seed spread (error bars);
    the methods of protocol ``reference`` (same data and evaluation) in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6.5))
    groups = [(protocol, None)] + ([(reference, "grey")] if reference and all_results.get(reference) else [])
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: the protocol's methods
    markers = ["o", "^", "v", "D", "P", "X", "<", ">", "*", "h"]  # the grey reference methods, told apart by shape
    for name, colour in groups:
        results = all_results[name]
        attack = attack_columns(results)[-1]
        for index, method in enumerate(PROTOCOLS[name].methods):
            runs = [r["evaluation"]["attacks"][attack] for r in results if r["method"] == method]
            if not runs or (name != protocol and any(r["method"] == method for r in all_results[protocol])):
                continue
            avg = [100 * r["avg"] for r in runs]
            worst = [100 * r["worst"] for r in runs]
            spread = (
                statistics.stdev(avg) if len(avg) > 1 else 0.0,
                statistics.stdev(worst) if len(worst) > 1 else 0.0,
            )
            label = LABELS.get(method, method) + ("" if name == protocol else f" ({name})")
            if colour is None:
                marker, colour_of = ("s" if method == "trades" else "o"), palette[index % len(palette)]
            else:
                marker, colour_of = markers[index % len(markers)], colour
            ax.errorbar(
                statistics.mean(avg), statistics.mean(worst), xerr=spread[0], yerr=spread[1], fmt=marker,
                color=colour_of, alpha=0.6 if colour else 1.0, capsize=3, label=label,
            )  # fmt: skip
    ax.set_xlabel(f"average {attack} accuracy (%)")
    ax.set_ylabel(f"worst-class {attack} accuracy (%)")
    ax.set_title(f"{protocol}: worst class vs average (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: protocols whose report adds the per-class table of the last attack
CLASSWISE_TABLES = {"cifar10_finetune", "cifar10_finetune_alpha"}
#: protocols whose report adds the worst-vs-average figure, with the protocol whose methods it shows in grey
TRADEOFF_FIGURES = {
    "digits_csr": "digits",
    "digits_alpha": None,
    "cifar10_finetune": None,
    "cifar10_finetune_alpha": None,
}


def write_report(
    all_results: dict[str, list[dict]], commands: dict[str, str], notes: dict[str, str] | None = None
) -> None:
    """RESULTS.md and the figures; ``notes``: protocol -> a remark printed under its table (results.json)."""
    notes = notes or {}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    lines = [
        "# Fairness methods side by side",
        "",
        "Produced by `benchmarks/fairness/run.py` (the command under each protocol). Accuracies in %, "
        "mean ± std over seeds of the final model's per-class accuracy on the test split; *worst* is the "
        "lowest class accuracy, ‖C‖₂ the spectral norm of the robust confusion matrix (per-class error "
        "rates) under the last attack column. *train s/epoch* is the fit wall time divided by the epochs "
        "(validation and the methods' extra passes included); runs used one thread each and several "
        "sweeps shared the 2 cores, so times are indicative: compare them within a protocol. `results.json` "
        "holds every run's full per-class report.",
        "",
    ]
    for protocol, results in all_results.items():
        if not results:
            continue
        spec = PROTOCOLS[protocol]
        figure_path = HERE / f"{protocol}_classwise.png"
        figure(results, spec.methods, figure_path, f"{protocol}: per-class robust accuracy (mean over seeds)")
        compared = len({r["method"] for r in results}) > 1  # a method beside the reference has run
        tradeoff = None
        if protocol in TRADEOFF_FIGURES and compared:
            tradeoff = HERE / f"{protocol}_tradeoff.png"
            tradeoff_figure(all_results, protocol, tradeoff, TRADEOFF_FIGURES[protocol])
        machine_note = results[0].get("machine", machine)
        codes = sorted({r.get("code", "not recorded") for r in results})
        lines += [
            f"## Protocol `{protocol}`",
            "",
            spec.description,
            "",
            f"Command: `{commands.get(protocol, f'python benchmarks/fairness/run.py --protocol {protocol}')}` "
            f"on {machine_note} (CPU only). Runs on record: {len(results)} of the "
            f"{len(spec.methods) * len(spec.seeds)} planned ({len(spec.methods)} methods x seeds "
            f"{', '.join(map(str, spec.seeds))}); rerunning the command completes the sweep. "
            f"Code: {', '.join(f'`{c}`' for c in codes)} (`code` of each run in results.json). Evaluation noise: "
            + ", ".join(f"{scheme} ({n} runs)" for scheme, n in sorted(Counter(map(evaluation_noise, results)).items()))
            + " (`EVALUATION_NOISE` in benchmarks/fairness/run.py).",
            "",
            table(results, spec.methods),
            "",
            *([notes[protocol], ""] if protocol in notes else []),
            *(
                [
                    f"Difference from {LABELS.get(spec.reference, spec.reference)} (points; mean ± std of the "
                    "per-seed differences over the seeds both methods have run):",
                    "",
                    deltas(results, spec.methods, spec.reference),
                    "",
                ]
                if compared
                else []
            ),
            *(
                [
                    f"Per-class {attack_columns(results)[-1]} accuracy (%, mean over seeds):",
                    "",
                    classwise_table(results, spec.methods),
                    "",
                ]
                if protocol in CLASSWISE_TABLES
                else []
            ),
            f"![per-class robust accuracy]({figure_path.name})",
            "",
            *([f"![worst class vs average]({tradeoff.name})", ""] if tradeoff else []),
        ]
    RESULTS_MD.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """The command line (``argv``: its arguments; default ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="digits")
    parser.add_argument("--methods", nargs="+", default=None, help="default: the protocol's list")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the protocol's seeds")
    parser.add_argument("--out", type=Path, default=HERE / "runs", help="run directories (git-ignored)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; exit 3 when spent (resumable)")
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        help="one more confspec argument for every run (smoke tests; "
        "repeatable), e.g. --extra=--trainer.max_epochs=1; such runs are not written to results.json",
    )
    args = parser.parse_args(argv)
    spec = PROTOCOLS[args.protocol]
    for method in args.methods or []:
        if method not in LABELS:
            parser.error(f"--methods: {method!r} is not one of {sorted(LABELS)}")

    if args.report_only:
        with locked_results() as stored:
            write_report(stored["protocols"], stored["commands"], stored.get("notes"))
        print(f"wrote {RESULTS_MD}", flush=True)
        return
    methods = args.methods or spec.methods
    seeds = args.seeds if args.seeds is not None else spec.seeds
    budget = Budget(args.time_budget)
    code = code_version()
    done = {} if args.extra else recorded_runs(args.protocol)
    try:
        for seed in seeds:
            for method in methods:
                if (method, seed) in done:
                    print(f"[{args.protocol}] {method} seed {seed}: on record in results.json", flush=True)
                    continue
                print(f"[{args.protocol}] {method} seed {seed} ...", flush=True)
                result = stamp(run_one(args.protocol, method, seed, args.out, budget, args.extra), code)
                aa = result["evaluation"]["attacks"].get("autoattack", {})
                print(
                    f"[{args.protocol}] {method} seed {seed}: AutoAttack avg "
                    f"{100 * aa.get('avg', float('nan')):.2f} worst {100 * aa.get('worst', float('nan')):.2f} "
                    f"(fit {result['fit_seconds']:.0f} s)",
                    flush=True,
                )
                if not args.extra:
                    record(args.protocol, result)
    except BudgetExhausted:
        print(f"[{args.protocol}] time budget spent; run the same command again to continue.", flush=True)
        sys.exit(BUDGET_EXIT)
    if args.extra:
        print("runs with --extra arguments are not recorded in results.json", flush=True)
        return
    print(f"wrote {RESULTS_MD}", flush=True)


if __name__ == "__main__":
    main()
