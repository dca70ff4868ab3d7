"""The base objectives (TRADES, PGD-AT): their terms stay float32 and finite under low precision."""

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
