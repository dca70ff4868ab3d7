"""``RobustFairLitModule``: adversarial training with class-fairness methods, as a thin Lightning shell.

It wires the pure-torch parts: the training attack (:mod:`~confspec_lightning.attacks`) -> the base objective
(:mod:`~confspec_lightning.objectives`) -> the fairness methods (a :class:`~.fairness.stack.FairnessStack`: CSR
and the baselines) -> the loss (:func:`~confspec_lightning.objectives.combine_terms`). Evaluation is its
component :class:`~confspec_lightning.evaluation.evaluator.Evaluator`, returned from ``configure_callbacks``.

Subclass it to change a piece without copying the rest: override :meth:`generate_adversarial` (the training
attack), :meth:`compute_objective` (the base loss terms) or :meth:`compute_loss` (how terms and methods
combine); give another evaluator, test attacks or fairness methods as arguments.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torchmetrics import Metric

from confspec_lightning import functional as CF
from confspec_lightning.attacks import PGD, Attack, EvalAttackConfig, TrainAttackConfig, eval_mode
from confspec_lightning.attacks.noise import SampleNoise
from confspec_lightning.data.base import SamplePositions
from confspec_lightning.evaluation.evaluator import Evaluator, attack_progress, robust_key
from confspec_lightning.evaluation.report import CLEAN
from confspec_lightning.fairness import passes
from confspec_lightning.fairness.base import EpochContext, FairnessMethod
from confspec_lightning.fairness.stack import FairnessStack
from confspec_lightning.metrics import EpochMeans, RobustConfusionMatrix, load_global_states, save_global_states
from confspec_lightning.models.layouts import LayoutName
from confspec_lightning.models.normalize import InputNormalization, Normalize, resolve_input_normalization
from confspec_lightning.models.weights import load_backbone_weights, load_error, raised_by_torch_load
from confspec_lightning.numerics import NonFiniteGuard
from confspec_lightning.objectives import (
    AWP,
    BaseObjective,
    ObjectiveName,
    ObjectiveOutput,
    build_objective,
    combine_terms,
)
from confspec_lightning.validation import (
    check_bool,
    check_choice,
    check_compile_backend,
    check_int,
    check_normalization,
    check_num_classes,
    choices,
)

#: True while ``confspec`` (:class:`~confspec_lightning.cli.ConfspecCLI`) instantiates the module: its
#: components then come from the config, and the hyperparameters keep their config (class paths and arguments)
FROM_CONFIG: ContextVar[bool] = ContextVar("confspec_from_config", default=False)

#: Names logged by ``log_global`` (Lightning's sync_dist advice is silenced for exactly these).
_GLOBAL_NAMES: set[str] = set()

#: Checkpoint key of the running epoch means (:class:`~.metrics.EpochMeans`).
EPOCH_MEANS_KEY = "confspec_epoch_means"


@rank_zero_only
def rank_zero_print(message: str) -> None:
    """Print on the global rank 0 only."""
    print(message, flush=True)


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class RobustFairLitModule(pl.LightningModule):
    """Adversarial training (TRADES or PGD-AT) with stackable class-fairness methods such as CSR.

    Args:
        backbone: any classifier ``nn.Module`` mapping normalised images to ``num_classes`` logits.
        num_classes: K (linked from the data module by the CLI).
        objective: base objective: a name (``"trades"`` (default), ``"pgd_at"``, ``"mart"``) or a
            :class:`~confspec_lightning.objectives.BaseObjective` chosen by ``class_path`` (your own included).
        beta: TRADES's and MART's weight of the KL term, for an objective given by name (default 6.0).
        train_attack: threat model of the training attack (its attack loss follows ``objective``).
        eval_attack: threat model of the evaluation PGD (CE objective; default PGD-20): validation's robust
            accuracy, the budget of every test attack, ``predict``'s adversarial predictions.
        fairness: fairness methods applied in order, e.g. ``[CSR(alpha=0.3)]``; empty = plain base.
        weight_perturbation: adversarial weight perturbation around the objective
            (:class:`~confspec_lightning.objectives.AWP`; TRADES-AWP = ``objective: trades`` + ``AWP()``).
        training_attack: the attack making the training batch (default
            :class:`~confspec_lightning.attacks.PGD`, on the objective's attack loss with ``train_attack``).
        validation_attack: the attack of validation, ``predict`` and the train/test divergence (default ``PGD()``:
            PGD on CE with ``eval_attack``; e.g. ``CW()`` to select checkpoints on CW-20).
        optimizer: optimizer factory called with the parameters (default SGD).
        scheduler: optional LR scheduler factory called with the optimizer (stepped per epoch).
        input_mean: per-channel mean of the inputs (normalisation inside the model; linked from data).
        input_std: per-channel std of the inputs (linked from data).
        class_names: names used in logs and reports (linked from data).
        eval_seed: seed of the evaluation attacks' random starts (the same noise every evaluation).
        init_weights: fine-tuning: a Lightning checkpoint or a plain state-dict file whose weights are
            loaded into the backbone (safely, ``weights_only=True``; wrapper prefixes such as
            ``module.`` are stripped; the public layouts (TRADES's WideResNet, kuangliu's ResNet-18, the
            PreActResNet-18 variants) are converted; a wrong architecture is a clear error). One line says which
            layout was read and what was dropped.
        init_weights_layout: the layout of ``init_weights`` (:mod:`~confspec_lightning.models.layouts`); ``auto``
            (default) detects it from the keys; PreActResNet-18 files need it named (their keys cannot tell the
            shortcut variants apart).
        input_normalization: the model's input normalisation: ``data`` (``input_mean``/``input_std``, the data
            set's), ``none`` (raw [0, 1] pixels: TRADES, MART, AWP, DAFA, RobustBench models) or ``checkpoint``
            (the ``mu``/``sigma`` or ``net.normalize`` the start file records). None (default) decides only where
            nothing is in doubt (no start file, this library's own layout, a file that records the data's); a
            public file that records nothing needs the choice, and a choice that contradicts the file is refused
            (:func:`~confspec_lightning.models.normalize.resolve_input_normalization`).
        start_model_check_batches: before a fit from a file (``init_weights``, a RobustBench backbone) trains, the
            start model's clean and ``eval_attack`` accuracy on this many validation batches per process is printed
            and logged (``start/clean_acc``, ``start/robust_acc``); 0 turns it off.
        test_attacks: the attacks ``test`` runs on every test batch, in order, each an
            :class:`~confspec_lightning.attacks.Attack` chosen by ``class_path`` (``PGD``, ``CW``,
            ``AutoAttack``, or your own); default ``[PGD()]``. ``test`` writes ``evaluation/`` (JSON, Markdown, PNG).
        evaluator: the evaluation component (default :class:`~confspec_lightning.evaluation.Evaluator`).
        channels_last: store the network's weights and feed its inputs in ``torch.channels_last`` memory
            format (NHWC): faster convolutions on tensor-core GPUs under bf16/fp16; numerically the same model.
        compile: compile the network with ``torch.compile`` (in place, so checkpoint keys do not change); the
            attack's input gradients, train and eval mode each get their graph. Pays a one-off compile time.
        compile_mode: ``torch.compile`` mode (``"default"``, ``"reduce-overhead"`` (CUDA graphs),
            ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``).
        compile_backend: ``torch.compile`` backend (default ``"inductor"``; ``"aot_eager"`` traces without
            generating kernels, for debugging).
    """

    #: The metric that selects the best checkpoint, and its direction.
    monitor = "val/robust_acc_worst"
    mode = "max"
    #: How often (in training steps) the loss and its terms are checked for NaN/inf. Every step computes a
    #: device-side flag; on the CPU it is always read at once. With 1 (default) a non-finite step raises in
    #: ``training_step``, before ``backward``, so it never reaches the optimizer (on an accelerator this
    #: reads one flag per step, as Lightning's progress bar already does for ``train/loss``). With N > 1 an
    #: accelerator is read every N steps only (no per-step host-device sync), and up to N - 1 bad steps may
    #: already have updated the weights when it raises; the error names the first bad step.
    nonfinite_check_interval: int = 1

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        objective: ObjectiveName | BaseObjective = "trades",
        beta: float = 6.0,
        train_attack: TrainAttackConfig = TrainAttackConfig(),
        eval_attack: EvalAttackConfig = EvalAttackConfig(),
        fairness: list[FairnessMethod] | None = None,
        weight_perturbation: AWP | None = None,
        training_attack: Attack | None = None,
        validation_attack: Attack | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        scheduler: LRSchedulerCallable | None = None,
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
        class_names: list[str] | None = None,
        eval_seed: int = 0,
        init_weights: str | None = None,
        init_weights_layout: LayoutName = "auto",
        input_normalization: InputNormalization | None = None,
        start_model_check_batches: int = 4,
        test_attacks: list[Attack] | None = None,
        evaluator: Evaluator | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: CompileMode = "default",
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        check_num_classes(num_classes)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module; got {type(backbone).__name__}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries but num_classes={num_classes}.")
        train_attack = TrainAttackConfig.coerce("train_attack", train_attack)
        eval_attack = EvalAttackConfig.coerce("eval_attack", eval_attack)
        check_int("eval_seed", eval_seed, 0)
        check_int("start_model_check_batches", start_model_check_batches, 0)
        check_normalization(input_mean, input_std)
        via_cli = FROM_CONFIG.get()
        components = ["backbone", "fairness", "optimizer", "scheduler", "test_attacks", "evaluator"]
        components += ["weight_perturbation", "training_attack", "validation_attack"]
        if not isinstance(objective, str):
            components.append("objective")
        self.save_hyperparameters(ignore=[] if via_cli else components)
        # plain values only, so that checkpoints load with torch.load(weights_only=True)
        for key, value in (("train_attack", train_attack), ("eval_attack", eval_attack)):
            if key in self.hparams:
                self.hparams[key] = asdict(value)

        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        #: what init_weights held (layout, dropped keys, recorded normalisation); None without a start file
        self.start_weights = None
        if init_weights is not None:
            self.start_weights = load_backbone_weights(backbone, init_weights, layout=init_weights_layout)
        mean, std, self.input_normalization_used = resolve_input_normalization(
            input_normalization,
            input_mean,
            input_std,
            weights_file=init_weights,
            recorded=self.start_weights.normalization if self.start_weights is not None else None,
            foreign_layout=(
                self.start_weights.layout
                if self.start_weights is not None and self.start_weights.layout != "native"
                else None
            ),
            backbone_normalizes=bool(getattr(backbone, "normalizes_inputs", False)),
        )
        if self.start_weights is not None:
            rank_zero_print(
                f"{self.start_weights.summary()}; model input normalisation: {self.input_normalization_used}"
            )
        #: the start model comes from a file (init_weights, or a backbone that loads one: a RobustBench model)
        self.starts_from_file = init_weights is not None or getattr(backbone, "weights_file", None) is not None
        self.start_model_check_batches = start_model_check_batches
        self.net = nn.Sequential()
        self.net.add_module("normalize", nn.Identity() if mean is None else Normalize(mean, std))
        self.net.add_module("backbone", backbone)

        if not isinstance(objective, str | BaseObjective):
            names = ", ".join(map(repr, choices(ObjectiveName)))
            raise TypeError(
                f"objective={objective!r} is not accepted; give a name ({names}) or a BaseObjective (class_path: "
                "confspec_lightning.objectives.TRADES, MART, PGDAT or your own)."
            )
        if isinstance(objective, BaseObjective) and beta != 6.0:
            raise ValueError(
                f"beta={beta!r} applies to an objective given by name; set it in the objective's init_args "
                f"({type(objective).__name__}(beta=...))."
            )
        self.objective = build_objective(objective, beta=beta)
        self.train_attack = train_attack
        self.eval_attack = eval_attack
        self.eval_seed = eval_seed
        for name, attack in (("training_attack", training_attack), ("validation_attack", validation_attack)):
            if attack is not None and not isinstance(attack, Attack):
                raise TypeError(f"{name} must be an Attack (e.g. confspec_lightning.attacks.PGD); got {attack!r}.")
        #: the attack that makes the training batch (the objective's attack loss, the threat model train_attack)
        self.training_attack = training_attack if training_attack is not None else PGD()
        #: the attack of validation, predict and the train/test divergence (the threat model eval_attack)
        self.validation_attack = validation_attack if validation_attack is not None else PGD()
        if weight_perturbation is not None and not isinstance(weight_perturbation, AWP):
            raise TypeError(f"weight_perturbation must be an AWP; got {type(weight_perturbation).__name__}.")
        self.weight_perturbation = weight_perturbation
        self._unperturbed_weights: dict[str, Tensor] | None = (
            None  # the unperturbed weights while AWP's w + v is applied
        )
        self.fairness = FairnessStack(fairness or [], self.objective.terms, self.objective.name)
        self.fairness.bind(num_classes, self.net)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.test_attacks = list(test_attacks) if test_attacks is not None else [PGD()]
        for attack in self.test_attacks:
            if not isinstance(attack, Attack):
                raise TypeError(f"test_attacks entries must be Attack instances; got {type(attack).__name__}.")
        self.evaluator = evaluator if evaluator is not None else Evaluator()
        #: the index in its split of each evaluation sample (the attack noise is keyed by it)
        self.positions = SamplePositions()
        for name, flag in (("channels_last", channels_last), ("compile", compile)):
            check_bool(name, flag)
        check_choice("compile_mode", compile_mode, CompileMode)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile:
            check_compile_backend(compile_backend)
        self.compile_mode: CompileMode | None = compile_mode if compile else None
        self.compile_backend = compile_backend
        # the training-set robust confusion, from the adversarial predictions training makes (free); its
        # diagnostics are logged at every validation (train/confusion_*), see docs/explanation/method.md
        self.train_confusion = RobustConfusionMatrix(num_classes)
        self.train_confusion.persistent(True)
        self._diagnosed_step = -1  # the global step of the last train_confusion_diagnostics
        #: weighted means of the training step's values over the epoch (train/robust_acc, train/loss_*)
        self.epoch_means = EpochMeans()
        self.nonfinite = NonFiniteGuard()
        self.checkpoint_epoch: int | None = None  # the epoch of a loaded checkpoint (validate/test report it)
        #: where ``predict`` writes its CSV (set by ``confspec`` for a run's checkpoint); None: the run's folder
        self.prediction_file: Path | None = None

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = True,
        **kwargs: Any,
    ) -> RobustFairLitModule:
        """Lightning's ``load_from_checkpoint``, loading with ``torch.load(weights_only=True)`` by default.

        A checkpoint from elsewhere never executes pickled code: one that holds pickled Python objects is
        refused with a ``ValueError`` naming the file, and so is a corrupt or truncated file. Pass
        ``weights_only=False`` only for a trusted file.
        """
        loader = super().load_from_checkpoint
        try:
            return loader(checkpoint_path, map_location, hparams_file, strict, weights_only=weights_only, **kwargs)
        except Exception as error:
            if raised_by_torch_load(error):  # reading the file failed (not the model built from it)
                raise load_error("checkpoint", checkpoint_path, error) from error
            raise

    # ------------------------------------------------------------------ model
    @property
    def backbone(self) -> nn.Module:
        """The wrapped classifier (without the normalisation layer)."""
        return self.net.backbone

    def forward(self, x: Tensor) -> Tensor:
        """Logits of images in [0, 1]."""
        return self.net(x)

    def check_logits(self, logits: Tensor) -> None:
        """Raise a clear error when the backbone's output does not have ``num_classes`` logits."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the backbone returns outputs of shape {tuple(logits.shape)}, but num_classes={self.num_classes} "
                f"(from the data); the backbone must return (batch, {self.num_classes}) logits: set its "
                f"output size (e.g. its num_classes argument) to {self.num_classes}."
            )

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Buffers DDP does not broadcast from rank 0 before every forward: the fairness methods' state.

        ``DistributedDataParallel`` (``broadcast_buffers=True``, Lightning's default) copies every buffer of the
        module from rank 0 at each training step. The fairness state (CSR's u1/v1 or G and its EMA matrix, CFA's,
        DAFA's, FAAL's, FRL's and WAT's statistics) is computed on every rank from statistics summed over ranks, so
        it is equal everywhere already; broadcasting it would only cost bandwidth (the ``ema`` source's K x K float64
        matrix is 8 MB at K = 1000) and hide a rank that diverged. The network's own buffers (BatchNorm's running
        statistics) are still broadcast. Read by torch's DDP when Lightning wraps this module.
        """
        return [name for name, _ in self.fairness.named_buffers(prefix="fairness")]

    def setup(self, stage: str) -> None:
        """Fail fast: check the backbone's output size on a dummy batch of the data's input shape."""
        input_shape = getattr(self.trainer.datamodule, "input_shape", None)
        if input_shape is not None:
            try:
                with torch.no_grad(), eval_mode(self.net):
                    logits = self.net(torch.zeros(2, *input_shape, device=self.device))
            except RuntimeError as error:
                raise ValueError(
                    f"the backbone {type(self.backbone).__name__} fails on a batch of the data's input shape "
                    f"{tuple(input_shape)} (channels, height, width): {error}"
                ) from error
            self.check_logits(logits)

    def configure_model(self) -> None:
        """Compile the network in place (``compile``) once, before the strategy wraps it."""
        if self.compile_mode is not None and getattr(self.net, "_compiled_call_impl", None) is None:
            options = {"mode": self.compile_mode} if self.compile_backend == "inductor" else {}
            self.net.compile(backend=self.compile_backend, **options)

    def format_input(self, x: Tensor) -> Tensor:
        """The batch in the network's memory format (``channels_last`` for 4-D images when enabled)."""
        if self.memory_format is torch.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def configure_callbacks(self) -> list[pl.Callback]:
        """The evaluator, and ``predict``'s writer of ``predictions.csv`` in the run directory."""
        from confspec_lightning.evaluation.predictions import PredictionWriter

        return [self.evaluator, PredictionWriter()]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "monitor": self.monitor},
        }

    # --------------------------------------------------------------- training
    def generate_adversarial(self, x: Tensor, target: Tensor) -> Tensor:
        """The training attack on the base objective's attack loss, with per-sample budgets from fairness methods."""
        eps, step = self.fairness.attack_budget(target, self.train_attack)
        return self.training_attack.perturb(
            self.net, x, target, threat=self.train_attack, loss=self.objective.attack_loss, eps=eps, step=step
        )

    # ------------------------------------------------------ weight perturbation
    def perturb_weights(self, x: Tensor, x_adv: Tensor, target: Tensor) -> None:
        """AWP: move the weights to w + v for this step's loss (removed after its backward)."""
        awp = self.weight_perturbation
        if awp is None or not awp.active(self.current_epoch):
            return
        self._unperturbed_weights = awp.apply(self.net, awp.perturbation(self.net, self.objective, x, x_adv, target))

    def restore_weights(self) -> None:
        """Remove the AWP perturbation (w + v -> w, the saved weights), if one is applied."""
        if self._unperturbed_weights is not None:
            AWP.restore(self.net, self._unperturbed_weights)
            self._unperturbed_weights = None

    def on_after_backward(self) -> None:
        """The gradient was taken at w + v; the optimizer steps from w (and checkpoints never see w + v)."""
        self.restore_weights()

    def compute_objective(self, x: Tensor, x_adv: Tensor, target: Tensor) -> ObjectiveOutput:
        """Per-sample terms of the base objective (train-mode forwards)."""
        return self.objective(self.net, x, x_adv, target)

    def compute_loss(self, output: ObjectiveOutput, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss from the base terms and every fairness method's adjustment."""
        return combine_terms(output, self.fairness.loss_adjustments(output, target))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, target = batch
        x = self.format_input(x)
        self.restore_weights()  # a step that never reached backward left its perturbation
        x_adv = self.generate_adversarial(x, target)
        self.perturb_weights(x, x_adv, target)
        try:
            output = self.compute_objective(x, x_adv, target)
            self.check_logits(output.adv_logits)
            loss, parts = self.compute_loss(output, target)
            self.check_finite(loss, parts, batch_idx)
        except BaseException:
            self.restore_weights()
            raise
        self.fairness.batch_end(output, target)
        self.train_confusion.update(output.adv_logits.detach(), target)
        batch_size = target.shape[0]
        robust_acc = (output.adv_logits.detach().argmax(dim=1) == target).float().mean()
        # step values stay local (no per-step collective); epoch values are summed here and over ranks once, at the
        # epoch's end, by every rank in the same hook (see EpochMeans: why not Lightning's sync_dist)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
        self.epoch_means.update({"robust_acc": robust_acc, **{f"loss_{k}": v for k, v in parts.items()}}, batch_size)
        return loss

    def check_finite(self, loss: Tensor, parts: dict[str, Tensor], batch_idx: int) -> None:
        """Stop training with an error naming the term when the loss or one of its terms is NaN/inf.

        Called in ``training_step`` before ``backward`` (see :attr:`nonfinite_check_interval`).

        Raises:
            FloatingPointError: naming the term(s), their value, the epoch and batch, and what to try.
        """
        self.nonfinite.check(
            loss,
            parts,
            epoch=self.current_epoch,
            batch_idx=batch_idx,
            global_step=self.global_step,
            interval=int(self.nonfinite_check_interval),
            deferred=self.defer_finite_check(loss.device),
        )

    def defer_finite_check(self, device: torch.device) -> bool:
        """Whether the NaN/inf flag is only read every :attr:`nonfinite_check_interval` steps (else at once).

        Reading at once is free on the CPU; on an accelerator it is one host-device sync per step.
        """
        return device.type != "cpu" and int(self.nonfinite_check_interval) > 1

    def train_confusion_diagnostics(self) -> dict[str, float] | None:
        """Diagnostics of the training robust confusion of the epoch so far (logged; None without samples).

        A collective under DDP (every rank calls it). The accumulator is the one shared statistic of the training
        predictions: the fairness methods that need it (CFA's R_c, CSR's ``streaming`` matrix with hard counts)
        read it at the next epoch's start, after which it starts again.
        """
        self._diagnosed_step = self.global_step
        errors, counts = self.train_confusion.synced_state()
        if int(counts.sum()) == 0:
            return None
        rates = CF.confusion_from_counts(errors, counts, normalize=True)
        diagnostics = {key: float(value) for key, value in CF.confusion_diagnostics(rates).items()}
        diagnostics["robust_acc"] = float(1.0 - errors.sum() / counts.sum())
        logged = {f"train/confusion_{k}": v for k, v in diagnostics.items() if k != "robust_acc"}
        self.log_global(logged)
        return diagnostics

    def log_global(self, values: dict[str, float | Tensor]) -> None:
        """Log epoch values that are already global (equal on every rank), without ``sync_dist``.

        So no collective hides in Lightning's logging (the progress bar would run it on rank 0 alone; see
        :class:`~.metrics.EpochMeans`).
        """
        for name, value in values.items():
            if name not in _GLOBAL_NAMES:  # Lightning's advice to add sync_dist does not apply to a global value
                _GLOBAL_NAMES.add(name)
                message = re.escape(f"It is recommended to use `self.log({name!r}, ..., sync_dist=True)`")
                warnings.filterwarnings("ignore", message=message)
            value = value.detach().float() if isinstance(value, Tensor) else float(value)
            self.log(name, value, on_step=False, on_epoch=True, sync_dist=False)

    # ----------------------------------------------------- fairness methods
    def on_train_epoch_start(self) -> None:
        self._log_fairness(self.fairness.epoch_start(self.epoch_context(self.current_epoch)))
        self.train_confusion.reset()  # the methods have read last epoch's; this epoch's starts

    def on_validation_start(self) -> None:
        trainer = self.trainer
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.is_last_batch:
            self._fairness_epoch_end()  # the epoch's training is over; before the evaluator swaps weights in

    def on_train_epoch_end(self) -> None:
        # every rank, in this order: the methods' end-of-epoch hooks, the training confusion, the epoch means
        self._fairness_epoch_end()
        if self._diagnosed_step != self.global_step:  # an epoch without validation logs them here
            self.train_confusion_diagnostics()
        self.log_global({f"train/{name}": value for name, value in self.epoch_means.synced_means().items()})

    def _fairness_epoch_end(self) -> None:
        logs = self.fairness.epoch_end(self.epoch_context(self.current_epoch))
        if logs is not None:
            self._log_fairness(logs)
            if self.num_classes <= self.evaluator.max_classwise_scalars:
                for key, values in self.fairness.classwise_state().items():
                    self._log_fairness({f"{key}/{name}": values[c] for c, name in enumerate(self.class_names)})

    def _log_fairness(self, values: dict[str, Tensor]) -> None:
        self.log_global(values)  # the methods' state is equal on all ranks

    def epoch_context(self, epoch: int) -> EpochContext:
        """What fairness methods see at an epoch's start or end: the network, passes over the data, the attack."""
        return EpochContext(
            model=self.net,
            train_batches=lambda: passes.training_batches(self),
            validation_batches=lambda: passes.validation_batches(self),
            attack=self.train_attack,
            training_attack=self.training_attack,
            objective=self.objective,
            train_confusion=self.train_confusion,
            epoch=epoch,
        )

    def on_fit_start(self) -> None:
        """A fit from a file (not resumed): the start model's clean and PGD accuracy first (a collective under DDP)."""
        if self.starts_from_file and self.start_model_check_batches > 0 and self.trainer.ckpt_path is None:
            from confspec_lightning.evaluation.start_model import report_start_model

            report_start_model(self, self.start_model_check_batches)

    # ------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self.positions.reset()

    def on_test_epoch_start(self) -> None:
        self.positions.reset()

    def on_predict_epoch_start(self) -> None:
        self.positions.reset()

    def _batch_position(self, stage: str, dataloader_idx: int, batch_idx: int, size: int) -> tuple[Tensor | None, int]:
        """The split indices of a batch's samples (None: a placeholder batch) and its number in one process's pass."""
        loaders = getattr(self.trainer, f"{stage}_dataloaders")  # val_, test_ or predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, list | tuple) else loaders
        return self.positions.of(loader, (stage, dataloader_idx), batch_idx, size)

    def validation_adversarial(self, x: Tensor, target: Tensor, indices: Tensor) -> Tensor:
        """The validation attack's batch (``eval_attack``), each sample's random start keyed by its index."""
        noise = SampleNoise(self.eval_seed, indices)
        return self.validation_attack.perturb(self.net, x, target, threat=self.eval_attack, generator=noise)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor] | None:
        """Clean and validation-attack predictions of a batch, with each sample's index (the evaluator counts them)."""
        x, target = batch
        indices, _ = self._batch_position("val", dataloader_idx, batch_idx, len(target))
        if indices is None:  # a placeholder batch: a rank without a batch of its own counts nothing
            return None
        x = self.format_input(x)
        clean_logits = self.net(x)
        self.check_logits(clean_logits)
        adv_logits = self.net(self.validation_adversarial(x, target, indices))
        return {
            "index": indices,
            "target": target,
            CLEAN: clean_logits.argmax(1),
            robust_key(self): adv_logits.argmax(1),
        }

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor] | None:
        """Every test attack's predictions on the test split; the validation attack's on a train subset.

        The train subset gives the train/test divergence. Each attack's random starts are keyed by sample index and
        AutoAttack is seeded with ``eval_seed`` plus the batch's number in a single process's pass, so several
        processes give one process's predictions.
        """
        x, target = batch
        indices, number = self._batch_position("test", dataloader_idx, batch_idx, len(target))
        if indices is None:
            return None
        x = self.format_input(x)
        clean_logits = self.net(x)
        self.check_logits(clean_logits)
        out = {"index": indices, "target": target, CLEAN: clean_logits.argmax(1)}
        if dataloader_idx > 0:  # the train subset
            out[robust_key(self)] = self.net(self.validation_adversarial(x, target, indices)).argmax(1)
            return out
        noise = SampleNoise(self.eval_seed, indices)
        for attack in self.test_attacks:
            out[attack.key(self.eval_attack)] = attack.predictions(
                self.net,
                x,
                target,
                threat=self.eval_attack,
                generator=noise,
                seed=self.eval_seed + number,
                progress=attack_progress(self.trainer, f"{attack.name}, test batch {number + 1}"),
            )
        return out

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Clean predictions and, where labels come with the batch, the validation attack's.

        A placeholder batch (a rank with no batch of its own) gives empty predictions.
        """
        x, target = batch if isinstance(batch, list | tuple) and len(batch) == 2 else (batch, None)
        indices, _ = self._batch_position("predict", 0, batch_idx, len(x))
        if indices is None:
            empty = torch.zeros(0, dtype=torch.long, device=x.device)
            return {"pred": empty, **({"target": empty, "adv_pred": empty} if target is not None else {})}
        x = self.format_input(x)
        with torch.no_grad():
            out = {"pred": self.net(x).argmax(dim=1)}
        if target is not None:
            out["target"] = target
            out["adv_pred"] = self.net(self.validation_adversarial(x, target, indices)).argmax(dim=1)
        return out

    def use_evaluation_weights(self) -> None:
        """Evaluate with a method's weights (CFA's average) where one offers them; the trained ones are kept."""
        self.fairness.use_evaluation_weights(self.net)

    def restore_trained_weights(self) -> None:
        self.fairness.restore_trained_weights(self.net)

    # ------------------------------------------------------------ checkpoints
    def _persistent_metrics(self) -> Iterator[tuple[str, Metric]]:
        """The metrics whose states checkpoints carry: the training confusion and the fairness methods' statistics."""
        yield "train_confusion", self.train_confusion
        for name, module in self.fairness.named_modules(prefix="fairness"):
            if isinstance(module, Metric) and any(module._persistent.values()):
                yield name, module

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the persistent metric states summed over all ranks (on every rank; ``save_global_states``)."""
        save_global_states(self._persistent_metrics(), checkpoint["state_dict"])
        checkpoint[EPOCH_MEANS_KEY] = self.epoch_means.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.checkpoint_epoch = checkpoint.get("epoch")  # validate/test report the checkpoint's epoch
        state = checkpoint["state_dict"]
        # checkpoints of 0.1: the end-of-epoch counter lived on the module, the training confusion was not kept
        if "fairness_epoch_end_done" in state:
            state["fairness.epoch_end_done"] = state.pop("fairness_epoch_end_done")
        state.setdefault("fairness.epoch_end_done", torch.tensor(-1, dtype=torch.long))
        for key, value in self.train_confusion.state_dict(prefix="train_confusion.").items():
            state.setdefault(key, torch.zeros_like(value))
        try:
            rank = self.trainer.global_rank
        except RuntimeError:  # not attached to a Trainer (load_from_checkpoint)
            return
        load_global_states(self._persistent_metrics(), state, rank)
        if self.trainer.state.fn == "fit":  # a resumed epoch's means include the batches before the checkpoint
            self.epoch_means.load_state(checkpoint.get(EPOCH_MEANS_KEY, {}), rank, self.device)
