"""The evaluation component of :class:`~confspec_lightning.module.RobustFairLitModule`: a Lightning callback.

The module's validation, test and predict steps attack and predict; they return, per batch, each sample's index in
its split, its label and its predicted class under every attack (``clean``, ``pgd20``, ...). The evaluator owns the
rest, by one route for validation and test: it collects those predictions (``on_*_batch_end``), gathers them over
DDP ranks in the order of the indices at the epoch's end (every rank, the same collectives), builds the per-class
report (:class:`~confspec_lightning.evaluation.report.EvaluationReport`), logs it (TensorBoard scalars and figures),
keeps the per-epoch mechanism diagnostics (``history``), prints the table and writes ``classwise_val.json`` and the
test report ``evaluation/`` (JSON, Markdown, PNG). It reads what it needs from the module through
:class:`EvaluatedModule` (the names of the classes, the threat model, the attacks, a few methods), never the module
class itself. Subclass it and give it as the module's ``evaluator`` to change how a run is evaluated or reported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from confspec_lightning.attacks import Attack, AttackConfig
from confspec_lightning.data.base import evaluation_sampler
from confspec_lightning.environment import environment
from confspec_lightning.evaluation.report import CLEAN, Divergence, EvaluationReport
from confspec_lightning.validation import check_bool, check_int

#: ``train_eval``: a stratified subset of the training images (the data module's second validation/test loader).
STAGES = ("val", "test", "train_eval")


class EvaluatedModule(Protocol):
    """What the evaluator reads from the module it evaluates (``RobustFairLitModule`` provides all of it)."""

    class_names: list[str]
    num_classes: int
    eval_attack: AttackConfig
    eval_seed: int
    validation_attack: Attack
    test_attacks: list[Attack]
    checkpoint_epoch: int | None

    def use_evaluation_weights(self) -> None:
        """Swap in the weights to evaluate (CFA's average), keeping the trained ones."""

    def restore_trained_weights(self) -> None:
        """Swap the trained weights back."""

    def log_global(self, values: dict[str, Any]) -> None:
        """Log values equal on every rank."""

    def train_confusion_diagnostics(self) -> dict[str, float] | None:
        """The training robust confusion's diagnostics (a collective), logged; None without samples."""


def attack_progress(trainer: pl.Trainer, prefix: str) -> Callable[[str], None] | None:
    """A printer of an attack's progress messages (rank 0, when the trainer shows progress bars), else None."""
    bar = trainer.progress_bar_callback
    if bar is None or not bar.is_enabled or not trainer.is_global_zero:
        return None
    from tqdm.auto import tqdm

    return lambda message: tqdm.write(f"{prefix}: {message}", file=sys.stderr)


def robust_key(module: EvaluatedModule) -> str:
    """The report column of the validation attack (``pgd20`` for PGD with a 20-step ``eval_attack``)."""
    return module.validation_attack.key(module.eval_attack)


def robust_description(module: EvaluatedModule) -> str:
    """E.g. ``PGD-20 linf eps=0.0314 step=0.0078`` (the validation attack and its threat model)."""
    return module.eval_attack.describe(type(module.validation_attack).__name__)


class Evaluator(pl.Callback):
    """Per-class evaluation of validation and test, and its reports (see the module docstring).

    Args:
        figures: log per-class bar charts and the robust confusion heatmap to TensorBoard every validation.
        max_classwise_scalars: log per-class accuracies as TensorBoard scalars up to this many classes.
    """

    def __init__(self, figures: bool = True, max_classwise_scalars: int = 20) -> None:
        check_bool("evaluator.figures", figures)
        check_int("evaluator.max_classwise_scalars", max_classwise_scalars, 0)
        self.figures = figures
        self.max_classwise_scalars = max_classwise_scalars
        self.reports: dict[str, EvaluationReport] = {}
        #: per validation epoch of a fit: the diagnostics of the validation and the training robust confusion
        self.history: list[dict[str, Any]] = []
        #: where validate/test reports go (set by ``confspec`` for a run's checkpoint); None: the logger's directory
        self.output_dir: Path | None = None
        #: stage -> the batches' predictions (index, target and one entry per attack), until the epoch's end
        self._collected: dict[str, list[dict[str, Tensor]]] = {}

    # ------------------------------------------------------------ collection
    def collect(self, stage: str, outputs: dict[str, Tensor] | None) -> None:
        """Keep a batch's predictions (on the CPU; a placeholder batch gives None and is skipped)."""
        if outputs is not None:
            self._collected.setdefault(stage, []).append({k: v.detach().cpu() for k, v in outputs.items()})

    def gathered(self, trainer: pl.Trainer, stage: str) -> dict[str, Tensor]:
        """Every rank's predictions of ``stage`` in the order of the samples' indices (a collective under DDP)."""
        pieces = self._collected.pop(stage, [])
        local = {key: torch.cat([p[key] for p in pieces]) for key in pieces[0]} if pieces else {}
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, local)
        else:
            parts = [local]
        parts = [part for part in parts if part]
        if not parts:
            return {}
        merged = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        order = torch.argsort(merged.pop("index"), stable=True)
        return {key: value[order] for key, value in merged.items()}

    def report(
        self, module: EvaluatedModule, stage: str, predictions: dict[str, Tensor], **fields: Any
    ) -> EvaluationReport:
        """The per-class report of a stage's gathered predictions."""
        predictions = dict(predictions)
        target = predictions.pop("target")
        return EvaluationReport.from_predictions(
            name=self.run_name(module), class_names=list(module.class_names), target=target, predictions=predictions,
            stage=stage, epoch=self.report_epoch(module), **fields,
        )  # fmt: skip

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.collect("val" if dataloader_idx == 0 else "train_eval", outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.collect("test" if dataloader_idx == 0 else "train_eval", outputs)

    # ------------------------------------------------------------ validation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.use_evaluation_weights()
        self._collected = {}
        if not trainer.sanity_checking:
            self._check_sharding(trainer, "val")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module: EvaluatedModule = pl_module  # type: ignore[assignment]
        key = robust_key(module)
        report = self.report(module, "val", self.gathered(trainer, "val"), robust_attack=key,
                             description=robust_description(module))  # fmt: skip
        train_eval = self.gathered(trainer, "train_eval")
        if not trainer.sanity_checking:
            self._publish_scalars(pl_module, report, figures=self.figures)
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            entry: dict[str, Any] = {"epoch": pl_module.current_epoch, "val": report.robust.diagnostics}
            train = module.train_confusion_diagnostics()
            if train is not None:
                entry["train"] = train
            self.history.append(entry)
            report.history = list(self.history)
        if train_eval:  # the data module also gave a train subset: the train/test divergence
            train_report = self.report(module, "train_eval", train_eval, robust_attack=key)
            if not trainer.sanity_checking:
                self._publish_scalars(pl_module, train_report, figures=False)
                self.reports["train_eval"] = train_report
            report.divergence = Divergence.from_accuracies(
                key.rstrip("0123456789"),
                train_report.robust.classwise_acc,
                report.robust.classwise_acc,
                train_size=sum(train_report.class_counts),
            )
            if not trainer.sanity_checking:
                module.log_global({"val/robust_acc_kendall_tau_train": report.divergence.kendall_tau})
        if not trainer.sanity_checking:
            self.reports["val"] = report
        module.restore_trained_weights()

    def _publish_scalars(self, pl_module: pl.LightningModule, report: EvaluationReport, figures: bool) -> None:
        """Log the report's scalars (already global: gathered predictions) and, if asked, its figures."""
        module: EvaluatedModule = pl_module  # type: ignore[assignment]
        module.log_global(report.scalars())
        if module.num_classes <= self.max_classwise_scalars:
            module.log_global(report.classwise_scalars())
        if figures:
            self.log_figures(pl_module, report)

    @staticmethod
    def report_epoch(module: Any) -> int:
        """The training epoch the evaluated weights come from (the checkpoint's, outside fit)."""
        epoch = getattr(module, "checkpoint_epoch", None)
        if module.trainer.state.fn != "fit" and epoch is not None:
            return int(epoch)
        return module.current_epoch

    @staticmethod
    def run_name(module: Any) -> str:
        logger = module.trainer.logger
        return str(getattr(logger, "name", None) or type(getattr(module, "backbone", module)).__name__)

    def log_figures(self, module: pl.LightningModule, report: EvaluationReport) -> None:
        """Per-class bars (clean and robust) and the robust confusion heatmap, to every TensorBoard logger."""
        if module.global_rank != 0:
            return
        loggers = [lg for lg in module.loggers if isinstance(lg, TensorBoardLogger)]
        robust = report.robust
        if not loggers or robust is None or robust.confusion is None:
            return
        import matplotlib.pyplot as plt

        from confspec_lightning.plotting import classwise_bars, confusion_heatmap

        bars, _ = classwise_bars(
            {"clean": report.attacks[CLEAN].classwise_acc, "robust": robust.classwise_acc},
            report.class_names,
            title=f"{report.stage}: per-class accuracy (robust = {report.description})",
        )
        heatmap, _ = confusion_heatmap(
            torch.tensor(robust.confusion),
            report.class_names,
            title=f"{report.stage}: robust confusion (error rates), ||C||_2 = {robust.confusion_spectral_norm:.3f}",
        )
        for logger in loggers:
            logger.experiment.add_figure(f"{report.stage}/classwise_accuracy", bars, module.global_step, close=False)
            logger.experiment.add_figure(f"{report.stage}/robust_confusion", heatmap, module.global_step, close=False)
        plt.close(bars)
        plt.close(heatmap)

    def _check_sharding(self, trainer: pl.Trainer, stage: str) -> None:
        """Under DDP, refuse (test) or flag (validation) loaders that are not dealt by an ``EvaluationSampler``."""
        if trainer.world_size == 1:
            return
        loaders = trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders
        loaders = list(loaders) if isinstance(loaders, list | tuple) else [loaders]
        foreign = [type(getattr(dl, "sampler", None)).__name__ for dl in loaders if evaluation_sampler(dl) is None]
        if not foreign:
            return
        message = (
            f"{'test' if stage == 'test' else 'validation'} on {trainer.world_size} processes with a loader over a "
            f"{foreign[0]}: a DistributedSampler repeats images to even out the ranks, and the attacks' batches differ "
            "from one process's, so per-class numbers would not be one process's. Use a data module of this library "
            "(its loaders deal whole batches: confspec_lightning.data.EvaluationSampler) or give your loaders an "
            "EvaluationSampler"
        )
        if stage == "test":
            raise RuntimeError(message + "; or pass --trainer.devices 1 --trainer.num_nodes 1.")
        rank_zero_warn(message + ".")

    # ------------------------------------------------------------------ test
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_sharding(trainer, "test")
        pl_module.use_evaluation_weights()
        self._collected = {}

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module: EvaluatedModule = pl_module  # type: ignore[assignment]
        test, train = self.gathered(trainer, "test"), self.gathered(trainer, "train_eval")
        key = robust_key(module)
        divergence = None
        if train and key in test:
            divergence = Divergence.from_predictions(
                key, module.num_classes, train["target"], train[key], test["target"], test[key]
            )
        cfg = module.eval_attack
        report = self.report(
            module,
            "test",
            test,
            settings={
                "norm": cfg.norm,
                "eps": cfg.eps,
                "pgd/cw step": cfg.step,
                "pgd/cw steps": cfg.steps,
                "random start": cfg.random_start,
                "seed": module.eval_seed,
                "attacks": [type(a).__name__ for a in module.test_attacks],
                "autoattack": next(
                    (a.describe() for a in module.test_attacks if a.name == "autoattack" and hasattr(a, "describe")),
                    "not run",
                ),
                "images": int(test["target"].numel()),
            },
            divergence=divergence,
            robust_attack=key if key in test else None,
            description=cfg.describe(),
        )
        pl_module.log_dict(report.scalars(), on_epoch=True)
        for attack, result in report.attacks.items():
            pl_module.log_dict(
                {f"test/{attack}_acc": result.avg, f"test/{attack}_acc_worst": result.worst}, on_epoch=True
            )
        if divergence is not None:
            pl_module.log("test/robust_acc_kendall_tau_train", divergence.kendall_tau, on_epoch=True)
        self.reports["test"] = report
        module.restore_trained_weights()

    # --------------------------------------------------------------- predict
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.use_evaluation_weights()

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.restore_trained_weights()

    # ------------------------------------------------------------ publishing
    def publish(self, trainer: pl.Trainer, stage: str) -> None:
        """Print the stage's table and write its report into the run directory (rank 0)."""
        log_dir = trainer.log_dir if trainer.logger is not None else None  # a collective under DDP
        report = self.reports.get(stage)
        if report is None or not trainer.is_global_zero:
            return
        report.environment = environment(trainer.strategy.root_device)
        print("\n" + report.format_table(), flush=True)
        if log_dir is None and self.output_dir is None:
            return
        fitting = trainer.state.fn == "fit"
        if stage == "test":
            written = report.write(self.output_dir or Path(log_dir) / "evaluation")
            print(f"evaluation report written to {written['markdown']}", flush=True)
        else:
            folder = Path(log_dir) if fitting or self.output_dir is None else self.output_dir
            path = folder / f"classwise_{stage}.json"
            report.write_json(path)
            print(f"per-class results written to {path}", flush=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.publish(trainer, "val")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.publish(trainer, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.publish(trainer, "test")

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
