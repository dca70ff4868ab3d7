"""The confspec CLI, run in-process on every shipped config."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from confspec_lightning import __version__
from confspec_lightning.cli import build_cli
from confspec_lightning.recipes import RECIPES_DIR, compose, config_files, recipe_names, recipes

from helpers import CONFIGS, ROOT

QUICK = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.train_attack.steps=2",
    "--model.init_args.eval_attack.steps=2",
    "--config",
    str(ROOT / "tests/quick_attacks.yaml"),
]


def test_recipes_are_shipped_as_bases_and_overlays():
    names = set(recipe_names())
    methods = ["trades", "trades_csr", "trades_csr_paper", "frl_rw", "frl_rwrm", "faal", "faal_csr", "cfa", "wat"]
    assert {f"digits/{m}" for m in [*methods, "dafa", "pgdat_csr", "mart", "trades_awp", "trades_awp_csr"]} <= names
    assert {f"cifar10/scratch_{m}" for m in ["trades", "trades_csr", "frl_rwrm", "faal", "cfa", "wat", "dafa"]} <= names
    finetune = ["trades", "trades_csr", "trades_csr_streaming", "trades_csr_paper", "frl_rwrm", "faal", "faal_csr"]
    finetune += ["cfa", "wat", "dafa", "trades_awp", "trades_awp_csr"]
    assert {f"cifar10/finetune_{m}" for m in finetune} <= names
    public = {"cifar10/finetune_trades_csr_from_trades_wrn", "cifar10/finetune_trades_csr_from_robustbench"}
    assert public <= names  # docs/how-to/public-models.md
    assert {"audit/robustbench_cifar10", "audit/checkpoint_cifar10"} <= set(config_files())
    # every shipped file is a base, an overlay of some recipe, or a stand-alone audit config
    used = {f.removesuffix(".yaml") for files in recipes().values() for f in files}
    assert {f for f in config_files() if not f.startswith("audit/")} == used
    # one base per data set and protocol: every recipe starts with one, and overlays are small
    bases = {"digits/base", "cifar10/scratch", "cifar10/finetune", "tinyimagenet/scratch"}
    assert {files[0].removesuffix(".yaml") for files in recipes().values()} == bases
    for overlay in used - bases:
        assert len((RECIPES_DIR / f"{overlay}.yaml").read_text().splitlines()) <= 30, overlay


def test_a_recipe_name_a_pair_of_files_and_a_0_1_path_give_one_config_and_run_name(capsys):
    printed = []
    for config in (
        ["--config", "digits/trades_csr"],
        ["--config", "digits/base.yaml", "--config", "methods/trades_csr.yaml"],
        ["--config", str(ROOT / "configs/digits/base.yaml"), "--config", str(ROOT / "configs/methods/trades_csr.yaml")],
        ["--config", str(ROOT / "configs/digits/trades_csr.yaml")],  # a recipe that was one file in 0.1
    ):
        with pytest.raises(SystemExit):
            build_cli(["fit", *config, "--print_config"])
        printed.append(yaml.safe_load(capsys.readouterr().out))
    assert all(p == printed[0] for p in printed)
    assert printed[0]["trainer"]["logger"]["init_args"]["name"] == "digits_trades_csr"
    assert printed[0]["model"]["init_args"]["fairness"][0]["class_path"] == "confspec_lightning.fairness.CSR"
    # the library's own merge (the fairness runner's, the tests') gives what jsonargparse gives
    composed = compose("digits/trades_csr")["model"]["init_args"]["fairness"][0]["init_args"]
    assert composed.items() <= printed[0]["model"]["init_args"]["fairness"][0]["init_args"].items()
    # a protocol's own method overlay keeps the method's other settings; the command line names the run
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", "digits/cfa", "--trainer.logger.init_args.name=mine", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["logger"]["init_args"]["name"] == "mine"
    assert config["model"]["init_args"]["fairness"][0]["init_args"]["warmup_epochs"] == 3
    # a user's own overlay (a file outside the package) does not rename the run
    with pytest.raises(SystemExit):
        build_cli(
            ["fit", "--config", "digits/cfa", "--config", str(ROOT / "tests/quick_attacks.yaml"), "--print_config"]
        )
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]["init_args"]["name"] == "digits_cfa"


def test_an_unknown_config_names_the_closest_recipes():
    from confspec_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "digits/trade_csr"])
    assert exit_info.value.code == 2
    with pytest.raises(
        FileNotFoundError,
        match=r"'digits/trade_csr' is neither a file nor a shipped recipe; did you "
        r"mean 'digits/trades_csr'",
    ):
        build_cli(["fit", "--config", "digits/trade_csr"])


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
    sub_block1), or a RobustBench entry in RobustBench's cache layout (needs robustbench and ``monkeypatch``). The
    CIFAR-10 scratch recipes share their base file (PreActResNet-18) and differ by the method overlay: the base's
    backbone runs in ``cifar10/scratch_trades``, the other overlays (and Tiny-ImageNet's, at 64x64) on a WRN-10-1.
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
        if name.startswith("cifar10/scratch_") and name != "cifar10/scratch_trades":
            small = "{class_path: confspec_lightning.models.WideResNet, init_args: {depth: 10, widen_factor: 1}}"
            out.append(f"--model.init_args.backbone={small}")
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
    if name.startswith("tinyimagenet/"):  # PreActResNet-18 at 64x64: tests/models/test_resnet.py
        small = "{class_path: confspec_lightning.models.WideResNet, init_args: {depth: 10, widen_factor: 1}}"
        root = SHARED_DATA / "tinyimagenet200_subset"
        return [f"--data.init_args.root={root}", *SMALL_SPLITS, f"--model.init_args.backbone={small}"]
    raise AssertionError(f"no test overrides for the shipped config {name}")


def _config_param(name):
    """A shipped recipe as a test parameter: the CIFAR-10 and Tiny-ImageNet ones (real data, ResNets) are slow."""
    return pytest.param(name, id=name, marks=() if name.startswith("digits/") else pytest.mark.slow)


@pytest.mark.parametrize("config", [_config_param(c) for c in CONFIGS])
def test_every_config_fast_dev_run(config, chdir_tmp, monkeypatch):
    overrides = config_overrides(config, chdir_tmp, monkeypatch)
    cli = build_cli(["fit", "--config", config, "--trainer.fast_dev_run=1", *QUICK, *overrides])
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
        build_cli(["fit", "--config", "digits/trades_csr", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["fairness"][0]["init_args"]["confusion_source"] == "epoch_pass"


def test_an_integer_batch_limit_is_a_number_of_batches(chdir_tmp):
    """``--trainer.limit_val_batches=1`` is one batch (Lightning's float-first type read it as 1.0: all of them)."""
    (chdir_tmp / "limits.yaml").write_text("trainer:\n  limit_test_batches: 2\n  val_check_interval: 1.0\n")
    limits = ["--trainer.limit_val_batches=1", "--trainer.limit_train_batches=0.5", "--config", "limits.yaml"]
    cli = build_cli(["--config", "digits/trades", *limits], run=False)
    trainer = cli.trainer
    assert (trainer.limit_val_batches, trainer.limit_test_batches) == (1, 2)
    assert isinstance(trainer.limit_val_batches, int) and isinstance(trainer.limit_test_batches, int)
    assert trainer.limit_train_batches == 0.5 and isinstance(trainer.val_check_interval, float)
    trainer.validate(cli.model, cli.datamodule, verbose=False)
    assert trainer.num_val_batches == [1]


def test_fit_then_test_with_ckpt_path_best(chdir_tmp, capsys):
    cfg = "digits/trades_csr"
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
        build_cli(["test", "--config", "digits/trades", "--ckpt_path", "best", *QUICK])


def _edited_config(tmp, edit) -> str:
    config = compose("digits/trades_csr")
    edit(config["model"]["init_args"])
    path = tmp / "edited.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _set_csr(key, value):
    return lambda model: model["fairness"][0]["init_args"].__setitem__(key, value)


@pytest.mark.parametrize(
    "edit,needles",
    [
        (lambda m: m.__setitem__("objective", "mat"), ["mat", "'trades', 'pgd_at', 'mart'"]),
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
    cfg = "digits/pgdat_csr"
    cli = build_cli(["--config", cfg, "--trainer.fast_dev_run=1", *QUICK], run=False)
    predictions = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    first = predictions[0]
    assert set(first) == {"pred", "adv_pred", "target"}
    assert first["pred"].shape == first["adv_pred"].shape == first["target"].shape
