"""Class-wise calibrated fair adversarial training (CFA; Wei et al., CVPR 2023).

With R_c the previous epoch's training robust accuracy of class c (the accuracy on the adversarial
examples training made, summed over ranks), from epoch ``warmup_epochs`` on (docs/explanation/method.md §7):

* class-wise budget: eps_c = (lambda_eps + R_c) eps, step_c = eps_c * (step / eps);
* class-wise TRADES weight: beta_c = (lambda_beta + R_c) beta, loss (1 - b_c) CE + b_c KL with
  b_c = beta_c / (1 + beta_c) (only with a base objective that has the KL term);
* fairness-aware weight averaging (FAWA): after an epoch, if the worst-class PGD-10 accuracy of the
  trained model on the validation split is >= threshold, average <- decay * average + (1 - decay) * model
  over the whole state (parameters and float buffers; the first accepted epoch copies the model).
  Validation, test and predict then use the averaged weights; the trained weights stay in ``net``.

The average is not a buffer: DDP would broadcast a second copy of the model from rank 0 at every step. It is the
method's *extra state* (``fairness.<i>._extra_state`` in checkpoints), identical on every rank because it averages
the weights DDP keeps identical, and it follows the model's device when it is updated.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from confspec_lightning import functional as CF
from confspec_lightning.attacks import AttackConfig
from confspec_lightning.fairness.base import EpochContext, FairnessMethod
from confspec_lightning.fairness.statistics import classwise_accuracy
from confspec_lightning.objectives import LossAdjustment, ObjectiveOutput
from confspec_lightning.validation import check_bool, check_int, check_real


def cfa_class_eps(robust_acc: Tensor, eps: float, base: float = 0.5) -> Tensor:
    """eps_c = (base + R_c) eps."""
    return (base + robust_acc) * eps


def cfa_trades_weights(robust_acc: Tensor, beta: float, base: float = 0.5) -> Tensor:
    """b_c = beta_c / (1 + beta_c), beta_c = (base + R_c) beta: the KL share of (1 - b_c) CE + b_c KL."""
    beta_c = (base + robust_acc) * beta
    return beta_c / (1.0 + beta_c)


def ema_update(average: dict[str, Tensor], current: dict[str, Tensor], decay: float, first: bool) -> None:
    """EMA of a state: average <- decay average + (1 - decay) current for float tensors; others (counters) copied."""
    with torch.no_grad():
        for key, avg in average.items():
            value = current[key].detach()
            if first or not avg.is_floating_point():
                avg.copy_(value)
            else:
                avg.mul_(decay).add_(value.to(avg.dtype), alpha=1.0 - decay)


class CFA(FairnessMethod):
    """CFA: class-wise eps, class-wise TRADES weight, fairness-aware weight averaging (module docstring).

    Args:
        eps_base: lambda of eps_c = (lambda + R_c) eps (0.5).
        beta_base: lambda of beta_c = (lambda + R_c) beta (0.5).
        warmup_epochs: the class-wise calibration starts at this epoch (10 from scratch; 0 for fine-tuning,
            where it starts once one epoch of statistics exists).
        classwise_eps: calibrate the training attack's budget per class.
        classwise_beta: calibrate the TRADES weight per class.
        weight_average: fairness-aware weight averaging.
        average_decay: decay of the weight average (0.88).
        average_threshold: minimum worst-class validation PGD accuracy for an epoch to enter the average (0.2).
        average_eval_steps: PGD steps of that validation check (10).
    """

    name = "cfa"

    train_robust_acc: Tensor
    has_statistics: Tensor
    average_updates: Tensor

    def __init__(
        self,
        eps_base: float = 0.5,
        beta_base: float = 0.5,
        warmup_epochs: int = 10,
        classwise_eps: bool = True,
        classwise_beta: bool = True,
        weight_average: bool = True,
        average_decay: float = 0.88,
        average_threshold: float = 0.2,
        average_eval_steps: int = 10,
    ) -> None:
        super().__init__()
        for name, value in (("cfa.eps_base", eps_base), ("cfa.beta_base", beta_base)):
            check_real(name, value, lambda v: v >= 0, ">= 0 (paper: 0.5)")
        check_real("cfa.average_decay", average_decay, lambda v: 0.0 <= v < 1.0, "in [0, 1) (0.88)")
        check_real("cfa.average_threshold", average_threshold, lambda v: 0.0 <= v <= 1.0, "in [0, 1] (0.2)")
        check_int("cfa.warmup_epochs", warmup_epochs, 0)
        check_int("cfa.average_eval_steps", average_eval_steps, 1)
        for name, flag in (
            ("cfa.classwise_eps", classwise_eps),
            ("cfa.classwise_beta", classwise_beta),
            ("cfa.weight_average", weight_average),
        ):
            check_bool(name, flag)
        self.eps_base = eps_base
        self.beta_base = beta_base
        self.warmup_epochs = warmup_epochs
        self.classwise_eps = classwise_eps
        self.classwise_beta = classwise_beta
        self.weight_average = weight_average
        self.average_decay = average_decay
        self.average_threshold = average_threshold
        self.average_eval_steps = average_eval_steps
        self._calibrated = False
        #: the averaged state of the network (its state-dict keys); empty until bound
        self.average: dict[str, Tensor] = {}

    def bind(self, num_classes: int, model: nn.Module | None = None) -> None:
        """R_c (ones until measured), the training-confusion accumulator and the averaged state."""
        super().bind(num_classes, model)
        self.register_buffer("train_robust_acc", torch.ones(num_classes, dtype=torch.float64))
        self.register_buffer("has_statistics", torch.zeros((), dtype=torch.bool))
        self.register_buffer("average_updates", torch.zeros((), dtype=torch.long))
        if self.weight_average:
            if model is None:
                raise ValueError("cfa.weight_average needs the model at bind time (RobustFairLitModule passes it).")
            self.average = {key: torch.zeros_like(value) for key, value in model.state_dict().items()}

    # ---------------------------------------------------- the averaged state
    def get_extra_state(self) -> dict[str, Tensor]:
        """The averaged state (checkpoints carry it as ``_extra_state``; plain tensors: ``weights_only`` loads)."""
        return dict(self.average)

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        if self.weight_average:
            missing = sorted(set(self.average) - set(state))
            if missing:
                raise ValueError(f"CFA: the checkpoint's weight average lacks {missing[:5]} (another network?).")
            self.average = {key: state[key].to(self.average[key]) for key in self.average}

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # checkpoints of 0.1 kept CFA's own copy of the training confusion; the module's shared one replaces it
        for key in [k for k in state_dict if k.startswith(prefix + "train_confusion.")]:
            del state_dict[key]
        # checkpoints of 0.1 kept the average as buffers average.<key with '.' -> '__'>
        old = [key for key in state_dict if key.startswith(prefix + "average.")]
        if not old and not self.weight_average:  # nothing averaged: an older checkpoint has no extra state
            state_dict.setdefault(prefix + "_extra_state", {})
        if old and prefix + "_extra_state" not in state_dict:
            names = {key.replace(".", "__"): key for key in self.average}
            state_dict[prefix + "_extra_state"] = {
                names.get(key[len(prefix + "average.") :], key): state_dict.pop(key) for key in old
            }
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------ calibration
    def on_train_epoch_start(self, context: EpochContext) -> dict[str, Tensor]:
        """R_c from last epoch's training predictions (the module's shared training confusion, summed over ranks)."""
        if context.train_confusion is None:
            raise ValueError("CFA needs the training confusion in its EpochContext (RobustFairLitModule gives it).")
        errors, counts = context.train_confusion.synced_state()
        if int(counts.sum()) > 0:
            self.train_robust_acc.copy_(CF.classwise_accuracy(errors, counts).nan_to_num(1.0))
            self.has_statistics.fill_(True)
        self._calibrated = context.epoch >= self.warmup_epochs and bool(self.has_statistics)
        logs: dict[str, Tensor] = {"cfa/calibrated": torch.tensor(float(self._calibrated))}
        if bool(self.has_statistics):
            logs["cfa/train_robust_acc_worst"] = self.train_robust_acc.min()
        return logs

    @property
    def sets_attack_budget(self) -> bool:
        return self.classwise_eps

    def attack_budget(self, target: Tensor, attack: AttackConfig) -> tuple[Tensor | None, Tensor | None]:
        if not (self._calibrated and self.classwise_eps):
            return None, None
        eps = cfa_class_eps(self.train_robust_acc, attack.eps, self.eps_base).float()[target]
        return eps, eps * (attack.step / attack.eps)

    def loss_adjustment(self, output: ObjectiveOutput, target: Tensor) -> LossAdjustment:
        beta = output.coefficients.get("kl", 0.0)
        if not (self._calibrated and self.classwise_beta and "kl" in output.terms and beta > 0):
            return LossAdjustment()
        share = cfa_trades_weights(self.train_robust_acc, beta, self.beta_base).float()[target]
        return LossAdjustment(term_weights={"ce": 1.0 - share, "kl": share / beta})

    # -------------------------------------------------------- weight averaging
    def on_train_epoch_end(self, context: EpochContext) -> dict[str, Tensor]:
        """FAWA: add the trained weights to the average if the worst validation class clears the threshold."""
        if not self.weight_average:
            return {}
        attack = replace(context.attack, steps=self.average_eval_steps)
        _, robust = classwise_accuracy(context.model, context.validation_batches(), attack, self.num_classes)
        # a class without validation samples does not hold the average back
        worst = robust.accuracy(empty=1.0).min().to(self.train_robust_acc.device)
        accepted = bool(worst >= self.average_threshold)
        if accepted:
            current = context.model.state_dict()
            self.average = {key: value.to(current[key].device) for key, value in self.average.items()}
            ema_update(self.average, current, self.average_decay, first=int(self.average_updates) == 0)
            self.average_updates += 1
        return {"cfa/val_robust_acc_worst": worst, "cfa/average_updated": torch.tensor(float(accepted))}

    def evaluation_weights(self) -> dict[str, Tensor] | None:
        if not self.weight_average or int(self.average_updates) == 0:
            return None
        return dict(self.average)

    def classwise_state(self) -> dict[str, Tensor]:
        state = {"train_robust_acc": self.train_robust_acc.float()}
        if self._calibrated and self.classwise_eps:
            state["eps_multiplier"] = (self.eps_base + self.train_robust_acc).float()
        return state

    def extra_repr(self) -> str:
        return (
            f"eps_base={self.eps_base}, beta_base={self.beta_base}, warmup_epochs={self.warmup_epochs}, "
            f"weight_average={self.weight_average}, average_decay={self.average_decay}"
        )
