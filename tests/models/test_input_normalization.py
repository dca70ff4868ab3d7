"""The input normalisation is a decided choice: data, none or the file's own; contradictions are refused."""

from __future__ import annotations

import pytest
import torch

from confspec_lightning.models import WideResNet
from confspec_lightning.models.normalize import Normalize, RecordedNormalization, resolve_input_normalization

from helpers import make_module
from public_architectures import TradesWideResNet, randomize

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]


def test_resolution_rules():
    data = (CIFAR_MEAN, CIFAR_STD)
    assert resolve_input_normalization(None, *data)[:2] == data  # no start file: the data's
    assert resolve_input_normalization(None, *data, weights_file="w.pt")[:2] == data  # our own layout: the data's
    assert resolve_input_normalization("none", *data, weights_file="w.pt", foreign_layout="trades_wideresnet")[:2] == (
        None,
        None,
    )
    recorded = RecordedNormalization([0.5] * 3, [0.5] * 3, "mu/sigma")
    assert resolve_input_normalization("checkpoint", *data, weights_file="w.pt", recorded=recorded)[:2] == (
        [0.5] * 3,
        [0.5] * 3,
    )
    same = RecordedNormalization(CIFAR_MEAN, CIFAR_STD, "net.normalize")
    assert resolve_input_normalization(None, *data, weights_file="w.pt", recorded=same)[:2] == data
    assert resolve_input_normalization(None, *data, backbone_normalizes=True)[:2] == (None, None)


@pytest.mark.parametrize(
    "choice,kwargs,needles",
    [
        (None, {"foreign_layout": "trades_wideresnet"}, ["records no input normalisation", "none or data", "TRADES"]),
        ("checkpoint", {}, ["input_normalization='checkpoint' is not accepted", "records no input normalisation"]),
        ("data", {"recorded": RecordedNormalization(None, None, "x")}, ["contradicts", "input_normalization: check"]),
        (None, {"recorded": RecordedNormalization([0.5] * 3, [0.5] * 3, "mu/sigma")}, ["decide", "checkpoint"]),
        ("data", {"backbone_normalizes": True}, ["normalises its inputs itself", "input_normalization: none"]),
        ("raw", {}, ["input_normalization='raw' is not accepted; choose one of 'data', 'none', 'checkpoint'"]),
    ],
)
def test_bad_choices_are_refused_with_the_choices(choice, kwargs, needles):
    with pytest.raises(ValueError) as info:
        resolve_input_normalization(choice, CIFAR_MEAN, CIFAR_STD, weights_file="w.pt", **kwargs)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_a_trades_file_needs_the_choice_and_then_computes_the_trades_model(tmp_path):
    """The trap of the issue: a TRADES model fed CIFAR-normalised inputs. Undecided: refused; none: the right model."""
    source = randomize(TradesWideResNet(10, 10, 2), seed=1)
    path = tmp_path / "model_cifar_wrn.pt"
    torch.save(source.state_dict(), path)
    kwargs = dict(
        fairness=[], backbone=WideResNet(10, depth=10, widen_factor=2), init_weights=str(path), input_mean=CIFAR_MEAN
    )
    with pytest.raises(ValueError, match=r"public checkpoint \(layout 'trades_wideresnet'\) that records no input"):
        make_module(input_std=CIFAR_STD, **kwargs)
    module = make_module(input_std=CIFAR_STD, input_normalization="none", **kwargs)
    assert not isinstance(module.net.normalize, Normalize)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module.net.eval()(x), source(x), atol=1e-4, rtol=1e-4)
    data = make_module(input_std=CIFAR_STD, input_normalization="data", **kwargs)  # decided: allowed, and different
    assert isinstance(data.net.normalize, Normalize)
    with torch.no_grad():
        assert (data.net.eval()(x) - source(x)).abs().max() > 1e-2


def test_a_module_checkpoint_records_its_normalisation(tmp_path):
    """A RobustFairLitModule checkpoint records net.normalize (or its absence): contradictions are refused."""
    trained = make_module(fairness=[], input_mean=None, input_std=None)  # a model of raw inputs
    path = tmp_path / "raw.ckpt"
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": {}}, path)
    with pytest.raises(ValueError, match=r"records the input normalisation none, raw \[0, 1\] inputs"):
        make_module(fairness=[], init_weights=str(path))  # the digits' mean/std would be a silent change
    module = make_module(fairness=[], init_weights=str(path), input_normalization="checkpoint")
    assert module.input_normalization_used.startswith("checkpoint: none")
