"""A plain PyTorch training step in the manner of the TRADES/CSR authors' scripts: the reference for timing.

It follows the public recipes (Zhang et al. 2019 TRADES ``trades.py``; the CSR authors' fine-tuning
script) as a user would copy them, written here from their description in ``docs/explanation/method.md``:

* attack: model.eval(); x_adv = x + 0.001 N(0, 1); ``steps`` times: loss_kl = KL(log_softmax(f(x_adv)),
  softmax(f(x))) summed over the batch, grad = autograd.grad(loss_kl, x_adv), signed step, projection;
* model.train(); logits = f(x); logits_adv = f(x_adv); loss = CE(logits) + beta KL(batchmean);
* CSR (authors' code): a *separate* forward f(x_adv) for the spectral term (the module shares one);
  L = (1 - alpha) CE + beta KL + alpha mean_k G[yhat_k, y_k] CE(f(x_adv_k), y_k);
* fp32, no channels_last, no compilation.

Nothing here is imported by the library; ``benchmarks/throughput/run.py`` times it next to the module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def trades_attack(model: nn.Module, x: Tensor, eps: float, step: float, steps: int) -> Tensor:
    """The TRADES recipe's l_inf KL attack (eval mode, summed KL, autograd.grad)."""
    model.eval()
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(loss_kl, [x_adv])
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    model.train()
    return x_adv.detach()


def plain_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    beta: float = 6.0,
    csr_alpha: float | None = None,
    direction: Tensor | None = None,
) -> Tensor:
    """One TRADES (``csr_alpha`` None) or TRADES + CSR training step; returns the loss."""
    x_adv = trades_attack(model, x, eps, step, steps)
    optimizer.zero_grad()
    logits = model(x)
    logits_adv = model(x_adv)
    loss_kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    loss_natural = F.cross_entropy(logits, y)
    if csr_alpha is None:
        loss = loss_natural + beta * loss_kl
    else:
        logits_csr = model(x_adv)  # the authors' script forwards x_adv again for the CSR term
        weights = direction[logits_csr.detach().argmax(1), y]
        loss_csr = (weights * F.cross_entropy(logits_csr, y, reduction="none")).mean()
        loss = (1 - csr_alpha) * loss_natural + beta * loss_kl + csr_alpha * loss_csr
    loss.backward()
    optimizer.step()
    return loss.detach()
