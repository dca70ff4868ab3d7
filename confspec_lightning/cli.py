"""The ``confspec`` command: a ``LightningCLI`` for ``fit | validate | test | predict``.

    confspec fit --config configs/digits/trades_csr.yaml
    confspec test --config configs/digits/trades_csr.yaml --ckpt_path best

* model and data in subclass mode (``class_path``), so user subclasses plug in from a config;
* ``data.num_classes``, ``data.class_names``, ``data.mean`` and ``data.std`` are linked into the model,
  so the class count and the normalisation are given once;
* a ``checkpoint`` section configures the best checkpoint (highest worst-class robust accuracy on
  validation) and ``last_checkpoint`` the ``last.ckpt`` written after every epoch (for resuming);
* ``--ckpt_path best|last`` in a new process resolves to the newest earlier run of the same logger
  directory, so ``test`` after ``fit`` works as written above and ``fit --ckpt_path last`` resumes
  (the resumed run logs into a new ``version_N`` directory);
* the parsed config is saved with every run next to its TensorBoard logs;
* every checkpoint is written atomically (:class:`~confspec_lightning.checkpointing.AtomicCheckpointIO`
  is added to ``trainer.plugins`` unless the user gives a checkpoint IO plugin of their own);
* a ``preemption`` section configures :class:`~confspec_lightning.checkpointing.PreemptionCheckpoint`:
  SIGTERM / SIGUSR1 save ``last.ckpt`` at the next batch end and exit with status 75
  (``--preemption.exit_code``), and ``fit --ckpt_path last`` resumes exactly there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from confspec_lightning import __version__
from confspec_lightning.checkpointing import PreemptionCheckpoint, with_atomic_checkpoint_io
from confspec_lightning.module import RobustFairLitModule


def _checkpoint_from_previous_run(trainer: Trainer, which: str) -> str | None:
    """``best``/``last`` checkpoint of the newest earlier run under the trainer's logger directory."""
    logger = trainer.logger
    if logger is None or logger.save_dir is None:
        return None
    root = Path(logger.save_dir) / (logger.name or "")
    candidates = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for last in candidates:
        if which == "last":
            return str(last)
        state = torch.load(last, map_location="cpu", weights_only=True)
        for key, callback_state in state.get("callbacks", {}).items():
            if (
                key.startswith("ModelCheckpoint")
                and callback_state.get("monitor")
                and callback_state.get("best_model_path")
            ):
                best = Path(callback_state["best_model_path"])
                if best.is_file():
                    return str(best)
    return None


class ConfspecCLI(LightningCLI):
    """LightningCLI with the links and defaults of confspec-lightning."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Two checkpoint callbacks: the best one by worst-class robust accuracy, and last.ckpt after every
        # epoch (Lightning >= 2.6 refreshes a save_last=True checkpoint only when a top-k one was written).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        # SIGTERM/SIGUSR1: save last.ckpt at the next batch end, exit 75; `--preemption.signals []` turns it off
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.set_defaults(
            {
                "checkpoint.monitor": RobustFairLitModule.monitor,
                "checkpoint.mode": RobustFairLitModule.mode,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
            }
        )
        for name in ("num_classes", "class_names"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.link_arguments("data.mean", "model.init_args.input_mean", apply_on="instantiate")
        parser.link_arguments("data.std", "model.init_args.input_std", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # atomic checkpoint writes by default, whatever other plugins the user lists
        config["plugins"] = with_atomic_checkpoint_io(config.get("plugins"))
        return super()._instantiate_trainer(config, callbacks)

    def _resolve_ckpt_path(self) -> None:
        config = self.config_init[self.subcommand]
        # Lightning 2.6 hands weights_only=None to torch.load, which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns into
        # an unpickling load: make it explicit (a checkpoint from elsewhere never runs code; `--weights_only
        # false` opts out for a trusted file)
        if config.get("weights_only") is None:
            config["weights_only"] = True
        which = config.get("ckpt_path")
        if which not in ("best", "last") or self.trainer.checkpoint_callback is None:
            return
        if which == "best" and self.trainer.checkpoint_callback.best_model_path:
            return  # resolved by Lightning within this process
        path = _checkpoint_from_previous_run(self.trainer, which)
        if path is None:
            root = Path(self.trainer.logger.save_dir) / (self.trainer.logger.name or "") if self.trainer.logger else "?"
            raise FileNotFoundError(
                f"--ckpt_path {which}: no earlier run with checkpoints was found under {root}/version_*/checkpoints; "
                "run `confspec fit` with the same config first, or pass the path of a .ckpt file."
            )
        print(f"--ckpt_path {which} -> {path}", flush=True)
        config["ckpt_path"] = path

    def before_fit(self) -> None:
        self._resolve_ckpt_path()

    def before_validate(self) -> None:
        self._resolve_ckpt_path()

    def before_test(self) -> None:
        self._resolve_ckpt_path()

    def before_predict(self) -> None:
        self._resolve_ckpt_path()


def build_cli(args: list[str] | None = None, run: bool = True) -> ConfspecCLI:
    """Parse ``args`` (default: ``sys.argv``), instantiate and, with ``run``, run the subcommand."""
    return ConfspecCLI(
        RobustFairLitModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "default"},
            },
        },
        parser_kwargs={"version": __version__, "description": __doc__.split("\n\n")[0]},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``confspec`` and ``python -m confspec_lightning``."""
    build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main()
