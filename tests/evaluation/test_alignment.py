"""The gradient-alignment check's parts (evaluation.alignment) on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from confspec_lightning import functional as CF
from confspec_lightning.evaluation.alignment import (
    PENALTIES,
    cosine,
    discrete_summary,
    flat_gradient,
    gradient_alignment,
    penalty_objectives,
    smoothed_sigma_max,
    step_along,
)


def test_smoothed_confusion_tends_to_the_discrete_matrix():
    torch.manual_seed(0)
    logits, target = torch.randn(60, 4) * 3, torch.randint(0, 4, (60,))
    discrete = CF.confusion_from_predictions(logits.argmax(1), target, 4, normalize=True).double()
    expected = torch.linalg.matrix_norm(discrete, ord=2)
    assert float(smoothed_sigma_max(logits, target, 0.001)) == pytest.approx(float(expected), rel=1e-4)
    # T = 1 is the soft surrogate's sigma_max
    assert float(smoothed_sigma_max(logits, target, 1.0)) == pytest.approx(
        float(penalty_objectives(logits, target)["soft"]), rel=1e-6
    )


def test_penalties_hand_case():
    # two samples of class 0: one predicted 1 (CE c), one correct; one sample of class 1, correct
    logits = torch.tensor([[0.0, 2.0], [3.0, 0.0], [0.0, 1.0]], requires_grad=True)
    target = torch.tensor([0, 0, 1])
    values = penalty_objectives(logits, target)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    # kl: L = [[0, 0], [ce0 / 2, 0]] -> sigma_max = ce0 / 2
    assert float(values["kl"]) == pytest.approx(float(ce[0] / 2))
    # counts: one error in cell (1, 0): G = u1 v1^T = e1 e0^T, rescaled to 2.01 there, 0.01 elsewhere
    weights = torch.tensor([2.01, 0.01, 0.01])
    assert float(values["counts-weighted CE"]) == pytest.approx(float((weights * ce).mean()), rel=1e-6)
    assert float(values["CE"]) == pytest.approx(float(ce.mean()))
    assert set(values) == set(PENALTIES)


def test_alignment_and_steps_on_a_linear_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, target = torch.randn(90, 5), torch.randint(0, 3, (90,))
    gradients, cosines = gradient_alignment(model, x, target, [1.0, 0.1])
    assert set(cosines) == set(PENALTIES) and all(set(c) == {1.0, 0.1} for c in cosines.values())
    assert cosines["soft"][1.0] == pytest.approx(1.0)  # soft = C_T at T = 1
    assert all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for values in cosines.values() for c in values.values())
    # a step along minus the gradient of sigma_max(C_T) lowers sigma_max(C_T) (first order)
    reference = smoothed_sigma_max(model(x), target, 1.0).item()
    step_along(model, gradients["C_T=1"], 1e-3)
    assert smoothed_sigma_max(model(x), target, 1.0).item() < reference
    assert cosine(torch.ones(3), torch.zeros(3)) == 0.0
    (g,) = [flat_gradient(model(x).sum(), list(model.parameters()))]
    assert g.shape == (5 * 3 + 3,) and g.dtype == torch.float64


def test_discrete_summary():
    pred, target = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1])
    summary = discrete_summary(pred, target, 2)
    assert summary["worst_error"] == pytest.approx(0.5) and summary["spectral_norm"] == pytest.approx(0.5)
