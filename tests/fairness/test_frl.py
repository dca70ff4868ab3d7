"""FRL (reweight, reweight + remargin): multiplier steps, weights and budgets on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from confspec_lightning import AttackConfig
from confspec_lightning.fairness import FRL
from confspec_lightning.fairness.frl import (
    frl_class_weights,
    frl_eps_multiplier,
    frl_multiplier_step,
    frl_violations,
    self_normalized,
)
from confspec_lightning.objectives import combine_terms

from helpers import make_module, trades_output


# --------------------------------------------------------------------- FRL
def test_frl_multiplier_step_hand_computed():
    errors = torch.tensor([0.5, 0.2, 0.2], dtype=torch.float64)
    g = frl_violations(errors, tau=0.05)  # mean 0.3 -> [0.15, -0.15, -0.15]
    torch.testing.assert_close(g, torch.tensor([0.15, -0.15, -0.15], dtype=torch.float64))
    lam = frl_multiplier_step(torch.zeros(3, dtype=torch.float64), g, rate=1.0, max_sum=0.5)
    torch.testing.assert_close(lam, torch.tensor([0.15, 0.0, 0.0], dtype=torch.float64))  # clamped at 0
    big = frl_multiplier_step(torch.tensor([0.4, 0.3, 0.0], dtype=torch.float64), g, rate=1.0, max_sum=0.5)
    # [0.55, 0.15, 0] sums to 0.7 > 0.5: scaled by 0.5 / 0.7
    torch.testing.assert_close(big, torch.tensor([0.55, 0.15, 0.0], dtype=torch.float64) * (0.5 / 0.7))
    w = frl_class_weights(torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([1 / 3 + 0.2, 1 / 3 - 0.1, 1 / 3 - 0.1], dtype=torch.float64))
    assert float(w.sum()) == pytest.approx(1.0)
    m = frl_eps_multiplier(torch.tensor([-1.0, 0.1, 2.0]))
    torch.testing.assert_close(m, torch.tensor([0.98, math.exp(0.2), 3.0]))


def test_frl_update_from_validation_accuracy_and_rate_halving():
    frl = FRL(mode="reweight_remargin", tau=0.0)
    frl.bind(3)
    clean = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    robust = torch.tensor([0.5, 0.6, 0.1], dtype=torch.float64)
    frl.update_multipliers(clean, robust, epoch=40)  # rates halved once
    g_nat = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64) - 0.2
    g_bndy = torch.tensor([0.4, 0.2, 0.6], dtype=torch.float64) - 0.4
    torch.testing.assert_close(frl.multiplier_nat, (0.025 * g_nat).clamp(min=0))
    torch.testing.assert_close(frl.multiplier_bndy, (0.05 * g_bndy).clamp(min=0))
    torch.testing.assert_close(frl.multiplier_margin, 0.1 * g_bndy)  # not clamped: exp(2 lam) is


def test_frl_loss_is_self_normalised_reweighting():
    frl = FRL(mode="reweight")
    frl.bind(3)
    frl.multiplier_nat.copy_(torch.tensor([0.2, 0.0, 0.1], dtype=torch.float64))
    frl.multiplier_bndy.copy_(torch.tensor([0.0, 0.3, 0.0], dtype=torch.float64))
    output, target = trades_output()
    loss, _ = combine_terms(output, [frl.loss_adjustment(output, target)])
    w_nat = frl_class_weights(frl.multiplier_nat).float()[target]
    w_bndy = frl_class_weights(frl.multiplier_bndy).float()[target]
    expected = (w_nat * output.terms["ce"]).sum() / w_nat.sum() + 6.0 * (
        w_bndy * output.terms["kl"]
    ).sum() / w_bndy.sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(self_normalized(torch.ones(4)), torch.ones(4))


def test_frl_remargin_budget_and_needs_trades():
    frl = FRL(mode="reweight_remargin")
    frl.bind(3)
    frl.multiplier_margin.copy_(torch.tensor([0.0, 0.2, 5.0], dtype=torch.float64))
    attack = AttackConfig(eps=0.1, step=0.025, steps=3)
    eps, step = frl.attack_budget(torch.tensor([0, 1, 2, 1]), attack)
    torch.testing.assert_close(eps, torch.tensor([0.1, 0.1 * math.exp(0.4), 0.3, 0.1 * math.exp(0.4)]))
    torch.testing.assert_close(step, torch.tensor(0.3 / 4))  # max eps of the batch / 4 (= step / eps)
    assert FRL(mode="reweight").attack_budget(torch.tensor([0]), attack) == (None, None)
    with pytest.raises(ValueError, match=r"FRL needs the loss term\(s\) \['kl'\].*pgd_at"):
        make_module(fairness=[FRL()], objective="pgd_at")
    with pytest.raises(ValueError, match=r"frl\.mode=.remargin.*reweight_remargin"):
        FRL(mode="remargin")
