"""The ``confspec`` command: a ``LightningCLI`` for ``fit | validate | test | predict``.

    confspec fit --config digits/base.yaml --config methods/trades_csr.yaml   (or: --config digits/trades_csr)
    confspec test --config digits/trades_csr --ckpt_path best

* ``--config`` takes files, shipped config files by name and recipe names (:mod:`confspec_lightning.recipes`: a
  protocol base plus method overlays; the run is named after them);
* model and data in subclass mode (``class_path``), so user subclasses plug in from a config;
* ``data.num_classes``, ``data.class_names``, ``data.mean`` and ``data.std`` are linked into the model,
  so the class count and the normalisation are given once;
* a ``checkpoint`` section configures the best checkpoint (highest worst-class robust accuracy on
  validation) and ``last_checkpoint`` the ``last.ckpt`` written after every epoch (for resuming);
* ``--ckpt_path best|last`` resolves within the run the command names (:mod:`confspec_lightning.runs`: the
  logger's name and version, a run directory, or the only run of that name) and prints the file it took;
  ``fit --ckpt_path last`` continues that run (same directory, best checkpoint and TensorBoard run); a file
  ``torch.load(weights_only=True)`` cannot read is refused with its name;
* the parsed config is saved with every run next to its TensorBoard logs;
* every checkpoint is written atomically (:class:`~confspec_lightning.checkpointing.AtomicCheckpointIO`
  is added to ``trainer.plugins`` unless the user gives a checkpoint IO plugin of their own);
* a ``preemption`` section configures :class:`~confspec_lightning.checkpointing.PreemptionCheckpoint`:
  SIGTERM / SIGUSR1 save ``last.ckpt`` at the next batch end and exit with status 75
  (``--preemption.exit_code``), and ``fit --ckpt_path last`` resumes exactly there.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from confspec_lightning import __version__, environment, errors, runs
from confspec_lightning.checkpointing import PreemptionCheckpoint, with_atomic_checkpoint_io
from confspec_lightning.module import FROM_CONFIG, RobustFairLitModule
from confspec_lightning.recipes import resolve_config_args


class ConfspecTrainer(Trainer):
    """Lightning's ``Trainer``, where an integer ``limit_*_batches`` / ``val_check_interval`` stays a number of batches.

    Lightning types these ``float | int``; the parser tries ``float`` first, so ``--trainer.limit_val_batches=1``
    (or ``limit_val_batches: 1`` in YAML) became ``1.0``, i.e. *all* batches. Here ``1`` is one batch and ``1.0``
    all of them, as the Trainer's own documentation says.
    """

    def __init__(
        self,
        *args: Any,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        val_check_interval: int | float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args,
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            val_check_interval=val_check_interval,
            **kwargs,
        )


class ConfspecCLI(LightningCLI):
    """LightningCLI with the links and defaults of confspec-lightning.

    ``only_subcommand``: build the parser of that subcommand alone (the command line names it): Lightning builds
    one parser per subcommand, each with every Trainer, model and data argument, which is most of the start-up.
    """

    def __init__(self, *args: Any, only_subcommand: str | None = None, **kwargs: Any) -> None:
        self.only_subcommand = only_subcommand
        #: where an evaluation of a run's checkpoint writes (None: the logger's directory)
        self.report_dir: Path | None = None
        self.prediction_file: Path | None = None
        #: folders this command created, removed again when it fails before writing a result
        self._created_dirs: list[Path] = _COMMAND.setdefault("created", [])
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        """Lightning's, telling the module its components come from the config (:data:`~.module.FROM_CONFIG`)."""
        token = FROM_CONFIG.set(True)
        try:
            super().instantiate_classes()
        finally:
            FROM_CONFIG.reset(token)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser; the saved ``config.yaml`` starts with the versions, commit and device of the run."""
        parser = super().init_parser(**kwargs)
        parser.dump_header = [*(parser.dump_header or []), *environment.header_lines()]
        return parser

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]
        """Lightning's subcommands, or the requested one alone (see the class docstring)."""
        every = LightningCLI.subcommands()
        only = getattr(self, "only_subcommand", None)
        return {only: every[only]} if only in every else every

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

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path`` within the run the command names, check the file, continue a resumed run.

        ``best|last|<run dir>`` become a file; a resumed fit keeps its run's directory, best/top-k bookkeeping
        and TensorBoard run.
        """
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config is not None and config.get("ckpt_path") is not None:
            requested = str(config["ckpt_path"])
            layout = runs.logger_runs(config.get("trainer", {}).get("logger"))
            path, run = runs.resolve_checkpoint(requested, "last" if subcommand == "fit" else "best", layout)
            if config.get("weights_only") is not False:  # `--weights_only false` opts out for a trusted file
                runs.check_checkpoint_file(path)
            config["ckpt_path"] = path
            if path != requested:
                print(f"--ckpt_path {requested} -> {path}", flush=True)
            if subcommand == "fit" and run is not None and layout is not None and layout.version is None:
                version = runs.run_version(run, layout)
                if version is not None:  # continue that run rather than opening a new version_N
                    config["trainer"]["logger"]["init_args"]["version"] = version
                    print(f"resuming the run {run} (logger version {version!r})", flush=True)
            if subcommand == "fit" and run is not None:  # its checkpoints are there on purpose
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            if subcommand in ("validate", "test", "predict") and run is not None:
                self._report_into_run(subcommand, config, Path(path), run)
        # Lightning's own _parse_ckpt_path would re-parse the checkpoint's saved hyperparameters over the config, so
        # the checkpoint's test attacks, eval batch or eval_attack would win over the command line and --config
        # files; here the config as given is what runs, and what the checkpoint fixes is checked once the model
        # is built (check_checkpoint_fixes, in before_<subcommand>)

    def _report_into_run(self, subcommand: str, config: Any, checkpoint: Path, run: Path) -> None:
        """Point an evaluation of a run's checkpoint at that run: its reports go into the run's folder.

        ``validate``/``test``: ``<run>/evaluation/<checkpoint name>/`` (its per-class reports and the command's
        ``config.yaml``), ``predict``: ``<run>/predictions/<checkpoint name>.csv``; the TensorBoard scalars join the
        run's. An earlier report is never overwritten: the next free name gets ``-2``, ``-3``, ...
        """
        logger = config.get("trainer", {}).get("logger")
        init = getattr(logger, "init_args", None) if logger is not None and not isinstance(logger, bool) else None
        if init is None or getattr(init, "save_dir", None) is None:
            return  # no logger run layout: the reports go where the logger (or the working directory) says
        init["save_dir"], init["name"], init["version"] = str(run.parent.parent), run.parent.name, run.name
        stem = checkpoint.stem
        if subcommand == "predict":
            self.prediction_file = runs.free_path(run / "predictions", stem, ".csv")
            target = self.prediction_file.parent
        else:
            self.report_dir = runs.free_path(run / "evaluation", stem, "", taken=runs.report_taken(subcommand))
            target = self.report_dir
        name = f"{self.prediction_file.stem}.config.yaml" if self.prediction_file is not None else "config.yaml"
        config_file = target / name
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": str(config_file.relative_to(run))}
        self._created_dirs.append(target)

    #: The module arguments a checkpoint fixes: its weights only fit a model built with these.
    CHECKPOINT_FIXES = ("backbone", "num_classes", "input_mean", "input_std", "fairness")

    def check_checkpoint_fixes(self) -> None:
        """Refuse a config that builds another model than the one the checkpoint holds (clear error, no traceback).

        The architecture and class count (else its weights do not load, or load into another network), the input
        normalisation (the Normalize buffers would be overwritten by the checkpoint's: a silent change of the
        input convention) and the fairness methods (their state lives in the checkpoint).
        """
        config = self.config_init[self.subcommand]
        path = config.get("ckpt_path")
        if not path or not Path(str(path)).is_file():
            return
        import torch

        saved = torch.load(str(path), map_location="cpu", weights_only=True).get("hyper_parameters") or {}
        built = dict(getattr(self.model, "hparams", {}))
        conflicts = []
        for key in self.CHECKPOINT_FIXES:
            if key in saved and key in built and _plain(saved[key]) != _plain(built[key]):
                conflicts.append(f"{key}: checkpoint {_short(saved[key])}, config {_short(built[key])}")
        if conflicts:
            run = Path(str(path)).parent.parent / "config.yaml"
            hint = f"--config {run}" if run.is_file() else "the config the checkpoint was trained with"
            raise ValueError(
                f"--ckpt_path {path} holds another model than the config builds ({'; '.join(conflicts)}); the "
                f"checkpoint fixes {', '.join(self.CHECKPOINT_FIXES)}: pass {hint} (options such as test_attacks, "
                "eval_attack and the data's batch sizes may still be changed)."
            )

    def _resolve_ckpt_path(self) -> None:
        config = self.config_init[self.subcommand]
        # Lightning 2.6 hands weights_only=None to torch.load, which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns into
        # an unpickling load: make it explicit (a checkpoint from elsewhere never runs code; `--weights_only
        # false` opts out for a trusted file)
        if config.get("weights_only") is None:
            config["weights_only"] = True
        self.check_checkpoint_fixes()
        self.model.evaluator.output_dir = self.report_dir
        self.model.prediction_file = self.prediction_file
        for folder in [self.report_dir, self.prediction_file and self.prediction_file.parent]:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)  # the command's config.yaml is saved there at setup

    def after_instantiate_classes(self) -> None:
        """Note the run folder the logger will create: removed again if the command fails before any result."""
        super().after_instantiate_classes()
        logger = getattr(self.trainer, "logger", None)
        log_dir = getattr(logger, "log_dir", None) if logger is not None else None
        if log_dir is not None and not Path(log_dir).exists() and _is_global_zero():
            self._created_dirs.append(Path(log_dir))

    def before_fit(self) -> None:
        self._resolve_ckpt_path()

    def before_validate(self) -> None:
        self._resolve_ckpt_path()

    def before_test(self) -> None:
        self._resolve_ckpt_path()

    def before_predict(self) -> None:
        self._resolve_ckpt_path()


def _plain(value: Any) -> Any:
    """A hyperparameter as plain data (jsonargparse Namespaces and tuples as dicts and lists), for comparison."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "_instantiator"}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _short(value: Any, limit: int = 160) -> str:
    text = repr(_plain(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: The command ``main`` runs (its arguments after recipe names are resolved, and ``--debug``), for the parser's
#: error path, which Lightning calls with no access to them.
_COMMAND: dict[str, Any] = {"argv": [], "debug": False, "created": []}

#: Top-level config keys of every subcommand (for "did you mean" on a typo'd one).
TOP_LEVEL_KEYS = ["trainer", "model", "data", "checkpoint", "last_checkpoint", "preemption", "seed_everything"]


class ConfspecArgumentParser(LightningArgumentParser):
    """Parse errors as one line: where, the innermost reason, the closest valid names (``--debug``: in full)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        argv = _COMMAND["argv"] or sys.argv[1:]
        if not self.exit_on_error or _COMMAND["debug"] or errors.debug_requested(argv):
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        summary = errors.summarize_parse_error(message, TOP_LEVEL_KEYS)
        if "Problems parsing config" in message:  # a YAML syntax error: name the file, the reason and the line
            summary = errors.config_file_problem(argv) or summary
        sys.stderr.write(f"{prog}: error: {summary}  [--help lists the options; --debug: the parser's message]\n")
        sys.exit(errors.USAGE_EXIT)


def build_cli(args: list[str] | None = None, run: bool = True) -> ConfspecCLI:
    """Parse ``args`` (default: ``sys.argv``), instantiate and, with ``run``, run the subcommand.

    ``--config`` values are resolved first (recipe names, shipped files: :func:`~.recipes.resolve_config_args`).
    """
    argv = resolve_config_args(sys.argv[1:] if args is None else args)
    if args is None:
        sys.argv[1:] = argv
    else:
        args = argv
    requested = argv[0] if argv and not argv[0].startswith("-") else None
    return ConfspecCLI(
        RobustFairLitModule,
        LightningDataModule,
        trainer_class=ConfspecTrainer,
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
        parser_kwargs={"prog": "confspec", "version": __version__, "description": __doc__.split("\n\n")[0]},
        auto_configure_optimizers=False,
        parser_class=ConfspecArgumentParser,
        args=args,
        run=run,
        only_subcommand=requested,
    )


class _DropAdvertisements(logging.Filter):
    """Drops Lightning's tips about installing its cloud products (litlogger, litmodels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("litlogger" in message or "litmodels" in message)


def quiet_lightning(subcommand: str | None = None) -> None:
    """No messages a user of ``confspec`` cannot act on: Lightning's product tips, its internal deprecations.

    When evaluating (``validate``, ``test``, ``predict``) another run's checkpoint, also Lightning's notice about
    that run's ModelCheckpoint bookkeeping (the state is not used there).
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvertisements) for f in logger.filters):
            logger.addFilter(_DropAdvertisements())
    # raised inside Lightning's own _pytree helper with torch >= 2.10; nothing in a config can change it
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    if subcommand in ("validate", "test", "predict"):
        warnings.filterwarnings("ignore", message=r"The dirpath has changed from .*")


def _named_in_full(error: BaseException) -> str:
    """The message, its field named from the config root when the module rejected it (``model.eval_attack.steps``)."""
    message = str(error)
    match = re.match(r"([A-Za-z_][\w.\[\]]*)=", message)
    if match and match.group(1).split(".")[0].split("[")[0] in inspect.signature(RobustFairLitModule).parameters:
        return "model." + message
    return message


def _is_global_zero() -> bool:
    """Rank 0 of a job (the launching process), from the environment launchers set; True without one."""
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


#: Files that make a folder a result: a failed command never removes a folder holding one.
RESULT_PATTERNS = ("*.ckpt", "evaluation.json", "classwise_*.json", "*.csv")


def remove_empty_run_folders(folders: list[Path]) -> None:
    """Remove the folders a failed command created if they hold no result (config and empty logs only)."""
    import shutil

    for folder in reversed(folders):
        if folder.is_dir() and not any(any(folder.rglob(pattern)) for pattern in RESULT_PATTERNS):
            shutil.rmtree(folder, ignore_errors=True)


def close_process_group() -> None:
    """Destroy the ``torch.distributed`` process group a finished DDP run leaves open.

    Lightning does not; left to the interpreter's exit, gloo's threads can be destroyed while still joinable
    (``terminate called without an active exception``, SIGABRT): torchrun then reports a finished run as failed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(args: list[str] | None = None) -> None:
    """Entry point of ``confspec`` and ``python -m confspec_lightning``.

    A value the library rejects prints its one-paragraph message and exits with status 2; ``--debug`` (or
    ``CONFSPEC_DEBUG=1``) shows the traceback instead.
    """
    argv = list(sys.argv[1:] if args is None else args)
    quiet_lightning(argv[0] if argv else None)
    debug = errors.debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        argv = resolve_config_args(argv)
        if args is None:  # LightningCLI reads sys.argv itself (given args too, it warns)
            sys.argv[1:] = argv
        _COMMAND.update(argv=argv, debug=debug, created=[])  # for the parser's error path and clean-up
        build_cli(None if args is None else argv)
        close_process_group()
    except Exception as error:
        if _is_global_zero():
            remove_empty_run_folders(_COMMAND.get("created", []))
        root = None if debug else errors.user_error(error)
        if root is None:
            raise
        command = " ".join(["confspec", *[a for a in argv[:1] if not a.startswith("-")]])
        sys.stderr.write(f"{command}: error: {_named_in_full(root)}  [--debug: the traceback]\n")
        sys.exit(errors.USAGE_EXIT)
    finally:
        _COMMAND.update(argv=[], debug=False, created=[])


if __name__ == "__main__":  # pragma: no cover
    main()
