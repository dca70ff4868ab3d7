"""Adversarial weight perturbation (AWP; Wu, Xia & Wang, NeurIPS 2020), composable with any objective.

Per training step, after the adversarial batch is made with the unperturbed weights w:

1. the ascent direction: the gradient g of the base objective's loss (1/B) sum_k L_k at w, in train mode, as one
   SGD step of gradient *ascent* of a proxy copy would take it (d_l = proxy_lr g_l). The forward runs on the
   network's own parameters with *copies* of its buffers, so BatchNorm running statistics do not move, and
   ``torch.autograd.grad`` is used, so no ``.grad`` is touched and no DDP hook fires;
2. per weight tensor of dimension > 1 (convolution and linear weights; biases and BatchNorm stay),
   v_l = gamma ||w_l|| d_l / (||d_l|| + 1e-20) (layer-wise relative size gamma);
3. w <- w + v; the training loss, every fairness term included, is computed and back-propagated at w + v; w is
   put back (the saved copy, bit for bit: adding and subtracting v would leave round-off); the optimizer steps from
   w with the gradient taken at w + v. With plain SGD and no weight decay: w_new = w - lr grad L(w + v).

Under DDP the ascent gradient is averaged over the ranks (one all-reduce) before v is formed, so every rank applies
the same perturbation to the same weights. v is recomputed every step: nothing but the weights is state, and a
checkpoint (written between steps) holds the unperturbed weights. The ascent is taken in float32 (autocast off),
so fp16 mixed precision cannot underflow it. ``warmup_epochs``: AWP starts after that many epochs (0 in the
TRADES-AWP fine-tuning script of the CSR authors; gamma 0.005 there and in Wu et al.'s TRADES-AWP).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from confspec_lightning.objectives.base import BaseObjective
from confspec_lightning.validation import check_int, check_real


class AWP:
    """Adversarial weight perturbation (see the module docstring).

    Args:
        gamma: layer-wise relative size of the perturbation, ||v_l|| = gamma ||w_l|| (0.005).
        warmup_epochs: epochs trained without the perturbation first (0).
        proxy_lr: the proxy's ascent step d = proxy_lr g (0.01, as the reference code; after the normalisation
            it only matters next to the 1e-20 guard).
    """

    def __init__(self, gamma: float = 0.005, warmup_epochs: int = 0, proxy_lr: float = 0.01) -> None:
        check_real("awp.gamma", gamma, lambda v: v >= 0, ">= 0 (Wu et al.: 0.005)")
        check_int("awp.warmup_epochs", warmup_epochs, 0)
        check_real("awp.proxy_lr", proxy_lr, lambda v: v > 0, "> 0 (0.01)")
        self.gamma = gamma
        self.warmup_epochs = warmup_epochs
        self.proxy_lr = proxy_lr

    def active(self, epoch: int) -> bool:
        """Whether this epoch trains at perturbed weights."""
        return epoch >= self.warmup_epochs and self.gamma > 0

    def perturbation(
        self,
        model: nn.Module,
        objective: BaseObjective,
        x: Tensor,
        x_adv: Tensor,
        target: Tensor,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """V for every perturbed weight (name -> tensor); ``reduce`` averages a flat gradient over DDP ranks."""
        parameters = {name: p for name, p in model.named_parameters() if p.requires_grad and p.dim() > 1}
        if not parameters:
            return {}
        buffers = {name: b.clone() for name, b in model.named_buffers()}  # BatchNorm statistics stay put
        params = dict(model.named_parameters())

        def proxy(inputs: Tensor) -> Tensor:
            return torch.func.functional_call(model, (params, buffers), (inputs,))

        with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            loss = objective(_Callable(proxy), x.float(), x_adv.float(), target).per_sample_loss().mean()
            grads = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters.values(), grads, strict=True)]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = (reduce or _mean_over_ranks)(flat)
        perturbation = {}
        offset = 0
        for (name, weight), grad in zip(parameters.items(), grads, strict=True):
            direction = self.proxy_lr * flat[offset : offset + grad.numel()].view_as(grad)
            offset += grad.numel()
            perturbation[name] = (self.gamma * weight.detach().norm() / (direction.norm() + 1e-20)) * direction
        return perturbation

    @staticmethod
    def apply(model: nn.Module, perturbation: dict[str, Tensor]) -> dict[str, Tensor]:
        """W <- w + v, in place; returns copies of the unperturbed weights (for :meth:`restore`)."""
        params = dict(model.named_parameters())
        saved = {}
        with torch.no_grad():
            for name, v in perturbation.items():
                saved[name] = params[name].detach().clone()
                params[name].add_(v.to(params[name].dtype))
        return saved

    @staticmethod
    def restore(model: nn.Module, saved: dict[str, Tensor]) -> None:
        """W <- the saved unperturbed weights, bit for bit (w + v - v would differ from w by round-off)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)

    def __repr__(self) -> str:
        return f"AWP(gamma={self.gamma}, warmup_epochs={self.warmup_epochs}, proxy_lr={self.proxy_lr})"


class _Callable(nn.Module):
    """A module whose forward is a function (the functional forward of the proxy)."""

    def __init__(self, forward: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self._forward = forward

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)


def _mean_over_ranks(flat: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = flat.clone()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
    return flat
