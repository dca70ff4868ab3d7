"""``RobustFairLitModule``: adversarial training with class-fairness methods, as a thin Lightning shell.

It wires the pure-torch parts: attack (``attacks.pgd``) -> base objective (``objectives``) ->
fairness methods (``fairness``; CSR and later the baselines) -> loss (``objectives.combine_terms``),
and evaluates clean and PGD-robust accuracy per class with the DDP-synchronised
``metrics.RobustConfusionMatrix``.

Subclass it to change a piece without copying the rest: override :meth:`generate_adversarial`
(the training attack), :meth:`compute_objective` (the base loss terms), :meth:`compute_loss`
(how terms and methods combine) or :meth:`evaluation_attack`.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor, nn
from torchmetrics import Metric

from confspec_lightning import functional as CF
from confspec_lightning.attacks import (
    AttackConfig,
    EvalAttackConfig,
    TrainAttackConfig,
    check_bool,
    check_choice,
    check_int,
    check_real,
    eval_mode,
)
from confspec_lightning.evaluation.autoattack import AutoAttackVersion, autoattack_predictions, check_autoattack_options
from confspec_lightning.evaluation.report import Divergence, EvaluationReport
from confspec_lightning.fairness.base import EpochContext, FairnessMethod
from confspec_lightning.metrics import RobustConfusionMatrix, synced_states
from confspec_lightning.models.normalize import Normalize
from confspec_lightning.models.weights import load_backbone_weights, load_error, raised_by_torch_load
from confspec_lightning.objectives import ObjectiveName, ObjectiveOutput, build_objective, combine_terms
from confspec_lightning.reporting import ClasswiseReport, diagnostics_from_rates

try:  # set by LightningCLI while it instantiates the module (hyperparameters come from the config)
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older/newer Lightning
    _given_hyperparameters = None

#: Upper bound of num_classes: a typo such as 1e9 would otherwise try to allocate K x K statistics.
MAX_NUM_CLASSES = 100_000
#: Per-class accuracies are logged as TensorBoard scalars up to this many classes (figures always).
MAX_CLASSWISE_SCALARS = 20
TestAttack = Literal["pgd", "cw", "autoattack"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TEST_ATTACKS: tuple[str, ...] = ("pgd", "cw", "autoattack")
#: "train_eval": a stratified subset of the training images (the data module's second validation loader).
EVAL_STAGES = ("val", "test", "train_eval")


def _attack_config(name: str, value: AttackConfig | dict[str, Any], kind: type[AttackConfig]) -> AttackConfig:
    """Accept an AttackConfig or a dict of its fields (as stored in checkpoints' hyperparameters)."""
    if isinstance(value, dict):
        try:
            return kind(**value)
        except TypeError as error:
            raise ValueError(
                f"{name}={value!r} is not accepted; its fields are norm, eps, step, steps, random_start ({error})."
            ) from error
    if not isinstance(value, AttackConfig):
        raise TypeError(f"{name}={value!r} is not accepted; it must be an AttackConfig or a dict of its fields.")
    return value


def _check_channel_values(name: str, values: list[float], positive: bool) -> None:
    """``input_mean`` / ``input_std``: a non-empty list of finite numbers (> 0 for the std)."""
    if isinstance(values, str | bytes) or not isinstance(values, list | tuple) or len(values) == 0:
        raise ValueError(
            f"{name}={values!r} is not accepted; it must be a non-empty list of numbers (one per channel)."
        )
    for i, value in enumerate(values):
        check_real(
            f"{name}[{i}]", value, (lambda v: v > 0) if positive else (lambda v: True), "> 0" if positive else ""
        )


NONFINITE_HINT = (
    "what to try: a lower learning rate (model.init_args.optimizer.init_args.lr), precision bf16-mixed instead of "
    "16-mixed, gradient clipping (trainer.gradient_clip_val), smaller fairness-method rates, and a check of the data "
    "for NaN/inf inputs"
)


class RobustFairLitModule(pl.LightningModule):
    """Adversarial training (TRADES or PGD-AT) with stackable class-fairness methods such as CSR.

    Args:
        backbone: any classifier ``nn.Module`` mapping normalised images to ``num_classes`` logits.
        num_classes: K (linked from the data module by the CLI).
        objective: base objective, ``"trades"`` (default) or ``"pgd_at"``.
        beta: TRADES weight of the KL term (default 6.0).
        train_attack: threat model of the training attack (its objective follows ``objective``); an
            ``AttackConfig`` or a dict of its fields.
        eval_attack: threat model of the validation/test PGD attack (CE objective; default PGD-20).
        fairness: fairness methods applied in order, e.g. ``[CSR(alpha=0.3)]``; empty = plain base.
        optimizer: optimizer factory called with the parameters (default SGD).
        scheduler: optional LR scheduler factory called with the optimizer (stepped per epoch).
        input_mean: per-channel mean of the inputs (normalisation inside the model; linked from data).
        input_std: per-channel std of the inputs (linked from data).
        class_names: names used in logs and reports (linked from data).
        eval_seed: seed of the evaluation attack's random start (same noise every epoch).
        init_weights: fine-tuning: a Lightning checkpoint or a plain state-dict file whose weights are
            loaded into the backbone (safely, ``weights_only=True``; wrapper prefixes such as
            ``module.`` are stripped; a wrong architecture is a clear error).
        test_attacks: what ``test`` evaluates besides clean accuracy: ``"pgd"`` (``eval_attack``, always
            run), ``"cw"`` (CW margin, same budget and steps) and ``"autoattack"`` (pyautoattack, norm and
            eps of ``eval_attack``). Default ``["pgd"]``. ``test`` writes ``evaluation/`` (JSON,
            Markdown, PNG) in the run directory.
        autoattack_version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square) or ``"custom"``.
        autoattack_attacks: the attack list of the ``"custom"`` version (e.g. ``["apgd-ce", "apgd-t"]``).
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
        objective: ObjectiveName = "trades",
        beta: float = 6.0,
        train_attack: TrainAttackConfig = TrainAttackConfig(),
        eval_attack: EvalAttackConfig = EvalAttackConfig(),
        fairness: list[FairnessMethod] | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        scheduler: LRSchedulerCallable | None = None,
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
        class_names: list[str] | None = None,
        eval_seed: int = 0,
        init_weights: str | None = None,
        test_attacks: list[TestAttack] | None = None,
        autoattack_version: AutoAttackVersion = "standard",
        autoattack_attacks: list[str] | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: CompileMode = "default",
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= MAX_NUM_CLASSES:
            raise ValueError(
                f"num_classes={num_classes!r} is not accepted; it must be an integer in [2, {MAX_NUM_CLASSES}] "
                "(per-class state and the K x K confusion statistics grow with it)."
            )
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module; got {type(backbone).__name__}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries but num_classes={num_classes}.")
        train_attack = _attack_config("train_attack", train_attack, TrainAttackConfig)
        eval_attack = _attack_config("eval_attack", eval_attack, EvalAttackConfig)
        check_int("eval_seed", eval_seed, 0)
        for name, values, positive in (("input_mean", input_mean, False), ("input_std", input_std, True)):
            if values is not None:
                _check_channel_values(name, values, positive)
        if input_mean is not None and input_std is not None and len(input_mean) != len(input_std):
            raise ValueError(
                f"input_mean={input_mean!r} and input_std={input_std!r} are not accepted; they must have one entry "
                "per channel each (the same length)."
            )
        via_cli = _given_hyperparameters is not None and _given_hyperparameters.get() is not None
        self.save_hyperparameters(ignore=[] if via_cli else ["backbone", "fairness", "optimizer", "scheduler"])
        # plain values only, so that checkpoints load with torch.load(weights_only=True)
        for key, value in (("train_attack", train_attack), ("eval_attack", eval_attack)):
            if key in self.hparams:
                self.hparams[key] = asdict(value)

        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        normalize: nn.Module = nn.Identity()
        if input_mean is not None or input_std is not None:
            if input_mean is None or input_std is None:
                raise ValueError(
                    f"input_mean={input_mean!r} and input_std={input_std!r} are not accepted; give both (one entry "
                    "per channel) or neither."
                )
            normalize = Normalize(input_mean, input_std)
        if init_weights is not None:
            load_backbone_weights(backbone, init_weights)
        self.net = nn.Sequential()
        self.net.add_module("normalize", normalize)
        self.net.add_module("backbone", backbone)

        self.objective = build_objective(objective, train_attack, beta=beta)
        self.eval_attack = eval_attack
        self.fairness = nn.ModuleList(fairness or [])
        for method in self.fairness:
            if not isinstance(method, FairnessMethod):
                raise TypeError(f"fairness entries must be FairnessMethod instances; got {type(method).__name__}.")
            method.bind(num_classes, self.net)
            missing = [term for term in method.required_terms if term not in self.objective.terms]
            if missing:
                raise ValueError(
                    f"the fairness method {type(method).__name__} needs the loss term(s) {missing}, which the "
                    f"objective {objective!r} does not have (its terms: {list(self.objective.terms)}); use "
                    "objective: trades."
                )
        budget_setters = [type(m).__name__ for m in self.fairness if m.sets_attack_budget]
        if len(budget_setters) > 1:
            raise ValueError(
                f"two fairness methods both set per-sample attack budgets ({' and '.join(budget_setters)}; e.g. FRL "
                "reweight_remargin and CFA classwise_eps); keep only one."
            )
        # the last epoch whose end-of-epoch fairness hooks ran (in checkpoints, so a resume neither repeats
        # nor skips them)
        self.register_buffer("fairness_epoch_end_done", torch.tensor(-1, dtype=torch.long))
        self._stashed_weights: dict[str, Tensor] | None = None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.eval_seed = eval_seed
        self.test_attacks = list(test_attacks) if test_attacks is not None else ["pgd"]
        for attack in self.test_attacks:
            check_choice("test_attacks[]", attack, TEST_ATTACKS)
        if "autoattack" in self.test_attacks:
            check_autoattack_options(autoattack_version, autoattack_attacks)
        self.autoattack_version = autoattack_version
        self.autoattack_attacks = autoattack_attacks
        for name, flag in (("channels_last", channels_last), ("compile", compile)):
            check_bool(name, flag)
        check_choice("compile_mode", compile_mode, COMPILE_MODES)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile and compile_backend not in torch.compiler.list_backends(exclude_tags=()):
            raise ValueError(
                f"compile_backend={compile_backend!r} is not accepted; choose one of "
                f"{', '.join(map(repr, torch.compiler.list_backends(exclude_tags=())))}."
            )
        self.compile_mode: CompileMode | None = compile_mode if compile else None
        self.compile_backend = compile_backend
        self.eval_metrics = nn.ModuleDict(
            {
                f"{stage}_{kind}": RobustConfusionMatrix(num_classes)
                for stage in EVAL_STAGES
                for kind in ("clean", "robust")
            }
        )
        # the training-set robust confusion, from the adversarial predictions training makes (free); its
        # diagnostics are logged at every validation (train/confusion_*), see docs/method.md
        self.train_confusion = RobustConfusionMatrix(num_classes)
        self.train_confusion.persistent(True)
        self.diagnostics_history: list[dict[str, Any]] = []
        self.reports: dict[str, ClasswiseReport] = {}
        self._eval_generator: torch.Generator | None = None
        # device-side record of the first non-finite step since the last check (nonfinite_check_interval > 1)
        self._nonfinite: tuple[list[str], Tensor, Tensor, Tensor, Tensor] | None = None

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

    def setup(self, stage: str) -> None:
        """Fail fast: check the backbone's output size on a dummy batch of the data's input shape."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        input_shape = getattr(datamodule, "input_shape", None)
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

    # --------------------------------------------------------------- training
    def generate_adversarial(self, x: Tensor, target: Tensor) -> Tensor:
        """The training attack (the base objective's), with per-sample budgets from fairness methods."""
        eps: Tensor | None = None
        step: Tensor | None = None
        for method in self.fairness:
            method_eps, method_step = method.attack_budget(target, self.objective.attack_config)
            if method_eps is not None:
                if eps is not None:
                    raise ValueError(
                        "two fairness methods both set per-sample attack budgets (e.g. FRL reweight_remargin and "
                        "CFA classwise_eps); keep only one."
                    )
                eps, step = method_eps, method_step
        return self.objective.attack(self.net, x, target, eps=eps, step=step)

    def compute_objective(self, x: Tensor, x_adv: Tensor, target: Tensor) -> ObjectiveOutput:
        """Per-sample terms of the base objective (train-mode forwards)."""
        return self.objective(self.net, x, x_adv, target)

    def compute_loss(self, output: ObjectiveOutput, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss from the base terms and every fairness method's adjustment."""
        return combine_terms(output, [method.loss_adjustment(output, target) for method in self.fairness])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, target = batch
        x = self.format_input(x)
        x_adv = self.generate_adversarial(x, target)
        output = self.compute_objective(x, x_adv, target)
        self.check_logits(output.adv_logits)
        loss, parts = self.compute_loss(output, target)
        self.check_finite(loss, parts, batch_idx)
        for method in self.fairness:
            method.on_train_batch_end(output, target)
        self.train_confusion.update(output.adv_logits.detach(), target)
        batch_size = target.shape[0]
        robust_acc = (output.adv_logits.detach().argmax(dim=1) == target).float().mean()
        # step values stay local (no per-step collective); epoch values are averaged over ranks once
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
        epoch_values = {"train/robust_acc": robust_acc, **{f"train/loss_{k}": v for k, v in parts.items()}}
        self.log_dict(epoch_values, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
        return loss

    def check_finite(self, loss: Tensor, parts: dict[str, Tensor], batch_idx: int) -> None:
        """Stop training with an error naming the term when the loss or one of its terms is NaN/inf.

        Called in ``training_step`` before ``backward`` (see :attr:`nonfinite_check_interval`).

        Raises:
            FloatingPointError: naming the term(s), their value, the epoch and batch, and what to try.
        """
        names = ["loss", *parts]
        values = torch.stack(
            [loss.detach().float().reshape(()), *(v.detach().float().reshape(()) for v in parts.values())]
        )
        bad = ~torch.isfinite(values)
        interval = max(1, int(self.nonfinite_check_interval))
        if not self.defer_finite_check(values.device):
            if bool(bad.any()):
                self._raise_nonfinite(names, values, self.current_epoch, batch_idx, updated=False)
            return
        record = self._nonfinite
        if record is None or record[0] != names:
            seen = torch.zeros((), dtype=torch.bool, device=values.device)
            record = (
                names,
                seen,
                values.clone(),
                torch.zeros_like(seen, dtype=torch.long),
                torch.zeros_like(seen, dtype=torch.long),
            )
        _, seen, first_values, first_epoch, first_batch = record
        new = bad.any() & ~seen
        record = (
            names,
            seen | new,
            torch.where(new, values, first_values),
            torch.where(new, self.current_epoch, first_epoch),
            torch.where(new, batch_idx, first_batch),
        )
        self._nonfinite = record
        if (self.global_step + 1) % interval == 0:
            self._nonfinite = None
            if bool(record[1]):
                epoch, batch = int(record[3]), int(record[4])
                updated = (epoch, batch) != (self.current_epoch, batch_idx)
                self._raise_nonfinite(names, record[2], epoch, batch, updated=updated)

    def defer_finite_check(self, device: torch.device) -> bool:
        """Whether the NaN/inf flag is only read every :attr:`nonfinite_check_interval` steps (else at once).

        Reading at once is free on the CPU; on an accelerator it is one host-device sync per step.
        """
        return device.type != "cpu" and int(self.nonfinite_check_interval) > 1

    @staticmethod
    def _raise_nonfinite(names: list[str], values: Tensor, epoch: int, batch_idx: int, updated: bool) -> None:
        host = values.cpu().tolist()
        bad_terms = [(n, v) for n, v in zip(names[1:], host[1:], strict=True) if not math.isfinite(v)]
        if len(bad_terms) == 1:
            what = f"the loss term {bad_terms[0][0]!r} is not finite ({bad_terms[0][1]})"
        elif bad_terms:
            what = f"the loss terms {', '.join(f'{n!r} ({v})' for n, v in bad_terms)} are not finite"
        else:
            what = f"the loss (sum of the finite terms {', '.join(map(repr, names[1:]))}) is not finite ({host[0]})"
        raise FloatingPointError(
            f"{what} at epoch {epoch}, batch {batch_idx}; training stopped "
            + ("(steps since then updated the weights)" if updated else "before this step's weight update")
            + f". {NONFINITE_HINT}."
        )

    def _train_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """A fresh pass over this rank's training batches, on device, under the precision context."""
        trainer = self.trainer
        limit = trainer.num_training_batches
        total = None if math.isinf(limit) else int(limit)
        batches = itertools.islice(trainer.train_dataloader, total)
        with trainer.precision_plugin.forward_context():
            for batch in self._pass_progress(batches, total, f"epoch {trainer.current_epoch}: attack pass (train)"):
                x, target = trainer.strategy.batch_to_device(batch)
                yield self.format_input(x), target

    def _validation_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share (samples rank, rank + W, ...) of the first validation loader's data set, on device.

        No padding, so the shares of all ranks partition the split and summed statistics equal a single
        process's. Batches go through the data module's device hooks as validation batches (no augmentation).
        """
        trainer = self.trainer
        source = trainer.datamodule if trainer.datamodule is not None else self
        loaders = source.val_dataloader()
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        dataset = loader.dataset
        shard = torch.utils.data.Subset(dataset, range(trainer.global_rank, len(dataset), trainer.world_size))
        shard_loader = torch.utils.data.DataLoader(
            shard, batch_size=loader.batch_size or 256, shuffle=False, collate_fn=loader.collate_fn
        )
        with trainer.precision_plugin.forward_context():
            description = f"epoch {trainer.current_epoch}: validation-split pass"
            for batch in self._pass_progress(shard_loader, len(shard_loader), description):
                stage = trainer.state.stage
                trainer.state.stage = RunningStage.VALIDATING
                try:
                    x, target = trainer.strategy.batch_to_device(batch)
                finally:
                    trainer.state.stage = stage
                yield self.format_input(x), target

    def _pass_progress(self, batches: Iterable[Any], total: int | None, description: str) -> Iterable[Any]:
        """A progress bar over a fairness method's extra pass (rank 0, when the trainer shows progress bars)."""
        bar = self.trainer.progress_bar_callback
        if bar is None or not bar.is_enabled or not self.trainer.is_global_zero:
            return batches
        from tqdm.auto import tqdm

        return tqdm(batches, total=total, desc=description, leave=False, dynamic_ncols=True, unit="batch")

    def _epoch_context(self, epoch: int) -> EpochContext:
        return EpochContext(
            model=self.net,
            train_batches=self._train_batches,
            validation_batches=self._validation_batches,
            attack=self.objective.attack_config,
            objective=self.objective,
            epoch=epoch,
        )

    def _log_fairness(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            self.log(name, value.float(), on_step=False, on_epoch=True, sync_dist=True)  # equal on all ranks

    def on_train_epoch_start(self) -> None:
        if not self.fairness:
            return
        if self.current_epoch > 0:  # resumed from a checkpoint written before the last epoch's end hooks
            self._fairness_epoch_end(self.current_epoch - 1)
        context = self._epoch_context(self.current_epoch)
        for method in self.fairness:
            self._log_fairness(method.on_train_epoch_start(context))

    def _fairness_epoch_end(self, epoch: int) -> None:
        """Run the methods' end-of-epoch hooks once per epoch (before its validation), then log their state."""
        if not self.fairness or int(self.fairness_epoch_end_done) >= epoch:
            return
        context = self._epoch_context(epoch)
        for method in self.fairness:
            self._log_fairness(method.on_train_epoch_end(context))
        self.fairness_epoch_end_done.fill_(epoch)
        if self.num_classes > MAX_CLASSWISE_SCALARS:
            return
        for method in self.fairness:
            for key, values in method.classwise_state().items():
                self._log_fairness(
                    {f"{method.name}/{key}/{name}": values[c] for c, name in enumerate(self.class_names)}
                )

    def on_train_epoch_end(self) -> None:
        self._fairness_epoch_end(self.current_epoch)
        diagnostics = self._train_confusion_diagnostics()  # an epoch without validation logs them here
        if diagnostics is not None:
            self.diagnostics_history.append({"epoch": self.current_epoch, "train": diagnostics})

    def _train_confusion_diagnostics(self) -> dict[str, float] | None:
        """Diagnostics of the training robust confusion since the last call (logged; None without samples).

        A collective under DDP (every rank calls it); resets the accumulator.
        """
        errors, counts = self.train_confusion.synced_state()
        self.train_confusion.reset()
        if int(counts.sum()) == 0:
            return None
        diagnostics = diagnostics_from_rates(CF.confusion_from_counts(errors, counts, normalize=True))
        diagnostics["robust_acc"] = float(1.0 - errors.sum() / counts.sum())
        self.log_dict(
            {f"train/confusion_{k}": v for k, v in diagnostics.items() if k != "robust_acc"},
            on_step=False,
            on_epoch=True,
            sync_dist=True,
        )
        return diagnostics

    def _use_evaluation_weights(self) -> None:
        """Evaluate with a method's weights (CFA's average) where one offers them; the trained ones are kept."""
        for method in self.fairness:
            weights = method.evaluation_weights()
            if weights is not None and self._stashed_weights is None:
                self._stashed_weights = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
                self.net.load_state_dict(weights)

    def _restore_trained_weights(self) -> None:
        if self._stashed_weights is not None:
            self.net.load_state_dict(self._stashed_weights)
            self._stashed_weights = None

    def configure_callbacks(self) -> list[pl.Callback]:
        """``predict`` writes its predictions to ``predictions.csv`` in the run directory."""
        from confspec_lightning.evaluation.predictions import PredictionWriter

        return [PredictionWriter()]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "monitor": self.monitor},
        }

    # ------------------------------------------------------------- evaluation
    def evaluation_attack(self, x: Tensor, target: Tensor) -> Tensor:
        """PGD (CE) with ``eval_attack``; seeded random start; works under inference mode."""
        if self._eval_generator is None or self._eval_generator.device != x.device:
            self._eval_generator = torch.Generator(device=x.device).manual_seed(self.eval_seed)
        return self.eval_attack.perturb(self.net, x, target, "ce", generator=self._eval_generator)

    def attack_description(self) -> str:
        """E.g. ``PGD-20 linf eps=0.1000 step=0.0250``."""
        cfg = self.eval_attack
        return f"PGD-{cfg.steps} {cfg.norm} eps={cfg.eps:.4f} step={cfg.step:.4f}"

    def _evaluate_batch(self, batch: Any, stage: str) -> tuple[Tensor, Tensor]:
        x, target = batch
        x = self.format_input(x)
        clean_logits = self.net(x)
        self.check_logits(clean_logits)
        adv_logits = self.net(self.evaluation_attack(x, target))
        self.eval_metrics[f"{stage}_clean"].update(clean_logits, target)
        self.eval_metrics[f"{stage}_robust"].update(adv_logits, target)
        return clean_logits, adv_logits

    def _start_evaluation(self) -> None:
        self._eval_generator = None  # same attack noise every evaluation

    def _finish_evaluation(self, stage: str, figures: bool = True) -> ClasswiseReport:
        clean, robust = self.eval_metrics[f"{stage}_clean"], self.eval_metrics[f"{stage}_robust"]
        clean_acc = clean.classwise_accuracy()  # collectives: every rank calls them
        errors, counts = robust.synced_state()
        clean.reset()
        robust.reset()
        report = ClasswiseReport.from_state(
            stage, self._report_epoch(), self.attack_description(), self.class_names, clean_acc, errors, counts
        )
        if self.trainer.sanity_checking:
            return report
        # values are already global (synced metric state): sync_dist only averages equal numbers
        self.log_dict(report.scalars(), on_step=False, on_epoch=True, sync_dist=True)
        if self.num_classes <= MAX_CLASSWISE_SCALARS:
            self.log_dict(report.classwise_scalars(), on_step=False, on_epoch=True, sync_dist=True)
        if figures:
            self._log_figures(report)
        self.reports[stage] = report
        return report

    def _report_epoch(self) -> int:
        """The training epoch the evaluated weights come from (the checkpoint's, outside fit)."""
        if self.trainer.state.fn != "fit" and getattr(self, "_checkpoint_epoch", None) is not None:
            return int(self._checkpoint_epoch)
        return self.current_epoch

    def _log_figures(self, report: ClasswiseReport) -> None:
        if self.global_rank != 0:
            return
        loggers = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        from confspec_lightning.plotting import classwise_bars, confusion_heatmap

        step = self.global_step
        bars, _ = classwise_bars(
            {"clean": report.clean_acc, "robust": report.robust_acc},
            report.class_names,
            title=f"{report.stage}: per-class accuracy (robust = {report.attack})",
        )
        heatmap, _ = confusion_heatmap(
            torch.tensor(report.confusion),
            report.class_names,
            title=f"{report.stage}: robust confusion (error rates), ||C||_2 = {report.confusion_spectral_norm:.3f}",
        )
        for logger in loggers:
            logger.experiment.add_figure(f"{report.stage}/classwise_accuracy", bars, step, close=False)
            logger.experiment.add_figure(f"{report.stage}/robust_confusion", heatmap, step, close=False)
        import matplotlib.pyplot as plt

        plt.close(bars)
        plt.close(heatmap)

    def on_validation_epoch_start(self) -> None:
        trainer = self.trainer
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.is_last_batch:
            self._fairness_epoch_end(self.current_epoch)  # the epoch's training is over
        self._use_evaluation_weights()
        self._start_evaluation()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_batch(batch, "val" if dataloader_idx == 0 else "train_eval")

    def on_validation_epoch_end(self) -> None:
        report = self._finish_evaluation("val")
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            entry = {"epoch": self.current_epoch, "val": report.diagnostics}
            train = self._train_confusion_diagnostics()
            if train is not None:
                entry["train"] = train
            self.diagnostics_history.append(entry)
            report.history = list(self.diagnostics_history)
        if len(self.trainer.num_val_batches) > 1:  # the data module also gave a train subset
            train_report = self._finish_evaluation("train_eval", figures=False)
            report.divergence = Divergence.from_accuracies(
                "pgd", train_report.robust_acc, report.robust_acc, train_size=sum(train_report.class_counts)
            )
            if not self.trainer.sanity_checking:
                name = "val/robust_acc_kendall_tau_train"
                self.log(name, report.divergence.kendall_tau, on_epoch=True, sync_dist=True)
        self._restore_trained_weights()

    def on_test_start(self) -> None:
        if self.trainer.world_size > 1:
            raise RuntimeError(
                f"confspec test runs on one device for exact per-class numbers (a DistributedSampler pads the "
                f"split by repeating images); got {self.trainer.world_size} processes: pass --trainer.devices 1 "
                "--trainer.num_nodes 1."
            )

    def on_test_epoch_start(self) -> None:
        self._use_evaluation_weights()
        self._start_evaluation()
        self._test_predictions: dict[str, dict[str, list[Tensor]]] = {"test": {}, "train_eval": {}}

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Clean and PGD on every batch; CW and AutoAttack (``test_attacks``) on the test split only."""
        stage = "test" if dataloader_idx == 0 else "train_eval"
        clean_logits, adv_logits = self._evaluate_batch(batch, stage)
        x, target = batch
        predictions = {"target": target, "clean": clean_logits.argmax(1), self._attack_key("pgd"): adv_logits.argmax(1)}
        if stage == "test" and "cw" in self.test_attacks:
            x_cw = self.eval_attack.perturb(self.net, x, target, "cw", generator=self._eval_generator)
            predictions[self._attack_key("cw")] = self.net(x_cw).argmax(1)
        if stage == "test" and "autoattack" in self.test_attacks:
            predictions["autoattack"] = autoattack_predictions(
                self.net,
                x,
                target,
                norm=self.eval_attack.norm,
                eps=self.eval_attack.eps,
                version=self.autoattack_version,
                attacks=self.autoattack_attacks,
                batch_size=x.shape[0],
                seed=self.eval_seed + batch_idx,
                progress=self._autoattack_progress(batch_idx),
            )
        for key, value in predictions.items():
            self._test_predictions[stage].setdefault(key, []).append(value.detach())

    def _autoattack_progress(self, batch_idx: int) -> Callable[[str], None] | None:
        """Prints AutoAttack's progress on this test batch (rank 0, when the trainer shows progress bars)."""
        bar = self.trainer.progress_bar_callback
        if bar is None or not bar.is_enabled or not self.trainer.is_global_zero:
            return None
        from tqdm.auto import tqdm

        batches = self.trainer.num_test_batches[0] if self.trainer.num_test_batches else "?"
        prefix = f"AutoAttack, test batch {batch_idx + 1}/{batches}"
        return lambda message: tqdm.write(f"{prefix}: {message}", file=sys.stderr)

    def _attack_key(self, attack: str) -> str:
        return f"{attack}{self.eval_attack.steps}"  # pgd20, cw20

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")
        collected = {stage: {k: torch.cat(v) for k, v in d.items()} for stage, d in self._test_predictions.items()}
        test, train = collected["test"], collected["train_eval"]
        target = test.pop("target")
        divergence = None
        if train:
            self._finish_evaluation("train_eval", figures=False)
            key = self._attack_key("pgd")
            divergence = Divergence.from_predictions(
                key, self.num_classes, train["target"], train[key], target, test[key]
            )
        cfg = self.eval_attack
        self.evaluation = EvaluationReport.from_predictions(
            name=self._run_name(),
            class_names=self.class_names,
            target=target,
            predictions=test,
            settings={
                "norm": cfg.norm,
                "eps": cfg.eps,
                "pgd/cw step": cfg.step,
                "pgd/cw steps": cfg.steps,
                "random start": cfg.random_start,
                "seed": self.eval_seed,
                "autoattack": (
                    f"{self.autoattack_version} {self.autoattack_attacks or ''}".strip()
                    if "autoattack" in self.test_attacks
                    else "not run"
                ),
                "images": int(target.numel()),
            },
            divergence=divergence,
        )
        for attack, result in self.evaluation.attacks.items():
            self.log_dict({f"test/{attack}_acc": result.avg, f"test/{attack}_acc_worst": result.worst}, on_epoch=True)
        if divergence is not None:
            self.log("test/robust_acc_kendall_tau_train", divergence.kendall_tau, on_epoch=True)
        self._restore_trained_weights()

    def on_predict_epoch_start(self) -> None:
        self._use_evaluation_weights()

    def on_predict_epoch_end(self) -> None:
        self._restore_trained_weights()

    def _run_name(self) -> str:
        logger = self.trainer.logger
        return str(getattr(logger, "name", None) or type(self.backbone).__name__)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Clean predictions and, where labels come with the batch, predictions under ``eval_attack``."""
        x, target = batch if isinstance(batch, list | tuple) and len(batch) == 2 else (batch, None)
        out = {"pred": self.net(x).argmax(dim=1)}
        if target is not None:
            out["target"] = target
            out["adv_pred"] = self.net(self.evaluation_attack(x, target)).argmax(dim=1)
        return out

    # ------------------------------------------------------------ checkpoints
    def _persistent_metrics(self) -> Iterator[tuple[str, Metric]]:
        """The metrics whose states checkpoints carry: the training confusion and the fairness methods' statistics."""
        yield "train_confusion", self.train_confusion
        for name, module in self.fairness.named_modules(prefix="fairness"):
            if isinstance(module, Metric) and any(module._persistent.values()):
                yield name, module

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the persistent metric states (confusion statistics) summed over all ranks (runs on every rank).

        Metric states are per rank; the checkpoint holds their global sum, and on loading only rank 0
        keeps it (the others start from zero), so the synced sum is the same after a resume, whatever
        the number of processes.
        """
        state = checkpoint["state_dict"]
        for name, metric in self._persistent_metrics():
            for key, value in synced_states(metric).items():
                state[f"{name}.{key}"] = value.detach().cpu()
        checkpoint["diagnostics_history"] = list(self.diagnostics_history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_epoch = checkpoint.get("epoch")  # validate/test report the checkpoint's epoch
        # checkpoints written before the end-of-epoch hooks existed (0.1) lack the counter
        checkpoint["state_dict"].setdefault("fairness_epoch_end_done", torch.tensor(-1, dtype=torch.long))
        # checkpoints written before the training confusion was kept (0.1) lack it
        for key, value in self.train_confusion.state_dict(prefix="train_confusion.").items():
            checkpoint["state_dict"].setdefault(key, torch.zeros_like(value))
        self.diagnostics_history = list(checkpoint.get("diagnostics_history", []))
        if self._trainer is None or self.global_rank == 0:
            return
        state = checkpoint["state_dict"]
        for name, metric in self._persistent_metrics():
            for key in metric._defaults:
                if f"{name}.{key}" in state:
                    state[f"{name}.{key}"] = torch.zeros_like(state[f"{name}.{key}"])

    # ---------------------------------------------------------------- reports
    def _publish(self, stage: str) -> None:
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None  # a collective under DDP
        report = self.reports.get(stage)
        if report is None or self.global_rank != 0:
            return
        print("\n" + report.format_table(), flush=True)
        if log_dir is not None:
            path = Path(log_dir) / f"classwise_{stage}.json"
            report.write_json(path)
            print(f"per-class results written to {path}", flush=True)

    def on_fit_end(self) -> None:
        self._publish("val")

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "validate":
            self._publish("val")

    def on_test_end(self) -> None:
        self._publish("test")
        evaluation = getattr(self, "evaluation", None)
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        if evaluation is None or log_dir is None or self.global_rank != 0:
            return
        written = evaluation.write(Path(log_dir) / "evaluation")
        print(f"evaluation report written to {written['markdown']}", flush=True)
