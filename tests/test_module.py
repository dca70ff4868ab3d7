"""RobustFairLitModule with a real Lightning Trainer on real digits data."""

from __future__ import annotations

import pytest
import torch

from confspec_lightning import CSR, AttackConfig
from confspec_lightning import functional as CF
from confspec_lightning.data import DigitsDataModule
from confspec_lightning.models import DigitsCNN

from helpers import CleanTrainingModule, DirectionRecorder, make_module, make_trainer


@pytest.mark.parametrize("objective", ["trades", "pgd_at"])
@pytest.mark.parametrize("source", ["epoch_pass", "streaming"])
def test_fast_dev_run_fit_validate_test(objective, source):
    module = make_module(objective=objective, fairness=[CSR(confusion_source=source)])
    dm = DigitsDataModule(batch_size=32)
    trainer = make_trainer(fast_dev_run=True)
    trainer.fit(module, dm)
    trainer.validate(module, dm)
    trainer.test(module, dm)
    report = module.evaluator.reports["test"]
    assert len(report.robust.classwise_acc) == 10
    assert report.robust.confusion_spectral_norm >= 0


def test_bf16_mixed_precision_trains_and_attacks():
    module = make_module(fairness=[CSR(confusion_source="epoch_pass")])
    trainer = make_trainer(fast_dev_run=True, precision="bf16-mixed")
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    g = module.fairness[0].direction
    assert g.dtype == torch.float32 and not torch.equal(g, torch.ones_like(g))


def test_no_fairness_methods_is_plain_trades():
    module = make_module(fairness=[])
    trainer = make_trainer(fast_dev_run=True)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert set(trainer.callback_metrics) >= {"train/loss_ce", "train/loss_kl"}
    assert "train/loss_csr" not in trainer.callback_metrics


def test_validation_attack_runs_under_inference_mode():
    attack = AttackConfig(eps=0.3, step=0.1, steps=5)
    module = make_module(cls=CleanTrainingModule, objective="pgd_at", fairness=[], eval_attack=attack)
    dm = DigitsDataModule(batch_size=32)
    make_trainer(max_epochs=3, limit_train_batches=None).fit(module, dm)
    trainer = make_trainer(inference_mode=True, limit_val_batches=2)
    trainer.validate(module, dm)
    clean, robust = trainer.callback_metrics["val/clean_acc"], trainer.callback_metrics["val/robust_acc"]
    assert clean > 0.3
    assert robust < clean - 0.1, (clean, robust)


def test_subclass_can_override_the_attack():
    sub = make_module(cls=CleanTrainingModule)
    before = CleanTrainingModule.calls
    make_trainer(fast_dev_run=True).fit(sub, DigitsDataModule(batch_size=32))
    assert CleanTrainingModule.calls == before + 1


def test_epoch_pass_sets_direction_each_epoch():
    recorder = DirectionRecorder()
    module = make_module(fairness=[CSR(confusion_source="epoch_pass")])
    make_trainer(max_epochs=2, callbacks=[recorder]).fit(module, DigitsDataModule(batch_size=32))
    for epoch in (0, 1):
        g = recorder.directions[epoch]
        assert not torch.equal(g, torch.ones(10, 10))
        assert g.min().item() == pytest.approx(0.01, abs=1e-6) and g.max().item() == pytest.approx(2.01, abs=1e-6)
    assert not torch.equal(recorder.directions[0], recorder.directions[1])


def test_streaming_uses_ones_then_last_epochs_confusion():
    recorder = DirectionRecorder()
    module = make_module(fairness=[CSR(confusion_source="streaming")])
    make_trainer(max_epochs=2, callbacks=[recorder]).fit(module, DigitsDataModule(batch_size=32))
    torch.testing.assert_close(recorder.directions[0], torch.ones(10, 10))
    assert not torch.equal(recorder.directions[1], torch.ones(10, 10))


def test_backbone_output_size_mismatch_fails_before_training():
    module = make_module(backbone=DigitsCNN(num_classes=7, width=8))
    trainer = make_trainer(fast_dev_run=True)
    with pytest.raises(ValueError, match=r"shape \(2, 7\).*num_classes=10"):
        trainer.fit(module, DigitsDataModule(batch_size=32))
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: make_module(objective="mat"), r"objective='mat'.*'trades', 'pgd_at', 'mart'"),
        (lambda: make_module(beta=-1.0), r"beta=-1.0"),
        (lambda: make_module(num_classes=1), r"num_classes=1"),
        (lambda: make_module(class_names=["a"]), r"class_names has 1 entries"),
        (lambda: CSR(alpha=1.5), r"csr.alpha=1.5.*\[0, 1\]"),
        (lambda: CSR(alpha=-0.1), r"csr.alpha=-0.1"),
        (lambda: CSR(gamma=1.0), r"csr.gamma=1.0"),
        (lambda: CSR(margin="multiplicative"), r"csr.margin='multiplicative'.*'relative', 'additive'"),
        (lambda: CSR(confusion_source="online"), r"csr.confusion_source='online'.*'epoch_pass', 'streaming'"),
        (lambda: DigitsDataModule(batch_size=0), r"data.batch_size=0"),
        (lambda: DigitsDataModule(val_fraction=1.2), r"data.val_fraction=1.2"),
    ],
)
def test_bad_input_names_value_and_accepted(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_checkpoint_carries_direction_and_confusion_and_resumes(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = DigitsDataModule(batch_size=32)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    module = make_module(fairness=[CSR(confusion_source="streaming")])
    make_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[ckpt_cb]).fit(module, dm)
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    # hard counts without a margin: CSR's stream is the module's shared training confusion
    errors, counts = state["train_confusion.errors"], state["train_confusion.class_counts"]
    assert counts.sum() == 3 * 32  # epoch 1's stream, still to be turned into G
    assert state["fairness.0.confusion.class_counts"].sum() == 0
    torch.testing.assert_close(state["fairness.0.direction"], module.fairness[0].direction)

    recorder = DirectionRecorder()
    resumed = make_module(fairness=[CSR(confusion_source="streaming")])
    trainer = make_trainer(max_epochs=3, callbacks=[recorder])
    trainer.fit(resumed, dm, ckpt_path=tmp_path / "last.ckpt")
    assert list(recorder.directions) == [2]
    expected = CF.spectral_direction(CF.confusion_from_counts(errors, counts)).float()
    torch.testing.assert_close(recorder.directions[2], expected)


def test_train_test_divergence_diagnostic_is_logged_and_reported():
    module = make_module()
    trainer = make_trainer(limit_val_batches=None)
    trainer.fit(module, DigitsDataModule(batch_size=32, train_eval_per_class=10))
    report = module.evaluator.reports["val"]
    train_eval = module.evaluator.reports["train_eval"]
    assert len(train_eval.robust.classwise_acc) == 10
    assert sum(train_eval.class_counts) == 100
    tau = report.divergence.kendall_tau
    assert -1.0 <= tau <= 1.0
    assert trainer.callback_metrics["val/robust_acc_kendall_tau_train"].item() == pytest.approx(tau, abs=1e-6)
    assert "Kendall tau" in report.format_table()
    assert report.to_dict()["divergence"]["train_acc"] == train_eval.robust.classwise_acc


def test_ddp_broadcasts_the_networks_buffers_but_not_the_fairness_state(tmp_path):
    """A real ``DistributedDataParallel`` (gloo, one process) built on the module the way Lightning builds it: the
    fairness methods' buffers (CSR's EMA matrix and warm start, CFA's statistics) are left out of the per-step
    broadcast, the network's BatchNorm statistics are not."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from confspec_lightning.fairness import CFA

    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)
    )
    module = make_module(
        backbone=backbone, fairness=[CSR(form="paper", confusion_source="ema"), CFA(weight_average=False)]
    )
    ignored = set(module._ddp_params_and_buffers_to_ignore)
    assert {"fairness.0.ema_matrix", "fairness.0.subspace", "fairness.1.train_robust_acc"} <= ignored
    assert ignored == {name for name, _ in module.named_buffers() if name.startswith("fairness.")}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(module)
        broadcast = {id(b) for b in ddp.modules_buffers}
        names = {id(b): name for name, b in module.named_buffers()}
        network = {name for name in names.values() if name.startswith("net.")}
        assert {"net.backbone.1.running_mean", "net.normalize.mean"} <= network
        assert {names[i] for i in broadcast} == network
    finally:
        dist.destroy_process_group()
