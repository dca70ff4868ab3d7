"""Does a CSR surrogate's gradient follow the discrete confusion matrix's? Pure-torch parts of the check.

The paper assumes, without showing it, that lowering a differentiable surrogate of the robust confusion
matrix lowers the discrete one. The check (``benchmarks/csr_mechanism``) compares, on a fixed probe set of
adversarial examples, the weight gradient of each penalty

* ``counts-weighted CE`` (the code form: mean_k G[yhat_k, y_k] CE_k, G = rescaled u1 v1^T of the hard counts),
* ``kl`` (the paper form: sigma_max(L) of the KL surrogate, additive margin),
* ``soft`` (sigma_max(L) of the soft surrogate, p_i(x_adv) in every wrong cell),

with the gradient of sigma_max(C_T), C_T the temperature-smoothed confusion matrix (softmax(z / T) in every
wrong cell, normalised per true class): as T -> 0 it tends to the discrete matrix of per-class error rates,
whose own gradient is zero almost everywhere. ``soft`` is C_T at T = 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from confspec_lightning import functional as CF
from confspec_lightning.losses import cross_entropy
from confspec_lightning.objectives.base import ObjectiveOutput

#: The penalties compared, in table order; "CE" is the plain adversarial cross entropy (a reference).
PENALTIES: tuple[str, ...] = ("counts-weighted CE", "kl", "soft", "CE")


def csr_term(logits: Tensor, target: Tensor, gamma: float = 0.0, **options: Any) -> Tensor:
    """CSR's own term (:class:`~confspec_lightning.fairness.CSR`, alpha 1) on a batch of adversarial logits.

    The batch's own matrix gives the direction (``confusion_source: batch``), by a float64 SVD (``direction_solver:
    svd``) so the value is exactly the penalty's: the check measures the library's CSR, not a copy of it.
    """
    from confspec_lightning.fairness.csr import CSR

    csr = CSR(alpha=1.0, gamma=gamma, confusion_source="batch", direction_solver="svd", **options)
    csr.bind(logits.shape[1])
    csr.to(logits.device)
    ce = cross_entropy(logits, target)
    output = ObjectiveOutput(terms={"ce": ce}, coefficients={"ce": 1.0}, adv_logits=logits, adv_ce=ce)
    return csr.loss_adjustment(output, target).extra_terms["csr"]


def smoothed_sigma_max(logits: Tensor, target: Tensor, temperature: float) -> Tensor:
    """sigma_max(C_T): the soft confusion matrix of softmax(z / T), normalised per true class."""
    return csr_term(logits / temperature, target, form="paper", surrogate="soft")


def penalty_objectives(logits: Tensor, target: Tensor, gamma: float = 0.0) -> dict[str, Tensor]:
    """Each of :data:`PENALTIES` on a batch of adversarial logits (scalars with their graph), CSR's own terms."""
    return {
        "counts-weighted CE": csr_term(logits, target, gamma, form="code", surrogate="counts", margin="additive"),
        "kl": csr_term(logits, target, gamma, form="paper", surrogate="kl"),
        "soft": csr_term(logits, target, form="paper", surrogate="soft"),
        "CE": cross_entropy(logits, target).mean(),
    }


def flat_gradient(value: Tensor, parameters: Sequence[Tensor]) -> Tensor:
    """The gradient d value / d parameters, flattened into one float64 vector (zeros where a parameter gets none)."""
    grads = torch.autograd.grad(value, list(parameters), retain_graph=True, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1).double() for p, g in zip(parameters, grads, strict=True)]
    )


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two vectors (0 when one of them is zero)."""
    norm = a.norm() * b.norm()
    return float((a @ b) / norm) if float(norm) > 0 else 0.0


def discrete_summary(pred: Tensor, target: Tensor, num_classes: int) -> dict[str, float]:
    """``spectral_norm`` ||C||_2 and ``worst_error`` ||C||_1 of the discrete robust confusion (error rates)."""
    rates = CF.confusion_from_predictions(pred, target, num_classes, normalize=True).double()
    diagnostics = CF.confusion_diagnostics(rates)
    return {"spectral_norm": float(diagnostics["spectral_norm"]), "worst_error": float(diagnostics["l1_norm"])}


def gradient_alignment(
    model: torch.nn.Module, x_adv: Tensor, target: Tensor, temperatures: Iterable[float], gamma: float = 0.0
) -> tuple[dict[str, Tensor], dict[str, dict[float, float]]]:
    """Weight gradients of every penalty, and their cosines with the gradient of sigma_max(C_T) per temperature.

    One forward of the probe set in the model's current mode (use eval mode); returns
    ``({penalty: gradient}, {penalty: {T: cosine}})``; ``"sigma_max(C_T)"`` gradients are included under
    ``f"C_T={T}"`` keys of the first dict.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    logits = model(x_adv)
    gradients = {
        name: flat_gradient(value, parameters) for name, value in penalty_objectives(logits, target, gamma).items()
    }
    cosines: dict[str, dict[float, float]] = {name: {} for name in gradients}
    for temperature in temperatures:
        reference = flat_gradient(smoothed_sigma_max(logits, target, temperature), parameters)
        gradients[f"C_T={temperature:g}"] = reference
        for name in PENALTIES:
            cosines[name][temperature] = cosine(gradients[name], reference)
    return gradients, cosines


@torch.no_grad()
def step_along(model: torch.nn.Module, direction: Tensor, step: float) -> None:
    """In place: theta <- theta - step * direction / ||direction|| (over the trainable parameters)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    unit = direction / direction.norm().clamp_min(1e-30)
    offset = 0
    for p in parameters:
        n = p.numel()
        p.sub_(step * unit[offset : offset + n].view_as(p).to(p.dtype))
        offset += n
