"""Threat models (AttackConfig: checks, coercion from checkpoints) and the eval-mode context of attacks."""

from __future__ import annotations

from dataclasses import asdict

import pytest
from torch import nn

from confspec_lightning.attacks import AttackConfig, EvalAttackConfig, TrainAttackConfig, eval_mode


def test_eval_mode_restores_each_submodule():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"eps": 0.0}, r"attack.eps=0.0.*> 0"),
        ({"eps": -1.0}, r"attack.eps=-1.0"),
        ({"step": 0}, r"attack.step=0"),
        ({"steps": 0}, r"attack.steps=0.*integer >= 1"),
        ({"norm": "l1"}, r"attack.norm='l1'.*'linf', 'l2'"),
    ],
)
def test_attack_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttackConfig(**kwargs)


def test_coerce_takes_a_config_or_the_dict_a_checkpoint_stores():
    train = TrainAttackConfig(eps=0.1, step=0.02, steps=3)
    assert TrainAttackConfig.coerce("train_attack", train) is train
    assert TrainAttackConfig.coerce("train_attack", asdict(train)) == train
    assert isinstance(EvalAttackConfig.coerce("eval_attack", {"steps": 5}), EvalAttackConfig)
    with pytest.raises(ValueError, match=r"train_attack=\{'epsilon': 0.1\} is not accepted; its fields are norm"):
        TrainAttackConfig.coerce("train_attack", {"epsilon": 0.1})
    with pytest.raises(TypeError, match=r"eval_attack=0.1 is not accepted; it must be an AttackConfig"):
        EvalAttackConfig.coerce("eval_attack", 0.1)
