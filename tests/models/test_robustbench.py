"""RobustBench model zoo entries as backbones: RobustBench's own code, its cache folder, offline errors."""

from __future__ import annotations

import pytest
import torch

from confspec_lightning.models import RobustBenchModel

from helpers import make_module
from public_architectures import TINY_ROBUSTBENCH_NAME, install_tiny_robustbench_entry, require_robustbench


def test_an_entry_in_the_cache_is_built_by_robustbench_and_computes_its_network(tmp_path, monkeypatch):
    network = install_tiny_robustbench_entry(monkeypatch, tmp_path / "models")
    backbone = RobustBenchModel(TINY_ROBUSTBENCH_NAME, model_dir=str(tmp_path / "models"))
    assert type(backbone.model).__module__ == "robustbench.model_zoo.architectures.wide_resnet"
    assert not backbone.model.training  # RobustBench's load_model returns it in eval mode
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), network(x))
    # in the module: raw pixels (the model normalises itself where it needs to), whatever the data links in
    module = make_module(fairness=[], backbone=backbone, input_mean=[0.5] * 3, input_std=[0.25] * 3)
    assert isinstance(module.net.normalize, torch.nn.Identity) and module.starts_from_file
    with pytest.raises(ValueError, match=r"input_normalization='data' is not accepted with this backbone"):
        make_module(
            fairness=[], backbone=backbone, input_mean=[0.5] * 3, input_std=[0.25] * 3, input_normalization="data"
        )


def test_a_name_not_in_the_cache_names_the_path_and_the_name(tmp_path):
    require_robustbench()
    with pytest.raises(FileNotFoundError) as info:
        RobustBenchModel("Zhang2019Theoretically", model_dir=str(tmp_path / "models"))
    message = str(info.value)
    assert "'Zhang2019Theoretically' (cifar10, Linf) is not in the cache folder" in message
    assert str(tmp_path / "models/cifar10/Linf/Zhang2019Theoretically.pt") in message and "download: true" in message


def test_an_unknown_name_or_option_lists_what_is_accepted(tmp_path):
    require_robustbench()
    with pytest.raises(ValueError, match=r"'Zhang2019Theoretical' is not a RobustBench cifar10 Linf model; did you "):
        RobustBenchModel("Zhang2019Theoretical", model_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"robustbench.threat_model='linf' is not accepted; choose one of 'Linf'"):
        RobustBenchModel("Zhang2019Theoretically", threat_model="linf", model_dir=str(tmp_path))


def test_a_pickled_cache_file_is_refused_not_executed(tmp_path, monkeypatch):
    install_tiny_robustbench_entry(monkeypatch, tmp_path / "models")
    path = tmp_path / "models/cifar10/Linf" / f"{TINY_ROBUSTBENCH_NAME}.pt"
    torch.save({"state_dict": {}, "args": Payload()}, path)
    with pytest.raises(ValueError, match=r"holds pickled Python objects, which are refused"):
        RobustBenchModel(TINY_ROBUSTBENCH_NAME, model_dir=str(tmp_path / "models"))


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))
