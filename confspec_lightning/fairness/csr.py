"""Confusional spectral regularisation (CSR; Jin et al., ICLR 2025), as a composable fairness method.

Two forms (``docs/explanation/method.md``, "CSR"), selected by ``form``:

* ``code`` (the authors' code, default): with a base objective whose classification term is ``"ce"``,

      L = (1 - alpha) * [ce term] + [other base terms] + alpha * (1/B) sum_k w_k CE(f(x_adv_k), y_k),
      w_k = G[yhat_k, y_k],  G = rescale(u1 v1^T of C),  yhat_k = argmax f(x_adv_k),

  C the robust confusion matrix (hard counts by default). For TRADES this is (1 - alpha) CE(f(x)) + beta KL +
  alpha w CE(f(x_adv)); for PGD-AT it is (1 - alpha) CE(f(x_adv)) + alpha w CE(f(x_adv)).
* ``paper`` (the paper's statement): the base objective unchanged plus alpha * sigma_max(L), differentiated
  through, with L the surrogate confusion matrix of the batch: L[i, j] = (1/m_j) * sum of the values the
  class-j samples charge to cell (i, j) (``surrogate``: ``kl`` = the CE of a charged sample, ``soft`` =
  p_i(x_adv), ``counts`` = 1 and no gradient). It is computed as sum_ij G_ij L_ij with G = u1 v1^T of the
  direction matrix (:func:`~confspec_lightning.functional.spectral_penalty`): with the batch's own L as the
  direction matrix this equals sigma_max(L) and its gradient.

The direction matrix (``confusion_source``):

* ``epoch_pass`` (authors' code): at the start of every epoch, PGD (CE, the training budget) over this
  rank's training data in eval mode, no weight update; G is computed once and kept for the epoch;
* ``streaming``: accumulated from the adversarial predictions training already makes during epoch e; its G
  is used in epoch e + 1 (epoch 0 uses G = ones in the code form, no penalty in the paper form);
* ``batch``: the current global batch's own matrix (summed over DDP ranks every step);
* ``ema``: an exponential moving average of the batch matrices, M <- d M + (1 - d) L_batch (``ema_decay``; as
  the follow-up "CAR", Zhu, Jin et al. 2026, arXiv 2603.16732), updated every step.

Accumulated matrices are summed over DDP ranks before the SVD (torchmetrics sum reduction), so every rank
uses the same G. In the paper form each rank's share of the penalty is scaled by the world size, so that
DDP's gradient averaging yields the gradient of the global batch's sigma_max. G, the EMA and the
accumulated matrix are buffers/persistent metric state: checkpoints carry them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from confspec_lightning import functional as CF
from confspec_lightning.attacks import eval_mode
from confspec_lightning.fairness.base import EpochContext, FairnessMethod
from confspec_lightning.fairness.statistics import sum_across_ranks, world_size
from confspec_lightning.functional import Margin, Surrogate
from confspec_lightning.metrics import RobustConfusionMatrix
from confspec_lightning.objectives import LossAdjustment, ObjectiveOutput
from confspec_lightning.validation import check_bool, check_choice, check_int, check_real

Form = Literal["code", "paper"]
ConfusionSource = Literal["epoch_pass", "streaming", "batch", "ema"]
DirectionSolver = Literal["power", "svd"]
#: Sources whose matrix is built anew every step from the (global) batch.
PER_STEP_SOURCES: tuple[str, ...] = ("batch", "ema")
#: Subspace iterations per step of the per-step sources when ``power_iterations`` is None.
DEFAULT_POWER_ITERATIONS = {"batch": 8, "ema": 2}

#: What ``form`` sets for every option left unset (None).
FORM_DEFAULTS: dict[str, dict[str, object]] = {
    "code": {
        "surrogate": "counts",
        "margin": "relative",
        "confusion_source": "epoch_pass",
        "include_diagonal": True,
        "rescale": True,
        "normalize": False,
    },
    "paper": {
        "surrogate": "kl",
        "margin": "additive",
        "confusion_source": "batch",
        "include_diagonal": False,
        "rescale": False,
        "normalize": True,
    },
}


class CSR(FairnessMethod):
    """Confusional spectral regulariser (see the module docstring for both forms and every source).

    Options left at ``None`` take the value of the chosen ``form`` (:data:`FORM_DEFAULTS`).

    Args:
        alpha: weight of the spectral term, in [0, 1] (code default 0.3).
        gamma: confusion margin in [0, 1) (default 0.0; the paper also uses 0.1).
        form: ``"code"`` (authors' code: G-weighted adversarial CE) or ``"paper"`` (alpha * sigma_max(L)).
        surrogate: what a sample charges to its cell: ``"counts"`` (code default), ``"kl"`` (paper default:
            the CE of the charged sample) or ``"soft"`` (p_i(x_adv) into every wrong cell). In the code form it
            only changes the matrix G comes from; the paper form needs ``kl`` or ``soft`` (``counts`` has no
            gradient).
        margin: ``"relative"`` (code default: true logit scaled by 1 - gamma) or ``"additive"`` (paper default:
            wrong logits raised by gamma).
        confusion_source: ``"epoch_pass"`` (code default), ``"streaming"``, ``"batch"`` (paper default) or ``"ema"``.
        ema_decay: decay d of the ``ema`` source, in [0, 1) (0.9).
        direction_solver: how the per-step sources (``batch``, ``ema``) find the top singular pair every step:
            ``"power"`` (default: :func:`~confspec_lightning.functional.top_singular_subspace`, subspace
            iteration warm-started from the previous step, on the device, no host sync, O(K^2)) or ``"svd"``
            (a float64 SVD with a check of the matrix's entries: O(K^3) and one host sync per step; the
            reference). The epoch-level sources always take the SVD, once per epoch.
        power_iterations: iterations n of the ``power`` solver per step; None (default): 8 for ``batch`` (each
            step's matrix is new: the SVD's pair to a cosine >= 1 - 1e-6 when sigma_2 <= sigma_1 / 2, from any
            start) and 2 for ``ema`` (the average moves little per step: the previous step's vectors are nearly
            converged). The error shrinks like (sigma_3 / sigma_1)^(2n) from the previous step's vectors.
        include_diagonal: code form: correctly classified samples get G[y, y] (default) or 0. The paper form
            charges only errors (must stay unset or false).
        rescale: rescale G to [0.01, 2.01] (code default) or use u1 v1^T as it is (paper default).
        normalize: normalise the matrix per true class, 1/m_j (paper default) or raw sums (code default).
    """

    name = "csr"

    direction: Tensor
    ema_matrix: Tensor
    ema_initialised: Tensor
    subspace: Tensor
    top_pair: Tensor

    def __init__(
        self,
        alpha: float = 0.3,
        gamma: float = 0.0,
        form: Form = "code",
        surrogate: Surrogate | None = None,
        margin: Margin | None = None,
        confusion_source: ConfusionSource | None = None,
        ema_decay: float = 0.9,
        include_diagonal: bool | None = None,
        rescale: bool | None = None,
        normalize: bool | None = None,
        direction_solver: DirectionSolver = "power",
        power_iterations: int | None = None,
    ) -> None:
        super().__init__()
        check_real("csr.alpha", alpha, lambda v: 0.0 <= v <= 1.0, "in [0, 1] (code default 0.3)")
        check_real("csr.gamma", gamma, lambda v: 0.0 <= v < 1.0, "in [0, 1) (default 0.0)")
        check_real("csr.ema_decay", ema_decay, lambda v: 0.0 <= v < 1.0, "in [0, 1) (default 0.9)")
        check_choice("csr.form", form, Form)
        check_choice("csr.direction_solver", direction_solver, DirectionSolver)
        if power_iterations is not None:
            check_int("csr.power_iterations", power_iterations, 1)
        given = {
            "surrogate": surrogate,
            "margin": margin,
            "confusion_source": confusion_source,
            "include_diagonal": include_diagonal,
            "rescale": rescale,
            "normalize": normalize,
        }
        options = {key: FORM_DEFAULTS[form][key] if value is None else value for key, value in given.items()}
        for key in ("include_diagonal", "rescale", "normalize"):
            check_bool(f"csr.{key}", options[key])
        check_choice("csr.surrogate", options["surrogate"], Surrogate)
        check_choice("csr.margin", options["margin"], Margin)
        check_choice("csr.confusion_source", options["confusion_source"], ConfusionSource)
        if form == "paper" and options["surrogate"] == "counts":
            raise ValueError(
                "csr.surrogate='counts' is not accepted with csr.form='paper': hard counts have no gradient, so "
                "sigma_max(L) could not be lowered; choose 'kl' (the paper's) or 'soft', or csr.form='code'."
            )
        if form == "paper" and options["include_diagonal"]:
            raise ValueError(
                "csr.include_diagonal=True is not accepted with csr.form='paper': the surrogate matrix charges "
                "only errors (its diagonal is 0); leave it unset (null: a config stacked on a code-form one, such as "
                "methods/trades_csr.yaml, keeps that config's CSR options unless they are set to null), or use "
                "csr.form='code'."
            )
        self.alpha = alpha
        self.gamma = gamma
        self.form: Form = form
        self.surrogate: Surrogate = options["surrogate"]  # type: ignore[assignment]
        self.margin: Margin = options["margin"]  # type: ignore[assignment]
        self.confusion_source: ConfusionSource = options["confusion_source"]  # type: ignore[assignment]
        self.ema_decay = ema_decay
        self.include_diagonal = bool(options["include_diagonal"])
        self.rescale = bool(options["rescale"])
        self.normalize = bool(options["normalize"])
        self.direction_solver: DirectionSolver = direction_solver
        self.power_iterations = power_iterations
        self._source_stats: Tensor | None = None  # per-step sources: running sums of (sigma_1, sigma_1/sigma_2, steps)

    def bind(self, num_classes: int, model: nn.Module | None = None) -> None:
        """Allocate G, the EMA matrix and the confusion accumulator for ``num_classes`` classes."""
        super().bind(num_classes, model)
        if self.iterates:  # u1, v1 (and the warm start) instead of G: entries are formed where needed
            self.register_buffer("subspace", CF.initial_subspace(num_classes))
            self.register_buffer("top_pair", torch.zeros(num_classes, 2, dtype=torch.float64))
        else:
            initial = torch.ones if self.form == "code" else torch.zeros  # paper form: no penalty before a matrix
            self.register_buffer("direction", initial(num_classes, num_classes, dtype=torch.float32))
        if self.confusion_source == "ema":
            # the average is kept as ema_scale * ema_matrix (see _update_ema); checkpoints hold the product
            self.register_buffer("ema_matrix", torch.zeros(num_classes, num_classes, dtype=torch.float64))
            self.register_buffer("ema_initialised", torch.zeros((), dtype=torch.bool))
            self.register_buffer("ema_scale", torch.ones((), dtype=torch.float64), persistent=False)
            self._steps_since_fold = 0
            self.register_state_dict_post_hook(_save_ema_average)
            self.register_load_state_dict_pre_hook(_load_ema_average)
        self.confusion = RobustConfusionMatrix(
            num_classes, gamma=self.gamma, margin=self.margin, surrogate=self.surrogate
        )
        self.confusion.persistent(True)

    # ---------------------------------------------------------------- direction
    @property
    def per_step(self) -> bool:
        """Whether the direction matrix is built anew every step (``batch``, ``ema``)."""
        return self.confusion_source in PER_STEP_SOURCES

    @property
    def shares_training_confusion(self) -> bool:
        """``streaming`` of hard counts without a margin: the module's training confusion is this very matrix."""
        return self.confusion_source == "streaming" and self.surrogate == "counts" and self.gamma == 0.0

    @property
    def iterates(self) -> bool:
        """Whether the per-step direction comes from the warm-started subspace iteration (no SVD, no sync)."""
        return self.per_step and self.direction_solver == "power"

    def _factored(self, u: Tensor, v: Tensor) -> CF.SpectralDirection:
        return CF.SpectralDirection(u, v, rescale=self.rescale, guard=self.form == "code" or self.rescale)

    def direction_matrix(self) -> Tensor:
        """G (K, K) in use now (float32): the buffer of the SVD paths, or formed from u1, v1 of the last step."""
        if not self.iterates:
            return self.direction
        return self._factored(self.top_pair[:, 0], self.top_pair[:, 1]).matrix().float()

    def direction_of(self, matrix: Tensor) -> tuple[Tensor, Tensor]:
        """G from a direction matrix, and the matrix's singular values (float64).

        Code form (or ``rescale``): u1 v1^T rescaled, ones when degenerate; paper form: u1 v1^T itself (zero for
        a zero matrix: no penalty).
        """
        u, v, singular = CF.top_singular_pair(matrix)
        if self.form == "code" or self.rescale:
            return CF.direction_from_singular_vectors(u, v, rescale=self.rescale), singular
        return torch.outer(u, v), singular

    def on_train_epoch_start(self, context: EpochContext) -> dict[str, Tensor]:
        """Recompute G: from an attack pass over the training data, or from last epoch's stream."""
        self._source_stats = None
        if self.per_step:
            return {}
        if self.confusion_source == "epoch_pass":
            self.confusion.reset()
            for x, y in context.train_batches():
                self.confusion.update(self._attacked_logits(context, x, y), y)
        errors, counts = self.confusion.synced_state()
        if self.shares_training_confusion and context.train_confusion is not None and int(counts.sum()) == 0:
            # the module's, accumulated once per step for every method (CSR's own holds a stream only when it was
            # restored from a 0.1 checkpoint, which kept it there)
            errors, counts = context.train_confusion.synced_state()
        if int(counts.sum()) == 0:  # nothing accumulated yet (streaming, epoch 0): keep G
            return {}
        matrix = CF.confusion_from_counts(errors, counts, normalize=self.normalize)
        self.direction.copy_(self.direction_of(matrix)[0])
        if self.confusion_source == "streaming":
            self.confusion.reset()  # start this epoch's stream; epoch_pass keeps the C that made G
        rates = CF.confusion_from_counts(errors, counts, normalize=True)
        _, _, singular = CF.top_singular_pair(rates)
        logs = {
            "csr/source_sigma1": singular[0],
            "csr/source_sigma_ratio": singular[0] / singular[1].clamp_min(1e-12),
        }
        if self.surrogate == "counts":
            logs["csr/train_confusion_spectral_norm"] = CF.spectral_norm(rates)
            logs["csr/train_robust_acc_worst"] = CF.classwise_accuracy(errors, counts).nan_to_num(1.0).min()
        return logs

    @staticmethod
    def _attacked_logits(context: EpochContext, x: Tensor, y: Tensor) -> Tensor:
        x_adv = context.adversarial(x, y, loss="ce")
        # no graph needed; safe under autocast: this pass has its own autocast context, so the cast-weight
        # cache it fills is dropped before the training step's forwards
        with torch.no_grad(), eval_mode(context.model):
            return context.model(x_adv)

    def ema_average(self) -> Tensor:
        """The ``ema`` source's average M (K, K), float64 (a new tensor: ``ema_scale * ema_matrix``)."""
        return self.ema_matrix * self.ema_scale

    def _update_ema(
        self, contributions: Tensor | CF.Charges, target: Tensor, counts: Tensor, dense: Tensor | None
    ) -> None:
        """M <- d M + (1 - d) L_batch (the first step: M <- L_batch) without a pass over M.

        M is kept as s * A: the decay multiplies the scalar s, and the batch's entries are added to A divided by the
        new s (O(B) for one process's charges, one K x K add for the all-reduced matrix ``dense``). Every
        :attr:`fold_period` steps s is folded into A (one pass), before d^steps could underflow; d = 0 folds every
        step (M = L_batch).
        """
        d = self.ema_decay
        first = ~self.ema_initialised
        if d == 0.0 or self._steps_since_fold >= self.fold_period:
            self.ema_matrix.mul_(self.ema_scale if d > 0.0 else 0.0)
            self.ema_scale.fill_(1.0)
            self._steps_since_fold = 0
        scale = torch.where(first | (d == 0.0), 1.0, d * self.ema_scale).to(self.ema_scale)  # d = 0: A was zeroed
        factor = torch.where(first, 1.0, 1.0 - d).to(scale) / scale  # A's share of this batch
        if dense is not None:
            self.ema_matrix.addcmul_(dense, factor)
        else:
            per_sample = factor / counts.clamp_min(1.0)[target] if self.normalize else factor.expand(target.shape)
            CF.add_contributions_(self.ema_matrix, contributions, target, scale=per_sample)
        self.ema_scale.copy_(scale)
        self.ema_initialised.fill_(True)
        self._steps_since_fold += 1

    @property
    def fold_period(self) -> int:
        """Steps between two folds of the EMA's scale into its matrix: d^period stays above 1e-100 (d = 0.9: 2184)."""
        d = self.ema_decay
        return 1 if d == 0.0 else max(1, int(-100.0 / math.log10(d)))

    def _batch_matrix(self, contributions: Tensor | CF.Charges, target: Tensor) -> tuple[Tensor, Tensor]:
        """The global batch's dense direction matrix (``batch``) and its class counts; ``ema``: the counts only.

        One all-reduce of K (K + 1) values under DDP (``ema`` with one process: none; its batch entries are added
        where they fall, O(B), :meth:`_update_ema`).
        """
        k = self.num_classes
        device = target.device
        if self.confusion_source == "ema" and world_size() == 1:
            counts = CF.counts_per_class(target, k).double()
            self._update_ema(contributions, target, counts, None)
            return self.ema_matrix, counts
        local = torch.zeros(k * k + k, dtype=torch.float64, device=device)
        CF.add_contributions_(local[: k * k].view(k, k), contributions, target)
        local[k * k :].index_add_(0, target, torch.ones_like(target, dtype=torch.float64))
        total = sum_across_ranks(local)
        sums, counts = total[: k * k].view(k, k), total[k * k :]
        matrix = sums / counts.clamp_min(1.0) if self.normalize else sums
        if self.confusion_source == "batch":
            return matrix, counts
        self._update_ema(contributions, target, counts, matrix)
        return self.ema_matrix, counts

    def _step_direction(self, contributions: Tensor, target: Tensor) -> tuple[Tensor | CF.SpectralDirection, Tensor]:
        """The direction of this step's matrix (per-step sources), and the global batch's class counts.

        ``batch`` with the power solver never forms the K x K matrix: its products come from the samples'
        contributions (:class:`~confspec_lightning.functional.BatchSurrogateOperator`, each partial product summed
        over DDP ranks); ``ema`` keeps its dense average.
        """
        if self.iterates and self.confusion_source == "batch":
            counts = sum_across_ranks(CF.counts_per_class(target, self.num_classes).double())
            operator = CF.BatchSurrogateOperator(
                contributions, target, self.num_classes, counts if self.normalize else None, reduce=sum_across_ranks
            )
        else:
            matrix, counts = self._batch_matrix(contributions, target)
            ema = self.confusion_source == "ema"
            if not self.iterates:  # the reference: a float64 SVD (and the entry check: one host sync)
                direction, singular = self.direction_of(self.ema_average() if ema else matrix)
                self.direction.copy_(direction)
                self._record_source(singular)
                return direction, counts
            operator = CF.DenseOperator(matrix, scalar=self.ema_scale if ema else None)
        iterations = self.power_iterations or DEFAULT_POWER_ITERATIONS[self.confusion_source]
        u, v, singular, basis = CF.top_singular_subspace(operator, self.subspace, iterations)
        self.subspace.copy_(basis)
        self.top_pair.copy_(torch.stack([u, v], dim=1))
        self._record_source(singular)
        return self._factored(u, v), counts

    def loss_adjustment(self, output: ObjectiveOutput, target: Tensor) -> LossAdjustment:
        """Code form: (1 - alpha) on the ce term + alpha (1/B) sum_k w_k CE_adv; paper form: + alpha sigma_max(L)."""
        contributions = None
        counts = None
        pred = output.adv_logits.detach().argmax(dim=1) if self.form == "code" else None  # shared: one argmax
        if self.form == "paper" or self.per_step:
            contributions = CF.charges(  # compact for counts and kl (one cell per sample), dense for soft
                output.adv_logits, target, self.surrogate, self.gamma, self.margin, adv_ce=output.adv_ce, pred=pred
            )
        if self.per_step:
            direction, counts = self._step_direction(contributions, target)
        else:
            direction = self.direction
        if self.form == "code":
            weights = CF.csr_weights(direction, output.adv_logits, target, self.include_diagonal, pred=pred)
            return LossAdjustment(
                term_weights={"ce": 1.0 - self.alpha},
                extra_terms={"csr": self.alpha * (weights * output.adv_ce).mean()},
            )
        if counts is None and self.normalize:  # a fixed direction, but the per-class 1/m_j of this global batch
            counts = sum_across_ranks(CF.counts_per_class(target, self.num_classes).double())
        share = CF.spectral_penalty(direction, contributions, target, counts if self.normalize else None)
        # DDP averages gradients over ranks: scaled by W, the ranks' shares add up to the global penalty's gradient
        return LossAdjustment(extra_terms={"csr": self.alpha * world_size() * share})

    def _record_source(self, singular: Tensor) -> None:
        """Running sums of sigma_1 and sigma_1 / sigma_2 of the per-step matrices (device only, no sync)."""
        ratio = singular[0] / singular[1].clamp_min(1e-12)
        stats = torch.stack([singular[0], ratio, torch.ones_like(ratio)])
        self._source_stats = stats if self._source_stats is None else self._source_stats + stats

    def on_train_epoch_end(self, context: EpochContext) -> dict[str, Tensor]:
        """Per-step sources: the epoch's mean sigma_1 and sigma_1 / sigma_2 of the direction matrices."""
        if self._source_stats is None:
            return {}
        sigma, ratio, steps = self._source_stats
        self._source_stats = None
        return {"csr/source_sigma1": sigma / steps, "csr/source_sigma_ratio": ratio / steps}

    def on_train_batch_end(self, output: ObjectiveOutput, target: Tensor) -> None:
        """Streaming source: add the batch's adversarial predictions to C (device only, no sync).

        Not when the module's shared training confusion is that matrix (:attr:`shares_training_confusion`).
        """
        if self.confusion_source == "streaming" and not self.shares_training_confusion:
            self.confusion.update(output.adv_logits.detach(), target)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, gamma={self.gamma}, form={self.form!r}, surrogate={self.surrogate!r}, "
            f"margin={self.margin!r}, confusion_source={self.confusion_source!r}, ema_decay={self.ema_decay}, "
            f"include_diagonal={self.include_diagonal}, rescale={self.rescale}, normalize={self.normalize}, "
            f"direction_solver={self.direction_solver!r}, power_iterations={self.power_iterations}"
        )


def _save_ema_average(module: CSR, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """Checkpoints hold the ``ema`` source's average itself (``ema_scale * ema_matrix``), as before the scale."""
    key = prefix + "ema_matrix"
    if key in state_dict:
        state_dict[key] = module.ema_average().detach()


def _load_ema_average(module: CSR, state_dict: dict, prefix: str, *args) -> None:
    """A loaded average is the matrix itself: the scale starts at 1."""
    if prefix + "ema_matrix" in state_dict:
        module.ema_scale.fill_(1.0)
        module._steps_since_fold = 0
