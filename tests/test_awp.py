"""AWP (adversarial weight perturbation): the step is SGD at the perturbed weights, the perturbation never stays
in the weights, the ascent is float32 and leaves BatchNorm's statistics alone. DDP: tests/test_ddp.py (2 and 3
processes train the one-process model with AWP on); resume: tests/test_checkpointing.py (the CSR case runs AWP)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from confspec_lightning import AttackConfig
from confspec_lightning.data import DigitsDataModule
from confspec_lightning.objectives import AWP, build_objective

from helpers import make_module, make_trainer


class Linear(nn.Module):
    """A hand-computable backbone: flatten, one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_a_step_with_awp_is_sgd_at_the_perturbed_weights(chdir_tmp):
    """With plain SGD: w_new = w - lr grad L(w + v), v = gamma ||W|| g / ||g|| for the weight matrix W (g: the
    gradient of the loss at w), the bias unperturbed; the weights after the step hold no perturbation."""
    gamma, lr = 0.05, 0.5
    module = make_module(
        fairness=[],
        backbone=Linear(),
        objective="pgd_at",
        weight_perturbation=AWP(gamma=gamma),
        train_attack=AttackConfig(eps=0.1, step=0.04, steps=2, random_start=False),
        optimizer=lambda params: torch.optim.SGD(params, lr=lr),
    )
    start = {k: v.detach().clone() for k, v in module.net.named_parameters()}
    seen = {}
    original = module.generate_adversarial

    def recording(x, target):
        x_adv = original(x, target)
        seen.update(x=x.detach().clone(), x_adv=x_adv.detach().clone(), target=target.clone())
        return x_adv

    module.generate_adversarial = recording
    make_trainer(max_steps=1, limit_train_batches=1, limit_val_batches=0).fit(
        module, DigitsDataModule(batch_size=32, shuffle=False)
    )
    (w_name, w0), (b_name, b0) = [(k, v) for k, v in start.items()]
    assert w_name.endswith("weight") and b_name.endswith("bias")

    def loss(w, b):  # PGD-AT: mean CE at x_adv; the network normalises the input first
        net = module.net
        z = net[0](seen["x_adv"]) if isinstance(net, nn.Sequential) else seen["x_adv"]
        return nn.functional.cross_entropy(nn.functional.linear(z.flatten(1), w, b), seen["target"])

    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(w, b), [w])
    v = gamma * w0.norm() * g / g.norm()
    wp, bp = (w0 + v).requires_grad_(), b0.clone().requires_grad_()
    gw, gb = torch.autograd.grad(loss(wp, bp), [wp, bp])
    after = dict(module.net.named_parameters())
    torch.testing.assert_close(after[w_name].detach(), w0 - lr * gw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[b_name].detach(), b0 - lr * gb, rtol=1e-5, atol=1e-6)
    # the perturbation changed the step: SGD at w itself lands elsewhere
    w_plain = w0.clone().requires_grad_()
    (g_plain,) = torch.autograd.grad(loss(w_plain, b0), [w_plain])
    assert not torch.allclose(w0 - lr * g_plain, after[w_name].detach(), rtol=1e-5, atol=1e-6)
    assert module._unperturbed_weights is None


def test_the_ascent_is_float32_and_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).train()
    x, target = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    awp = AWP(gamma=0.01)
    stats = {k: v.clone() for k, v in model.named_buffers()}
    plain = awp.perturbation(model, build_objective("trades"), x, x_adv, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = awp.perturbation(model, build_objective("trades"), x, x_adv, target)
    assert set(plain) == {"0.weight", "3.weight"}  # weights of dimension > 1 only: no bias, no BatchNorm
    for name, value in plain.items():
        assert mixed[name].dtype == torch.float32
        torch.testing.assert_close(mixed[name], value)
        weight = dict(model.named_parameters())[name]
        torch.testing.assert_close(value.norm(), 0.01 * weight.detach().norm())  # layer-wise relative size gamma
    for name, value in model.named_buffers():
        assert torch.equal(value, stats[name]), name
    assert all(p.grad is None for p in model.parameters())  # no .grad touched (no DDP hook fires)


def test_the_perturbation_is_removed_when_the_step_fails(chdir_tmp):
    module = make_module(fairness=[], weight_perturbation=AWP(gamma=0.1))
    before = {k: v.detach().clone() for k, v in module.net.named_parameters()}

    def broken(output, target):
        raise RuntimeError("a broken loss")

    module.compute_loss = broken
    with pytest.raises(RuntimeError, match="a broken loss"):
        make_trainer(max_steps=1, limit_val_batches=0).fit(module, DigitsDataModule(batch_size=16))
    for name, value in module.net.named_parameters():
        assert torch.equal(value.detach(), before[name]), name


def test_awp_warmup_and_bad_values():
    awp = AWP(gamma=0.005, warmup_epochs=2)
    assert [awp.active(e) for e in range(4)] == [False, False, True, True]
    assert not AWP(gamma=0.0).active(5)
    with pytest.raises(ValueError, match=r"awp.gamma=-0.1 is not accepted"):
        AWP(gamma=-0.1)
    with pytest.raises(ValueError, match=r"awp.warmup_epochs=-1"):
        AWP(warmup_epochs=-1)
    with pytest.raises(TypeError, match="weight_perturbation must be an AWP"):
        make_module(weight_perturbation="awp")
