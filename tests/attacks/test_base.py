"""Evaluation attacks: the Attack interface, PGD and CW as attacks, and a new attack added by one file + config."""

from __future__ import annotations

import textwrap

import pytest
import torch

from confspec_lightning.attacks import CW, PGD, Attack, AttackConfig, AutoAttack, EvalAttackConfig, pgd

from helpers import make_module, make_trainer


def test_keys_name_the_report_columns():
    threat = EvalAttackConfig()
    assert [a.key(threat) for a in (PGD(), CW(), PGD(steps=50), AutoAttack())] == [
        "pgd20",
        "cw20",
        "pgd50",
        "autoattack",
    ]
    with pytest.raises(ValueError, match=r"pgd\.steps=0 is not accepted"):
        PGD(steps=0)
    with pytest.raises(ValueError, match=r"autoattack\.version='plus' is not accepted"):
        AutoAttack(version="plus")


def test_pgd_attack_is_the_pgd_function(tiny_model, digits_batch):
    x, y = digits_batch
    threat = AttackConfig(eps=0.1, step=0.04, steps=3)
    for attack, objective in ((PGD(), "ce"), (CW(), "cw")):
        ours = attack.predictions(tiny_model, x, y, threat=threat, generator=torch.Generator().manual_seed(1))
        x_adv = pgd(tiny_model, x, y, eps=0.1, step=0.04, steps=3, objective=objective,
                    generator=torch.Generator().manual_seed(1))  # fmt: skip
        with torch.no_grad():
            assert torch.equal(ours, tiny_model(x_adv).argmax(1))


TOY = textwrap.dedent(
    '''
    """A new evaluation attack in one file: the clean image shifted by +eps in every pixel (a toy)."""
    import torch
    from confspec_lightning.attacks import Attack

    class Shift(Attack):
        name = "shift"

        def __init__(self, sign: float = 1.0) -> None:
            self.sign = sign

        def predictions(self, model, x, target, *, threat, generator=None, seed=0, progress=None):
            with torch.no_grad():
                return model((x + self.sign * threat.eps).clamp(0, 1)).argmax(1)
    '''
)


def test_a_new_attack_is_one_file_and_a_config_line(tmp_path, monkeypatch, capsys):
    """Register a toy attack by class_path, as a user would: it runs in `confspec test` and gets its column."""
    from confspec_lightning.cli import build_cli

    (tmp_path / "toy_attack.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "attacks.yaml").write_text(
        "model:\n  init_args:\n    test_attacks:\n"
        "      - class_path: confspec_lightning.attacks.PGD\n"
        "      - class_path: toy_attack.Shift\n        init_args: {sign: -1.0}\n"
    )
    args = [
        "--config", "digits/trades", "--config", str(tmp_path / "attacks.yaml"),
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false",
        "--model.init_args.train_attack.steps=1", "--model.init_args.eval_attack.steps=1",
    ]  # fmt: skip
    cli = build_cli(["fit", *args])
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    report = cli.model.evaluator.reports["test"]
    assert list(report.attacks) == ["clean", "pgd1", "shift"]
    assert report.settings["attacks"] == ["PGD", "Shift"]
    assert "shift %" in capsys.readouterr().out  # a column of the printed table


def test_attacks_are_checked_when_the_module_is_built():
    with pytest.raises(TypeError, match=r"test_attacks entries must be Attack instances; got str"):
        make_module(test_attacks=["pgd"])
    module = make_module(test_attacks=[CW()])
    trainer = make_trainer(limit_test_batches=1)
    from confspec_lightning.data import DigitsDataModule

    trainer.test(module, DigitsDataModule(batch_size=16))
    assert list(module.evaluator.reports["test"].attacks) == ["clean", "cw3"]
    assert isinstance(module.test_attacks[0], Attack)
