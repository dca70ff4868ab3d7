"""Evaluation building blocks: CW objective, Kendall's tau, AutoAttack wrapper, reports and comparison tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau

from confspec_lightning import functional as CF
from confspec_lightning.attacks import ATTACK_LOSSES, attack_objective_value, autoattack_predictions, pgd
from confspec_lightning.evaluation import Divergence, EvaluationReport, compare_reports
from confspec_lightning.evaluation.compare import main as compare_main

# ---------------------------------------------------------------- helpers


def cw_margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y, written independently of the library."""
    others = logits.clone()
    others[torch.arange(len(target)), target] = -torch.inf
    return others.max(dim=1).values - logits[torch.arange(len(target)), target]


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


# ---------------------------------------------------------------- CW objective


def test_cw_logit_gradient_matches_autograd_and_finite_differences():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    (autograd,) = torch.autograd.grad(cw_margin(logits, target).sum(), logits)
    ours = ATTACK_LOSSES["cw"].logit_grad(logits.detach(), target, None)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), autograd)
    # central finite differences of the margin of sample 0 (no ties: the margin is locally linear)
    h = 1e-6
    z = logits.detach()[:1]
    fd = torch.stack(
        [(cw_margin(z + h * e, target[:1]) - cw_margin(z - h * e, target[:1])) / (2 * h) for e in torch.eye(5)], 1
    )
    torch.testing.assert_close(ours[:1].double(), fd, atol=1e-6, rtol=0)
    # onehot(j*) - onehot(y): exactly one +1 and one -1 per row
    assert (ours.sum(1) == 0).all() and (ours.abs().sum(1) == 2).all()


def test_cw_objective_value_is_the_margin(tiny_model, digits_batch):
    x, y = digits_batch
    with torch.no_grad():
        expected = cw_margin(tiny_model.eval()(x).float(), y)
    torch.testing.assert_close(attack_objective_value(tiny_model, x, x, y, "cw"), expected)


def test_cw_attack_lowers_margin_accuracy(trained_model, digits_batch):
    x, y = digits_batch
    eps = 0.1
    x_adv = pgd(trained_model, x, y, eps=eps, step=0.025, steps=10, objective="cw")
    assert ((x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    before = attack_objective_value(trained_model, x, x, y, "cw")
    after = attack_objective_value(trained_model, x, x_adv, y, "cw")
    clean_acc = (before < 0).float().mean()
    robust_acc = (after < 0).float().mean()
    assert clean_acc == 1.0
    assert robust_acc < clean_acc - 0.3, (clean_acc, robust_acc)
    assert (after >= before - 1e-4).float().mean() > 0.95  # the margin grows for (almost) every sample
    # the uniform random start (as for CE) is seeded by the generator
    again = pgd(
        trained_model, x, y, eps=eps, step=0.025, steps=2, objective="cw", generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(
        again,
        pgd(
            trained_model,
            x,
            y,
            eps=eps,
            step=0.025,
            steps=2,
            objective="cw",
            generator=torch.Generator().manual_seed(1),
        ),
    )


def test_unknown_objective_names_cw_among_accepted(tiny_model, digits_batch):
    with pytest.raises(ValueError, match=r"objective='bogus'.*'ce', 'cw', 'trades_kl'"):
        pgd(tiny_model, *digits_batch, objective="bogus")


# ---------------------------------------------------------------- Kendall's tau-b


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


# ---------------------------------------------------------------- confusion from predictions


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


# ---------------------------------------------------------------- AutoAttack


def test_autoattack_custom_is_no_more_accurate_than_clean(trained_model, digits_batch, capsys):
    x, y = digits_batch[0][:16], digits_batch[1][:16]
    trained_model.train()
    trained_model[1].eval()  # a frozen submodule stays frozen
    rng_state = torch.get_rng_state()
    with torch.inference_mode():  # works inside inference mode (it re-enables autograd on a clone)
        pred = autoattack_predictions(
            trained_model, x, y, norm="linf", eps=0.1, version="custom", attacks=["apgd-ce"], batch_size=8
        )
    assert capsys.readouterr().out == ""  # pyautoattack printed nothing
    assert pred.shape == y.shape and pred.dtype == torch.long and pred.device == x.device
    assert trained_model.training and not trained_model[1].training
    assert all(p.grad is None for p in trained_model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_state)  # the seeded run leaves the global RNG alone
    with torch.no_grad():
        clean = trained_model.eval()(x).argmax(1)
    robust_correct, clean_correct = pred == y, clean == y
    assert not (robust_correct & ~clean_correct).any()  # per sample: robust-correct implies clean-correct
    assert robust_correct.float().mean() < clean_correct.float().mean()
    again = autoattack_predictions(
        trained_model, x, y, norm="linf", eps=0.1, version="custom", attacks=["apgd-ce"], batch_size=8
    )
    assert torch.equal(pred, again)  # fixed seed


def test_autoattack_log_path(trained_model, digits_batch, tmp_path, capsys):
    x, y = digits_batch[0][:8], digits_batch[1][:8]
    log = tmp_path / "aa.log"
    autoattack_predictions(
        trained_model, x, y, norm="l2", eps=0.5, version="custom", attacks=["apgd-ce"], log_path=str(log)
    )
    assert capsys.readouterr().out == ""
    text = log.read_text()
    assert "apgd-ce" in text and "robust accuracy" in text


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"version": "plus"}, r"version='plus'.*'standard', 'custom'"),
        ({"version": "custom"}, r"attacks=None.*version='custom'.*'apgd-ce'.*'square'"),
        ({"version": "custom", "attacks": []}, r"attacks=\[\].*non-empty"),
        ({"version": "custom", "attacks": ["pgd"]}, r"attacks\[\]='pgd'.*'apgd-ce'"),
        ({"attacks": ["apgd-ce"]}, r"attacks=\['apgd-ce'\].*version='standard'.*version='custom'"),
        ({"norm": "l1"}, r"norm='l1'.*'linf', 'l2'"),
        ({"eps": 0.0}, r"eps=0.0.*> 0"),
    ],
)
def test_autoattack_rejects_bad_options(tiny_model, digits_batch, kwargs, match):
    x, y = digits_batch
    options = {"norm": "linf", "eps": 8 / 255, **kwargs}
    with pytest.raises(ValueError, match=match):
        autoattack_predictions(tiny_model, x, y, **options)


# ---------------------------------------------------------------- EvaluationReport

CLASSES = ["a", "b", "c"]
TARGET = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
PREDICTIONS = {
    "clean": torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2]),  # acc a 3/4, b 2/2, c 4/4
    "pgd20": torch.tensor([0, 0, 1, 2, 1, 0, 2, 2, 2, 0]),  # acc a 2/4, b 1/2, c 3/4
    "autoattack": torch.tensor([1, 0, 1, 2, 0, 0, 2, 2, 0, 0]),  # acc a 1/4, b 0/2, c 2/4
}
SETTINGS = {"norm": "linf", "eps": 8 / 255, "checkpoint": "best.ckpt", "seeds": [0, 1]}


def make_report(name="TRADES", predictions=None, divergence=None) -> EvaluationReport:
    return EvaluationReport.from_predictions(
        name, CLASSES, TARGET, predictions or PREDICTIONS, SETTINGS, divergence=divergence
    )


def test_report_exact_numbers():
    report = make_report()
    assert list(report.attacks) == ["clean", "pgd20", "autoattack"] and report.strongest_attack == "autoattack"
    assert report.class_counts == [4, 2, 4]
    clean, pgd20, aa = report.attacks["clean"], report.attacks["pgd20"], report.attacks["autoattack"]
    assert clean.classwise_acc == pytest.approx([0.75, 1.0, 1.0])
    assert (clean.avg, clean.worst, clean.worst_class, clean.spread, clean.overall) == pytest.approx(
        (2.75 / 3, 0.75, "a", 0.25, 0.9)
    )
    assert clean.confusion is None and clean.confusion_spectral_norm is None
    assert pgd20.classwise_acc == pytest.approx([0.5, 0.5, 0.75])
    assert (pgd20.avg, pgd20.worst, pgd20.worst_class, pgd20.spread, pgd20.overall) == pytest.approx(
        (1.75 / 3, 0.5, "a", 0.25, 0.6)
    )
    assert aa.classwise_acc == pytest.approx([0.25, 0.0, 0.5])
    assert (aa.avg, aa.worst, aa.worst_class, aa.spread, aa.overall) == pytest.approx((0.25, 0.0, "b", 0.5, 0.3))
    # rows = predicted, columns = true class, per-class error rates
    c_pgd = np.array([[0, 0.5, 0.25], [0.25, 0, 0], [0.25, 0, 0]])
    c_aa = np.array([[0, 1.0, 0.5], [0.5, 0, 0], [0.25, 0, 0]])
    np.testing.assert_allclose(pgd20.confusion, c_pgd)
    np.testing.assert_allclose(aa.confusion, c_aa)
    assert pgd20.confusion_spectral_norm == pytest.approx(np.linalg.norm(c_pgd, 2))
    assert aa.confusion_spectral_norm == pytest.approx(np.linalg.norm(c_aa, 2))
    # column sums of C are the class-wise errors
    np.testing.assert_allclose(np.array(aa.confusion).sum(0), 1 - np.array(aa.classwise_acc))


def test_report_class_without_samples_is_nan_and_null(tmp_path):
    report = EvaluationReport.from_predictions(
        "x", [*CLASSES, "empty"], TARGET, {k: v for k, v in PREDICTIONS.items() if k != "pgd20"}, {}
    )
    aa = report.attacks["autoattack"]
    assert math.isnan(aa.classwise_acc[3]) and aa.avg == pytest.approx(0.25) and aa.worst_class == "b"
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["attacks"]["autoattack"]["classwise_acc"][3] is None
    loaded = EvaluationReport.load_json(tmp_path / "r.json")
    assert math.isnan(loaded.attacks["autoattack"].classwise_acc[3])
    assert "| empty | 0 | - | - |" in report.to_markdown()


def test_report_json_round_trip_and_markdown(tmp_path):
    divergence = Divergence.from_accuracies("autoattack", [0.3, 0.1, 0.6], [0.25, 0.0, 0.5], train_size=30)
    assert divergence.kendall_tau == pytest.approx(1.0)
    report = make_report(divergence=divergence)
    report.write_json(tmp_path / "report.json")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert EvaluationReport.load_json(tmp_path / "report.json") == report
    md = report.to_markdown()
    norm_pgd, norm_aa = (
        report.attacks["pgd20"].confusion_spectral_norm,
        report.attacks["autoattack"].confusion_spectral_norm,
    )
    assert "| clean | 91.67 | 75.00 (a) | 25.00 | - | 90.00 |" in md
    assert f"| pgd20 | 58.33 | 50.00 (a) | 25.00 | {norm_pgd:.4f} | 60.00 |" in md
    assert f"| autoattack | 25.00 | 0.00 (b) | 50.00 | {norm_aa:.4f} | 30.00 |" in md
    assert "| class | n | clean | pgd20 | autoattack |" in md
    assert "| b | 2 | 100.00 | 50.00 | 0.00 |" in md
    assert "Kendall's tau-b rank correlation = 1.0000" in md and "| a | 30.00 | 25.00 | 5.00 |" in md
    assert "- `checkpoint`: best.ckpt" in md and "- `seeds`: [0, 1]" in md
    sections = [md.index(s) for s in ("## Summary", "## Per-class", "## Train/test divergence", "## Settings")]
    assert sections == sorted(sections)


def test_report_write_files(tmp_path):
    written = make_report().write(tmp_path / "eval")
    for key, name in [
        ("json", "evaluation.json"),
        ("markdown", "evaluation.md"),
        ("classwise_accuracy", "classwise_accuracy.png"),
        ("robust_confusion", "robust_confusion.png"),
    ]:
        assert written[key] == tmp_path / "eval" / name
        assert written[key].stat().st_size > 0
    assert written["classwise_accuracy"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = written["markdown"].read_text()
    assert "](classwise_accuracy.png)" in md and "](robust_confusion.png)" in md
    assert EvaluationReport.load_json(written["json"]) == make_report()


def test_report_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"predictions\['pgd20'\] must have shape \(10,\)"):
        make_report(predictions={"pgd20": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(
        ValueError, match=r"predictions\['pgd20'\] holds the class index 3, outside \[0, num_classes=3\)"
    ):
        make_report(predictions={"pgd20": torch.full((10,), 3)})
    with pytest.raises(ValueError, match=r"predictions=\{\}"):
        EvaluationReport.from_predictions("x", CLASSES, TARGET, {}, {})
    with pytest.raises(ValueError, match=r"one per class \(3\)"):
        make_report(divergence=Divergence.from_accuracies("aa", [0.1, 0.2], [0.1, 0.2]))


def test_divergence_from_predictions():
    d = Divergence.from_predictions("pgd20", 3, TARGET, PREDICTIONS["pgd20"], TARGET, PREDICTIONS["autoattack"])
    assert d.train_acc == pytest.approx([0.5, 0.5, 0.75]) and d.test_acc == pytest.approx([0.25, 0.0, 0.5])
    assert d.train_size == 10
    assert d.kendall_tau == pytest.approx(kendalltau(d.train_acc, d.test_acc).statistic)


# ---------------------------------------------------------------- compare


def test_compare_reports_and_command(tmp_path, capsys):
    make_report("TRADES").write_json(tmp_path / "a.json")
    partial = {k: v for k, v in PREDICTIONS.items() if k != "pgd20"}
    make_report("CSR", predictions=partial).write_json(tmp_path / "b.json")
    table = compare_reports([tmp_path / "a.json", str(tmp_path / "b.json")])
    lines = table.strip().splitlines()
    assert len(lines) == 4
    assert lines[0] == (
        "| method | clean avg % | clean worst % | pgd20 avg % | pgd20 worst % | autoattack avg % | autoattack worst % "
        "| \\|\\|C\\|\\|_2 (autoattack) |"
    )
    norm = make_report().attacks["autoattack"].confusion_spectral_norm
    assert lines[2] == f"| TRADES | 91.67 | 75.00 | 58.33 | 50.00 | 25.00 | 0.00 | {norm:.4f} |"
    assert lines[3] == f"| CSR | 91.67 | 75.00 | - | - | 25.00 | 0.00 | {norm:.4f} |"
    renamed = compare_reports([tmp_path / "a.json", tmp_path / "b.json"], names=["base", "ours"])
    assert "| base |" in renamed and "| ours |" in renamed
    with pytest.raises(ValueError, match=r"2 names for 1 reports"):
        compare_reports([tmp_path / "a.json"], names=["x", "y"])

    out = tmp_path / "tables" / "table.md"
    compare_main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--names", "base", "ours", "--output", str(out)])
    printed = capsys.readouterr().out
    assert out.read_text() == printed and "| ours |" in printed
    with pytest.raises(SystemExit):
        compare_main([str(tmp_path / "a.json"), "--names", "x", "y"])
    assert "2 names for 1 reports" in capsys.readouterr().err


def test_format_mean_std_over_runs():
    from confspec_lightning.evaluation import format_mean_std

    assert format_mean_std([0.5], scale=100) == "50.00"
    # mean 0.25 -> 25.00 %; sample std of (10, 40) points = sqrt(450) = 21.21
    assert format_mean_std([0.1, 0.4], scale=100) == "25.00 ± 21.21"
    # norms: 3 digits, std of (0.4, 0.5) = 0.0707
    assert format_mean_std([0.4, 0.5], digits=3) == "0.450 ± 0.071"
    # signed differences; a mean that rounds to zero is written +0.00, not -0.00
    assert format_mean_std([-2.0, 4.0], signed=True) == "+1.00 ± 4.24"
    assert format_mean_std([-0.001], signed=True) == "+0.00"
