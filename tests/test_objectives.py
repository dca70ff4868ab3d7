"""The base objectives (TRADES, PGD-AT, MART): hand-computed terms, float32 and finite under low precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from confspec_lightning.objectives import build_objective, combine_terms, cross_entropy, kl_divergence

K = 4


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_objectives_run_in_float32_under_low_precision(dtype):
    """Logits of 1e4 in fp16/bf16: the terms are computed in float32 and stay finite and exact."""
    p = torch.tensor([[1e4, -1e4, 0.0, 3.0], [0.0, 1e4, -1e4, 2.0]], dtype=dtype, requires_grad=True)
    q = torch.tensor([[-1e4, 1e4, 0.0, 3.0], [1e4, 0.0, 0.0, -1e4]], dtype=dtype, requires_grad=True)
    target = torch.tensor([1, 0])
    ce, kl = cross_entropy(p, target), kl_divergence(p, q)
    assert ce.dtype == torch.float32 and kl.dtype == torch.float32
    torch.testing.assert_close(ce.double(), nn.functional.cross_entropy(p.double(), target, reduction="none"))
    reference = (p.double().softmax(1) * (p.double().log_softmax(1) - q.double().log_softmax(1))).sum(1)
    torch.testing.assert_close(kl.double(), reference)
    assert finite(ce) and finite(kl)
    (ce.sum() + kl.sum()).backward()
    assert finite(p.grad) and finite(q.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_trades_objective_under_autocast_with_huge_logits(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, K))
    with torch.no_grad():
        model[1].weight.mul_(3e3)  # logits of order 1e4
    x = torch.rand(6, 1, 8, 8)
    target = torch.arange(6) % K
    objective = build_objective("trades")
    with torch.autocast("cpu", dtype=dtype):
        output = objective(model, x, x.flip(0), target)
        assert output.adv_logits.dtype == dtype
        assert float(output.adv_logits.detach().abs().max()) > 1e3
        loss, parts = combine_terms(output, [])
    assert all(t.dtype == torch.float32 for t in output.terms.values())
    assert finite(loss) and all(finite(p) for p in parts.values())
    loss.backward()
    assert all(finite(p.grad) for p in model.parameters())


def test_mart_terms_hand_computed():
    """MART on fixed logits (the model is the identity): BCE and the misclassification-weighted KL, by hand."""
    from confspec_lightning.objectives import MART

    clean = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    target = torch.tensor([0, 1])
    output = MART(beta=5.0)(nn.Identity(), clean, adv, target)
    e = torch.e
    # sample 0: p_adv = (e, e, 1)/(2e + 1), CE = -log p_0; top wrong class 1
    p0 = torch.tensor([e, e, 1.0]) / (2 * e + 1)
    bce0 = -torch.log(p0[0]) - torch.log(1.0001 - p0[1])
    q0 = torch.tensor([e * e, 1.0, 1.0]) / (e * e + 2)  # p(x) of sample 0
    kl0 = (q0 * (q0.log() - p0.log())).sum() * (1 - q0[0])
    # sample 1: p_adv = (1, 1, e^2)/(e^2 + 2); top wrong class 2
    p1 = torch.tensor([1.0, 1.0, e * e]) / (e * e + 2)
    bce1 = -torch.log(p1[1]) - torch.log(1.0001 - p1[2])
    q1 = torch.tensor([1.0, e, 1.0]) / (e + 2)
    kl1 = (q1 * (q1.log() - p1.log())).sum() * (1 - q1[1])
    torch.testing.assert_close(output.terms["ce"], torch.stack([bce0, bce1]))
    torch.testing.assert_close(output.terms["kl"], torch.stack([kl0, kl1]))
    assert output.coefficients == {"ce": 1.0, "kl": 5.0}
    torch.testing.assert_close(output.adv_ce, torch.stack([-p0[0].log(), -p1[1].log()]))
    loss, _ = combine_terms(output, [])
    torch.testing.assert_close(loss, (torch.stack([bce0, bce1]) + 5.0 * torch.stack([kl0, kl1])).mean())
    assert build_objective("mart", beta=5.0).beta == 5.0
    assert build_objective("mart").attack_loss == "mart_ce"
