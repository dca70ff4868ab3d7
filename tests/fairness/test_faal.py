"""FAAL: the class weights solve the KL-constrained problem (vs brute force), margins, loss."""

from __future__ import annotations

import math

import pytest
import torch

from confspec_lightning.fairness import FAAL
from confspec_lightning.fairness.faal import faal_class_weights, kl_from_uniform, probability_margins
from confspec_lightning.fairness.statistics import classwise_sum
from confspec_lightning.objectives import combine_terms

from helpers import trades_output


# -------------------------------------------------------------------- FAAL
def brute_force_faal(scores: torch.Tensor, radius: float, steps: int = 400) -> float:
    """max_q <scores, q> over a grid of the 3-class simplex, subject to KL(u || q) = -log 3 - mean log q <= radius."""
    grid = torch.linspace(1e-4, 1 - 1e-4, steps, dtype=torch.float64)
    q0, q1 = torch.meshgrid(grid, grid, indexing="ij")
    q = torch.stack([q0, q1, 1 - q0 - q1], dim=-1).reshape(-1, 3)
    q = q[q[:, 2] > 0]
    feasible = -math.log(3) - q.log().mean(dim=1) <= radius
    return float((q[feasible] * scores).sum(dim=1).max())


@pytest.mark.parametrize("scores", [[0.3, -0.5, 1.2], [2.0, 1.9, -3.0], [-0.2, -0.1, -0.4]])
@pytest.mark.parametrize("radius", [0.05, 0.5])
def test_faal_weights_satisfy_the_constraint_and_maximise_the_objective(scores, radius):
    scores = torch.tensor(scores, dtype=torch.float64)
    present = torch.ones(3, dtype=torch.bool)
    q = faal_class_weights(scores, present, radius)
    assert float(q.sum()) == pytest.approx(1.0)
    kl = float(kl_from_uniform(q, present))
    assert kl <= radius + 1e-9 and kl == pytest.approx(radius, abs=1e-6)  # the constraint is active
    assert float((scores * q).sum()) >= brute_force_faal(scores, radius) - 1e-6
    assert int(q.argmax()) == int(scores.argmax())  # the worst (largest-margin) class gets the most weight


def test_faal_degenerate_cases():
    q = faal_class_weights(torch.tensor([0.7, 0.7, 0.7]), torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(q, torch.full((3,), 1 / 3, dtype=torch.float64))  # equal scores: uniform
    q = faal_class_weights(torch.tensor([0.0, 0.5, -0.5, 0.0]), torch.tensor([False, True, True, True]), 0.5)
    assert float(q[0]) == 0.0 and float(q.sum()) == pytest.approx(1.0)  # absent class: no weight
    with pytest.raises(ValueError, match=r"faal\.radius=0"):
        FAAL(radius=0)


def test_faal_margins_and_loss():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    margins = probability_margins(logits, torch.tensor([0, 0]))
    torch.testing.assert_close(margins, torch.tensor([0.2 - 0.7, 0.6 - 0.1]))
    faal = FAAL(radius=0.5)
    faal.bind(3)
    output, target = trades_output()
    loss, _ = combine_terms(output, [faal.loss_adjustment(output, target)])
    scores = classwise_sum(probability_margins(output.adv_logits, target), target, 3)
    q = faal_class_weights(scores, torch.ones(3, dtype=torch.bool), 0.5).float()
    per_sample = output.terms["ce"] + 6.0 * output.terms["kl"]
    torch.testing.assert_close(loss, 3 / 6 * (q[target] * per_sample).sum())  # (K / B) sum_i q_y l_i
