"""The fairness methods of a run, stacked: how their budgets, loss adjustments and epoch hooks combine.

:class:`FairnessStack` is the ``fairness`` list of :class:`~confspec_lightning.module.RobustFairLitModule` (an
``nn.ModuleList``, so checkpoints keep the keys ``fairness.<i>.<state>``). It

* refuses, when it is built, what cannot work: a method that needs a loss term the base objective lacks, and two
  methods that both set per-sample attack budgets;
* merges the methods' attack budgets (at most one sets them) and collects their loss adjustments (weights
  multiply, terms add: :func:`~confspec_lightning.objectives.combine_terms`);
* runs their end-of-epoch hooks exactly once per epoch (``epoch_end_done``, in checkpoints: a resumed fit
  neither repeats nor skips them) and catches up on a resume from a checkpoint written before them;
* swaps a method's evaluation weights (CFA's average) in and out of the network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from confspec_lightning.attacks import AttackConfig
from confspec_lightning.fairness.base import EpochContext, FairnessMethod
from confspec_lightning.objectives import LossAdjustment, ObjectiveOutput


class FairnessStack(nn.ModuleList):
    """Methods applied in order (see the module docstring).

    Args:
        methods: the fairness methods.
        objective_terms: the loss terms of the base objective (methods name the ones they need).
        objective_name: the base objective's name, for error messages.
    """

    epoch_end_done: Tensor

    def __init__(
        self, methods: Iterable[FairnessMethod] = (), objective_terms: Iterable[str] = (), objective_name: str = ""
    ) -> None:
        super().__init__(list(methods))
        terms = list(objective_terms)
        for method in self:
            if not isinstance(method, FairnessMethod):
                raise TypeError(f"fairness entries must be FairnessMethod instances; got {type(method).__name__}.")
            missing = [term for term in method.required_terms if term not in terms]
            if missing:
                raise ValueError(
                    f"the fairness method {type(method).__name__} needs the loss term(s) {missing}, which the "
                    f"objective {objective_name!r} does not have (its terms: {terms}); use objective: trades."
                )
        setters = [type(m).__name__ for m in self if m.sets_attack_budget]
        if len(setters) > 1:
            raise ValueError(
                f"two fairness methods both set per-sample attack budgets ({' and '.join(setters)}; e.g. FRL "
                "reweight_remargin and CFA classwise_eps); keep only one."
            )
        # the last epoch whose end-of-epoch hooks ran
        self.register_buffer("epoch_end_done", torch.tensor(-1, dtype=torch.long))
        self._stashed_weights: dict[str, Tensor] | None = None

    def bind(self, num_classes: int, model: nn.Module) -> None:
        """Let every method allocate its per-class state."""
        for method in self:
            method.bind(num_classes, model)

    # ------------------------------------------------------------- per batch
    def attack_budget(self, target: Tensor, attack: AttackConfig) -> tuple[Tensor | None, Tensor | None]:
        """The per-sample (eps, step) of the one method that sets them, else (None, None)."""
        for method in self:
            eps, step = method.attack_budget(target, attack)
            if eps is not None:
                return eps, step
        return None, None

    def loss_adjustments(self, output: ObjectiveOutput, target: Tensor) -> list[LossAdjustment]:
        return [method.loss_adjustment(output, target) for method in self]

    def batch_end(self, output: ObjectiveOutput, target: Tensor) -> None:
        for method in self:
            method.on_train_batch_end(output, target)

    # ------------------------------------------------------------- per epoch
    def epoch_start(self, context: EpochContext) -> dict[str, Tensor]:
        """The methods' epoch-start hooks (after the previous epoch's end hooks, if a resume skipped them)."""
        logs: dict[str, Tensor] = {}
        if not len(self):
            return logs
        if context.epoch > 0:  # resumed from a checkpoint written before the last epoch's end hooks
            logs.update(self.epoch_end(dataclasses.replace(context, epoch=context.epoch - 1)) or {})
        for method in self:
            logs.update(method.on_train_epoch_start(context))
        return logs

    def epoch_end(self, context: EpochContext) -> dict[str, Tensor] | None:
        """The methods' end-of-epoch hooks, once per epoch: their logs, or None when they had already run."""
        if not len(self) or int(self.epoch_end_done) >= context.epoch:
            return None
        logs: dict[str, Tensor] = {}
        for method in self:
            logs.update(method.on_train_epoch_end(context))
        self.epoch_end_done.fill_(context.epoch)
        return logs

    def classwise_state(self) -> dict[str, Tensor]:
        """Every method's per-class state as ``<method>/<key>`` -> (K,) values."""
        return {f"{m.name}/{key}": values for m in self for key, values in m.classwise_state().items()}

    # ------------------------------------------------------------- evaluation
    def use_evaluation_weights(self, model: nn.Module) -> None:
        """Put a method's evaluation weights (CFA's average) into ``model``; the trained ones are kept aside."""
        for method in self:
            weights = method.evaluation_weights()
            if weights is not None and self._stashed_weights is None:
                self._stashed_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                model.load_state_dict(weights)

    def restore_trained_weights(self, model: nn.Module) -> None:
        if self._stashed_weights is not None:
            model.load_state_dict(self._stashed_weights)
            self._stashed_weights = None
