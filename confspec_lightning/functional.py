"""Functional core of the confusional spectral regulariser (CSR).

Jin, Wu, Liu, Huang, Mu, "Enhancing Robust Fairness via Confusional Spectral Regularization",
ICLR 2025 (arXiv 2501.13273); the behaviour follows ``docs/explanation/method.md`` §1-2.

* :func:`robust_confusion_matrix` - C (K x K), rows = predicted, columns = true class, zero diagonal
  (:func:`confusion_from_predictions` builds the same C from predicted labels).
* :func:`spectral_direction` - G = u1 v1^T = d sigma_max(C) / dC (float64 SVD, non-negative,
  optionally rescaled to [0.01, 2.01]).
* :func:`csr_weights` - per-sample weights w_k = G[yhat_k, y_k] (the code form's loss).
* :func:`top_singular_subspace`, :class:`SpectralDirection` - the per-step direction without a full SVD or a
  host sync (subspace iteration warm-started from the previous step; G kept as u1, v1).
* :func:`surrogate_contributions`, :func:`surrogate_confusion`, :func:`top_singular_pair`,
  :func:`spectral_penalty` - the paper form: a surrogate confusion matrix L (counts, KL or soft values per
  cell, normalised per true class) and its spectral norm sigma_max(L), differentiated through.
* :func:`confusion_diagnostics` - ||C||_2, ||C||_1, sigma_1 / sigma_2 and nu = ||C||_1 / ||C||_2.
* :func:`spectral_norm`, :func:`classwise_error`, :func:`classwise_accuracy` - summaries of C.
* :func:`kendall_tau` - Kendall's tau-b rank correlation (train/test divergence diagnostic).

All functions are pure torch and run on the tensors' device. The per-batch ones never synchronise host
and device; :func:`spectral_direction` (once per epoch) checks its input's values, and label ranges are
checked for CPU tensors only (on an accelerator that check would cost a synchronisation per batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from confspec_lightning.losses import cross_entropy
from confspec_lightning.validation import check_choice, check_int, check_labels, check_real

Margin = Literal["relative", "additive"]
#: What a sample charges to its confusion cell (docs/explanation/method.md §3).
Surrogate = Literal["counts", "kl", "soft"]


def margin_predictions(logits: Tensor, target: Tensor, gamma: float = 0.0, margin: Margin = "relative") -> Tensor:
    """Predicted classes after applying the confusion margin gamma.

    ``relative`` (authors' code): the true-class logit is scaled by (1 - gamma) before the argmax.
    ``additive`` (paper): every wrong-class logit is raised by gamma before the argmax.
    With gamma = 0 both are the plain argmax.
    """
    check_choice("margin", margin, Margin)
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
    check_labels("target", target, num_classes)


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
    worst-class error (docs/explanation/method.md §1).

    Returns:
        float32 tensor (K, K).
    """
    _check_inputs(logits, target, num_classes)
    pred = margin_predictions(logits, target, gamma, margin)
    return confusion_from_predictions(pred, target, num_classes, normalize)


def confusion_from_predictions(pred: Tensor, target: Tensor, num_classes: int, normalize: bool = False) -> Tensor:
    """Robust confusion matrix C from predicted labels (e.g. predictions on adversarial inputs).

    C[i, j] (i != j) = number of class-j samples predicted as i, C[j, j] = 0 (docs/explanation/method.md §1); with
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
    check_labels("pred", pred, num_classes)
    check_labels("target", target, num_classes)
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


def _check_confusion(confusion: Tensor) -> Tensor:
    """The matrix as float64 after checking it is square, K >= 1, finite and non-negative (one host sync)."""
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
    return c


def top_singular_pair(confusion: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top singular vectors u1, v1 (taken non-negative) and all singular values of a non-negative matrix.

    float64 SVD of C / max(C) (the vectors do not change; huge counts cannot overflow); the singular values
    are scaled back. u1 v1^T = d sigma_max(C) / dC wherever sigma_1 > sigma_2; with tied top singular values
    it is one valid subgradient (Perron-Frobenius: a non-negative top pair exists; taking absolute values of
    the SVD's pair gives one). A zero matrix gives u1 = v1 = 0 and singular values 0 (no direction).

    Returns:
        ``(u1, v1, singular_values)``, float64 (K,), (K,), (K,), detached.

    Raises:
        ValueError: C is not square, or has a NaN, infinite or negative entry (one host-device sync).
    """
    c = _check_confusion(confusion)
    scale = c.max()
    c = c / torch.where(scale > 0, scale, 1.0)
    u, s, vh = torch.linalg.svd(c)
    nonzero = scale > 0
    return (
        torch.where(nonzero, u[:, 0].abs(), 0.0),
        torch.where(nonzero, vh[0, :].abs(), 0.0),
        s * torch.where(nonzero, scale, 0.0),
    )


def spectral_direction(confusion: Tensor, rescale: bool = True) -> Tensor:
    """Top singular direction G = u1 v1^T of the confusion matrix (the code form's weights).

    C = U S V^T in float64; u1, v1 are taken non-negative (Perron-Frobenius: C >= 0), so G >= 0.
    With ``rescale`` (authors' code): G <- 2 (G - min G) / (max G - min G) + 0.01, in [0.01, 2.01].
    Guard: if C has no errors, or max G == min G (to 1e-9 relative), G = all ones. G is returned detached (a constant).
    C is divided by its largest entry before the SVD (G does not change; huge counts cannot overflow).

    Returns:
        float64 tensor (K, K).

    Raises:
        ValueError: C is not square, or has a NaN, infinite or negative entry (one host-device sync).
    """
    u, v, _ = top_singular_pair(confusion)
    return direction_from_singular_vectors(u, v, rescale)


def direction_from_singular_vectors(u: Tensor, v: Tensor, rescale: bool = True) -> Tensor:
    """G = u v^T with :func:`spectral_direction`'s rescale and guard (u = 0 or a constant G: all ones)."""
    direction = torch.outer(u, v)
    ones = torch.ones_like(direction)
    g_min, g_max = direction.min(), direction.max()
    # max G == min G up to float64 SVD round-off (a constant G would otherwise rescale noise)
    degenerate = (u.abs().sum() == 0) | (g_max - g_min <= 1e-9 * g_max.abs())
    if rescale:
        direction = 2.0 * (direction - g_min) / torch.where(degenerate, 1.0, g_max - g_min) + 0.01
    return torch.where(degenerate, ones, direction)


def initial_subspace(num_classes: int, device: torch.device | str | None = None) -> Tensor:
    """The start of :func:`top_singular_subspace` before any warm start: (K, 2) float64, orthonormal.

    Column 0 is the uniform vector 1/sqrt(K) (it overlaps every non-negative singular vector), column 1 a fixed
    cosine pattern orthogonalised against it (deterministic: no random generator is drawn from).
    """
    check_int("num_classes", num_classes, 2)
    k = torch.arange(num_classes, dtype=torch.float64, device=device)
    basis = torch.stack([torch.ones_like(k), torch.cos(2.399963229728653 * (k + 1.0))], dim=1)
    return _orthonormal_columns(basis)


def _orthonormal_columns(w: Tensor) -> Tensor:
    """Gram-Schmidt, twice (CGS2), on the two columns of ``w`` (K, 2); a zero column stays zero. Device-only."""
    tiny = torch.finfo(w.dtype).tiny
    q0 = w[:, 0] / w[:, 0].norm().clamp_min(tiny)
    w1 = w[:, 1] - (q0 @ w[:, 1]) * q0
    w1 = w1 - (q0 @ w1) * q0
    return torch.stack([q0, w1 / w1.norm().clamp_min(tiny)], dim=1)


class DenseOperator:
    """M = ``scalar`` ``matrix`` diag(``column_scale``) as the products :func:`top_singular_subspace` takes (float64).

    Products are formed as (2 x K) @ (K x K): BLAS runs a (K x K) @ (K x 2) product 2-3x slower on a CPU. ``scalar``
    (a 0-dim tensor, e.g. an EMA's lazily applied decay) multiplies each (K, 2) product, never the matrix.
    """

    def __init__(self, matrix: Tensor, column_scale: Tensor | None = None, scalar: Tensor | None = None) -> None:
        self.matrix = matrix.detach().to(torch.float64)
        self.scale = None if column_scale is None else column_scale.detach().to(self.matrix)[:, None]
        self.scalar = None if scalar is None else scalar.detach().to(self.matrix)
        self.size = self.matrix.shape[0]

    def times(self, v: Tensor) -> Tensor:
        """M V for V (K, 2) (BLAS reads M^T as a view: cheaper than copying it)."""
        w = ((v if self.scale is None else v * self.scale).t() @ self.matrix.t()).t()
        return w if self.scalar is None else w * self.scalar

    def times_transposed(self, x: Tensor) -> Tensor:
        """M^T X for X (K, 2)."""
        w = (x.t() @ self.matrix).t()
        w = w if self.scale is None else w * self.scale
        return w if self.scalar is None else w * self.scalar


class BatchSurrogateOperator:
    """M = the surrogate confusion matrix L of a batch, L[:, j] = sum_{k: y_k = j} S[k, :] / m_j, never formed.

    M V = S^T (V[y] / m[y]) and M^T U = (index-add over y of S U) / m: O(B K) per product with dense rows (``soft``),
    O(B) with :class:`Charges` (``kl``, ``counts``: one cell per sample). ``reduce`` sums a (K, 2) partial product
    over DDP ranks (the global batch's M is the sum of the ranks' M); the identity by default.

    Args:
        contributions: S (B, K) or :class:`Charges`: what each sample charges to its true-class column.
        target: (B,) true classes.
        num_classes: K.
        class_counts: m (K,) of the global batch, or None for raw sums (no per-class normalisation).
        reduce: the sum over ranks of a local partial product.
    """

    def __init__(
        self,
        contributions: Tensor | Charges,
        target: Tensor,
        num_classes: int,
        class_counts: Tensor | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.size = num_classes
        self.target = target
        device = target.device
        inverse = (
            torch.ones(num_classes, dtype=torch.float64, device=device)
            if class_counts is None
            else 1.0 / class_counts.to(device=device, dtype=torch.float64).clamp_min(1.0)
        )
        self.inverse = inverse
        self.charges = isinstance(contributions, Charges)
        if self.charges:  # coefficient of sample k: its charged value over m_{y_k}
            self.cells = contributions.cells
            self.coefficient = (contributions.values.detach().to(torch.float64) * inverse[target])[:, None]
        else:
            self.s = contributions.detach().to(torch.float64)
        self.reduce = reduce or (lambda t: t)

    def times(self, v: Tensor) -> Tensor:
        """M V for V (K, 2)."""
        if self.charges:
            local = v.new_zeros(self.size, 2).index_add_(0, self.cells, self.coefficient * v[self.target])
        else:
            local = self.s.t() @ (v[self.target] * self.inverse[self.target, None])  # S^T (V[y_k] / m_{y_k})
        return self.reduce(local)

    def times_transposed(self, u: Tensor) -> Tensor:
        """M^T U for U (K, 2)."""
        if self.charges:
            local = u.new_zeros(self.size, 2).index_add_(0, self.target, self.coefficient * u[self.cells])
        else:
            local = u.new_zeros(self.size, 2).index_add_(0, self.target, self.s @ u) * self.inverse[:, None]
        return self.reduce(local)


def top_singular_subspace(
    matrix: Tensor | DenseOperator | BatchSurrogateOperator,
    basis: Tensor,
    iterations: int = 8,
    column_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top singular pair of a non-negative matrix by subspace iteration from a warm start, without a host sync.

    M = ``matrix`` diag(``column_scale``) (the scale, e.g. 1/m_j, is applied on the fly: no K x K temporary), or an
    operator giving M's products (:class:`DenseOperator`, :class:`BatchSurrogateOperator`: a batch's surrogate
    matrix without forming it). Starting from the two orthonormal columns of ``basis`` (the previous call's
    returned basis, or :func:`initial_subspace`), ``iterations`` times V <- orth(M^T M V) (classical Gram-Schmidt
    twice), then the Rayleigh-Ritz step: the 2 x 2 matrix (M V)^T (M V) is diagonalised in closed form, giving
    sigma_1, sigma_2 and v1 in span(V); u1 = M v1 / sigma_1 (Golub & Van Loan, *Matrix Computations*, 4th ed.,
    §8.2.4 orthogonal iteration and §8.1.3 Rayleigh-Ritz). The error in v1 shrinks like (sigma_3 / sigma_1)^(2n)
    from the warm start, so a tie between sigma_1 and sigma_2 alone is resolved; near-ties of three or more leave
    a vector from the near-tied subspace (u^T M v then lies between the smallest and the largest of the near-tied
    values). Cost: 2n + 1 products of M with a (K, 2) block, O(n K^2) dense; every operation stays on the device
    (no ``.item()``, no LAPACK call).

    Before iterating, 1e-3 / sqrt(K) is added to every entry of the first column, so the start overlaps the
    top singular vector even when the previous one lived on other classes (a non-negative matrix has a
    non-negative top pair: Perron-Frobenius). The returned u1, v1 are taken non-negative (as
    :func:`top_singular_pair`); a zero matrix gives u1 = v1 = 0 and sigma = 0.

    Args:
        matrix: (K, K) non-negative matrix (computed in float64), or an operator.
        basis: (K, 2) start.
        iterations: n >= 1 products with M^T M.
        column_scale: optional (K,) non-negative scale of the columns (a matrix only).

    Returns:
        ``(u1, v1, (sigma_1, sigma_2), next_basis)``, float64 (K,), (K,), (2,), (K, 2); detached.
    """
    check_int("iterations", iterations, 1)
    operator = DenseOperator(matrix, column_scale) if isinstance(matrix, Tensor) else matrix
    k = operator.size
    v = basis.detach().to(dtype=torch.float64).clone()
    v[:, 0] += 1e-3 / k**0.5
    v = _orthonormal_columns(v)
    for _ in range(iterations):
        v = _orthonormal_columns(operator.times_transposed(operator.times(v)))
    x = operator.times(v)
    gram = x.t() @ x  # V^T M^T M V (2 x 2, symmetric)
    a, b, c = gram[0, 0], gram[0, 1], gram[1, 1]
    theta = 0.5 * torch.atan2(2.0 * b, a - c)  # rotation onto the eigenvector of the larger eigenvalue
    cos, sin = torch.cos(theta), torch.sin(theta)
    radius = torch.sqrt(((a - c) / 2.0) ** 2 + b**2)
    sigma = torch.sqrt(torch.stack([(a + c) / 2.0 + radius, (a + c) / 2.0 - radius]).clamp_min(0.0))
    v1 = cos * v[:, 0] + sin * v[:, 1]
    v2 = cos * v[:, 1] - sin * v[:, 0]
    nonzero = sigma[0] > 0
    u1 = (cos * x[:, 0] + sin * x[:, 1]) / torch.where(nonzero, sigma[0], 1.0)
    u1 = torch.where(nonzero, u1.abs(), 0.0)
    v1 = torch.where(nonzero, v1.abs(), 0.0)
    return u1, v1, sigma, torch.stack([torch.where(nonzero, v1, v[:, 0]), v2], dim=1)


class SpectralDirection:
    """G = u1 v1^T (optionally rescaled), kept as its two vectors: entries are formed only where needed.

    ``guard`` and ``rescale`` mirror :func:`direction_from_singular_vectors` (code form: a degenerate G is all
    ones; ``rescale``: 2 (G - min G) / (max G - min G) + 0.01). With u, v >= 0, min G = min u min v and
    max G = max u max v, so :meth:`entries` equals indexing :meth:`matrix` without forming the K x K matrix.
    """

    def __init__(self, u: Tensor, v: Tensor, rescale: bool = False, guard: bool = False) -> None:
        self.u, self.v, self.rescale, self.guard = u, v, rescale, guard

    def _range(self) -> tuple[Tensor, Tensor, Tensor]:
        """(min G, max G, whether G is degenerate: zero or constant up to round-off), on the device."""
        g_min, g_max = self.u.min() * self.v.min(), self.u.max() * self.v.max()
        return g_min, g_max, (self.u.abs().sum() == 0) | (g_max - g_min <= 1e-9 * g_max.abs())

    def entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        """G[rows, cols] (float64), elementwise over the broadcast index tensors."""
        values = self.u[rows] * self.v[cols]
        if not self.guard:
            return values
        g_min, g_max, degenerate = self._range()
        if self.rescale:
            values = 2.0 * (values - g_min) / torch.where(degenerate, 1.0, g_max - g_min) + 0.01
        return torch.where(degenerate, torch.ones_like(values), values)

    def affine(self) -> tuple[Tensor, Tensor]:
        """(a, b) with G = a u v^T + b (a = 1, b = 0 unless guarded or rescaled), float64 scalars."""
        one = torch.ones((), dtype=self.u.dtype, device=self.u.device)
        if not self.guard:
            return one, one * 0.0
        g_min, g_max, degenerate = self._range()
        if self.rescale:
            span = torch.where(degenerate, 1.0, g_max - g_min)
            a, b = 2.0 / span, 0.01 - 2.0 * g_min / span
        else:
            a, b = one, one * 0.0
        return torch.where(degenerate, 0.0, a), torch.where(degenerate, 1.0, b)

    def matrix(self) -> Tensor:
        """G as a (K, K) float64 matrix."""
        k = self.u.shape[0]
        index = torch.arange(k, device=self.u.device)
        return self.entries(index[:, None], index[None, :])


def csr_weights(
    direction: Tensor | SpectralDirection,
    adv_logits: Tensor,
    target: Tensor,
    include_diagonal: bool = True,
    pred: Tensor | None = None,
) -> Tensor:
    """Per-sample CSR weights w_k = G[yhat_k, y_k], yhat_k = argmax f(x_adv_k) (docs/explanation/method.md §2).

    With ``include_diagonal=False`` (paper form) correctly classified samples get weight 0; with
    ``True`` (authors' code) they get G[y_k, y_k].

    Returns:
        detached float32 tensor (B,).
    """
    if isinstance(direction, SpectralDirection):
        _check_inputs(adv_logits, target, direction.u.shape[0])
        pred = adv_logits.detach().argmax(dim=1) if pred is None else pred
        weights = direction.entries(pred, target).to(device=adv_logits.device, dtype=torch.float32)
    else:
        if not isinstance(direction, Tensor) or direction.ndim != 2 or direction.shape[0] != direction.shape[1]:
            shape = tuple(direction.shape) if isinstance(direction, Tensor) else type(direction).__name__
            raise ValueError(f"direction must be a square (K, K) matrix; got shape {shape}.")
        _check_inputs(adv_logits, target, direction.shape[0])
        pred = adv_logits.detach().argmax(dim=1) if pred is None else pred
        weights = direction.to(device=adv_logits.device, dtype=torch.float32)[pred, target]
    if not include_diagonal:
        weights = torch.where(pred == target, torch.zeros_like(weights), weights)
    return weights


def surrogate_contributions(
    adv_logits: Tensor,
    target: Tensor,
    surrogate: Surrogate = "kl",
    gamma: float = 0.0,
    margin: Margin = "additive",
    adv_ce: Tensor | None = None,
) -> Tensor:
    """What each sample charges to the cells of its true-class column: S (B, K), S[k, i] for cell (i, y_k).

    * ``counts``: 1 in the cell (i_k, y_k) of a charged sample (not differentiable);
    * ``kl`` (paper): CE(f(x_adv_k), y_k) = KL(onehot(y_k) || p(x_adv_k)) in that cell (differentiable);
    * ``soft``: p_i(x_adv_k) in every cell i != y_k (a soft confusion matrix; every sample, no margin).

    i_k = argmax_{c != y_k} z_k[c] is the top wrong class; a sample is charged when its prediction after the
    margin (:func:`margin_predictions`) is wrong, which with gamma = 0 means misclassified. S[k, y_k] = 0.

    Args:
        adv_logits: (B, K) logits of the adversarial examples (with their graph for ``kl``/``soft``).
        target: (B,) true classes.
        surrogate: ``"counts"``, ``"kl"`` or ``"soft"``.
        gamma: confusion margin of the charge test (``counts``/``kl``).
        margin: ``"additive"`` (paper: wrong logits + gamma) or ``"relative"`` (code: true logit x (1 - gamma)).
        adv_ce: per-sample CE of ``adv_logits`` if already computed (the training forward's, reused).

    Returns:
        float32 (B, K).
    """
    check_choice("surrogate", surrogate, Surrogate)
    num_classes = adv_logits.shape[1]
    is_true = F.one_hot(target, num_classes).bool()
    if surrogate == "soft":
        return adv_logits.float().softmax(dim=1).masked_fill(is_true, 0.0)
    pred = margin_predictions(adv_logits, target, gamma, margin)
    charged = F.one_hot(pred, num_classes).float() * (pred != target).float()[:, None]
    if surrogate == "counts":
        return charged
    ce = cross_entropy(adv_logits, target) if adv_ce is None else adv_ce.float()
    return charged * ce[:, None]


class Charges(NamedTuple):
    """What a batch charges to the surrogate confusion matrix when each sample charges at most one cell.

    The ``counts`` and ``kl`` surrogates: sample k charges ``values[k]`` to the cell (``cells[k]``, y_k) (0 when it is
    not charged). The dense (B, K) form (:func:`surrogate_contributions`) holds the same numbers with K - 1 zeros
    per row; every consumer takes either, and the compact one costs O(B) instead of O(B K).
    """

    cells: Tensor
    values: Tensor


def charges(
    adv_logits: Tensor,
    target: Tensor,
    surrogate: Surrogate = "kl",
    gamma: float = 0.0,
    margin: Margin = "additive",
    adv_ce: Tensor | None = None,
    pred: Tensor | None = None,
) -> Charges | Tensor:
    """:func:`surrogate_contributions` in the compact :class:`Charges` form for ``counts`` and ``kl``.

    Dense (B, K) for ``soft``, which charges every wrong cell. ``values`` keep their graph for ``kl``. ``pred``: the
    argmax of ``adv_logits`` if already computed (used when gamma = 0, where the margin changes nothing).
    """
    check_choice("surrogate", surrogate, Surrogate)
    if surrogate == "soft":
        return surrogate_contributions(adv_logits, target, surrogate, gamma, margin, adv_ce)
    pred = pred if pred is not None and gamma == 0.0 else margin_predictions(adv_logits, target, gamma, margin)
    charged = (pred != target).float()
    if surrogate == "counts":
        return Charges(pred, charged)
    ce = cross_entropy(adv_logits, target) if adv_ce is None else adv_ce.float()
    return Charges(pred, charged * ce)


def add_contributions_(
    matrix: Tensor, contributions: Tensor | Charges, target: Tensor, scale: Tensor | None = None
) -> None:
    """In place: matrix[:, y_k] += scale_k S[k, :] for every sample k (detached; the matrix's dtype).

    :class:`Charges` add one scalar per sample at its cell, O(B), instead of O(B K) strided column writes; the same
    sums. ``scale``: an optional (B,) factor per sample.
    """
    if isinstance(contributions, Charges):
        values = contributions.values.detach().to(matrix.dtype)
        values = values if scale is None else values * scale
        matrix.view(-1).index_add_(0, contributions.cells * matrix.shape[1] + target, values)
        return
    s = contributions.detach().to(matrix.dtype)
    s = s if scale is None else s * scale[:, None]
    matrix.index_add_(1, target, s.t())


def surrogate_confusion(contributions: Tensor, target: Tensor, class_counts: Tensor | None = None) -> Tensor:
    """L (K, K) from per-sample contributions: L[:, j] = sum_{k: y_k = j} S[k, :] (/ m_j with ``class_counts``).

    Differentiable in ``contributions``; float32 unless the contributions are float64. With ``class_counts``
    (m_j, e.g. the global batch's) each column is divided by its class count (classes with none stay 0).
    """
    num_classes = contributions.shape[1]
    matrix = contributions.new_zeros(num_classes, num_classes).index_add(1, target, contributions.t())
    if class_counts is not None:
        matrix = matrix / class_counts.to(matrix).clamp_min(1.0)
    return matrix


def spectral_penalty(
    direction: Tensor | SpectralDirection,
    contributions: Tensor | Charges,
    target: Tensor,
    class_counts: Tensor | None,
) -> Tensor:
    """sum_ij G_ij L_ij = sum_k sum_i G[i, y_k] S[k, i] / m_{y_k}: the paper form's penalty for a direction G.

    With G = u1 v1^T of L itself this *is* sigma_max(L) = u1^T L v1, and its gradient is that of
    ``torch.linalg.matrix_norm(L, ord=2)`` (G a constant). With G from another matrix (the previous epoch's,
    an EMA) it is the first-order step along that matrix's top singular direction. Scalar, float32.
    A :class:`SpectralDirection` G = a u v^T + b gives sum_k [a v[y_k] (S[k] . u) + b sum_i S[k, i]] / m_{y_k}
    without forming G: O(B K).
    """
    if isinstance(contributions, Charges):  # one cell per sample: G[cell_k, y_k] times its value
        values = contributions.values.float()
        if isinstance(direction, SpectralDirection):
            per_sample = direction.entries(contributions.cells, target).to(values) * values
        else:
            per_sample = direction.to(device=values.device, dtype=torch.float32)[contributions.cells, target] * values
    elif isinstance(direction, SpectralDirection):
        a, b = (t.to(device=contributions.device, dtype=torch.float32) for t in direction.affine())
        u = direction.u.to(device=contributions.device, dtype=torch.float32)
        v = direction.v.to(device=contributions.device, dtype=torch.float32)
        s = contributions.float()
        # elementwise, not a matmul: autocast would run a matmul in bf16/fp16
        per_sample = a * (s * u).sum(dim=1) * v[target] + b * s.sum(dim=1)
    else:
        g = direction.to(device=contributions.device, dtype=torch.float32)
        weights = torch.index_select(g, 1, target).t()  # (B, K): G[i, y_k] (index_select: 5x faster than g[:, target])
        per_sample = (weights * contributions.float()).sum(dim=1)
    if class_counts is not None:
        per_sample = per_sample / class_counts.to(per_sample).clamp_min(1.0)[target]
    return per_sample.sum()


def confusion_diagnostics(rates: Tensor) -> dict[str, Tensor]:
    """What CSR targets, from a robust confusion matrix of per-class error rates (zero diagonal).

    ``spectral_norm`` = ||C||_2 = sigma_1, ``sigma_2``, ``sigma_ratio`` = sigma_1 / sigma_2 (inf when
    sigma_2 = 0), ``l1_norm`` = ||C||_1 = max column sum = the worst-class robust error, and
    ``nu`` = ||C||_1 / ||C||_2 (the factor of the paper's bound ||C||_1 <= nu ||C||_2; 0 < nu <= sqrt(K) for C != 0;
    NaN for C = 0). float64 scalars.
    """
    c = rates.detach().to(torch.float64)
    singular = torch.linalg.svdvals(c)
    sigma_1 = singular[0]
    sigma_2 = singular[1] if singular.numel() > 1 else torch.zeros_like(sigma_1)
    l1 = c.sum(dim=0).max()
    return {
        "spectral_norm": sigma_1,
        "sigma_2": sigma_2,
        "sigma_ratio": torch.where(sigma_2 > 0, sigma_1 / sigma_2, torch.full_like(sigma_1, float("inf"))),
        "l1_norm": l1,
        "nu": torch.where(sigma_1 > 0, l1 / sigma_1, torch.full_like(sigma_1, float("nan"))),
    }


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
    Equivalently ``sum_{i<j} s^a_ij s^b_ij / sqrt(sum_{i<j} |s^a_ij| sum_{i<j} |s^b_ij|)``,
    ``s^a_ij = sign(a_i - a_j)``.

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
