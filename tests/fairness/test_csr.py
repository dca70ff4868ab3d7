"""CSR's paper form and the surrogate variants: hand-computed cells, the gradient of sigma_max(L), edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from confspec_lightning import CSR
from confspec_lightning import functional as CF
from confspec_lightning.data import DigitsDataModule
from confspec_lightning.metrics import RobustConfusionMatrix
from confspec_lightning.objectives import ObjectiveOutput, cross_entropy

from helpers import make_module, make_trainer


def output_for(logits: torch.Tensor, target: torch.Tensor) -> ObjectiveOutput:
    ce = cross_entropy(logits, target)
    return ObjectiveOutput(terms={"ce": ce}, coefficients={"ce": 1.0}, adv_logits=logits, adv_ce=ce)


# ----------------------------------------------------------------- hand-computed cells
def test_surrogate_cells_hand_case():
    # sample 0: class 0, top wrong class 2 (charged: misclassified); sample 1: class 1, correct;
    # sample 2: class 1, logits tie-free, top wrong 0 wins
    z = torch.tensor([[0.0, -1.0, 1.0], [0.0, 2.0, -1.0], [3.0, 1.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    counts = CF.surrogate_contributions(z, y, "counts")
    torch.testing.assert_close(counts, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    kl = CF.surrogate_contributions(z, y, "kl")
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(kl, torch.tensor([[0.0, 0.0, ce[0]], [0.0, 0.0, 0.0], [ce[2], 0.0, 0.0]]))
    soft = CF.surrogate_contributions(z, y, "soft")
    p = z.softmax(1)
    torch.testing.assert_close(
        soft, torch.tensor([[0.0, p[0, 1], p[0, 2]], [p[1, 0], 0.0, p[1, 2]], [p[2, 0], 0, p[2, 2]]])
    )
    # L[:, j] = sum over class-j samples / m_j: m = (1, 2, 0)
    m = CF.counts_per_class(y, 3)
    lkl = CF.surrogate_confusion(kl, y, m)
    expected = torch.zeros(3, 3)
    expected[2, 0] = ce[0]
    expected[0, 1] = ce[2] / 2
    torch.testing.assert_close(lkl, expected)
    lsoft = CF.surrogate_confusion(soft, y, m)
    torch.testing.assert_close(lsoft[:, 1], (soft[1] + soft[2]) / 2)
    torch.testing.assert_close(lsoft[:, 2], torch.zeros(3))


def test_additive_margin_charges_near_misses():
    # class 0 logits (2, 1.5, -1): correct; with gamma 0.6 (additive) 1.5 + 0.6 > 2 -> charged to cell (1, 0)
    z, y = torch.tensor([[2.0, 1.5, -1.0]]), torch.tensor([0])
    assert CF.surrogate_contributions(z, y, "kl", gamma=0.0).sum() == 0
    charged = CF.surrogate_contributions(z, y, "kl", gamma=0.6, margin="additive")
    assert charged[0, 1] == pytest.approx(float(torch.nn.functional.cross_entropy(z, y))) and charged[0, 2] == 0


# --------------------------------------------------------- gradient of sigma_max(L)
@pytest.mark.parametrize("surrogate", ["kl", "soft"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_penalty_gradient_equals_autograd_through_matrix_norm(surrogate, seed):
    torch.manual_seed(seed)
    k, b = 5, 40
    logits = torch.randn(b, k, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, k, (b,))
    contributions = CF.surrogate_contributions(logits, target, surrogate)
    counts = CF.counts_per_class(target, k)
    matrix = CF.surrogate_confusion(contributions, target, counts)
    reference = torch.linalg.matrix_norm(matrix.double(), ord=2)
    (expected,) = torch.autograd.grad(reference, logits, retain_graph=True)
    u, v, singular = CF.top_singular_pair(matrix)
    penalty = CF.spectral_penalty(torch.outer(u, v), contributions, target, counts)
    (gradient,) = torch.autograd.grad(penalty, logits)
    assert float(penalty) == pytest.approx(float(reference), rel=1e-6)
    assert float(singular[0]) == pytest.approx(float(reference), rel=1e-9)
    torch.testing.assert_close(gradient.double(), expected, rtol=1e-4, atol=1e-6)


def test_csr_paper_batch_penalty_is_sigma_max_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(32, 4, requires_grad=True)
    target = torch.randint(0, 4, (32,))
    csr = CSR(form="paper", alpha=0.5)
    csr.bind(4)
    adjustment = csr.loss_adjustment(output_for(logits, target), target)
    assert adjustment.term_weights == {}  # the base objective is not rescaled in the paper form
    matrix = CF.surrogate_confusion(
        CF.surrogate_contributions(logits, target, "kl", margin="additive"), target, CF.counts_per_class(target, 4)
    )
    expected = 0.5 * torch.linalg.matrix_norm(matrix.double(), ord=2)
    assert float(adjustment.extra_terms["csr"]) == pytest.approx(float(expected), rel=1e-5)
    (g,) = torch.autograd.grad(adjustment.extra_terms["csr"], logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------ edge cases
def test_zero_matrix_gives_no_penalty_and_no_nan():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]], requires_grad=True)  # all correct: L = 0 for kl
    target = torch.tensor([0, 1])
    csr = CSR(form="paper")
    csr.bind(3)
    term = csr.loss_adjustment(output_for(logits, target), target).extra_terms["csr"]
    assert float(term) == 0.0
    (g,) = torch.autograd.grad(term, logits)
    assert torch.isfinite(g).all() and g.abs().sum() == 0
    u, v, s = CF.top_singular_pair(torch.zeros(3, 3))
    assert u.abs().sum() == 0 and v.abs().sum() == 0 and s.abs().sum() == 0


def test_tied_top_singular_values_give_a_finite_subgradient():
    # two disjoint confusions of equal size: sigma_1 = sigma_2
    k = 4
    target = torch.tensor([0, 1, 2, 3])
    logits = torch.full((k, k), -2.0)
    for sample, wrong in enumerate([1, 0, 3, 2]):
        logits[sample, wrong] = 2.0
    logits.requires_grad_(True)
    contributions = CF.surrogate_contributions(logits, target, "kl")
    matrix = CF.surrogate_confusion(contributions, target, CF.counts_per_class(target, k))
    _, _, singular = CF.top_singular_pair(matrix)
    assert float(singular[0]) == pytest.approx(float(singular[1]))
    csr = CSR(form="paper")
    csr.bind(k)
    term = csr.loss_adjustment(output_for(logits, target), target).extra_terms["csr"]
    (g,) = torch.autograd.grad(term, logits)
    assert math.isfinite(float(term)) and torch.isfinite(g).all() and g.abs().sum() > 0
    assert float(term) == pytest.approx(0.3 * float(singular[0]), rel=1e-5)


def test_bf16_autocast_keeps_the_svd_in_float64():
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 4)
    x, target = torch.randn(16, 6), torch.randint(0, 4, (16,))
    csr = CSR(form="paper", confusion_source="ema")
    csr.bind(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
        assert logits.dtype == torch.bfloat16
        term = csr.loss_adjustment(output_for(logits, target), target).extra_terms["csr"]
    assert csr.ema_matrix.dtype == torch.float64 and term.dtype == torch.float32
    matrix = CF.surrogate_confusion(
        CF.surrogate_contributions(logits.detach().float(), target, "kl", margin="additive").double(),
        target,
        CF.counts_per_class(target, 4),
    )
    torch.testing.assert_close(csr.ema_average(), matrix, rtol=1e-6, atol=1e-9)  # first EMA step = the batch matrix
    assert float(term) == pytest.approx(0.3 * float(torch.linalg.matrix_norm(matrix, ord=2)), rel=1e-3)


# -------------------------------------------------------------------- sources, options
@pytest.mark.parametrize(("iterations", "tolerance"), [(None, 1e-3), (30, 1e-6)])
def test_ema_source_averages_batch_matrices(iterations, tolerance):
    """The EMA of the batch matrices; its direction from 2 subspace iterations per step (the default) tracks the
    SVD's to 1e-3 from a cold start after three steps, and to float precision with more iterations."""
    torch.manual_seed(0)
    csr = CSR(form="paper", confusion_source="ema", ema_decay=0.75, power_iterations=iterations)
    csr.bind(3)
    matrices = []
    for _ in range(3):
        logits, target = torch.randn(12, 3), torch.randint(0, 3, (12,))
        csr.loss_adjustment(output_for(logits, target), target)
        contributions = CF.surrogate_contributions(logits, target, "kl", margin="additive").double()
        matrices.append(CF.surrogate_confusion(contributions, target, CF.counts_per_class(target, 3)))
    expected = 0.75 * (0.75 * matrices[0] + 0.25 * matrices[1]) + 0.25 * matrices[2]
    torch.testing.assert_close(csr.ema_average(), expected)
    torch.testing.assert_close(csr.state_dict()["ema_matrix"], expected)  # checkpoints hold the average
    u, v, _ = CF.top_singular_pair(expected)
    torch.testing.assert_close(csr.direction_matrix(), torch.outer(u, v).float(), rtol=tolerance, atol=tolerance)
    assert not hasattr(csr, "direction")  # the per-step sources keep u1, v1 (top_pair), not G


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_ema_kept_with_a_lazy_scale_equals_the_plain_average_across_folds_and_checkpoints(monkeypatch, decay):
    """M = s A with the decay on s: over folds every 3 steps (patched period) and a checkpoint load after step 5, the
    average equals M <- d M + (1 - d) L_batch computed directly, and its direction the SVD's."""
    monkeypatch.setattr(CSR, "fold_period", property(lambda self: 3))
    torch.manual_seed(0)
    k = 4
    csr = CSR(form="paper", confusion_source="ema", ema_decay=decay, power_iterations=30)
    csr.bind(k)
    expected = None
    for step in range(10):
        if step == 5:  # a resumed run: the checkpoint holds the average; the scale starts again at 1
            state = csr.state_dict()
            csr = CSR(form="paper", confusion_source="ema", ema_decay=decay, power_iterations=30)
            csr.bind(k)
            csr.load_state_dict(state)
            assert float(csr.ema_scale) == 1.0
        logits, target = torch.randn(16, k), torch.randint(0, k, (16,))
        csr.loss_adjustment(output_for(logits, target), target)
        contributions = CF.surrogate_contributions(logits, target, "kl", margin="additive").double()
        batch = CF.surrogate_confusion(contributions, target, CF.counts_per_class(target, k))
        expected = batch if expected is None else decay * expected + (1.0 - decay) * batch
        torch.testing.assert_close(csr.ema_average(), expected)
    if decay > 0:
        assert float(csr.ema_scale) < 1.0  # the scale, not a pass over the matrix, carried the decay
    u, v, _ = CF.top_singular_pair(expected)
    torch.testing.assert_close(csr.direction_matrix(), torch.outer(u, v).float(), rtol=1e-5, atol=1e-6)


def test_ema_fold_period_keeps_the_scale_far_from_underflow():
    for decay in (1e-3, 0.5, 0.9, 0.99, 0.999):
        period = CSR(confusion_source="ema", ema_decay=decay).fold_period
        assert period >= 1 and decay**period >= 1e-101
    assert CSR(confusion_source="ema", ema_decay=0.9).fold_period == 2185


def test_code_form_with_a_kl_surrogate_takes_g_from_the_kl_matrix():
    torch.manual_seed(0)
    csr = CSR(surrogate="kl", confusion_source="streaming")
    csr.bind(4)
    logits, target = torch.randn(64, 4), torch.randint(0, 4, (64,))
    csr.on_train_batch_end(output_for(logits, target), target)
    errors, counts = csr.confusion.synced_state()
    assert errors.dtype == torch.float64
    kl = CF.surrogate_contributions(logits, target, "kl", margin="relative")
    torch.testing.assert_close(errors, CF.surrogate_confusion(kl.double(), target))
    assert csr.direction_of(CF.confusion_from_counts(errors, counts))[0].min() >= 0.01  # rescaled, code form


def test_form_defaults_and_overrides():
    code, paper = CSR(), CSR(form="paper")
    assert (
        code.surrogate,
        code.margin,
        code.confusion_source,
        code.include_diagonal,
        code.rescale,
        code.normalize,
    ) == (
        "counts",
        "relative",
        "epoch_pass",
        True,
        True,
        False,
    )
    assert (paper.surrogate, paper.margin, paper.confusion_source, paper.rescale, paper.normalize) == (
        "kl",
        "additive",
        "batch",
        False,
        True,
    )
    assert CSR(form="paper", surrogate="soft", confusion_source="streaming").confusion_source == "streaming"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"form": "paper", "surrogate": "counts"}, r"csr.surrogate='counts' is not accepted with csr.form='paper'"),
        ({"form": "paper", "include_diagonal": True}, r"csr.include_diagonal=True is not accepted"),
        ({"form": "article"}, r"csr.form='article' is not accepted; choose one of 'code', 'paper'"),
        ({"surrogate": "hard"}, r"csr.surrogate='hard'.*'counts', 'kl', 'soft'"),
        ({"confusion_source": "epoch"}, r"csr.confusion_source='epoch'.*'batch', 'ema'"),
        ({"ema_decay": 1.0}, r"csr.ema_decay=1.0 is not accepted"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CSR(**kwargs)


def test_metric_accumulates_surrogate_values():
    torch.manual_seed(0)
    metric = RobustConfusionMatrix(3, surrogate="soft")
    logits, target = torch.randn(10, 3), torch.randint(0, 3, (10,))
    metric.update(logits[:6], target[:6])
    metric.update(logits[6:], target[6:])
    soft = CF.surrogate_contributions(logits, target, "soft").double()
    torch.testing.assert_close(metric.errors, CF.surrogate_confusion(soft, target))
    torch.testing.assert_close(metric.class_counts, CF.counts_per_class(target, 3))
    torch.testing.assert_close(metric.compute(), CF.surrogate_confusion(soft, target))


# ----------------------------------------------------------------- in a real Trainer
@pytest.mark.parametrize(
    "options",
    [
        {"form": "paper"},
        {"form": "paper", "confusion_source": "ema"},
        {"form": "paper", "surrogate": "soft", "confusion_source": "streaming"},
        {"form": "paper", "confusion_source": "epoch_pass"},
        {"form": "code", "confusion_source": "batch"},
    ],
)
def test_paper_form_trains_in_a_trainer(options):
    module = make_module(fairness=[CSR(**options)])
    trainer = make_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_csr"]) and float(metrics["train/loss_csr"]) > 0
    assert {"csr/source_sigma1", "csr/source_sigma_ratio"} <= set(metrics)
    assert {"train/confusion_spectral_norm", "val/confusion_nu", "val/confusion_l1_norm"} <= set(metrics)
    history = module.evaluator.reports["val"].history
    assert [entry["epoch"] for entry in history] == [0, 1]
    assert set(history[-1]["train"]) >= {"spectral_norm", "sigma_2", "sigma_ratio", "l1_norm", "nu"}
    val = history[-1]["val"]
    assert val["l1_norm"] == pytest.approx(1 - module.evaluator.reports["val"].robust.worst)
    assert 0.0 < val["nu"] <= math.sqrt(10) + 1e-9  # ||C||_1 <= sqrt(K) ||C||_2
