"""Public checkpoint layouts: every supported source network, saved in its file format, loads into our backbone and
computes the same logits (eval mode, random weights and BatchNorm statistics); the traps are refused clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from confspec_lightning.models import PreActResNet18, ResNet18, WideResNet
from confspec_lightning.models.weights import load_backbone_weights

from public_architectures import PublicResNet18, TradesWideResNet, randomize

SIZES = (32, 30)  # the public nets pool with a fixed kernel: the same function as our global pool on 29..32 pixels


def save(tmp_path, state: dict, fmt: str, name: str = "source.pt"):
    """``state`` in one of the public file formats."""
    state = {k: v.clone() for k, v in state.items()}
    wrapped = {
        "plain": state,
        "dataparallel": {f"module.{k}": v for k, v in state.items()},
        "nested": {"state_dict": state},
        "nested_module": {"state_dict": {f"module.{k}": v for k, v in state.items()}},  # DAFA, RobustBench files
        "csr_authors": {"model_state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 99},
        "model_prefix": {"state_dict": {f"model.{k}": v for k, v in state.items()}},
        "hat_sequential": {f"module.0.{k}": v for k, v in state.items()},  # DataParallel(Sequential(backbone))
        "no_counters": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
    }[fmt]
    path = tmp_path / name
    torch.save(wrapped, path)
    return path


def assert_same_function(source: nn.Module, ours: nn.Module, channels: int = 3):
    source, ours = source.double().eval(), ours.double().eval()
    for size in SIZES:
        x = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
        with torch.no_grad():
            diff = (source(x) - ours(x)).abs().max().item()
        assert diff <= 1e-5, (size, diff)


WRN_CASES = [
    # depth, widen, sub_block1, file format
    (34, 1, True, "plain"),  # TRADES's own model_cifar_wrn.pt: a plain state dict with sub_block1
    (28, 2, True, "csr_authors"),  # the CSR authors' checkpoints: model_state_dict with module.
    (34, 1, False, "nested_module"),  # DAFA / later code without sub_block1, {'state_dict': module.*}
    (28, 1, True, "dataparallel"),  # MART: DataParallel state dict
    (34, 1, False, "hat_sequential"),  # HAT: DataParallel(Sequential(backbone))
    (28, 1, True, "no_counters"),  # files of older torch: no num_batches_tracked
]


@pytest.mark.parametrize("depth,widen,sub_block1,fmt", WRN_CASES)
def test_trades_wideresnet_files_load_as_the_same_function(tmp_path, depth, widen, sub_block1, fmt, capsys):
    source = randomize(TradesWideResNet(depth, 10, widen, sub_block1=sub_block1), seed=depth + widen)
    path = save(tmp_path, source.state_dict(), fmt)
    ours = WideResNet(10, depth=depth, widen_factor=widen)
    loaded = load_backbone_weights(ours, path)
    assert loaded.layout == "trades_wideresnet" and loaded.detected
    assert loaded.description == f"WRN-{depth}-{widen}"
    summary = loaded.summary()
    assert "read layout 'trades_wideresnet' (detected" in summary
    if sub_block1:
        assert "sub_block1.*" in summary and all(k.startswith("sub_block1.") for k in loaded.dropped)
    else:
        assert "dropped: nothing" in summary
    assert_same_function(source, ours)


def test_trades_wideresnet_file_into_another_backbone_says_what_to_build(tmp_path):
    path = save(tmp_path, TradesWideResNet(34, 10, 1).state_dict(), "plain")
    with pytest.raises(
        ValueError, match=r"build confspec_lightning.models.WideResNet with depth 34 and widen_factor 1"
    ):
        load_backbone_weights(ResNet18(), path)
    with pytest.raises(ValueError, match=r"read as layout 'trades_wideresnet'.*missing.*blocks.5"):  # WRN-28 != 34
        load_backbone_weights(WideResNet(10, depth=28, widen_factor=1), path)


def test_an_extra_tensor_in_a_public_file_is_refused(tmp_path):
    state = TradesWideResNet(28, 10, 1).state_dict()
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"1 unexpected \[extra.weight\]"):
        load_backbone_weights(WideResNet(10, depth=28, widen_factor=1), save(tmp_path, state, "nested_module"))


@pytest.mark.parametrize("fmt", ["plain", "model_prefix"])
def test_kuangliu_resnet18_files_load_as_the_same_function(tmp_path, fmt):
    source = randomize(PublicResNet18(preact=False), seed=3)
    ours = ResNet18(10)
    loaded = load_backbone_weights(ours, save(tmp_path, source.state_dict(), fmt))
    assert loaded.layout == "kuangliu_resnet18"
    assert_same_function(source, ours)


PREACT_CASES = [
    # shortcut the source takes, its final bn, our layout, file format
    ("input", True, "preact_resnet18_input_shortcut", "nested"),  # fast_adversarial
    ("activated", False, "preact_resnet18_activated_shortcut", "plain"),  # kuangliu preact_resnet.py
    ("activated", True, "preact_resnet18_activated_shortcut", "dataparallel"),  # Rice et al.
    ("input", False, "preact_resnet18_input_shortcut", "no_counters"),  # RobustBench PreActResNet default
]


@pytest.mark.parametrize("takes,final_bn,layout,fmt", PREACT_CASES)
def test_preact_resnet18_files_load_as_the_same_function(tmp_path, takes, final_bn, layout, fmt):
    source = randomize(PublicResNet18(preact=True, shortcut_takes=takes, final_bn=final_bn), seed=5)
    ours = PreActResNet18(10, shortcut=takes, final_bn=final_bn)
    loaded = load_backbone_weights(ours, save(tmp_path, source.state_dict(), fmt), layout=layout)
    assert loaded.layout == layout and not loaded.detected
    assert_same_function(source, ours)


def test_a_preact_file_needs_its_layout_named_and_the_matching_variant(tmp_path):
    source = randomize(PublicResNet18(preact=True, shortcut_takes="input", final_bn=True), seed=6)
    path = save(tmp_path, source.state_dict(), "plain")
    # the keys cannot tell the shortcut variants apart: refused, naming both and the option
    with pytest.raises(ValueError, match=r"several layouts.*preact_resnet18_input_shortcut.*init_weights_layout"):
        load_backbone_weights(PreActResNet18(10, shortcut="input"), path)
    # the default block (shortcut of relu(bn1(x))) computes another function with the same shapes: refused
    with pytest.raises(ValueError, match=r"another function\): build PreActResNet18 with shortcut: input"):
        load_backbone_weights(PreActResNet18(10), path, layout="preact_resnet18_input_shortcut")
    # ... and it is another function indeed
    from confspec_lightning.models import layouts

    wrong = PreActResNet18(10)
    wrong.load_state_dict(layouts.LAYOUTS["preact_resnet18_input_shortcut"].convert(source.state_dict()).state)
    with torch.no_grad():
        x = torch.rand(2, 3, 32, 32)
        assert (wrong.eval()(x) - source(x)).abs().max() > 1e-3
    # a file without the final BN into a backbone with it: the option to set
    kuangliu = save(tmp_path, PublicResNet18(preact=True).state_dict(), "plain", "kuangliu.pt")
    with pytest.raises(ValueError, match=r"without a final BN, the backbone is not: build .* final_bn: false"):
        load_backbone_weights(PreActResNet18(10), kuangliu, layout="preact_resnet18_activated_shortcut")


def test_an_unknown_layout_names_what_it_saw_the_layouts_and_the_option(tmp_path):
    source = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    path = save(tmp_path, {f"encoder.{k}": v for k, v in source.state_dict().items()}, "nested")
    with pytest.raises(ValueError) as info:
        load_backbone_weights(ResNet18(), path)
    message = str(info.value)
    for needle in (
        "its layout is not one this library reads",
        "top-level modules encoder",
        "encoder.0.weight",
        "trades_wideresnet",
        "kuangliu_resnet18",
        "preact_resnet18_input_shortcut",
        "init_weights_layout",
    ):
        assert needle in message, message
    with pytest.raises(ValueError, match=r"init_weights_layout='wrn' is not accepted; choose one of 'auto', 'native'"):
        load_backbone_weights(ResNet18(), path, layout="wrn")


# ------------------------------------------------------------------------------ RobustBench's own classes
def _robustbench_architectures():
    import importlib

    from public_architectures import require_robustbench

    require_robustbench()

    return (
        importlib.import_module("robustbench.model_zoo.architectures.wide_resnet"),
        importlib.import_module("robustbench.model_zoo.architectures.resnet"),
        importlib.import_module("robustbench.model_zoo.cifar10"),
        importlib.import_module("robustbench.model_zoo.cifar100"),
    )


def test_robustbench_wideresnet_and_resnet_files(tmp_path):
    wide_resnet, resnet, _, _ = _robustbench_architectures()
    for depth, sub_block1 in ((28, True), (34, False)):
        source = randomize(wide_resnet.WideResNet(depth=depth, widen_factor=1, sub_block1=sub_block1), seed=depth)
        ours = WideResNet(10, depth=depth, widen_factor=1)
        assert load_backbone_weights(ours, save(tmp_path, source.state_dict(), "nested_module")).layout == (
            "trades_wideresnet"
        )
        assert_same_function(source, ours)
    source = randomize(resnet.ResNet18(), seed=1)
    ours = ResNet18(10)
    load_backbone_weights(ours, save(tmp_path, source.state_dict(), "model_prefix"))
    assert_same_function(source, ours)


@pytest.mark.parametrize(
    "build,shortcut,final_bn,layout",
    [
        (lambda r: r.PreActResNet(r.PreActBlock, [2, 2, 2, 2]), "input", False, "preact_resnet18_input_shortcut"),
        (
            lambda r: r.PreActResNet(r.PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True),
            "activated",
            True,
            "preact_resnet18_activated_shortcut",
        ),
    ],
    ids=["PreActBlock-default", "PreActBlockV2-bn_before_fc"],
)
def test_robustbench_preact_files(tmp_path, build, shortcut, final_bn, layout):
    _, resnet, _, _ = _robustbench_architectures()
    source = randomize(build(resnet), seed=2)
    ours = PreActResNet18(10, shortcut=shortcut, final_bn=final_bn)
    load_backbone_weights(ours, save(tmp_path, source.state_dict(), "nested_module"), layout=layout)
    assert_same_function(source, ours)


@pytest.mark.parametrize(
    "entry,classes,shortcut,final_bn,layout",
    [
        ("cifar10.Wong2020FastNet", 10, "input", False, "preact_resnet18_input_shortcut"),
        ("cifar100.Rice2020OverfittingNet", 100, "activated", True, "preact_resnet18_activated_shortcut"),
    ],
)
def test_robustbench_models_with_mu_sigma_load_with_their_normalisation(
    tmp_path, entry, classes, shortcut, final_bn, layout
):
    """RobustBench models that normalise inside carry mu/sigma: input_normalization: checkpoint keeps them."""
    _, _, cifar10, cifar100 = _robustbench_architectures()
    module_name, cls = entry.split(".")
    source = randomize({"cifar10": cifar10, "cifar100": cifar100}[module_name].__dict__[cls](), seed=4)
    path = save(tmp_path, source.state_dict(), "nested_module")
    from helpers import make_module

    kwargs = dict(fairness=[], num_classes=classes, init_weights=str(path), init_weights_layout=layout)
    backbone = PreActResNet18(classes, shortcut=shortcut, final_bn=final_bn)
    module = make_module(backbone=backbone, input_normalization="checkpoint", **kwargs)
    assert "mu/sigma" in module.input_normalization_used
    assert_same_function(source, module.net)
    # mu/sigma in the file and no decision, or a contradicting one: refused, naming the choice
    with pytest.raises(ValueError, match=r"records the input normalisation mean .* input_normalization: checkpoint"):
        make_module(backbone=PreActResNet18(classes, shortcut=shortcut, final_bn=final_bn), **kwargs)
    with pytest.raises(
        ValueError, match=r"input_normalization='none' .* contradicts .* set input_normalization: check"
    ):
        make_module(
            backbone=PreActResNet18(classes, shortcut=shortcut, final_bn=final_bn), input_normalization="none", **kwargs
        )


class SelfNormalizing(nn.Module):
    """A backbone with its own mu/sigma buffers (as RobustBench's Wong2020FastNet, or a RobustBenchModel of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mu", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("sigma", torch.full((1, 3, 1, 1), 0.25))
        self.conv = nn.Conv2d(3, 4, 3)


@pytest.mark.parametrize("wrap", [lambda m: m, lambda m: nn.ModuleDict({"model": m})], ids=["plain", "model."])
def test_a_backbones_own_mu_sigma_are_its_weights_not_a_recorded_normalisation(tmp_path, wrap):
    source = wrap(SelfNormalizing())
    with torch.no_grad():
        for buffer in source.buffers():
            buffer.add_(0.1)
    target = wrap(SelfNormalizing())
    loaded = load_backbone_weights(target, save(tmp_path, source.state_dict(), "dataparallel"))
    assert loaded.layout == "native" and loaded.normalization is None
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, msg=key)
