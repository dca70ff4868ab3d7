"""The evaluation component of :class:`~confspec_lightning.module.RobustFairLitModule`: a Lightning callback.

It owns everything after training: clean and robust per-class accuracy of validation (every epoch, streamed
into DDP-synchronised :class:`~confspec_lightning.metrics.RobustConfusionMatrix` metrics), the test attacks
(``test_attacks``: PGD, CW, AutoAttack, ... on one device), ``predict``, the train/test divergence (the data
module's ``train_eval`` subset), and publishing: TensorBoard scalars and figures, the printed table,
``classwise_val.json`` (with the per-epoch mechanism diagnostics) and the test report ``evaluation/`` (JSON,
Markdown, PNG). The module returns it from ``configure_callbacks`` and calls it from its step methods;
subclass it and give it as the module's ``evaluator`` to change how a run is evaluated or reported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from confspec_lightning.attacks.noise import SampleNoise
from confspec_lightning.data.base import EvaluationSampler
from confspec_lightning.environment import environment
from confspec_lightning.evaluation.classwise import ClasswiseResult
from confspec_lightning.evaluation.report import CLEAN, Divergence, EvaluationReport
from confspec_lightning.metrics import RobustConfusionMatrix
from confspec_lightning.validation import check_bool, check_int

if TYPE_CHECKING:  # pragma: no cover
    from confspec_lightning.module import RobustFairLitModule

#: ``train_eval``: a stratified subset of the training images (the data module's second validation loader).
STAGES = ("val", "test", "train_eval")


def evaluation_sampler(loader: Any) -> EvaluationSampler | None:
    """The :class:`~confspec_lightning.data.base.EvaluationSampler` of a loader, or None.

    Also found under Lightning's predict wrapper of the loader's batch sampler.
    """
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, EvaluationSampler):
            return sampler
    return None


class Evaluator(pl.Callback):
    """Per-class evaluation of validation, test and predict, and its reports (see the module docstring).

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
        self._predictions: dict[str, dict[str, list[Tensor]]] = {}
        #: samples seen so far per (stage, loader), for loaders whose batches have no known indices
        self._positions: dict[tuple[str, int], int] = {}

    def bind(self, num_classes: int) -> nn.ModuleDict:
        """The streaming metrics (clean and robust per stage); the module registers them (device, DDP)."""
        self.metrics = nn.ModuleDict(
            {f"{stage}_{kind}": RobustConfusionMatrix(num_classes) for stage in STAGES for kind in ("clean", "robust")}
        )
        return self.metrics

    # ------------------------------------------------------------- per batch
    def batch_position(
        self, trainer: pl.Trainer, stage: str, dataloader_idx: int, batch_idx: int, size: int
    ) -> tuple[Tensor | None, int]:
        """The indices in the split of a batch's samples (None: a placeholder batch to skip), and its batch number.

        Exact for a loader over an :class:`~confspec_lightning.data.base.EvaluationSampler` (the data modules of
        this library): the single process's indices and batch number, on any number of processes. Another loader
        is taken as sequential: its samples are numbered in the order this process sees them.
        """
        loaders = {"val": trainer.val_dataloaders, "test": trainer.test_dataloaders}.get(stage)
        if stage == "predict":
            loaders = trainer.predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, list | tuple) else loaders
        sampler = evaluation_sampler(loader)
        if sampler is not None:
            global_batch = sampler.global_batch(batch_idx)
            return (None if global_batch is None else sampler.batch_indices(batch_idx)), global_batch or 0
        start = self._positions.get((stage, dataloader_idx), 0)
        self._positions[(stage, dataloader_idx)] = start + size
        return torch.arange(start, start + size), batch_idx

    def robust_logits(self, module: RobustFairLitModule, x: Tensor, target: Tensor, indices: Tensor) -> Tensor:
        """Logits under the evaluation PGD (``module.eval_attack``, CE objective), seeded per sample.

        Each sample's random start is keyed by its index (:class:`~confspec_lightning.attacks.noise.SampleNoise`
        with ``module.eval_seed``).
        """
        noise = SampleNoise(module.eval_seed, indices)
        x_adv = module.validation_attack.perturb(module.net, x, target, threat=module.eval_attack, generator=noise)
        return module.net(x_adv)

    def evaluate_batch(
        self, module: RobustFairLitModule, batch: Any, stage: str, indices: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Clean and evaluation-PGD logits of a batch, added to the stage's metrics."""
        x, target = batch
        x = module.format_input(x)
        clean_logits = module.net(x)
        module.check_logits(clean_logits)
        adv_logits = self.robust_logits(module, x, target, indices)
        self.metrics[f"{stage}_clean"].update(clean_logits, target)
        self.metrics[f"{stage}_robust"].update(adv_logits, target)
        return clean_logits, adv_logits

    def validation_batch(self, module: RobustFairLitModule, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        indices, _ = self.batch_position(module.trainer, "val", dataloader_idx, batch_idx, len(batch[1]))
        if indices is not None:  # a placeholder batch (a rank with no batch of its own) counts nothing
            self.evaluate_batch(module, batch, "val" if dataloader_idx == 0 else "train_eval", indices)

    def test_batch(self, module: RobustFairLitModule, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """Every test attack on the test split; the evaluation PGD on the train subset (divergence).

        Each attack's random starts are keyed by sample index and AutoAttack is seeded with ``eval_seed`` plus the
        batch's number in a single process's pass, so several processes give one process's predictions.
        """
        stage = "test" if dataloader_idx == 0 else "train_eval"
        x, target = batch
        indices, number = self.batch_position(module.trainer, "test", dataloader_idx, batch_idx, len(target))
        if indices is None:
            return
        x = module.format_input(x)
        clean_logits = module.net(x)
        module.check_logits(clean_logits)
        predictions = {"index": indices.to(target.device), "target": target, CLEAN: clean_logits.argmax(1)}
        if stage == "train_eval":
            predictions[self.divergence_key(module)] = self.robust_logits(module, x, target, indices).argmax(1)
        else:
            noise = SampleNoise(module.eval_seed, indices)
            for attack in module.test_attacks:
                predictions[attack.key(module.eval_attack)] = attack.predictions(
                    module.net,
                    x,
                    target,
                    threat=module.eval_attack,
                    generator=noise,
                    seed=module.eval_seed + number,
                    progress=self._progress(module.trainer, f"{attack.name}, test batch {number + 1}"),
                )
        for key, value in predictions.items():
            self._predictions.setdefault(stage, {}).setdefault(key, []).append(value.detach().cpu())

    def predict_batch(self, module: RobustFairLitModule, batch: Any, batch_idx: int = 0) -> dict[str, Tensor]:
        """Clean predictions and, where labels come with the batch, predictions under the evaluation PGD.

        A placeholder batch (a rank with no batch of its own) gives empty predictions.
        """
        x, target = batch if isinstance(batch, list | tuple) and len(batch) == 2 else (batch, None)
        indices, _ = self.batch_position(module.trainer, "predict", 0, batch_idx, len(x))
        if indices is None:
            empty = torch.zeros(0, dtype=torch.long, device=x.device)
            return {"pred": empty, **({"target": empty, "adv_pred": empty} if target is not None else {})}
        x = module.format_input(x)
        out = {"pred": module.net(x).argmax(dim=1)}
        if target is not None:
            out["target"] = target
            out["adv_pred"] = self.robust_logits(module, x, target, indices).argmax(dim=1)
        return out

    @staticmethod
    def divergence_key(module: RobustFairLitModule) -> str:
        return f"pgd{module.eval_attack.steps}"

    @staticmethod
    def _progress(trainer: pl.Trainer, prefix: str) -> Callable[[str], None] | None:
        """Prints an attack's progress (rank 0, when the trainer shows progress bars)."""
        bar = trainer.progress_bar_callback
        if bar is None or not bar.is_enabled or not trainer.is_global_zero:
            return None
        from tqdm.auto import tqdm

        return lambda message: tqdm.write(f"{prefix}: {message}", file=sys.stderr)

    # ------------------------------------------------------------ validation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.use_evaluation_weights()
        self._positions = {}
        if not trainer.sanity_checking:
            self._check_sharding(trainer, "val")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module: RobustFairLitModule = pl_module  # type: ignore[assignment]
        report = self._finish(module, "val", figures=self.figures)
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            entry: dict[str, Any] = {"epoch": module.current_epoch, "val": report.robust.diagnostics}
            train = module.train_confusion_diagnostics()
            if train is not None:
                entry["train"] = train
            self.history.append(entry)
            report.history = list(self.history)
        if len(trainer.num_val_batches) > 1:  # the data module also gave a train subset
            train_report = self._finish(module, "train_eval", figures=False)
            report.divergence = Divergence.from_accuracies(
                "pgd",
                train_report.robust.classwise_acc,
                report.robust.classwise_acc,
                train_size=sum(train_report.class_counts),
            )
            if not trainer.sanity_checking:
                name = "val/robust_acc_kendall_tau_train"
                module.log_global({name: report.divergence.kendall_tau})
        module.restore_trained_weights()

    def _finish(self, module: RobustFairLitModule, stage: str, figures: bool) -> EvaluationReport:
        """The stage's report from the synced metrics (collectives: every rank calls it); logged."""
        clean, robust = self.metrics[f"{stage}_clean"], self.metrics[f"{stage}_robust"]
        clean_errors, counts = clean.synced_state()
        errors, _ = robust.synced_state()
        clean.reset()
        robust.reset()
        key = f"pgd{module.eval_attack.steps}"
        attacks = {
            CLEAN: ClasswiseResult.from_confusion(clean_errors, counts, module.class_names, with_confusion=False),
            key: ClasswiseResult.from_confusion(errors, counts, module.class_names),
        }
        report = EvaluationReport(
            name=self.run_name(module),
            class_names=list(module.class_names),
            class_counts=[int(c) for c in counts.tolist()],
            attacks=attacks,
            stage=stage,
            epoch=self.report_epoch(module),
            robust_attack=key,
            description=module.eval_attack.describe(),
        )
        if module.trainer.sanity_checking:
            return report
        # values are already global (synced metric state): logged without another reduction
        module.log_global(report.scalars())
        if module.num_classes <= self.max_classwise_scalars:
            module.log_global(report.classwise_scalars())
        if figures:
            self.log_figures(module, report)
        self.reports[stage] = report
        return report

    @staticmethod
    def report_epoch(module: RobustFairLitModule) -> int:
        """The training epoch the evaluated weights come from (the checkpoint's, outside fit)."""
        epoch = getattr(module, "checkpoint_epoch", None)
        if module.trainer.state.fn != "fit" and epoch is not None:
            return int(epoch)
        return module.current_epoch

    @staticmethod
    def run_name(module: RobustFairLitModule) -> str:
        logger = module.trainer.logger
        return str(getattr(logger, "name", None) or type(module.backbone).__name__)

    def log_figures(self, module: RobustFairLitModule, report: EvaluationReport) -> None:
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
        self._positions = {}
        self._predictions = {"test": {}, "train_eval": {}}

    def _gathered_predictions(self, trainer: pl.Trainer) -> dict[str, dict[str, Tensor]]:
        """Every rank's predictions, in the order of the samples' indices (a collective under DDP: every rank)."""
        local = {stage: {k: torch.cat(v) for k, v in d.items()} for stage, d in self._predictions.items()}
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, local)
        else:
            parts = [local]
        collected: dict[str, dict[str, Tensor]] = {}
        for stage in self._predictions:
            pieces = [part[stage] for part in parts if part.get(stage)]
            if not pieces:
                collected[stage] = {}
                continue
            merged = {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}
            order = torch.argsort(merged.pop("index"), stable=True)
            collected[stage] = {key: value[order] for key, value in merged.items()}
        return collected

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module: RobustFairLitModule = pl_module  # type: ignore[assignment]
        collected = self._gathered_predictions(trainer)
        test, train = collected["test"], collected["train_eval"]
        target = test.pop("target")
        divergence = None
        key = self.divergence_key(module)
        if train and key in test:
            divergence = Divergence.from_predictions(
                key, module.num_classes, train["target"], train[key], target, test[key]
            )
        cfg = module.eval_attack
        report = EvaluationReport.from_predictions(
            name=self.run_name(module),
            class_names=list(module.class_names),
            target=target,
            predictions=test,
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
                "images": int(target.numel()),
            },
            divergence=divergence,
            stage="test",
            epoch=self.report_epoch(module),
            robust_attack=key if key in test else None,
            description=cfg.describe(),
        )
        module.log_dict(report.scalars(), on_epoch=True)
        for attack, result in report.attacks.items():
            module.log_dict({f"test/{attack}_acc": result.avg, f"test/{attack}_acc_worst": result.worst}, on_epoch=True)
        if divergence is not None:
            module.log("test/robust_acc_kendall_tau_train", divergence.kendall_tau, on_epoch=True)
        self.reports["test"] = report
        module.restore_trained_weights()

    # --------------------------------------------------------------- predict
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.use_evaluation_weights()
        self._positions = {}

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
