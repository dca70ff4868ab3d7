"""Real DDP (2 CPU processes, gloo) against one process on the same data: identical CSR state and metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from confspec_lightning.evaluation.report import CLEAN, EvaluationReport

from helpers import ROOT, launch_ranks, run_confspec, run_confspec_in_process, run_once

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def fit_args(save_dir, processes: int, source: str, fairness: str | None = None) -> list[str]:
    """``fit`` digits/pgdat_csr.yaml (or TRADES with the ``fairness`` YAML list) on 1 or 2 processes, in save_dir."""
    global_batch = 32
    args = [
        "fit",
        "--config",
        "digits/pgdat_csr",
        "--trainer.accelerator=cpu",
        f"--trainer.devices={processes}",
        f"--trainer.strategy={'ddp' if processes > 1 else 'auto'}",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=4",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--data.init_args.shuffle=false",
        f"--data.init_args.batch_size={global_batch // processes}",
        # 90 validation images (9 per class) in 2 batches of different sizes, one per rank on 2 processes
        "--data.init_args.val_fraction=0.05",
        "--data.init_args.eval_batch_size=64",
        "--model.init_args.train_attack.steps=3",
        "--model.init_args.train_attack.random_start=false",
        "--model.init_args.eval_attack.steps=3",
        "--model.init_args.eval_attack.random_start=false",
    ]
    config = save_dir / "csr.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    if fairness is None:
        fairness = (
            f"      - class_path: confspec_lightning.fairness.CSR\n        init_args: {{confusion_source: {source}}}\n"
        )
    else:
        args.append("--model.init_args.objective=trades")
    config.write_text("model:\n  init_args:\n    fairness:\n" + fairness)
    return [*args, "--config", str(config)]


def run_one_thread(*args: str, cwd):
    """``confspec`` in this process with one intra-op thread (as each DDP rank has), the thread count restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_confspec_in_process(*args, cwd=cwd)
    finally:
        torch.set_num_threads(threads)


def run_fit(save_dir, source: str, fairness: str | None = None) -> tuple[dict, dict]:
    """The one-process reference of :func:`fit_args`, in this process (one intra-op thread, as each DDP rank has)."""
    proc = run_one_thread(*fit_args(save_dir, 1, source, fairness), cwd=save_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return read_fit(save_dir)


def ddp_fits_folder(tmp_path_factory) -> Path:
    """Every 2-process fit of ``DDP_FITS`` in ONE torchrun-style job of ``tests/ddp_fits.py`` (2 ranks, once per test
    session: the interpreters' start-up paid once for all of them); its folder, one subfolder per fit. Lightning's
    own launcher starts the ranks of the evaluation tests below."""

    def job(out: Path) -> None:
        commands = out / "commands.json"
        commands.write_text(json.dumps([fit_args(out / key, 2, *DDP_FITS[key]) for key in DDP_FITS]))
        args = ["--out", str(out), "--timeout", "900", str(commands)]
        launch_ranks(ROOT / "tests" / "ddp_fits.py", 2, out, args, timeout=900)

    return run_once(tmp_path_factory, "ddp_state_equality_fits", job)


def ddp_fit(tmp_path_factory, name: str) -> tuple[dict, dict]:
    """The 2-process fit ``DDP_FITS[name]`` (:func:`ddp_fits_folder`)."""
    return read_fit(ddp_fits_folder(tmp_path_factory) / name)


def read_fit(save_dir) -> tuple[dict, dict]:
    """The last checkpoint's state dict and the last validation report's per-class numbers."""
    run_dir = save_dir / "digits_pgdat_csr/version_0"
    state = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return state, validation_arrays(run_dir / "classwise_val.json")


def validation_arrays(path) -> dict:
    """The per-class numbers of the last validation report (clean, evaluation PGD, its confusion matrix)."""
    report = EvaluationReport.load_json(path)
    robust = report.robust
    return {
        "class_counts": report.class_counts,
        "clean_acc": report.attacks[CLEAN].classwise_acc,
        "robust_acc": robust.classwise_acc,
        "confusion": robust.confusion,
        "confusion_spectral_norm": robust.confusion_spectral_norm,
    }


def assert_csr_equal(single_state: dict, ddp_state: dict, index: int, counts: int, shared: bool = False) -> None:
    """CSR number ``index`` of the stack: the accumulated confusion matrix summed over ranks is the single
    process's, exactly; so is its spectral direction G, up to float rounding. ``shared``: the streaming matrix of
    hard counts is the module's training confusion (accumulated once for every method)."""
    prefix = f"fairness.{index}."
    confusion = "train_confusion." if shared else prefix + "confusion."
    for key in ("errors", "class_counts"):
        torch.testing.assert_close(ddp_state[confusion + key], single_state[confusion + key], rtol=0, atol=0)
    assert single_state[confusion + "class_counts"].sum() == counts
    g_single, g_ddp = single_state[prefix + "direction"], ddp_state[prefix + "direction"]
    assert not torch.equal(g_single, torch.ones_like(g_single))
    torch.testing.assert_close(g_ddp, g_single, rtol=1e-5, atol=1e-6)


def assert_reports_equal(single_report: dict, ddp_report: dict) -> None:
    """The logged per-class metrics (validation split, synchronised over ranks)."""
    assert sum(ddp_report["class_counts"]) == sum(single_report["class_counts"]) == 90
    for key in ("class_counts", "clean_acc", "robust_acc", "confusion"):
        torch.testing.assert_close(torch.tensor(ddp_report[key]), torch.tensor(single_report[key]), msg=key)
    assert ddp_report["confusion_spectral_norm"] == pytest.approx(single_report["confusion_spectral_norm"])


def test_ddp_two_processes_equal_one_process_epoch_pass(tmp_path, tmp_path_factory):
    """CSR's direction from a separate pass over the training set at each epoch start (code form, PGD-AT).

    The ``streaming`` source (the training batches' own predictions) is the ``dafa_csr`` stack below."""
    single_state, single_report = run_fit(tmp_path / "single", "epoch_pass")
    ddp_state, ddp_report = ddp_fit(tmp_path_factory, "epoch_pass")
    assert_csr_equal(single_state, ddp_state, 0, counts=4 * 32)
    assert_reports_equal(single_report, ddp_report)


BASELINE_STACKS = {
    # FRL (RWRM: validation passes, per-class eps, globally self-normalised weights) + WAT (validation losses)
    "frl_wat": (
        "      - class_path: confspec_lightning.fairness.FRL\n        init_args: {tau: 0.0, eval_steps: 3}\n"
        "      - class_path: confspec_lightning.fairness.WAT\n        init_args: {eta: 1.0}\n"
    ),
    # CFA (training statistics, class-wise eps/beta, weight averaging) + FAAL (per-batch global class weights)
    "cfa_faal": (
        "      - class_path: confspec_lightning.fairness.CFA\n"
        "        init_args: {warmup_epochs: 1, average_threshold: 0.0, average_eval_steps: 3}\n"
        "      - class_path: confspec_lightning.fairness.FAAL\n"
    ),
    # DAFA (the class-wise mean adversarial softmax of epoch 0, summed over ranks; then W per class) + CSR
    "dafa_csr": (
        "      - class_path: confspec_lightning.fairness.DAFA\n        init_args: {warmup_epochs: 1}\n"
        "      - class_path: confspec_lightning.fairness.CSR\n        init_args: {confusion_source: streaming}\n"
    ),
}


@pytest.mark.parametrize("stack", list(BASELINE_STACKS))
def test_ddp_baseline_state_equals_one_process(tmp_path, tmp_path_factory, stack):
    single_state, single_report = run_fit(tmp_path / "single", "", BASELINE_STACKS[stack])
    ddp_state, ddp_report = ddp_fit(tmp_path_factory, stack)
    keys = [k for k in single_state if k.startswith("fairness.")]
    assert keys and set(keys) == {k for k in ddp_state if k.startswith("fairness.")}
    for key in keys:
        torch.testing.assert_close(ddp_state[key], single_state[key], rtol=1e-4, atol=1e-5, msg=key)
    state = {
        "frl_wat": ["fairness.0.multiplier_bndy", "fairness.0.multiplier_margin", "fairness.1.cumulative_loss"],
        "cfa_faal": ["fairness.0.train_robust_acc", "fairness.1.weight_sum"],
        "dafa_csr": ["fairness.0.weights", "fairness.1.direction"],
    }[stack]
    for key in state:  # the state did move (the comparison is not between two initial states)
        value = single_state[key]
        assert value.abs().sum() > 0 and not torch.equal(value, torch.ones_like(value)), key
    assert_reports_equal(single_report, ddp_report)
    if stack == "dafa_csr":  # CSR streaming (the last epoch's training batches) after DAFA's warm-up epoch
        assert_csr_equal(single_state, ddp_state, 1, counts=4 * 32, shared=True)


# jsonargparse merges the init_args of a list entry with the same class_path in the base config
# (digits/pgdat_csr.yaml, code form): reset its code-form options so the paper form's defaults apply
_CODE_OPTIONS_UNSET = "margin: null, include_diagonal: null, rescale: null, normalize: null"
PAPER_FORMS = {
    # the batch's own surrogate matrix, summed over ranks every step; each rank's share scaled by W
    "batch": (
        "      - class_path: confspec_lightning.fairness.CSR\n"
        f"        init_args: {{form: paper, alpha: 1.0, confusion_source: batch, {_CODE_OPTIONS_UNSET}}}\n"
    ),
    # an EMA of the global batch matrices
    "ema": (
        "      - class_path: confspec_lightning.fairness.CSR\n"
        "        init_args: {form: paper, alpha: 1.0, confusion_source: ema, surrogate: soft, "
        f"{_CODE_OPTIONS_UNSET}}}\n"
    ),
}


def test_ddp_paper_form_gradient_and_state_equal_one_process(tmp_path, tmp_path_factory):
    """The paper form's penalty is a function of the global batch: 2 ranks train the single process's weights, for
    each source of the matrix (``PAPER_FORMS``); one run without the penalty (alpha 0: the same training for every
    source) shows that the penalty changed the weights of each."""
    plain = PAPER_FORMS["batch"].replace("alpha: 1.0", "alpha: 0.0")
    plain_state, _ = run_fit(tmp_path / "plain", "", plain)
    for source, stack in PAPER_FORMS.items():
        single_state, _ = run_fit(tmp_path / source, "", stack)
        ddp_state, _ = ddp_fit(tmp_path_factory, f"paper_{source}")
        weights = [k for k in single_state if k.startswith("net.")]
        assert weights
        for key in weights:
            torch.testing.assert_close(ddp_state[key], single_state[key], rtol=1e-4, atol=1e-5, msg=f"{source} {key}")
        # the solver's warm start (subspace) is an iterate: its second column, the sign and direction of an estimate of
        # the second singular vector, may differ by round-off; the top pair itself (top_pair) is compared
        for key in [k for k in single_state if k.startswith("fairness.") and not k.endswith(".subspace")]:
            torch.testing.assert_close(ddp_state[key], single_state[key], rtol=1e-4, atol=1e-6, msg=f"{source} {key}")
        assert "fairness.0.top_pair" in single_state
        if source == "ema":
            assert single_state["fairness.0.ema_matrix"].abs().sum() > 0
        # the penalty changed the training: without it (alpha 0) the weights differ
        assert any(not torch.allclose(plain_state[k], single_state[k], rtol=1e-4, atol=1e-5) for k in weights), source


#: the 2-process fits of the tests above (name: the source and fairness list of :func:`fit_args`), one job
DDP_FITS = {
    "epoch_pass": ("epoch_pass", None),
    **{stack: ("", fairness) for stack, fairness in BASELINE_STACKS.items()},
    **{f"paper_{source}": ("", fairness) for source, fairness in PAPER_FORMS.items()},
}


def test_ddp_ranks_agree_on_the_fairness_state_without_a_broadcast(tmp_path_factory):
    """DDP broadcasts no fairness buffer (``RobustFairLitModule._ddp_params_and_buffers_to_ignore``): after every
    2-process fit of ``DDP_FITS`` each rank holds the same fairness state, computed from statistics summed over
    ranks, bit for bit."""
    out = ddp_fits_folder(tmp_path_factory)
    for name in DDP_FITS:
        rank0, rank1 = (torch.load(out / name / f"fairness_buffers_rank{r}.pt", weights_only=True) for r in (0, 1))
        assert set(rank0) == set(rank1) and any(key != "fairness.epoch_end_done" for key in rank0), name
        for key in rank0:
            torch.testing.assert_close(rank1[key], rank0[key], rtol=0, atol=0, msg=f"{name} {key}")


# ------------------------------------------------- evaluation on several processes = one process, exactly
def eval_args(save_dir, processes: int) -> list[str]:
    """Validate/test settings: eval batch 64 over 270 validation / 360 test images (5 and 6 batches, the last short),
    the evaluation PGD with its random start, and AutoAttack (APGD-CE, 2 iterations) seeded per batch."""
    return [
        "--config",
        "digits/trades_csr",
        "--trainer.accelerator=cpu",
        f"--trainer.devices={processes}",
        f"--trainer.strategy={'ddp' if processes > 1 else 'auto'}",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--data.init_args.eval_batch_size=64",
        "--model.init_args.eval_attack.steps=3",
        "--model.init_args.test_attacks=[{class_path: confspec_lightning.attacks.PGD}, "
        "{class_path: confspec_lightning.attacks.AutoAttack, init_args: {version: custom, attacks: [apgd-ce], "
        "n_iter: 2}}]",
    ]


def run(processes: int, *args: str, cwd) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    if processes == 1:
        proc = run_one_thread(*args, cwd=cwd)
    else:
        proc = run_confspec(*args, cwd=cwd, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_ddp_test_and_predict_equal_one_process_exactly(tmp_path, tmp_path_factory):
    """One checkpoint (the one-process fit of the next test), tested on 1 and 2 processes: every image counted once
    (no padding), each image's PGD start drawn from its index, AutoAttack seeded by the batch's number in one
    process's pass: identical reports; predict on 2 processes writes one predictions.csv, identical to one
    process's."""
    fit = one_process_fit(tmp_path_factory)
    checkpoint = tmp_path / "model.ckpt"  # a file outside any run: each evaluation opens a run of its own under out/
    shutil.copy(next(fit.glob("*/version_0/checkpoints/last.ckpt")), checkpoint)
    # 3 processes (uneven shards, a rank with a placeholder batch): test_ddp_fit_validation_and_best_checkpoint_...
    # validates on them through the same prediction route as test
    commands = {1: ("test", "predict"), 2: ("test", "predict")}
    reports = {}
    for processes, names in commands.items():
        out = tmp_path / f"eval{processes}"
        for command in names:
            run(processes, command, *eval_args(out, processes), f"--ckpt_path={checkpoint}", cwd=out)
        test = json.loads(next(out.glob("*/version_*/evaluation/evaluation.json")).read_text())
        predictions = [p.read_text() for p in out.glob("*/version_*/predictions.csv")]
        reports[processes] = (test["class_counts"], test["attacks"], predictions)
    assert sum(reports[1][0]) == 360 and set(reports[1][1]) == {"clean", "pgd3", "autoattack"}
    assert len(reports[1][2][0].splitlines()) == 361  # the header and one row per test image
    assert reports[2] == reports[1]


#: AWP on (its ascent gradient is averaged over the ranks: every rank perturbs the same weights the same way)
AWP_ON = "--model.init_args.weight_perturbation={gamma: 0.01}"


def evaluated_fit_args(out, processes: int) -> list[str]:
    """2 epochs of 3 batches, no shuffle, deterministic training attack, a global batch of 48 split evenly, AWP on."""
    args = [*eval_args(out, processes), "--trainer.max_epochs=2", "--trainer.limit_train_batches=3"]
    args += [f"--data.init_args.batch_size={48 // processes}", "--data.init_args.shuffle=false"]
    args += ["--model.init_args.train_attack.steps=2", "--model.init_args.train_attack.random_start=false"]
    return [*args, "--trainer.enable_progress_bar=false", AWP_ON]


def one_process_fit(tmp_path_factory) -> Path:
    """The one-process fit of :func:`evaluated_fit_args`, run once for this module's tests (its working directory)."""
    return run_once(
        tmp_path_factory, "ddp_one_process_fit", lambda out: run(1, "fit", *evaluated_fit_args(out, 1), cwd=out)
    )


def test_ddp_fit_validation_and_best_checkpoint_equal_one_process(tmp_path, tmp_path_factory):
    """2 and 3 processes train the single process's model (no shuffle, deterministic training attack, a global batch
    of 48 split evenly, AWP on); validation, with its random starts, gives the same per-class history and best
    checkpoint."""
    histories = {}
    for processes in (1, 2, 3):
        if processes == 1:
            out = one_process_fit(tmp_path_factory)
        else:
            out = tmp_path / f"fit{processes}"
            run(processes, "fit", *evaluated_fit_args(out, processes), cwd=out)
        run_dir = next(out.glob("*/version_0"))
        report = json.loads((run_dir / "classwise_val.json").read_text())
        state = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
        (best,) = [v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint") and v.get("monitor")]
        histories[processes] = (
            report["class_counts"],
            [entry["val"] for entry in report["history"]],
            {k: v["classwise_acc"] for k, v in report["attacks"].items()},
            Path(best["best_model_path"]).name,
            best["best_model_score"],
        )
    assert sum(histories[1][0]) == 270
    for processes in (2, 3):
        counts, history, accuracy, best_name, best_score = histories[processes]
        assert counts == histories[1][0] and accuracy == histories[1][2], processes
        assert best_name == histories[1][3], processes
        assert float(best_score) == pytest.approx(float(histories[1][4])), processes
        for ours, theirs in zip(history, histories[1][1], strict=True):  # the per-epoch diagnostics (||C||_2, ...)
            assert ours.keys() == theirs.keys()
            for key, value in ours.items():
                assert value == theirs[key] or value == pytest.approx(theirs[key], rel=1e-9), (processes, key)


def test_ddp_start_model_check_equals_one_process(tmp_path):
    """The start model's evaluation before a fit from a file: every rank evaluates its share of the validation split,
    the counts are summed (one collective on every rank), and the printed line is one process's."""
    import re

    from confspec_lightning.models import DigitsCNN

    torch.manual_seed(3)
    weights = tmp_path / "start.pt"
    torch.save(DigitsCNN(width=32).state_dict(), weights)
    lines = {}
    for processes in (1, 2):
        save_dir = tmp_path / f"p{processes}"
        save_dir.mkdir()
        args = [
            "fit",
            "--config",
            "digits/trades",
            "--trainer.accelerator=cpu",
            f"--trainer.devices={processes}",
            f"--trainer.strategy={'ddp' if processes > 1 else 'auto'}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={save_dir}",
            "--model.init_args.train_attack.steps=1",
            "--model.init_args.eval_attack.steps=3",
            "--model.init_args.eval_attack.random_start=false",
            f"--model.init_args.init_weights={weights}",
            "--model.init_args.start_model_check_batches=4",  # the whole validation split on 1 and on 2 processes
        ]
        if processes == 1:
            proc = run_confspec_in_process(*args, cwd=save_dir)
        else:
            proc = run_confspec(*args, cwd=save_dir, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        found = re.findall(
            r"start model: clean [\d.]+ %, PGD-3 [\d.]+ % \(class-balanced; worst class [^;]+;", proc.stdout
        )
        assert len(found) == 1, proc.stdout[-3000:]  # printed once (rank 0)
        lines[processes] = found[0]
    assert lines[1] == lines[2], lines
