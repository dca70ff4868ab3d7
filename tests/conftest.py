from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from confspec_lightning.data.digits import DigitsDataModule

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared test modules (helpers, archives)

os.environ.setdefault("PYTHONHASHSEED", "0")
# one intra-op thread per pytest-xdist worker (the workers share the cores), at most 2 in a single process
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # and in the processes a worker starts (confspec commands, scripts): 2 OpenMP threads each beside the other
    # worker oversubscribe the cores, and their spin-waits cost CPU time (-10 to -20 % on the subprocess tests)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """64 real digits images (1, 8, 8) in [0, 1], stratified, with labels."""
    dm = DigitsDataModule(seed=0)
    dm.setup()
    x, y = dm.splits["train"].tensors
    return x[:64].clone(), y[:64].clone()


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    from confspec_lightning.models import DigitsCNN, Normalize

    return torch.nn.Sequential(Normalize([0.3053], [0.3760]), DigitsCNN(width=8))


@pytest.fixture(autouse=True)
def chdir_tmp(tmp_path, monkeypatch):
    """Every test runs in its own temporary directory: nothing is written into the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def trained_model(tiny_model, digits_batch):
    """The tiny CNN fitted to the 64 digits images (clean accuracy 100%): attacks have something to break."""
    x, y = digits_batch
    optimizer = torch.optim.Adam(tiny_model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = F.cross_entropy(tiny_model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tiny_model.zero_grad(set_to_none=True)
    tiny_model.eval()
    return tiny_model


def pytest_collection_modifyitems(config, items):
    """The ``slow`` tests (real processes, training runs) first: two xdist workers then share the long ones
    and finish together on the many short ones."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
