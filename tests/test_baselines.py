"""FRL, FAAL, CFA, WAT and DAFA: state updates on hand-computed statistics, losses, checkpoints and resume."""

from __future__ import annotations

import itertools
import math
import operator

import pytest
import torch

from confspec_lightning import AttackConfig
from confspec_lightning.data import DigitsDataModule
from confspec_lightning.fairness import CFA, CSR, DAFA, FAAL, FRL, WAT
from confspec_lightning.fairness.cfa import cfa_class_eps, cfa_trades_weights, ema_update
from confspec_lightning.fairness.dafa import dafa_weights
from confspec_lightning.fairness.faal import faal_class_weights, kl_from_uniform, probability_margins
from confspec_lightning.fairness.frl import (
    frl_class_weights,
    frl_eps_multiplier,
    frl_multiplier_step,
    frl_violations,
    self_normalized,
)
from confspec_lightning.fairness.statistics import classwise_sum
from confspec_lightning.fairness.wat import wat_loss_vector, wat_weights
from confspec_lightning.objectives import ObjectiveOutput, combine_terms

from helpers import QUICK_ATTACK, make_module, make_trainer


def trades_output(batch: int = 6, classes: int = 3, seed: int = 0) -> tuple[ObjectiveOutput, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    target = torch.arange(batch) % classes
    ce = torch.rand(batch, generator=gen) + 0.1
    kl = torch.rand(batch, generator=gen) + 0.1
    adv_logits = torch.randn(batch, classes, generator=gen)
    output = ObjectiveOutput(
        terms={"ce": ce, "kl": kl}, coefficients={"ce": 1.0, "kl": 6.0}, adv_logits=adv_logits, adv_ce=ce
    )
    return output, target


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


# -------------------------------------------------------------------- FAAL
def brute_force_faal(scores: torch.Tensor, radius: float, steps: int = 400) -> float:
    best = -math.inf
    grid = torch.linspace(1e-4, 1 - 1e-4, steps, dtype=torch.float64)
    for q0, q1 in itertools.product(grid, grid):
        if q0 + q1 >= 1:
            continue
        q = torch.stack([q0, q1, 1 - q0 - q1])
        if kl_from_uniform(q, torch.ones(3, dtype=torch.bool)) <= radius:
            best = max(best, float((scores * q).sum()))
    return best


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


# --------------------------------------------------------------------- CFA
def test_cfa_class_eps_and_trades_weights_hand_computed():
    acc = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(cfa_class_eps(acc, 0.1), torch.tensor([0.05, 0.1, 0.15], dtype=torch.float64))
    b = cfa_trades_weights(acc, beta=6.0)  # beta_c = 3, 6, 9
    torch.testing.assert_close(b, torch.tensor([3 / 4, 6 / 7, 9 / 10], dtype=torch.float64))


def test_cfa_loss_budget_and_state_from_training_predictions():
    cfa = CFA(warmup_epochs=0, weight_average=False)
    cfa.bind(3)
    output, target = trades_output()
    # a fake previous epoch: class 0 always right, class 1 half, class 2 never
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0.1, 0, 0], [5.0, 0, 0]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    cfa.on_train_batch_end(ObjectiveOutput({}, {}, logits, torch.zeros(6)), labels)
    context = type("Ctx", (), {"epoch": 0})()
    cfa.on_train_epoch_start(context)
    torch.testing.assert_close(cfa.train_robust_acc, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    attack = AttackConfig(eps=0.1, step=0.025, steps=3)
    eps, step = cfa.attack_budget(target, attack)
    torch.testing.assert_close(eps, torch.tensor([0.15, 0.1, 0.05] * 2))
    torch.testing.assert_close(step, eps / 4)
    loss, _ = combine_terms(output, [cfa.loss_adjustment(output, target)])
    b = torch.tensor([9 / 10, 6 / 7, 3 / 4] * 2)
    expected = ((1 - b) * output.terms["ce"] + b * output.terms["kl"]).mean()
    torch.testing.assert_close(loss, expected)
    # before warm-up ends: the plain base
    late = CFA(warmup_epochs=5, weight_average=False)
    late.bind(3)
    late.on_train_batch_end(ObjectiveOutput({}, {}, logits, torch.zeros(6)), labels)
    late.on_train_epoch_start(context)
    assert late.attack_budget(target, attack) == (None, None)
    assert late.loss_adjustment(output, target).term_weights == {}


def test_ema_update():
    avg = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    ema_update(avg, {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(7)}, decay=0.88, first=False)
    torch.testing.assert_close(avg["w"], torch.tensor([0.88 * 1 + 0.12 * 3, 0.88 * 2 + 0.12 * 4]))
    assert int(avg["n"]) == 7
    ema_update(avg, {"w": torch.tensor([5.0, 6.0]), "n": torch.tensor(1)}, decay=0.88, first=True)
    torch.testing.assert_close(avg["w"], torch.tensor([5.0, 6.0]))


def test_cfa_evaluates_the_averaged_weights(chdir_tmp):
    dm = DigitsDataModule(batch_size=64)
    module = make_module(fairness=[CFA(warmup_epochs=1, average_threshold=0.0)])
    make_trainer(max_epochs=2, limit_train_batches=2).fit(module, dm)
    cfa = module.fairness[0]
    assert int(cfa.average_updates) == 2  # threshold 0: both epochs entered the average
    average = cfa.evaluation_weights()
    trained = {k: v.clone() for k, v in module.net.state_dict().items()}
    assert any(not torch.equal(average[k], trained[k]) for k in trained if trained[k].is_floating_point())
    seen = {}

    def record(net, args):
        seen["w"] = net.backbone.features[0].weight.detach().clone()  # the last forward: a test step

    hook = module.net.register_forward_pre_hook(record)
    make_trainer().test(module, dm)
    hook.remove()
    torch.testing.assert_close(seen["w"], average["backbone.features.0.weight"])  # test ran on the average
    for key, value in module.net.state_dict().items():
        torch.testing.assert_close(value, trained[key])  # and the trained weights are back


# --------------------------------------------------------------------- WAT
def test_wat_weights_and_loss_hand_computed():
    cumulative = torch.tensor([1.0, 2.0, 4.0, 2.0], dtype=torch.float64)
    w = wat_weights(cumulative, eta=0.1)
    e = torch.exp(0.1 * cumulative)
    torch.testing.assert_close(w, 3 * e / e.sum())
    vec = wat_loss_vector(torch.tensor([2.0, 0.0, 6.0], dtype=torch.float64), torch.tensor([2.0, 0.0, 3.0]))
    torch.testing.assert_close(vec, torch.tensor([1.0, 0.0, 2.0, 8 / 5], dtype=torch.float64))
    wat = WAT(eta=0.1)
    wat.bind(3)
    wat.cumulative_loss.copy_(cumulative)
    output, target = trades_output()
    loss, _ = combine_terms(output, [wat.loss_adjustment(output, target)])
    per_sample = output.terms["ce"] + 6.0 * output.terms["kl"]
    wf = w.float()
    expected = (wf[target] * per_sample).mean() + wf[3] * per_sample.mean()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match=r"wat\.eta=-1"):
        WAT(eta=-1)


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
    context = EpochContext(None, list, list, QUICK_ATTACK, None, epoch=0)
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

    context = EpochContext(None, list, list, QUICK_ATTACK, None, epoch=0)
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


# ------------------------------------------------- checkpoints and resume
STATE_KEYS = {
    "frl": ["multiplier_nat", "multiplier_bndy", "multiplier_margin"],
    "faal": ["weight_sum", "weight_batches"],
    "cfa": ["train_robust_acc", "has_statistics", "average_updates", "train_confusion.errors"],
    "wat": ["cumulative_loss"],
    "dafa": ["weights", "frozen", "probabilities.probability_sums"],
}


def build(name: str):
    return {
        "frl": lambda: FRL(mode="reweight_remargin", tau=0.0, eval_steps=2),
        "faal": lambda: FAAL(),
        "cfa": lambda: CFA(warmup_epochs=1, average_threshold=0.0, average_eval_steps=2),
        "wat": lambda: WAT(eta=1.0),
        "dafa": lambda: DAFA(warmup_epochs=1),
    }[name]()


@pytest.mark.parametrize("name", ["frl", "faal", "cfa", "wat", "dafa"])
def test_state_round_trip_and_exact_resume(name, chdir_tmp):
    """Two epochs in one go = one epoch, a checkpoint, and a resumed second epoch (state and weights)."""
    dm = DigitsDataModule(batch_size=64, shuffle=False)
    straight = make_module(
        fairness=[build(name)], train_attack=AttackConfig(eps=0.1, step=0.04, steps=2, random_start=False)
    )
    make_trainer(max_epochs=2, limit_train_batches=2).fit(straight, dm)

    first = make_module(
        fairness=[build(name)], train_attack=AttackConfig(eps=0.1, step=0.04, steps=2, random_start=False)
    )
    trainer = make_trainer(max_epochs=1, limit_train_batches=2)
    trainer.fit(first, dm)
    trainer.save_checkpoint("epoch0.ckpt")
    state = torch.load("epoch0.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for key in STATE_KEYS[name]:
        assert f"fairness.0.{key}" in state, key
    assert int(state["fairness.epoch_end_done"]) == 0
    resumed = make_module(
        fairness=[build(name)], train_attack=AttackConfig(eps=0.1, step=0.04, steps=2, random_start=False)
    )
    make_trainer(max_epochs=2, limit_train_batches=2).fit(resumed, dm, ckpt_path="epoch0.ckpt")
    final_straight, final_resumed = straight.state_dict(), resumed.state_dict()
    assert final_straight.keys() == final_resumed.keys()
    for key, value in final_straight.items():
        torch.testing.assert_close(final_resumed[key], value, msg=key, rtol=1e-5, atol=1e-6)
    assert int(final_resumed["fairness.epoch_end_done"]) == 1
    if name == "wat":  # two validation passes added, neither repeated nor skipped by the resume
        assert not torch.equal(final_resumed["fairness.0.cumulative_loss"], torch.zeros(11, dtype=torch.float64))


def test_methods_stack_and_conflicting_budgets_are_refused(chdir_tmp):
    dm = DigitsDataModule(batch_size=64)
    module = make_module(fairness=[FAAL(), CSR(confusion_source="streaming")])
    make_trainer(max_epochs=1, limit_train_batches=2).fit(module, dm)
    # refused when the module is built, not epochs later when the second budget first applies
    with pytest.raises(ValueError, match=r"two fairness methods both set per-sample attack budgets \(FRL and CFA"):
        make_module(fairness=[FRL(eval_steps=1), CFA(warmup_epochs=10, weight_average=False)])
    with pytest.raises(ValueError, match=r"\(CFA and DAFA"):
        make_module(fairness=[CFA(), DAFA()])
    make_module(fairness=[FRL(mode="reweight"), CFA(), CSR()])  # FRL RW and CSR set no budget


@pytest.mark.parametrize("name", ["frl", "faal", "cfa", "wat", "dafa"])
def test_methods_under_bf16_mixed(name, chdir_tmp):
    dm = DigitsDataModule(batch_size=64)
    module = make_module(fairness=[build(name)], train_attack=QUICK_ATTACK)
    make_trainer(max_epochs=2, limit_train_batches=2, precision="bf16-mixed").fit(module, dm)
    method = module.fairness[0]
    for key in STATE_KEYS[name]:
        value = operator.attrgetter(key)(method)
        if value.is_floating_point():
            assert value.dtype == torch.float64 and torch.isfinite(value).all(), key
    for values in method.classwise_state().values():
        assert torch.isfinite(values).all()


@pytest.mark.parametrize(
    ("config", "tags"),
    [
        ("frl_rwrm", ["frl/weight_nat/0", "frl/weight_bndy/9", "frl/eps_multiplier/3", "frl/val_boundary_error_worst"]),
        ("faal", ["faal/weight/0", "faal/weight/9"]),
        ("cfa", ["cfa/train_robust_acc/0", "cfa/average_updated", "cfa/val_robust_acc_worst"]),
        ("wat", ["wat/weight/0", "wat/weight_average_entry", "wat/val_loss_worst"]),
        ("dafa", ["dafa/weight/0", "dafa/weight/9", "dafa/active"]),
    ],
)
def test_per_class_state_reaches_tensorboard(config, tags, chdir_tmp):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from confspec_lightning.cli import build_cli

    from conftest import ROOT

    build_cli(
        [
            "fit",
            "--config",
            str(ROOT / f"configs/digits/{config}.yaml"),
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.train_attack.steps=2",
            "--model.init_args.eval_attack.steps=2",
        ]
    )
    (events,) = (chdir_tmp / f"runs/digits_{config}/version_0").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    logged = set(accumulator.Tags()["scalars"])
    assert set(tags) <= logged, sorted(t for t in logged if t.startswith(config[:3]))
    assert len(accumulator.Scalars(tags[0])) == 2  # once per epoch
