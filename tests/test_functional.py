"""Reference checks of the CSR math on hand-computed cases (docs/explanation/method.md §1-2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from confspec_lightning import functional as CF
from confspec_lightning.objectives import (
    LossAdjustment,
    ObjectiveOutput,
    combine_terms,
    cross_entropy,
    kl_divergence,
)


def logits_for(preds: list[int], k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(preds), k).float() * 5.0


def test_confusion_rows_predicted_columns_true_zero_diagonal():
    target = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    preds = [0, 2, 0, 1, 1, 1, 2]
    c = CF.robust_confusion_matrix(logits_for(preds, 3), target, 3)
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(c, expected)
    assert c.dtype == torch.float32
    # normalised: per true class rates, column sums = class-wise error
    cn = CF.robust_confusion_matrix(logits_for(preds, 3), target, 3, normalize=True)
    torch.testing.assert_close(cn.sum(0), torch.tensor([1 / 2, 1 / 2, 2 / 3]))
    torch.testing.assert_close(cn.sum(0).max(), torch.linalg.matrix_norm(cn, ord=1))


def test_margin_modes_hand_case():
    # true class 0 with logits (2, 1.5, -1)
    z = torch.tensor([[2.0, 1.5, -1.0]])
    y = torch.tensor([0])
    # gamma = 0: correct for both
    for margin in ("relative", "additive"):
        assert CF.margin_predictions(z, y, 0.0, margin).item() == 0
    # relative: 2 * (1 - 0.3) = 1.4 < 1.5 -> predicted 1
    assert CF.margin_predictions(z, y, 0.3, "relative").item() == 1
    # additive: wrong logits + 0.3 -> 1.8 < 2 -> still 0; + 0.6 -> 2.1 > 2 -> 1
    assert CF.margin_predictions(z, y, 0.3, "additive").item() == 0
    assert CF.margin_predictions(z, y, 0.6, "additive").item() == 1
    # relative with a negative true logit: scaling by (1 - gamma) *raises* it (authors' code behaviour)
    z_neg = torch.tensor([[-1.0, -0.95]])
    assert CF.margin_predictions(z_neg, torch.tensor([0]), 0.0).item() == 1
    assert CF.margin_predictions(z_neg, torch.tensor([0]), 0.1, "relative").item() == 0
    c = CF.robust_confusion_matrix(z, y, 3, gamma=0.3, margin="relative")
    assert c[1, 0] == 1 and c.sum() == 1


def test_bad_margin_is_named():
    with pytest.raises(ValueError, match=r"margin='bogus'.*'relative', 'additive'"):
        CF.robust_confusion_matrix(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 3, margin="bogus")


def power_iteration(c: torch.Tensor, iters: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.ones(c.shape[1], dtype=torch.float64)
    for _ in range(iters):
        v = c.T @ (c @ v)
        v = v / v.norm()
    u = c @ v
    return u / u.norm(), v


def test_spectral_direction_matches_power_iteration():
    g = torch.Generator().manual_seed(1)
    c = torch.randint(0, 20, (6, 6), generator=g).double().fill_diagonal_(0)
    u, v = power_iteration(c)
    assert (u >= 0).all() and (v >= 0).all()
    torch.testing.assert_close(CF.spectral_direction(c, rescale=False), torch.outer(u, v), atol=1e-8, rtol=1e-6)
    # G = d sigma_max / dC: a finite-difference check of one entry
    eps = 1e-6
    bumped = c.clone()
    bumped[2, 4] += eps
    fd = (torch.linalg.matrix_norm(bumped, ord=2) - torch.linalg.matrix_norm(c, ord=2)) / eps
    assert math.isclose(fd.item(), CF.spectral_direction(c, rescale=False)[2, 4].item(), rel_tol=1e-4)


def test_spectral_direction_rescale_hand_case():
    # C = [[0, 2], [0, 0]]: u1 = e0, v1 = e1, G = [[0, 1], [0, 0]] -> rescaled [[0.01, 2.01], [0.01, 0.01]]
    c = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(
        CF.spectral_direction(c, rescale=False), torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        CF.spectral_direction(c), torch.tensor([[0.01, 2.01], [0.01, 0.01]], dtype=torch.float64)
    )
    g = CF.spectral_direction(torch.rand(10, 10).fill_diagonal_(0))
    assert math.isclose(g.min().item(), 0.01) and math.isclose(g.max().item(), 2.01)
    assert g.dtype == torch.float64


@pytest.mark.parametrize("rescale", [True, False])
def test_spectral_direction_no_error_guard(rescale):
    ones = torch.ones(4, 4, dtype=torch.float64)
    torch.testing.assert_close(CF.spectral_direction(torch.zeros(4, 4), rescale=rescale), ones)
    # J - I: the top singular vectors are uniform, so G is constant (max == min) -> all ones, no NaN
    c = torch.ones(3, 3) - torch.eye(3)
    torch.testing.assert_close(CF.spectral_direction(c, rescale=rescale), torch.ones(3, 3, dtype=torch.float64))


def test_csr_weights_with_and_without_diagonal():
    g = torch.tensor([[0.5, 2.0, 0.1], [0.3, 0.7, 1.5], [1.2, 0.9, 0.2]], dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 2])
    adv = logits_for([0, 0, 1, 2], 3)  # correct, 1->0, 2->1, correct
    torch.testing.assert_close(CF.csr_weights(g, adv, target), torch.tensor([0.5, 2.0, 1.5, 0.2]))
    torch.testing.assert_close(
        CF.csr_weights(g, adv, target, include_diagonal=False), torch.tensor([0.0, 2.0, 1.5, 0.0])
    )


def test_spectral_norm_and_classwise_error():
    c = torch.tensor([[0.0, 3.0], [4.0, 0.0]])
    assert CF.spectral_norm(c).item() == pytest.approx(4.0)
    err = CF.classwise_error(c, torch.tensor([8, 6]))
    torch.testing.assert_close(err, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert CF.classwise_accuracy(c, torch.tensor([8, 0]))[1].isnan()


def test_kl_direction_and_values():
    p_logits = torch.tensor([[2.0, 0.0, -1.0]])
    q_logits = torch.tensor([[0.0, 1.0, 0.0]])
    p, q = p_logits.softmax(1), q_logits.softmax(1)
    expected = (p * (p.log() - q.log())).sum()
    assert kl_divergence(p_logits, q_logits).item() == pytest.approx(expected.item(), rel=1e-6)
    reverse = (q * (q.log() - p.log())).sum()
    assert not math.isclose(expected.item(), reverse.item(), rel_tol=1e-3)  # KL(p||q), not KL(q||p)
    # the clean branch is not detached: gradients reach both arguments
    a, b = p_logits.clone().requires_grad_(), q_logits.clone().requires_grad_()
    kl_divergence(a, b).sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_trades_csr_loss_equals_formula():
    torch.manual_seed(0)
    clean, adv = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 1, 0])
    out = ObjectiveOutput(
        terms={"ce": cross_entropy(clean, y), "kl": kl_divergence(clean, adv)},
        coefficients={"ce": 1.0, "kl": 6.0},
        adv_logits=adv,
        adv_ce=cross_entropy(adv, y),
        clean_logits=clean,
    )
    g = torch.rand(3, 3, dtype=torch.float64) + 0.01
    w = CF.csr_weights(g, adv, y)
    alpha = 0.3
    adj = LossAdjustment(term_weights={"ce": 1 - alpha}, extra_terms={"csr": alpha * (w * out.adv_ce).mean()})
    loss, parts = combine_terms(out, [adj])
    ce = torch.nn.functional.cross_entropy(clean, y)
    kl = torch.nn.functional.kl_div(adv.log_softmax(1), clean.log_softmax(1), reduction="batchmean", log_target=True)
    manual = (
        (1 - alpha) * ce + 6.0 * kl + alpha * (w * torch.nn.functional.cross_entropy(adv, y, reduction="none")).mean()
    )
    torch.testing.assert_close(loss, manual)
    assert set(parts) == {"ce", "kl", "csr"}
    # methods stack by multiplying weights
    loss2, _ = combine_terms(out, [LossAdjustment(term_weights={"ce": 0.5}), LossAdjustment(term_weights={"ce": 0.5})])
    torch.testing.assert_close(loss2, 0.25 * ce + 6.0 * kl)
    with pytest.raises(KeyError, match="'bndy'"):
        combine_terms(out, [LossAdjustment(term_weights={"bndy": 1.0})])


@pytest.mark.parametrize(
    "a,b,expected",
    [
        ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
        ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
        ([1, 2, 3], [1, 3, 2], 1 / 3),  # 2 concordant, 1 discordant
        ([1, 1, 2, 3], [1, 2, 3, 4], 5 / math.sqrt(5 * 6)),  # one tie in a: n0 = 6, n1 = 1
        ([1, 1, 2, 2], [1, 2, 1, 2], 0.0),
        ([1, math.nan, 3, 2], [3, 1, math.nan, 1], -1.0),  # NaNs dropped pairwise -> a=[1, 2], b=[3, 1]
        ([1, math.nan], [math.nan, 2], math.nan),  # fewer than 2 points
        ([5], [1], math.nan),
        ([2, 2, 2], [1, 2, 3], math.nan),  # constant vector
    ],
)
def test_kendall_tau_hand_cases(a, b, expected):
    tau = CF.kendall_tau(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float32))
    assert isinstance(tau, float)
    if math.isnan(expected):
        assert math.isnan(tau)
    else:
        assert tau == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_kendall_tau_matches_scipy_with_ties_and_nans(seed):
    g = torch.Generator().manual_seed(seed)
    n = 5 + 3 * seed
    a = torch.randint(0, 4, (n,), generator=g).double()  # few distinct values: many ties
    b = (a + torch.randint(-2, 3, (n,), generator=g)).double()
    a[torch.rand(n, generator=g) < 0.15] = math.nan
    b[torch.rand(n, generator=g) < 0.15] = math.nan
    expected = kendalltau(a.numpy(), b.numpy(), nan_policy="omit").statistic
    keep = ~(np.isnan(a.numpy()) | np.isnan(b.numpy()))
    assert kendalltau(a.numpy()[keep], b.numpy()[keep]).statistic == pytest.approx(expected, abs=1e-12, nan_ok=True)
    assert CF.kendall_tau(a, b) == pytest.approx(float(expected), abs=1e-12, nan_ok=True)


def test_kendall_tau_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"same length.*\(3,\) and \(4,\)"):
        CF.kendall_tau(torch.zeros(3), torch.zeros(4))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("gamma,margin", [(0.0, "relative"), (0.2, "relative"), (0.3, "additive")])
def test_confusion_from_predictions_matches_robust_confusion_matrix(normalize, gamma, margin):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 6, generator=g)
    target = torch.randint(0, 6, (200,), generator=g)
    pred = CF.margin_predictions(logits, target, gamma, margin)
    expected = CF.robust_confusion_matrix(logits, target, 6, gamma=gamma, margin=margin, normalize=normalize)
    got = CF.confusion_from_predictions(pred, target, 6, normalize=normalize)
    assert got.dtype == torch.float32 and (got.diagonal() == 0).all()
    torch.testing.assert_close(got, expected)


def test_confusion_from_predictions_hand_case_and_shape_error():
    pred = torch.tensor([0, 2, 1, 1, 0])
    target = torch.tensor([0, 0, 1, 2, 2])
    c = CF.confusion_from_predictions(pred, target, 3)
    torch.testing.assert_close(c, torch.tensor([[0.0, 0, 1], [0, 0, 1], [1, 0, 0]]))
    cn = CF.confusion_from_predictions(pred, target, 3, normalize=True)
    torch.testing.assert_close(cn, torch.tensor([[0.0, 0, 0.5], [0, 0, 0.5], [0.5, 0, 0]]))
    with pytest.raises(ValueError, match=r"same shape.*\(5,\) and \(4,\)"):
        CF.confusion_from_predictions(pred, target[:4], 3)
