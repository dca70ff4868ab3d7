"""The attack objectives: gradients at the logits against autograd and finite differences, values."""

from __future__ import annotations

import pytest
import torch

from confspec_lightning.attacks import ATTACK_LOSSES, attack_objective_value, pgd


def cw_margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y, written independently of the library."""
    others = logits.clone()
    others[torch.arange(len(target)), target] = -torch.inf
    return others.max(dim=1).values - logits[torch.arange(len(target)), target]


def test_cw_logit_gradient_matches_autograd_and_finite_differences():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    (autograd,) = torch.autograd.grad(cw_margin(logits, target).sum(), logits)
    ours = ATTACK_LOSSES["cw"].logit_grad(logits.detach(), target, None)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), autograd)
    # central finite differences of the margin of sample 0 (no ties: the margin is locally linear)
    h = 1e-6
    z = logits.detach()[:1]
    fd = torch.stack(
        [(cw_margin(z + h * e, target[:1]) - cw_margin(z - h * e, target[:1])) / (2 * h) for e in torch.eye(5)], 1
    )
    torch.testing.assert_close(ours[:1].double(), fd, atol=1e-6, rtol=0)
    # onehot(j*) - onehot(y): exactly one +1 and one -1 per row
    assert (ours.sum(1) == 0).all() and (ours.abs().sum(1) == 2).all()


def test_cw_objective_value_is_the_margin(tiny_model, digits_batch):
    x, y = digits_batch
    with torch.no_grad():
        expected = cw_margin(tiny_model.eval()(x).float(), y)
    torch.testing.assert_close(attack_objective_value(tiny_model, x, x, y, "cw"), expected)


def test_cw_attack_lowers_margin_accuracy(trained_model, digits_batch):
    x, y = digits_batch
    eps = 0.1
    x_adv = pgd(trained_model, x, y, eps=eps, step=0.025, steps=10, objective="cw")
    assert ((x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    before = attack_objective_value(trained_model, x, x, y, "cw")
    after = attack_objective_value(trained_model, x, x_adv, y, "cw")
    clean_acc = (before < 0).float().mean()
    robust_acc = (after < 0).float().mean()
    assert clean_acc == 1.0
    assert robust_acc < clean_acc - 0.3, (clean_acc, robust_acc)
    assert (after >= before - 1e-4).float().mean() > 0.95  # the margin grows for (almost) every sample
    # the uniform random start (as for CE) is seeded by the generator
    again = pgd(
        trained_model, x, y, eps=eps, step=0.025, steps=2, objective="cw", generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(
        again,
        pgd(
            trained_model,
            x,
            y,
            eps=eps,
            step=0.025,
            steps=2,
            objective="cw",
            generator=torch.Generator().manual_seed(1),
        ),
    )


def test_unknown_objective_names_cw_among_accepted(tiny_model, digits_batch):
    with pytest.raises(ValueError, match=r"objective='bogus'.*'ce', 'cw', 'trades_kl'"):
        pgd(tiny_model, *digits_batch, objective="bogus")
