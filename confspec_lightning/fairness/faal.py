"""Fairness-aware adversarial learning (FAAL; Zhang et al., 2024): KL-constrained per-batch class weights.

Per batch (docs/explanation/method.md §7): margins m_i = max_{k != y_i} p_k(x_adv_i) - p_{y_i}(x_adv_i); with
a_c = sum_{i: y_i = c} m_i = n_c M_c, the class weights solve

    max_q  sum_c a_c q_c   subject to  KL(uniform || q) <= r,  q on the simplex.

The KKT conditions give q_c = (1 / (nu - a_c)) / sum_j 1 / (nu - a_j) with nu > max_c a_c; KL(uniform || q(nu))
falls monotonically from infinity to 0 as nu grows, so nu is found by bisection (on log(nu - max a),
a fixed number of steps: no host synchronisation, no CPU solver). Classes absent from the batch are
left out of the problem (uniform and q range over the present ones). Under DDP, a_c and n_c are summed
over ranks first, so every rank uses the q of the global batch. The loss is (K/B) sum_i q_{y_i} l_i
with l the base objective's per-sample loss: every base term is weighted by K q_{y_i} (detached).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from confspec_lightning.fairness.base import EpochContext, FairnessMethod
from confspec_lightning.fairness.statistics import classwise_sum, sum_across_ranks
from confspec_lightning.objectives import LossAdjustment, ObjectiveOutput
from confspec_lightning.validation import check_int, check_real


def probability_margins(logits: Tensor, target: Tensor) -> Tensor:
    """m_i = max_{k != y_i} p_k - p_{y_i} (float32, in [-1, 1]; positive = misclassified)."""
    probs = logits.detach().float().softmax(dim=1)
    true = probs.gather(1, target[:, None]).squeeze(1)
    others = probs.scatter(1, target[:, None], -1.0).max(dim=1).values
    return others - true


def kl_from_uniform(q: Tensor, present: Tensor) -> Tensor:
    """KL(u || q) with u uniform over the ``present`` classes (q > 0 on them)."""
    n = present.sum()
    log_q = torch.where(present, q.clamp(min=1e-300).log(), 0.0)
    return -torch.log(n) - log_q.sum() / n


#: Bisection bounds of log t (t = nu - max a): t stays a normal float64 far from overflow and underflow.
LOG_T_MIN, LOG_T_MAX = -690.0, 690.0


def _log_expm1(x: float) -> float:
    """log(e^x - 1) for x > 0 without overflow (large x) or cancellation (small x)."""
    return x + math.log1p(-math.exp(-x)) if x > 20.0 else math.log(math.expm1(x))


def faal_class_weights(scores: Tensor, present: Tensor, radius: float = 0.5, iterations: int = 60) -> Tensor:
    """argmax_q sum_c scores_c q_c s.t. KL(uniform || q) <= radius, q on the simplex of the present classes.

    Args:
        scores: a_c = n_c M_c (K,), any float dtype (computed in float64).
        present: (K,) bool, classes that take part (others get q = 0).
        radius: r > 0.
        iterations: bisection steps on log(nu - max a).

    Returns:
        q (K,) float64, summing to 1 over the present classes.
    """
    if not (radius > 0 and math.isfinite(radius)):
        raise ValueError(f"radius={radius!r} is not accepted; it must be a finite number > 0.")
    a = scores.to(torch.float64)
    present = present.to(device=a.device, dtype=torch.bool)
    a_max = torch.where(present, a, -math.inf).max()
    a_min = torch.where(present, a, math.inf).min()
    spread = (a_max - a_min).clamp(min=0.0)
    gap = torch.where(present, a_max - a, 0.0)  # >= 0

    def weights(log_t: Tensor) -> Tensor:
        # t >= e^-690 > 0: the argmax class (gap 0) never divides by zero
        inv = torch.where(present, 1.0 / (log_t.clamp(LOG_T_MIN, LOG_T_MAX).exp() + gap), 0.0)
        return inv / inv.sum()

    # KL(u || q) <= log(max q / min q) <= log(1 + spread / t): t_hi = spread / (e^r - 1) is feasible.
    # With n present classes, q_c <= t / spread for the class of smallest score, so
    # KL(u || q) >= -log n + log(spread / t) / n > r once log t < log spread - n (r + log n): t_lo.
    log_spread = torch.log(spread.clamp(min=1e-30))
    n = present.sum().clamp(min=1).to(torch.float64)
    log_hi = (log_spread - _log_expm1(radius)).clamp(LOG_T_MIN, LOG_T_MAX)
    log_lo = torch.minimum(log_spread - n * (radius + torch.log(n)) - 1.0, log_hi).clamp(LOG_T_MIN, LOG_T_MAX)
    for _ in range(iterations):
        mid = 0.5 * (log_lo + log_hi)
        infeasible = kl_from_uniform(weights(mid), present) > radius
        log_lo = torch.where(infeasible, mid, log_lo)
        log_hi = torch.where(infeasible, log_hi, mid)
    q = weights(log_hi)
    uniform = present.to(torch.float64) / present.sum().clamp(min=1)
    return torch.where(spread > 1e-12, q, uniform)


class FAAL(FairnessMethod):
    """FAAL class weights per batch (see the module docstring); composes with any base objective.

    Args:
        radius: r of the constraint KL(uniform || q) <= r (0.5).
        iterations: bisection steps (60; float64, converged far below float32 precision).
    """

    name = "faal"

    weight_sum: Tensor
    weight_batches: Tensor

    def __init__(self, radius: float = 0.5, iterations: int = 60) -> None:
        super().__init__()
        check_real("faal.radius", radius, lambda v: v > 0, "> 0 (paper: 0.5)")
        check_int("faal.iterations", iterations, 1)
        self.radius = radius
        self.iterations = iterations

    def bind(self, num_classes: int, model: nn.Module | None = None) -> None:
        """Running sum of the per-class weights K q over the epoch (for logging)."""
        super().bind(num_classes, model)
        self.register_buffer("weight_sum", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("weight_batches", torch.zeros((), dtype=torch.float64))

    def on_train_epoch_start(self, context: EpochContext) -> dict[str, Tensor]:
        self.weight_sum.zero_()
        self.weight_batches.zero_()
        return {}

    def class_weights(self, adv_logits: Tensor, target: Tensor) -> Tensor:
        """K_present q (float64 (K,)) from the batch's adversarial logits, summed over ranks."""
        margins = probability_margins(adv_logits, target)
        stats = torch.stack(
            [
                classwise_sum(margins, target, self.num_classes),
                classwise_sum(torch.ones_like(margins), target, self.num_classes),
            ]
        )
        scores, counts = sum_across_ranks(stats)
        present = counts > 0
        q = faal_class_weights(scores, present, self.radius, self.iterations)
        return q * present.sum()

    def loss_adjustment(self, output: ObjectiveOutput, target: Tensor) -> LossAdjustment:
        """Every base term weighted by K q_{y_i}."""
        weights = self.class_weights(output.adv_logits, target)
        self.weight_sum += weights
        self.weight_batches += 1
        per_sample = weights.float()[target]
        return LossAdjustment(term_weights={role: per_sample for role in output.terms})

    def classwise_state(self) -> dict[str, Tensor]:
        return {"weight": (self.weight_sum / self.weight_batches.clamp(min=1)).float()}

    def extra_repr(self) -> str:
        return f"radius={self.radius}, iterations={self.iterations}"
