"""The confspec CLI, run in-process on every shipped config."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from confspec_lightning import __version__
from confspec_lightning.cli import build_cli

from helpers import CONFIGS, ROOT

QUICK = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.train_attack.steps=2",
    "--model.init_args.eval_attack.steps=2",
    "--config",
    str(ROOT / "tests/quick_attacks.yaml"),
]


def test_configs_are_shipped():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    assert {"digits/trades.yaml", "digits/trades_csr.yaml", "digits/pgdat_csr.yaml"} <= names
    methods = ["frl_rw", "frl_rwrm", "faal", "faal_csr", "cfa", "wat"]
    assert {f"digits/{m}.yaml" for m in methods} <= names  # every baseline on every protocol
    assert {f"cifar10/scratch_{m}.yaml" for m in ["trades", "trades_csr", "frl_rwrm", "faal", "cfa", "wat"]} <= names
    assert {
        f"cifar10/finetune_{m}.yaml" for m in ["trades", "trades_csr", "frl_rwrm", "faal", "faal_csr", "cfa", "wat"]
    } <= names
    public = ["cifar10/finetune_trades_csr_from_trades_wrn.yaml", "cifar10/finetune_trades_csr_from_robustbench.yaml"]
    assert {
        *public,
        "audit/robustbench_cifar10.yaml",
        "audit/checkpoint_cifar10.yaml",
    } <= names  # docs/public-models.md


SHARED_DATA = ROOT.parent / "shared" / "data"
SMALL_SPLITS = [
    "--data.init_args.train_per_class=2",
    "--data.init_args.val_per_class=1",
    "--data.init_args.test_per_class=1",
    "--data.init_args.train_eval_per_class=1",
    "--data.init_args.batch_size=8",
    "--data.init_args.eval_batch_size=8",
]


def config_overrides(name: str, tmp, monkeypatch=None) -> list[str]:
    """Small data and (for fine-tuning) a generated starting checkpoint, so every config runs in seconds.

    The recipes of public models start from a tiny network in the public layout: TRADES's WideResNet file (with its
    sub_block1), or a RobustBench entry in RobustBench's cache layout (needs robustbench and ``monkeypatch``).
    """
    if name.startswith("digits/"):
        return []
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{name} needs the offline archives in {SHARED_DATA}, which is absent")
    cifar = [f"--data.init_args.root={SHARED_DATA / 'cifar10_q75'}", *SMALL_SPLITS]
    stem = name.removesuffix(".yaml")
    if stem.endswith("_robustbench") or stem == "audit/robustbench_cifar10":
        from public_architectures import TINY_ROBUSTBENCH_NAME, install_tiny_robustbench_entry

        install_tiny_robustbench_entry(monkeypatch, tmp / "models")
        backbone = "--model.init_args.backbone.init_args"
        return [*cifar, f"{backbone}.name={TINY_ROBUSTBENCH_NAME}", f"{backbone}.model_dir={tmp / 'models'}"]
    if stem.endswith("_from_trades_wrn") or stem == "audit/checkpoint_cifar10":
        from public_architectures import TradesWideResNet

        weights = tmp / "model_cifar_wrn.pt"
        torch.save(TradesWideResNet(depth=10, widen_factor=1).state_dict(), weights)  # TRADES's format and layout
        return [
            *cifar,
            "--model.init_args.backbone.init_args.depth=10",
            "--model.init_args.backbone.init_args.widen_factor=1",
            f"--model.init_args.init_weights={weights}",
        ]
    if name.startswith("cifar10/"):
        out = list(cifar)
        if "finetune" in name:  # a small WideResNet and a generated "TRADES model" to start from
            from confspec_lightning.models import WideResNet

            weights = tmp / "trades_wrn.pt"
            torch.save({"state_dict": WideResNet(10, depth=10, widen_factor=1).state_dict()}, weights)
            out += [
                "--model.init_args.backbone.init_args.depth=10",
                "--model.init_args.backbone.init_args.widen_factor=1",
                f"--model.init_args.init_weights={weights}",
            ]
        return out
    if name.startswith("tinyimagenet/"):
        return [f"--data.init_args.root={SHARED_DATA / 'tinyimagenet200_subset'}", *SMALL_SPLITS]
    raise AssertionError(f"no test overrides for the shipped config {name}")


def _config_param(config):
    """A shipped config as a test parameter: the CIFAR-10 and Tiny-ImageNet ones (real data, ResNets) are slow."""
    name = config.relative_to(ROOT / "configs").as_posix()
    return pytest.param(config, id=name, marks=() if name.startswith("digits/") else pytest.mark.slow)


@pytest.mark.parametrize("config", [_config_param(c) for c in CONFIGS])
def test_every_config_fast_dev_run(config, chdir_tmp, monkeypatch):
    name = config.relative_to(ROOT / "configs").as_posix()
    overrides = config_overrides(name, chdir_tmp, monkeypatch)
    cli = build_cli(["fit", "--config", str(config), "--trainer.fast_dev_run=1", *QUICK, *overrides])
    module, dm = cli.model, cli.datamodule
    assert module.num_classes == dm.num_classes  # linked, given once
    assert module.class_names == dm.class_names
    assert cli.trainer.state.finished
    assert "val" in module.evaluator.reports
    cli.trainer.test(module, datamodule=dm)
    assert set(module.evaluator.reports["test"].attacks) == {"clean", "pgd2", "cw2", "autoattack"}


def test_version_and_print_config(capsys):
    with pytest.raises(SystemExit) as exc:
        build_cli(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(ROOT / "configs/digits/trades_csr.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["fairness"][0]["init_args"]["confusion_source"] == "epoch_pass"


def test_an_integer_batch_limit_is_a_number_of_batches(chdir_tmp):
    """``--trainer.limit_val_batches=1`` is one batch (Lightning's float-first type read it as 1.0: all of them)."""
    (chdir_tmp / "limits.yaml").write_text("trainer:\n  limit_test_batches: 2\n  val_check_interval: 1.0\n")
    limits = ["--trainer.limit_val_batches=1", "--trainer.limit_train_batches=0.5", "--config", "limits.yaml"]
    cli = build_cli(["--config", str(ROOT / "configs/digits/trades.yaml"), *limits], run=False)
    trainer = cli.trainer
    assert (trainer.limit_val_batches, trainer.limit_test_batches) == (1, 2)
    assert isinstance(trainer.limit_val_batches, int) and isinstance(trainer.limit_test_batches, int)
    assert trainer.limit_train_batches == 0.5 and isinstance(trainer.val_check_interval, float)
    trainer.validate(cli.model, cli.datamodule, verbose=False)
    assert trainer.num_val_batches == [1]


def test_fit_then_test_with_ckpt_path_best(chdir_tmp, capsys):
    cfg = str(ROOT / "configs/digits/trades_csr.yaml")
    short = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3", *QUICK]
    build_cli(["fit", "--config", cfg, *short])
    run_dir = chdir_tmp / "runs/digits_trades_csr/version_0"
    assert (run_dir / "config.yaml").is_file()  # config saved with the run
    assert list(run_dir.glob("events.out.tfevents.*"))  # real TensorBoard event file
    assert (run_dir / "checkpoints/last.ckpt").is_file()
    fit_out = capsys.readouterr().out
    assert "Per-class accuracy (val split, epoch 1" in fit_out and "||C||_2" in fit_out

    build_cli(["test", "--config", cfg, "--ckpt_path", "best", *QUICK])
    out = capsys.readouterr().out
    assert "-> " in out and "best-epoch" in out
    best_epoch = int(re.search(r"best-epoch(\d+)\.ckpt", out).group(1))
    assert f"Per-class accuracy (test split, epoch {best_epoch};" in out  # the evaluated checkpoint's epoch
    # the report goes into the run of the checkpoint: <run>/evaluation/<checkpoint name>/, with the command's config
    assert not (chdir_tmp / "runs/digits_trades_csr/version_1").exists()
    test_dir = run_dir / "evaluation" / f"best-epoch{best_epoch:03d}"
    assert f"evaluation report written to {test_dir.relative_to(chdir_tmp)}/evaluation.md" in out
    evaluation = json.loads((test_dir / "evaluation.json").read_text())
    assert list(evaluation["attacks"]) == ["clean", "pgd2", "cw2", "autoattack"]
    assert sum(evaluation["class_counts"]) == 360
    for name in ("evaluation.md", "classwise_accuracy.png", "robust_confusion.png", "config.yaml"):
        assert (test_dir / name).stat().st_size > 0
    assert not (test_dir / "classwise_test.json").exists()  # one report: evaluation.json
    assert evaluation["environment"]["torch"] == torch.__version__
    assert len(evaluation["attacks"]["pgd2"]["classwise_acc"]) == 10 and evaluation["stage"] == "test"
    assert set(evaluation["summary"]) >= {"robust_acc_worst", "clean_acc", "confusion_spectral_norm", "cw2_acc"}
    # the best checkpoint loads safely (no pickled code) and carries G and the confusion state
    best = next((chdir_tmp / "runs/digits_trades_csr/version_0/checkpoints").glob("best-*.ckpt"))
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert {"fairness.0.direction", "fairness.0.confusion.errors", "fairness.0.confusion.class_counts"} <= set(state)


def test_ckpt_path_best_without_a_previous_run_is_a_clear_error(chdir_tmp):
    with pytest.raises(FileNotFoundError, match="no earlier run with checkpoints"):
        build_cli(["test", "--config", str(ROOT / "configs/digits/trades.yaml"), "--ckpt_path", "best", *QUICK])


def _edited_config(tmp, edit) -> str:
    config = yaml.safe_load((ROOT / "configs/digits/trades_csr.yaml").read_text())
    edit(config["model"]["init_args"])
    path = tmp / "edited.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _set_csr(key, value):
    return lambda model: model["fairness"][0]["init_args"].__setitem__(key, value)


@pytest.mark.parametrize(
    "edit,needles",
    [
        (lambda m: m.__setitem__("objective", "mart"), ["mart", "'trades', 'pgd_at'"]),
        (lambda m: m["train_attack"].__setitem__("eps", -0.1), ["attack.eps=-0.1 is not accepted", "> 0"]),
        (lambda m: m["eval_attack"].__setitem__("steps", 0), ["attack.steps=0 is not accepted", ">= 1"]),
        (lambda m: m["train_attack"].__setitem__("norm", "l1"), ["l1", "linf", "l2"]),
        (_set_csr("alpha", 2.0), ["csr.alpha=2.0 is not accepted", "[0, 1]"]),
        (_set_csr("margin", "bogus"), ["bogus", "'relative', 'additive'"]),
        (_set_csr("confusion_source", "online"), ["online", "'epoch_pass', 'streaming'"]),
    ],
)
def test_bad_config_values_fail_before_training(edit, needles, chdir_tmp, capsys):
    cfg = _edited_config(chdir_tmp, edit)
    with pytest.raises((SystemExit, ValueError)) as exc:
        build_cli(["fit", "--config", cfg, "--trainer.fast_dev_run=1"])
    message = str(exc.value) + capsys.readouterr().err
    for needle in needles:
        assert needle in message, message
    assert not (chdir_tmp / "runs").exists()


def test_predict_returns_clean_and_adversarial_predictions(chdir_tmp):
    cfg = str(ROOT / "configs/digits/pgdat_csr.yaml")
    cli = build_cli(["--config", cfg, "--trainer.fast_dev_run=1", *QUICK], run=False)
    predictions = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    first = predictions[0]
    assert set(first) == {"pred", "adv_pred", "target"}
    assert first["pred"].shape == first["adv_pred"].shape == first["target"].shape
