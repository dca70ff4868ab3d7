"""DAFA: class weights W by hand, the warm-up statistics, budgets and the natural CE, the clamp."""

from __future__ import annotations

import pytest
import torch

from confspec_lightning.data import DigitsDataModule
from confspec_lightning.fairness import DAFA
from confspec_lightning.fairness.dafa import dafa_weights
from confspec_lightning.objectives import ObjectiveOutput, combine_terms

from helpers import QUICK_ATTACK, make_module, make_trainer, trades_output


# -------------------------------------------------------------------- DAFA
def test_dafa_weights_hand_computed():
    # rows = true class; diag 0.6 < 0.7 < 0.8: class 0 is the hardest
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    # W0 = 1 + 0.3*0.7 + 0.1*0.8; W1 = 1 - 0.3*0.7 + 0.1*0.8; W2 = 1 - 0.1*0.8 - 0.1*0.8
    torch.testing.assert_close(dafa_weights(p), torch.tensor([1.29, 0.87, 0.84], dtype=torch.float64))
    torch.testing.assert_close(dafa_weights(p, lam=1.5), 1 + 1.5 * (dafa_weights(p) - 1))
    # equally hard classes subtract from each other (the "else" branch)
    tied = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(dafa_weights(tied), torch.tensor([0.75, 0.75], dtype=torch.float64))


def test_dafa_records_the_last_warmup_epoch_then_reweights_budget_and_natural_ce():
    from confspec_lightning.fairness.base import EpochContext

    dafa = DAFA(warmup_epochs=2, lam=1.0)
    dafa.bind(3)
    output, target = trades_output(batch=6, classes=3)
    context = EpochContext(None, list, list, QUICK_ATTACK, None, None, epoch=0)
    dafa.on_train_epoch_start(context)
    dafa.on_train_batch_end(output, target)  # epoch 0: not recorded
    assert int(dafa.probabilities.class_counts.sum()) == 0
    assert dafa.attack_budget(target, QUICK_ATTACK) == (None, None)
    context.epoch = 1
    dafa.on_train_epoch_start(context)
    dafa.on_train_batch_end(output, target)
    probabilities = torch.zeros(3, 3, dtype=torch.float64)
    softmax = output.adv_logits.softmax(1).double()
    for c in range(3):
        probabilities[c] = softmax[target == c].mean(0)
    dafa.on_train_epoch_end(context)
    expected = dafa_weights(probabilities).clamp_min(0.1)
    torch.testing.assert_close(dafa.weights, expected)
    expected = expected.float()
    assert bool(dafa.frozen)
    context.epoch = 2
    dafa.on_train_epoch_start(context)
    eps, step = dafa.attack_budget(target, QUICK_ATTACK)
    torch.testing.assert_close(eps, expected[target] * QUICK_ATTACK.eps)
    torch.testing.assert_close(step, expected[target] * QUICK_ATTACK.step)
    loss, _ = combine_terms(output, [dafa.loss_adjustment(output, target)])
    ce, kl = output.terms["ce"], output.terms["kl"]
    torch.testing.assert_close(loss, (expected[target] * ce).mean() + 6.0 * kl.mean())
    with pytest.raises(ValueError, match=r"dafa\.min_weight=0"):
        DAFA(min_weight=0)


def test_dafa_clamps_negative_weights_with_a_warning():
    dafa = DAFA(warmup_epochs=1, lam=10.0)
    dafa.bind(2)
    logits = torch.tensor([[4.0, 0.0], [0.0, 1.0]])  # class 0 easy, class 1 hard: W0 = 1 - 10 * ... < 0
    target = torch.tensor([0, 1])
    output = ObjectiveOutput(terms={}, coefficients={}, adv_logits=logits, adv_ce=torch.zeros(2))
    from confspec_lightning.fairness.base import EpochContext

    context = EpochContext(None, list, list, QUICK_ATTACK, None, None, epoch=0)
    dafa.on_train_epoch_start(context)
    dafa.on_train_batch_end(output, target)
    with pytest.warns(UserWarning, match=r"dafa: class weights below dafa.min_weight=0.1 were clamped"):
        dafa.on_train_epoch_end(context)
    assert float(dafa.weights.min()) == pytest.approx(0.1) and bool((dafa.weights > 0).all())


def test_dafa_finetuning_statistics_pass_before_the_first_epoch(chdir_tmp):
    module = make_module(fairness=[DAFA(warmup_epochs=0)], train_attack=QUICK_ATTACK)
    make_trainer(max_epochs=1, limit_train_batches=2).fit(module, DigitsDataModule(batch_size=64))
    dafa = module.fairness[0]
    assert bool(dafa.frozen) and not torch.equal(dafa.weights, torch.ones(10))
