"""Guarded numerics: no NaN/inf reaches the weights from the regulariser or a baseline's state.

Each case runs on the pure functions / method modules without a Trainer, except the last ones, which check
that a non-finite loss term stops a real ``Trainer.fit`` with a message naming the term, before the
optimizer step.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from confspec_lightning import functional as CF
from confspec_lightning.attacks import PGD
from confspec_lightning.classwise import ClasswiseResult
from confspec_lightning.data import DigitsDataModule
from confspec_lightning.fairness import CFA, CSR, FAAL, FRL, WAT, EpochContext
from confspec_lightning.fairness.faal import faal_class_weights, kl_from_uniform, probability_margins
from confspec_lightning.fairness.frl import self_normalized
from confspec_lightning.fairness.wat import wat_weights
from confspec_lightning.metrics import RobustConfusionMatrix
from confspec_lightning.module import RobustFairLitModule
from confspec_lightning.objectives import ObjectiveOutput, build_objective, combine_terms, cross_entropy

from helpers import QUICK_ATTACK, make_module, make_trainer

K = 4


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def context(
    model: nn.Module | None = None, batches=(), objective=None, epoch: int = 0, train_confusion=None
) -> EpochContext:
    """An EpochContext over fixed batches (no Trainer)."""
    return EpochContext(
        train_confusion=train_confusion if train_confusion is not None else RobustConfusionMatrix(K),
        model=model or nn.Linear(3, K),
        train_batches=lambda: iter(batches),
        validation_batches=lambda: iter(batches),
        attack=QUICK_ATTACK,
        training_attack=PGD(),
        objective=objective or build_objective("trades"),
        epoch=epoch,
    )


def output_for(adv_logits: torch.Tensor, target: torch.Tensor) -> ObjectiveOutput:
    ce = cross_entropy(adv_logits, target)
    return ObjectiveOutput(
        terms={"ce": ce, "kl": torch.rand_like(ce)},
        coefficients={"ce": 1.0, "kl": 6.0},
        adv_logits=adv_logits,
        adv_ce=ce,
    )


# ----------------------------------------------------------------------------------------------------------- CSR
def test_csr_all_zero_confusion_gives_ones_and_finite_loss():
    for rescale in (True, False):
        g = CF.spectral_direction(torch.zeros(K, K), rescale=rescale)
        assert torch.equal(g, torch.ones(K, K, dtype=torch.float64))
    csr = CSR(confusion_source="streaming")
    csr.bind(K)
    assert csr.on_train_epoch_start(context()) == {}  # nothing accumulated: G stays ones
    csr.confusion.update(torch.eye(K) * 5, torch.arange(K))  # all correct: C = 0 with counts > 0
    logs = csr.on_train_epoch_start(context())
    assert torch.equal(csr.direction, torch.ones(K, K))
    assert all(finite(v) for v in logs.values())
    adv = torch.randn(8, K, requires_grad=True)
    target = torch.arange(8) % K
    adjustment = csr.loss_adjustment(output_for(adv, target), target)
    loss, parts = combine_terms(output_for(adv, target), [adjustment])
    loss.backward()
    assert finite(loss) and all(finite(p) for p in parts.values()) and finite(adv.grad)


def test_csr_all_correct_batch_weights():
    logits = torch.eye(K) * 3
    target = torch.arange(K)
    direction = CF.spectral_direction(CF.robust_confusion_matrix(logits, target, K))
    assert torch.equal(CF.csr_weights(direction, logits, target), torch.ones(K))
    assert torch.equal(CF.csr_weights(direction, logits, target, include_diagonal=False), torch.zeros(K))


def test_class_absent_from_batch_and_from_statistics():
    logits = torch.tensor([[0.0, 2.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    target = torch.tensor([0, 1, 1])  # classes 2 and 3 absent
    for normalize in (False, True):
        c = CF.robust_confusion_matrix(logits, target, K, normalize=normalize)
        assert finite(c)
        g = CF.spectral_direction(c)
        assert finite(g) and float(g.min()) >= 0.01 - 1e-12
    errors = CF.confusion_from_predictions(logits.argmax(1), target, K)
    counts = CF.counts_per_class(target, K)
    acc = CF.classwise_accuracy(errors, counts)
    assert acc[2:].isnan().all() and finite(acc[:2])  # undefined, never a silent 0 ...
    # ... and every consumer replaces it before it reaches a weight: CSR's log, CFA's R_c
    csr = CSR(confusion_source="streaming")
    csr.bind(K)
    csr.confusion.update(logits, target)
    logs = csr.on_train_epoch_start(context())
    assert all(finite(v) for v in logs.values()) and finite(csr.direction)


def test_spectral_direction_huge_counts_do_not_overflow():
    c = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    reference = CF.spectral_direction(c)
    for scale in (1e-300, 1e300, 5e307):
        g = CF.spectral_direction(c * scale)
        assert finite(g)
        torch.testing.assert_close(g, reference)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_spectral_direction_rejects_non_finite_or_negative_entries(bad):
    c = torch.ones(3, 3)
    c[0, 1] = bad
    with pytest.raises(ValueError, match=r"confusion holds the entry .*finite, non-negative"):
        CF.spectral_direction(c)


# ---------------------------------------------------------------------------------------------------------- FAAL
def test_faal_all_margins_equal_is_uniform():
    present = torch.ones(K, dtype=torch.bool)
    q = faal_class_weights(torch.full((K,), 0.3), present)
    torch.testing.assert_close(q, torch.full((K,), 1 / K, dtype=torch.float64))


def test_faal_one_class_in_batch():
    faal = FAAL()
    faal.bind(K)
    target = torch.full((5,), 2)
    weights = faal.class_weights(torch.randn(5, K), target)
    assert weights.tolist() == [0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("radius", [5e-324, 1e-300, 1e-12, 0.5, 30.0, 50.0, 700.0, 1e6, 1e300])
@pytest.mark.parametrize("iterations", [1, 60])
def test_faal_bisection_at_the_edges(radius, iterations):
    gen = torch.Generator().manual_seed(0)
    present = torch.tensor([True, True, False, True, True, True])
    for scores in (
        torch.randn(6, generator=gen) * 3,
        torch.tensor([1e6, -1e6, 0.0, 5.0, 5.0, -3.0]),  # extreme
        torch.tensor([1.0, 1.0 + 1e-10, 7.0, 1.0, 1.0, 1.0]),  # nearly equal (spread below 1e-9)
    ):
        q = faal_class_weights(scores, present, radius, iterations)
        assert finite(q), (radius, iterations, q)
        assert float(q[~present].abs().sum()) == 0.0 and float(q.min()) >= 0.0
        assert math.isclose(float(q.sum()), 1.0, rel_tol=1e-9)
        if iterations == 60 and radius < 700:  # converged (beyond ~700 q is 1-hot up to float64's range)
            assert float(kl_from_uniform(q, present)) <= radius * (1 + 1e-6) + 1e-12


def test_faal_extreme_logits_margins():
    logits = torch.tensor([[1e4, -1e4, 0.0, 0.0], [-1e4, 1e4, 0.0, 0.0]], dtype=torch.float16)
    margins = probability_margins(logits, torch.tensor([1, 1]))
    assert margins.tolist() == [1.0, -1.0]
    faal = FAAL(radius=0.5)
    faal.bind(K)
    assert finite(faal.class_weights(logits, torch.tensor([1, 1])))


# ----------------------------------------------------------------------------------------------------------- WAT
def test_wat_softmax_is_stable_for_huge_cumulative_losses():
    for cumulative, eta in (
        (torch.tensor([1e308, -1e308, 0.0, 5.0, 1.0], dtype=torch.float64), 10.0),
        (torch.tensor([1e6, 1e6 - 1.0, 0.0, 0.0, 0.0], dtype=torch.float64), 0.1),
        (torch.tensor([1e308, 1e308, 1e308, 1e308, 1e308], dtype=torch.float64), 1e300),
        (torch.tensor([1e308, -1e308, 0.0, 5.0, 1.0], dtype=torch.float64), 0.0),
    ):
        w = wat_weights(cumulative, eta)
        assert finite(w), (cumulative, eta, w)
        assert math.isclose(float(w.sum()), K, rel_tol=1e-12)
    torch.testing.assert_close(
        wat_weights(torch.tensor([1e6, 1e6 - 1.0, 0.0, 0.0, 0.0], dtype=torch.float64), 1.0)[:2],
        K * torch.softmax(torch.tensor([1.0, 0.0], dtype=torch.float64), 0),
    )


class NaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * float("nan")


def test_wat_refuses_a_non_finite_validation_loss():
    wat = WAT()
    wat.bind(K)
    batches = [(torch.rand(8, 3), torch.arange(8) % K)]
    with pytest.raises(FloatingPointError, match=r"wat: the validation loss of class 0.*not finite.*after epoch 3"):
        wat.on_train_epoch_end(context(NaNModel(), batches, epoch=3))
    assert torch.equal(wat.cumulative_loss, torch.zeros(K + 1, dtype=torch.float64))  # state untouched


# ----------------------------------------------------------------------------------------------------------- FRL
def test_frl_multipliers_with_zero_counts():
    frl = FRL(mode="reweight_remargin")
    frl.bind(K)
    zeros = torch.zeros(K, dtype=torch.float64)
    names = [str(c) for c in range(K)]
    clean = robust = ClasswiseResult.from_counts(zeros, zeros, names)  # no validation sample of any class
    for epoch in range(3):
        frl.update_multipliers(clean.accuracy(empty=1.0), robust.accuracy(empty=1.0), epoch)
    counts = torch.tensor([0.0, 5.0, 0.0, 3.0], dtype=torch.float64)
    clean = ClasswiseResult.from_counts(torch.tensor([0.0, 5.0, 0.0, 0.0]).double(), counts, names)
    robust = ClasswiseResult.from_counts(torch.zeros(K).double(), counts, names)
    for epoch in range(50):
        frl.update_multipliers(clean.accuracy(empty=1.0), robust.accuracy(empty=1.0), epoch)
    w_nat, w_bndy = frl.class_weights()
    assert finite(w_nat) and finite(w_bndy) and float(w_nat.min()) >= 0 and float(w_bndy.min()) >= 0
    assert finite(frl.eps_multiplier())
    assert float(frl.multiplier_nat.sum()) <= 0.5 + 1e-12
    # a batch whose classes all have weight 0: self-normalisation stays finite
    assert torch.equal(self_normalized(torch.zeros(6)), torch.zeros(6))
    target = torch.tensor([1, 1, 3])
    adjustment = frl.loss_adjustment(output_for(torch.randn(3, K), target), target)
    assert all(finite(torch.as_tensor(w)) for w in adjustment.term_weights.values())


def test_frl_multiplier_sum_above_one_is_refused():
    # w[c] = 1/K + lam[c] - mean(lam) could be negative with sum(lam) > 1: negative weights are refused up front
    with pytest.raises(ValueError, match=r"frl\.max_multiplier_sum=1\.5.*\[0, 1\]"):
        FRL(max_multiplier_sum=1.5)


# ----------------------------------------------------------------------------------------------------------- CFA
def test_cfa_empty_class():
    model = nn.Linear(3, K)
    cfa = CFA(warmup_epochs=0, weight_average=False)
    cfa.bind(K, model)
    confusion = RobustConfusionMatrix(K)  # the module's shared training confusion
    cfa.on_train_epoch_start(context(model, train_confusion=confusion))  # no statistics at all yet
    assert torch.equal(cfa.train_robust_acc, torch.ones(K, dtype=torch.float64))
    target = torch.tensor([0, 0, 1, 1])  # classes 2, 3 empty
    logits = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 3.0, 0, 0], [0, 3.0, 0, 0]])
    confusion.update(logits, target)
    logs = cfa.on_train_epoch_start(context(model, epoch=1, train_confusion=confusion))
    assert cfa.train_robust_acc.tolist() == [0.5, 1.0, 1.0, 1.0]  # empty classes: 1, not NaN
    assert all(finite(v) for v in logs.values())
    eps, step = cfa.attack_budget(torch.arange(K), QUICK_ATTACK)
    assert finite(eps) and finite(step) and float(eps.min()) > 0
    adjustment = cfa.loss_adjustment(output_for(logits, target), target)
    assert all(finite(torch.as_tensor(w)) for w in adjustment.term_weights.values())


# ------------------------------------------------------------------------------------- non-finite loss stops fit
class NaNTermModule(RobustFairLitModule):
    """Makes the KL term NaN on the ``bad_call``-th training step (a real subclass hook)."""

    bad_call = 2

    def compute_objective(self, x, x_adv, target):
        output = super().compute_objective(x, x_adv, target)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls - 1 == self.bad_call:
            self.weights_before_bad_step = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            output.terms["kl"] = output.terms["kl"] * float("nan")
        return output


def test_non_finite_term_stops_fit_before_the_weight_update():
    module = make_module(fairness=[CSR(confusion_source="streaming")], cls=NaNTermModule)
    trainer = make_trainer(max_epochs=1, limit_train_batches=5)
    with pytest.raises(FloatingPointError) as info:
        trainer.fit(module, DigitsDataModule(batch_size=16))
    message = str(info.value)
    assert "the loss term 'kl' is not finite (nan) at epoch 0, batch 2" in message
    assert "before this step's weight update" in message
    assert "learning rate" in message and "bf16-mixed instead of 16-mixed" in message
    assert trainer.global_step == 2  # batches 0 and 1 were optimizer steps, batch 2 was not
    for key, value in module.net.state_dict().items():
        assert torch.equal(value, module.weights_before_bad_step[key]), key


def test_non_finite_sum_of_finite_terms_is_named():
    module = make_module(fairness=[], optimizer=partial(torch.optim.SGD, lr=0.1))
    parts = {"ce": torch.tensor(3e38), "kl": torch.tensor(3e38)}
    with pytest.raises(
        FloatingPointError, match=r"the loss \(sum of the finite terms 'ce', 'kl'\) is not finite \(inf\)"
    ):
        module.check_finite(parts["ce"] + parts["kl"], parts, 7)
    module.check_finite(torch.tensor(1.0), {"ce": torch.tensor(1.0)}, 0)  # finite: no error


class DeferredCheckModule(NaNTermModule):
    """Reads the NaN/inf flag every 3 steps, as on an accelerator (a real subclass hook, here on the CPU)."""

    nonfinite_check_interval = 3
    bad_call = 1

    def defer_finite_check(self, device):
        return True


def test_deferred_check_names_the_first_bad_step():
    module = make_module(fairness=[], cls=DeferredCheckModule)
    trainer = make_trainer(max_epochs=1, limit_train_batches=5)
    with pytest.raises(FloatingPointError) as info:
        trainer.fit(module, DigitsDataModule(batch_size=16))
    message = str(info.value)
    assert "the loss term 'kl' is not finite (nan) at epoch 0, batch 1" in message
    assert "steps since then updated the weights" in message
    assert trainer.global_step == 2  # read at the third step (batch 2), before its update
