from __future__ import annotations

import torch

from confspec_lightning import functional as CF
from confspec_lightning.metrics import RobustConfusionMatrix, load_global_states, save_global_states


def test_metric_accumulates_like_the_functional():
    torch.manual_seed(0)
    logits, target = torch.randn(100, 5), torch.randint(0, 5, (100,))
    metric = RobustConfusionMatrix(5, gamma=0.1, margin="additive")
    for chunk in range(4):
        sl = slice(25 * chunk, 25 * (chunk + 1))
        metric.update(logits[sl], target[sl])
    expected = CF.robust_confusion_matrix(logits, target, 5, gamma=0.1, margin="additive")
    torch.testing.assert_close(metric.compute(), expected.double())
    assert metric.compute().diagonal().eq(0).all()
    counts = torch.bincount(target, minlength=5)
    torch.testing.assert_close(metric.classwise_error(), CF.classwise_error(expected, counts))
    assert metric.spectral_norm().item() == torch.linalg.matrix_norm(expected.double(), ord=2).item()
    metric.reset()
    assert metric.errors.sum() == 0 and metric.class_counts.sum() == 0


def test_metric_normalize_and_state_dict():
    metric = RobustConfusionMatrix(3, normalize=True)
    metric.persistent(True)
    metric.update(torch.eye(3)[[1, 1, 2, 0]] * 4, torch.tensor([0, 0, 1, 2]))
    c = metric.compute()
    torch.testing.assert_close(c.sum(0), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    state = metric.state_dict()
    assert set(state) == {"errors", "class_counts"}
    other = RobustConfusionMatrix(3, normalize=True)
    other.load_state_dict(state)
    torch.testing.assert_close(other.compute(), c)


def test_metric_plot_returns_a_figure():
    metric = RobustConfusionMatrix(3)
    metric.update(torch.eye(3)[[1, 2, 0]], torch.tensor([0, 1, 2]))
    fig, ax = metric.plot(class_names=["a", "b", "c"])
    assert ax.get_xlabel() == "true class" and ax.get_ylabel() == "predicted class"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_bad_arguments_are_named():
    import pytest

    with pytest.raises(ValueError, match=r"num_classes=1"):
        RobustConfusionMatrix(1)
    with pytest.raises(ValueError, match=r"gamma=1\.5"):
        RobustConfusionMatrix(3, gamma=1.5)
    with pytest.raises(ValueError, match=r"shape \(batch, num_classes=3\)"):
        RobustConfusionMatrix(3).update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


def test_global_states_in_a_checkpoint_are_kept_by_rank_zero_only():
    metric = RobustConfusionMatrix(3)
    metric.update(torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]]), torch.tensor([0, 0]))
    state: dict[str, torch.Tensor] = {}
    save_global_states([("train_confusion", metric)], state)  # one process: the global sum is its own
    assert set(state) == {f"train_confusion.{key}" for key in metric._defaults}
    errors = state["train_confusion.errors"]
    assert errors.device.type == "cpu" and errors[1, 0] == 1 and errors[0, 0] == 0 and errors.sum() == 1
    for rank, kept in ((0, True), (1, False)):
        loaded = dict(state)
        load_global_states([("train_confusion", metric)], loaded, rank)
        for key, value in loaded.items():
            assert torch.equal(value, state[key] if kept else torch.zeros_like(state[key])), (rank, key)
