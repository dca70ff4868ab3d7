"""torchmetrics metrics: the robust confusion matrix, synchronised across DDP ranks by summation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from confspec_lightning import functional as CF
from confspec_lightning.functional import Margin, Surrogate
from confspec_lightning.validation import check_choice


class _StatisticsMetric(Metric):
    """A metric of summed statistics whose states stay on the metric's device when a checkpoint is loaded."""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # A checkpoint is loaded on the CPU; keep the states on the device (and dtype) the metric lives on.
        for key in self._defaults:
            if prefix + key in state_dict:
                current = getattr(self, key)
                state_dict[prefix + key] = state_dict[prefix + key].to(device=current.device, dtype=current.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RobustConfusionMatrix(_StatisticsMetric):
    """Accumulates the robust confusion matrix C (rows = predicted, columns = true, zero diagonal).

    States (both ``dist_reduce_fx="sum"``, so ``compute()`` sums them over every DDP rank):
    ``errors`` (K, K), what the samples charged to each cell, and ``class_counts`` (K,) int64 samples per
    true class. With ``surrogate="counts"`` (default) ``errors`` holds int64 error counts; with ``"kl"`` or
    ``"soft"`` it holds float64 sums of the surrogate values
    (:func:`~confspec_lightning.functional.surrogate_contributions`), the matrix CSR's paper form uses.
    ``compute()`` returns C as float64 (normalised per true class when ``normalize``).
    ``update`` only launches device kernels; it never synchronises host and device.

    Args:
        num_classes: K.
        gamma: confusion margin (see :func:`confspec_lightning.functional.margin_predictions`).
        margin: ``"relative"`` (authors' code) or ``"additive"`` (paper).
        normalize: divide each column by its class count (rates instead of counts).
        surrogate: ``"counts"``, ``"kl"`` or ``"soft"``: what a sample adds to its cell.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    errors: Tensor
    class_counts: Tensor

    def __init__(
        self,
        num_classes: int,
        gamma: float = 0.0,
        margin: Margin = "relative",
        normalize: bool = False,
        surrogate: Surrogate = "counts",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} is not accepted; it must be an integer >= 2.")
        check_choice("margin", margin, Margin)
        check_choice("surrogate", surrogate, Surrogate)
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma={gamma!r} is not accepted; it must lie in [0, 1).")
        self.num_classes = num_classes
        self.gamma = gamma
        self.margin = margin
        self.normalize = normalize
        self.surrogate = surrogate
        k = num_classes
        dtype = torch.long if surrogate == "counts" else torch.float64
        self.add_state("errors", torch.zeros(k, k, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("class_counts", torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch of logits (B, K) with labels (B,)."""
        CF._check_inputs(logits, target, self.num_classes)
        if self.surrogate == "counts":
            pred = CF.margin_predictions(logits, target, self.gamma, self.margin)
            CF.accumulate_confusion_(self.errors, self.class_counts, pred, target)
            return
        contributions = CF.charges(logits.detach(), target, self.surrogate, self.gamma, self.margin)
        CF.add_contributions_(self.errors, contributions, target)
        self.class_counts.scatter_add_(0, target, torch.ones_like(target))

    def compute(self) -> Tensor:
        """C as float64 (K, K); normalised per true class when ``normalize``."""
        return CF.confusion_from_counts(self.errors, self.class_counts, self.normalize)

    # Summaries of the accumulated (and, under DDP, synchronised) state.
    def classwise_accuracy(self) -> Tensor:
        """Per-class accuracy (K,) float64 over all ranks (``counts`` only); NaN for a class without samples."""
        errors, counts = self.synced_state()
        return CF.classwise_accuracy(errors, counts)

    def classwise_error(self) -> Tensor:
        """Per-class error rate (K,) float64 over all ranks; NaN for a class without samples."""
        errors, counts = self.synced_state()
        return CF.classwise_error(errors, counts)

    def spectral_norm(self) -> Tensor:
        """||C||_2 of the (normalised, if ``normalize``) accumulated matrix."""
        return CF.spectral_norm(self.compute())

    def synced_state(self) -> tuple[Tensor, Tensor]:
        """(errors, class_counts) summed over all DDP ranks (a collective: call it on every rank)."""
        states = synced_states(self)
        return states["errors"], states["class_counts"]

    def plot(  # type: ignore[override]
        self,
        val: Tensor | None = None,
        ax: Any = None,
        class_names: list[str] | None = None,
        title: str = "robust confusion matrix",
    ) -> tuple[Any, Any]:
        """Heatmap of C (rows = predicted, columns = true class) with matplotlib.

        Returns:
            ``(figure, axes)``.
        """
        from confspec_lightning.plotting import confusion_heatmap

        confusion = self.compute() if val is None else val
        return confusion_heatmap(confusion, class_names=class_names, title=title, ax=ax)


class EpochMeans:
    """Weighted means of per-step scalars over an epoch, summed over DDP ranks once, when asked for.

    ``update`` only adds on the device (no collective, no host read); :meth:`synced_means` is one all-reduce of
    every running sum (a collective: every rank calls it, with the same names, which come from the config).
    It replaces Lightning's ``self.log(..., on_epoch=True, sync_dist=True)``, whose reduction runs wherever a
    logged value is first read: on rank 0 inside the progress bar's epoch-end hook, on the other ranks later,
    so a collective of the module's own in between (a metric's sync) pairs with the wrong one and DDP hangs.
    :meth:`state` / :meth:`load_state` carry the global sums through a checkpoint (rank 0 keeps them).
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: Tensor | None = None  # (len(names) + 1,) float64: the weighted sums, then the total weight

    def update(self, values: dict[str, Tensor], weight: float) -> None:
        """Add ``weight`` x each value (scalars, detached) and ``weight`` to the total."""
        names = sorted(values)
        row = torch.stack([values[n].detach().to(torch.float64).reshape(()) for n in names]) * weight
        row = torch.cat([row, row.new_full((1,), float(weight))])
        if self.sums is None or names != self.names:
            if self.sums is not None and self.names:
                raise ValueError(f"the logged epoch values changed from {self.names} to {names} within an epoch.")
            self.names, self.sums = names, row
            return
        self.sums = self.sums + row.to(self.sums.device)

    def synced_means(self) -> dict[str, float]:
        """The means over the epoch and all ranks (a collective); empty when nothing was added. Resets."""
        from confspec_lightning.fairness.statistics import sum_across_ranks

        if self.sums is None:
            return {}
        total = sum_across_ranks(self.sums).cpu()
        self.reset()
        weight = float(total[-1])
        return {name: float(value) / weight for name, value in zip(self.names, total[:-1].tolist(), strict=True)}

    def reset(self) -> None:
        self.sums = None

    def state(self) -> dict[str, Any]:
        """The sums over all ranks (a collective under DDP), for a checkpoint."""
        from confspec_lightning.fairness.statistics import sum_across_ranks

        if self.sums is None:
            return {"names": [], "sums": torch.zeros(0, dtype=torch.float64)}
        return {"names": list(self.names), "sums": sum_across_ranks(self.sums).cpu()}

    def load_state(self, state: dict[str, Any], rank: int, device: torch.device) -> None:
        """Restore :meth:`state`'s sums on rank 0 (the other ranks start from zero, so the global sum is kept)."""
        if not state.get("names"):
            self.reset()
            return
        self.names = list(state["names"])
        sums = state["sums"].to(device=device, dtype=torch.float64)
        self.sums = sums if rank == 0 else torch.zeros_like(sums)


def synced_states(metric: Metric) -> dict[str, Tensor]:
    """Copies of every state of ``metric`` reduced over all DDP ranks (a collective: call it on every rank)."""
    with metric.sync_context(should_sync=metric.sync_on_compute, should_unsync=True):
        return {name: getattr(metric, name).clone() for name in metric._defaults}


def save_global_states(metrics: Iterable[tuple[str, Metric]], state_dict: dict[str, Tensor]) -> None:
    """Write every metric's states, summed over all DDP ranks, into ``state_dict`` as ``<name>.<state>``.

    A collective: call it on every rank.
    Metric states are per rank; the checkpoint holds their global sum, and :func:`load_global_states` lets
    only rank 0 keep it (the others start from zero), so the synced sum is the same after a resume,
    whatever the number of processes.
    """
    for name, metric in metrics:
        for key, value in synced_states(metric).items():
            state_dict[f"{name}.{key}"] = value.detach().cpu()


def load_global_states(metrics: Iterable[tuple[str, Metric]], state_dict: dict[str, Tensor], rank: int) -> None:
    """The other half of :func:`save_global_states`: on ranks other than 0, zero the metrics' stored states."""
    if rank == 0:
        return
    for name, metric in metrics:
        for key in metric._defaults:
            if f"{name}.{key}" in state_dict:
                state_dict[f"{name}.{key}"] = torch.zeros_like(state_dict[f"{name}.{key}"])


class ClassProbabilityMatrix(_StatisticsMetric):
    """Mean predicted distribution per true class: P[i, j] = mean over class-i samples of p_j(x).

    Rows are the true class (unlike the confusion matrix, whose columns are), as DAFA (Lee et al., ICLR 2024)
    defines it. States ``probability_sums`` (K, K) float64 and ``class_counts`` (K,) int64, both sum-reduced
    over DDP ranks; ``compute()`` returns P (float64; a row without samples is 0). Softmax in float32.

    Args:
        num_classes: K.
    """

    is_differentiable = False
    full_state_update = False

    probability_sums: Tensor
    class_counts: Tensor

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} is not accepted; it must be an integer >= 2.")
        self.num_classes = num_classes
        self.add_state("probability_sums", torch.zeros(num_classes, num_classes, dtype=torch.float64), "sum")
        self.add_state("class_counts", torch.zeros(num_classes, dtype=torch.long), "sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch of logits (B, K) with labels (B,)."""
        CF._check_inputs(logits, target, self.num_classes)
        probabilities = logits.detach().float().softmax(dim=1).to(torch.float64)
        self.probability_sums.index_add_(0, target, probabilities)
        self.class_counts.scatter_add_(0, target, torch.ones_like(target))

    def compute(self) -> Tensor:
        """P (K, K) float64, rows = true class."""
        return self.probability_sums / self.class_counts.to(torch.float64).clamp_min(1.0)[:, None]
