"""Properties of the PGD attacks (plain torch, no Trainer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from confspec_lightning.attacks import attack_objective_value, pgd


def linf(d):
    return d.flatten(1).abs().amax(1)


def l2(d):
    return d.flatten(1).norm(dim=1)


@pytest.mark.parametrize("objective", ["ce", "trades_kl"])
@pytest.mark.parametrize("norm,eps,step", [("linf", 0.1, 0.025), ("l2", 0.5, 0.1)])
def test_budget_range_and_loss_increase(tiny_model, digits_batch, norm, eps, step, objective):
    x, y = digits_batch
    x_adv = pgd(tiny_model, x, y, eps=eps, step=step, steps=10, norm=norm, objective=objective)
    size = linf(x_adv - x) if norm == "linf" else l2(x_adv - x)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    before = attack_objective_value(tiny_model, x, x, y, objective)
    after = attack_objective_value(tiny_model, x, x_adv, y, objective)
    assert after.mean() > before.mean()
    assert (after >= before - 1e-4).float().mean() > 0.9  # per sample, almost always


def test_per_sample_eps(tiny_model, digits_batch):
    x, y = digits_batch
    eps = torch.linspace(0.01, 0.2, x.shape[0])
    x_adv = pgd(tiny_model, x, y, eps=eps, step=eps / 4, steps=5)
    assert (linf(x_adv - x) <= eps + 1e-6).all()
    assert (linf(x_adv - x) > 0.5 * eps).all()
    with pytest.raises(ValueError, match=r"shape \(64,\)"):
        pgd(tiny_model, x, y, eps=torch.ones(3))


def test_no_parameter_grads_and_modes_restored(digits_batch):
    x, y = digits_batch
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.LazyLinear(10)
    )
    model(x)  # materialise the lazy layer
    model.train()
    model[1].eval()  # a frozen BatchNorm stays frozen
    stats = model[1].running_mean.clone()
    pgd(model, x, y, steps=3)
    assert all(p.grad is None for p in model.parameters())
    assert model.training and not model[1].training and model[4].training
    torch.testing.assert_close(model[1].running_mean, stats)  # attacked in eval mode: BN stats untouched


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_attack_inside_inference_mode(tiny_model, digits_batch, context):
    x, y = digits_batch
    with context():
        x_in = x.clone()
        x_adv = pgd(tiny_model, x_in, y, eps=0.1, step=0.025, steps=5)
        assert (linf(x_adv - x_in) > 0).all()


def test_fp16_autocast_does_not_collapse(tiny_model, digits_batch):
    """A confident model under fp16 autocast: every sample is still perturbed, as strongly as in fp32."""
    x, y = digits_batch
    model = tiny_model
    # make the model confident so that plain CE gradients are tiny
    with torch.no_grad():
        model[1].classifier[-1].weight.mul_(40)
    with torch.autocast("cpu", dtype=torch.float16):
        assert model(x).dtype == torch.float16
        x_adv = pgd(model, x, y, eps=0.1, step=0.025, steps=5, random_start=False)
    moved = linf(x_adv - x) > 0
    assert moved.all(), f"{(~moved).sum()} samples were not perturbed under fp16"
    x32 = pgd(model, x, y, eps=0.1, step=0.025, steps=5, random_start=False)
    acc16 = (model(x_adv).argmax(1) == y).float().mean()
    acc32 = (model(x32).argmax(1) == y).float().mean()
    assert acc16 <= acc32 + 0.05


def test_bf16_autocast(tiny_model, digits_batch):
    x, y = digits_batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd(tiny_model, x, y, eps=0.1, step=0.025, steps=5)
    assert (linf(x_adv - x) > 0).all() and x_adv.dtype == torch.float32


def test_seeded_random_start_is_reproducible(tiny_model, digits_batch):
    x, y = digits_batch
    a = pgd(tiny_model, x, y, steps=2, generator=torch.Generator().manual_seed(3))
    b = pgd(tiny_model, x, y, steps=2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def test_pgd_rejects_unknown_objective(tiny_model, digits_batch):
    with pytest.raises(ValueError, match=r"objective='bogus'.*'ce', 'cw', 'trades_kl'"):
        pgd(tiny_model, *digits_batch, objective="bogus")
