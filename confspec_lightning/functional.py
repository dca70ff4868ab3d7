"""Functional core of the confusional spectral regulariser (CSR).

Jin, Wu, Liu, Huang, Mu, "Enhancing Robust Fairness via Confusional Spectral Regularization",
ICLR 2025 (arXiv 2501.13273); the behaviour follows the project's ``method.md`` sections 1-3.

* :func:`robust_confusion_matrix` - C (K x K), rows = predicted, columns = true class, zero diagonal
  (:func:`confusion_from_predictions` builds the same C from predicted labels).
* :func:`spectral_direction` - G = u1 v1^T = d sigma_max(C) / dC (float64 SVD, non-negative,
  optionally rescaled to [0.01, 2.01]).
* :func:`csr_weights` - per-sample weights w_k = G[yhat_k, y_k].
* :func:`spectral_norm`, :func:`classwise_error`, :func:`classwise_accuracy` - summaries of C.
* :func:`kendall_tau` - Kendall's tau-b rank correlation (train/test divergence diagnostic).

All functions are pure torch and run on the tensors' device. The per-batch ones never synchronise host
and device; :func:`spectral_direction` (once per epoch) checks its input's values, and label ranges are
checked for CPU tensors only (on an accelerator that check would cost a synchronisation per batch).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from confspec_lightning.attacks import check_choice, check_int, check_real

Margin = Literal["relative", "additive"]
MARGINS: tuple[str, ...] = ("relative", "additive")


def margin_predictions(logits: Tensor, target: Tensor, gamma: float = 0.0, margin: Margin = "relative") -> Tensor:
    """Predicted classes after applying the confusion margin gamma.

    ``relative`` (authors' code): the true-class logit is scaled by (1 - gamma) before the argmax.
    ``additive`` (paper): every wrong-class logit is raised by gamma before the argmax.
    With gamma = 0 both are the plain argmax.
    """
    check_choice("margin", margin, MARGINS)
    check_real("gamma", gamma, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    if gamma == 0.0:
        return logits.argmax(dim=1)
    z = logits.detach().float()
    is_true = F.one_hot(target, z.shape[1]).bool()
    if margin == "relative":
        z = torch.where(is_true, z * (1.0 - gamma), z)
    else:
        z = torch.where(is_true, z, z + gamma)
    return z.argmax(dim=1)


def accumulate_confusion_(errors: Tensor, class_counts: Tensor, pred: Tensor, target: Tensor) -> None:
    """In place: ``errors[pred_k, y_k] += 1`` for every misclassified sample k, ``class_counts[y_k] += 1``.

    O(B) work (1-D ``scatter_add_`` into the flattened (K, K) state: no K x K temporary per batch), no
    data-dependent shapes, so it never synchronises host and device; deterministic on CUDA.
    """
    num_classes = class_counts.shape[0]
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    errors.view(-1).scatter_add_(0, pred * num_classes + target, (pred != target).long())
    class_counts.scatter_add_(0, target, torch.ones_like(target))


def _confusion_counts(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(K, K) int64 error counts: [i, j] = #samples with prediction i != j and true class j; zero diagonal."""
    errors = torch.zeros(num_classes, num_classes, dtype=torch.long, device=pred.device)
    accumulate_confusion_(errors, torch.zeros(num_classes, dtype=torch.long, device=pred.device), pred, target)
    return errors


def _check_labels(name: str, labels: Tensor, num_classes: int) -> None:
    """Integer dtype (bool excluded); values in [0, K) checked for CPU tensors (no sync on accelerators)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a tensor of class indices; got {type(labels).__name__} {labels!r}.")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must hold integer class indices; got dtype={labels.dtype}.")
    if labels.device.type == "cpu" and labels.numel() > 0:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"{name} holds the class index {bad!r}, outside [0, num_classes={num_classes}) (values {low}..{high})."
            )


def _check_inputs(logits: Tensor, target: Tensor, num_classes: int) -> None:
    check_int("num_classes", num_classes, 1)
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        what = f"dtype={logits.dtype}" if isinstance(logits, Tensor) else type(logits).__name__
        raise TypeError(f"logits must be a floating-point tensor (batch, num_classes); got {what}.")
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must have shape (batch, num_classes={num_classes}); got {tuple(logits.shape)}.")
    if not isinstance(target, Tensor) or target.shape != logits.shape[:1]:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"target must have shape ({logits.shape[0]},); got {shape}.")
    _check_labels("target", target, num_classes)


def robust_confusion_matrix(
    logits: Tensor,
    target: Tensor,
    num_classes: int,
    gamma: float = 0.0,
    margin: Margin = "relative",
    normalize: bool = False,
) -> Tensor:
    """Robust confusion matrix C of a batch of (adversarial) logits.

    C[i, j] (i != j) = number of class-j samples predicted as i (after the margin, see
    :func:`margin_predictions`); C[j, j] = 0. With ``normalize`` each column is divided by the
    number of class-j samples, so column sums are the class-wise error rates and ||C||_1 is the
    worst-class error (method.md section 1).

    Returns:
        float32 tensor (K, K).
    """
    _check_inputs(logits, target, num_classes)
    pred = margin_predictions(logits, target, gamma, margin)
    return confusion_from_predictions(pred, target, num_classes, normalize)


def confusion_from_predictions(pred: Tensor, target: Tensor, num_classes: int, normalize: bool = False) -> Tensor:
    """Robust confusion matrix C from predicted labels (e.g. predictions on adversarial inputs).

    C[i, j] (i != j) = number of class-j samples predicted as i, C[j, j] = 0 (method.md section 1); with
    ``normalize`` each column is divided by the number of class-j samples (per-class error rates).

    Args:
        pred: predicted classes (N,), integers in [0, K).
        target: true classes (N,), integers in [0, K).
        num_classes: K.
        normalize: divide each column by its class count.

    Returns:
        float32 tensor (K, K).
    """
    check_int("num_classes", num_classes, 1)
    if pred.ndim != 1 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must be 1-D tensors of the same shape; got {tuple(pred.shape)} and {tuple(target.shape)}."
        )
    _check_labels("pred", pred, num_classes)
    _check_labels("target", target, num_classes)
    errors = _confusion_counts(pred, target, num_classes).float()
    if normalize:
        errors = errors / counts_per_class(target, num_classes).float().clamp_min(1.0)
    return errors


def counts_per_class(target: Tensor, num_classes: int) -> Tensor:
    """Number of samples of each true class, int64 (K,)."""
    target = target.reshape(-1).long()
    return torch.zeros(num_classes, dtype=torch.long, device=target.device).scatter_add_(
        0, target, torch.ones_like(target)
    )


def confusion_from_counts(errors: Tensor, class_counts: Tensor, normalize: bool = False) -> Tensor:
    """C as float64 from accumulated error counts (K, K), divided per true class when ``normalize``."""
    confusion = errors.to(torch.float64)
    if normalize:
        confusion = confusion / class_counts.to(torch.float64).clamp_min(1.0)
    return confusion


def spectral_direction(confusion: Tensor, rescale: bool = True) -> Tensor:
    """Top singular direction G = u1 v1^T of the confusion matrix (method.md section 2).

    C = U S V^T in float64; u1, v1 are taken non-negative (Perron-Frobenius: C >= 0), so G >= 0.
    With ``rescale`` (authors' code): G <- 2 (G - min G) / (max G - min G) + 0.01, in [0.01, 2.01].
    Guard: if C has no errors, or max G == min G (to 1e-9 relative), G = all ones. G is returned detached (a constant).
    C is divided by its largest entry before the SVD (G does not change; huge counts cannot overflow).

    Returns:
        float64 tensor (K, K).

    Raises:
        ValueError: C is not square, or has a NaN, infinite or negative entry (one host-device sync).
    """
    if not isinstance(confusion, Tensor) or confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        shape = tuple(confusion.shape) if isinstance(confusion, Tensor) else type(confusion).__name__
        raise ValueError(f"confusion must be a square (K, K) matrix; got shape {shape}.")
    if confusion.shape[0] == 0:
        raise ValueError("confusion must be a square (K, K) matrix with K >= 1; got shape (0, 0).")
    c = confusion.detach().to(torch.float64)
    if not bool((torch.isfinite(c) & (c >= 0)).all()):
        bad = c[~(torch.isfinite(c) & (c >= 0))][0].item()
        raise ValueError(
            f"confusion holds the entry {bad!r}; a confusion matrix needs finite, non-negative entries (error counts)."
        )
    c = c / torch.where(c.max() > 0, c.max(), 1.0)
    u, _, vh = torch.linalg.svd(c)
    direction = torch.outer(u[:, 0].abs(), vh[0, :].abs())
    ones = torch.ones_like(direction)
    g_min, g_max = direction.min(), direction.max()
    # max G == min G up to float64 SVD round-off (a constant G would otherwise rescale noise)
    degenerate = (c.abs().sum() == 0) | (g_max - g_min <= 1e-9 * g_max.abs())
    if rescale:
        direction = 2.0 * (direction - g_min) / torch.where(degenerate, 1.0, g_max - g_min) + 0.01
    return torch.where(degenerate, ones, direction)


def csr_weights(direction: Tensor, adv_logits: Tensor, target: Tensor, include_diagonal: bool = True) -> Tensor:
    """Per-sample CSR weights w_k = G[yhat_k, y_k], yhat_k = argmax f(x_adv_k) (method.md section 3).

    With ``include_diagonal=False`` (paper form) correctly classified samples get weight 0; with
    ``True`` (authors' code) they get G[y_k, y_k].

    Returns:
        detached float32 tensor (B,).
    """
    if not isinstance(direction, Tensor) or direction.ndim != 2 or direction.shape[0] != direction.shape[1]:
        shape = tuple(direction.shape) if isinstance(direction, Tensor) else type(direction).__name__
        raise ValueError(f"direction must be a square (K, K) matrix; got shape {shape}.")
    _check_inputs(adv_logits, target, direction.shape[0])
    pred = adv_logits.detach().argmax(dim=1)
    weights = direction.to(device=adv_logits.device, dtype=torch.float32)[pred, target]
    if not include_diagonal:
        weights = torch.where(pred == target, torch.zeros_like(weights), weights)
    return weights


def spectral_norm(confusion: Tensor) -> Tensor:
    """||C||_2 = sigma_max(C), computed in float64."""
    return torch.linalg.matrix_norm(confusion.detach().to(torch.float64), ord=2)


def classwise_error(confusion: Tensor, class_counts: Tensor) -> Tensor:
    """Class-wise error rates from raw error counts: column sums of C divided by the class counts.

    Classes without samples get NaN (their error is undefined), never a silent 0.
    """
    counts = class_counts.to(torch.float64)
    errors = confusion.detach().to(torch.float64).sum(dim=0)
    return torch.where(counts > 0, errors / counts.clamp_min(1.0), torch.full_like(errors, float("nan")))


def classwise_accuracy(confusion: Tensor, class_counts: Tensor) -> Tensor:
    """Class-wise accuracy 1 - classwise_error (NaN for classes without samples)."""
    return 1.0 - classwise_error(confusion, class_counts)


def kendall_tau(a: Tensor, b: Tensor) -> float:
    """Kendall's tau-b rank correlation of two vectors (Kendall, 1945; as ``scipy.stats.kendalltau``).

    tau_b = (n_c - n_d) / sqrt((n_0 - n_1) (n_0 - n_2)) over the pairs i < j, with n_c / n_d the
    concordant / discordant pairs, n_0 = n (n - 1) / 2 and n_1, n_2 the pairs tied in ``a``, in ``b``.
    Equivalently sum_{i<j} s^a_ij s^b_ij / sqrt(sum_{i<j} |s^a_ij| sum_{i<j} |s^b_ij|), s^a_ij = sign(a_i - a_j).

    Entries where either vector is NaN are dropped (pairwise). Returns NaN with fewer than 2 points left
    or when a vector is constant. Pure torch, float64, O(n^2) memory (meant for per-class vectors).
    """
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(
            f"kendall_tau needs two 1-D tensors of the same length; got shapes {tuple(a.shape)} and {tuple(b.shape)}."
        )
    a, b = a.detach().to(torch.float64), b.detach().to(device=a.device, dtype=torch.float64)
    keep = ~(a.isnan() | b.isnan())
    a, b = a[keep], b[keep]
    if a.numel() < 2:
        return float("nan")
    upper = torch.triu(torch.ones(a.numel(), a.numel(), dtype=torch.bool, device=a.device), diagonal=1)
    sign_a = torch.sign(a[:, None] - a[None, :])[upper]
    sign_b = torch.sign(b[:, None] - b[None, :])[upper]
    denominator = torch.sqrt(sign_a.abs().sum() * sign_b.abs().sum())
    if denominator == 0:
        return float("nan")
    return float((sign_a * sign_b).sum() / denominator)
