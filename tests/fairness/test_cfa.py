"""CFA: class-wise eps and TRADES weights, training statistics, fairness-aware weight averaging."""

from __future__ import annotations

import torch

from confspec_lightning import AttackConfig
from confspec_lightning.data import DigitsDataModule
from confspec_lightning.fairness import CFA
from confspec_lightning.fairness.cfa import cfa_class_eps, cfa_trades_weights, ema_update
from confspec_lightning.metrics import RobustConfusionMatrix
from confspec_lightning.objectives import combine_terms

from helpers import make_module, make_trainer, trades_output

#: a deterministic training attack (no random start): a resumed fit repeats an uninterrupted one
QUICK_NO_START = AttackConfig(eps=0.1, step=0.04, steps=3, random_start=False)


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
    confusion = RobustConfusionMatrix(3)  # the module's shared training confusion, after a fake epoch
    confusion.update(logits, labels)
    context = type("Ctx", (), {"epoch": 0, "train_confusion": confusion})()
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


def test_the_weight_average_is_no_buffer_and_a_checkpoint_restores_it_exactly(chdir_tmp):
    """DDP broadcasts every buffer from rank 0 at each step: the average (a copy of the model) is the method's extra
    state instead, saved in the checkpoint (fairness.0._extra_state) and restored bit for bit, and a fit resumed
    from epoch 1's checkpoint ends with the average of an uninterrupted one."""
    dm = DigitsDataModule(batch_size=64, shuffle=False)
    options = dict(warmup_epochs=1, average_threshold=0.0, average_eval_steps=2)
    trainer_options = dict(limit_train_batches=2, enable_checkpointing=True, deterministic=True)
    module = make_module(fairness=[CFA(**options)], train_attack=QUICK_NO_START)
    assert not [name for name, _ in module.named_buffers() if "average." in name]
    make_trainer(max_epochs=3, **trainer_options).fit(module, dm)
    uninterrupted = {k: v.clone() for k, v in module.fairness[0].evaluation_weights().items()}

    first = make_module(fairness=[CFA(**options)], train_attack=QUICK_NO_START)
    trainer = make_trainer(max_epochs=2, **trainer_options)
    trainer.fit(first, dm)
    trainer.save_checkpoint("epoch1.ckpt")
    state = torch.load("epoch1.ckpt", weights_only=True)["state_dict"]
    saved = state["fairness.0._extra_state"]
    assert set(saved) == set(first.net.state_dict())
    for key, value in first.fairness[0].evaluation_weights().items():
        assert torch.equal(saved[key], value)
    resumed = make_module(fairness=[CFA(**options)], train_attack=QUICK_NO_START)
    make_trainer(max_epochs=3, **trainer_options).fit(resumed, dm, ckpt_path="epoch1.ckpt")
    for key, value in resumed.fairness[0].evaluation_weights().items():
        torch.testing.assert_close(value, uninterrupted[key], rtol=0, atol=0, msg=key)


def test_a_checkpoint_with_the_old_average_buffers_still_loads():
    module = make_module(fairness=[CFA(warmup_epochs=1)])
    state = module.state_dict()
    average = state.pop("fairness.0._extra_state")
    for key in average:  # 0.1 stored the average as buffers named average.<key with '.' -> '__'>
        state["fairness.0.average." + key.replace(".", "__")] = torch.full_like(average[key], 0.5)
    module.load_state_dict(state)
    restored = module.fairness[0].average
    assert set(restored) == set(average) and all(
        torch.all(v == 0.5) for v in restored.values() if v.is_floating_point()
    )
