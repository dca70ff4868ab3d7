"""Every baseline in the stack: checkpoint round trip and exact resume, stacking and refused conflicts,
bf16-mixed, per-class state in TensorBoard."""

from __future__ import annotations

import operator

import pytest
import torch

from confspec_lightning import AttackConfig
from confspec_lightning.data import DigitsDataModule
from confspec_lightning.fairness import CFA, CSR, DAFA, FAAL, FRL, WAT

from helpers import QUICK_ATTACK, make_module, make_trainer

# ------------------------------------------------- checkpoints and resume
STATE_KEYS = {
    "frl": ["multiplier_nat", "multiplier_bndy", "multiplier_margin"],
    "faal": ["weight_sum", "weight_batches"],
    "cfa": ["train_robust_acc", "has_statistics", "average_updates"],
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
    assert "train_confusion.errors" in state  # the module's shared training confusion (CFA reads it)
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

    from helpers import ROOT

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
