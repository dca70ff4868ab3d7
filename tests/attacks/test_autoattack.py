"""AutoAttack through pyautoattack: no more accurate than clean, its log, its options."""

from __future__ import annotations

import pytest
import torch

from confspec_lightning.attacks import autoattack_predictions


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
        ({"n_iter": 0}, r"autoattack\.n_iter=0.*integer >= 1"),
    ],
)
def test_autoattack_rejects_bad_options(tiny_model, digits_batch, kwargs, match):
    x, y = digits_batch
    options = {"norm": "linf", "eps": 8 / 255, **kwargs}
    with pytest.raises(ValueError, match=match):
        autoattack_predictions(tiny_model, x, y, **options)


def test_autoattack_n_iter_sets_the_apgd_iterations_and_is_named_in_reports(trained_model, digits_batch):
    from confspec_lightning.attacks import AutoAttack

    x, y = digits_batch[0][:8], digits_batch[1][:8]
    forwards = []
    hook = trained_model.register_forward_hook(lambda module, args, out: forwards.append(len(args[0])))
    try:
        counts = {}
        for n_iter in (2, 6):
            forwards.clear()
            autoattack_predictions(
                trained_model, x, y, norm="linf", eps=0.1, version="custom", attacks=["apgd-ce"], n_iter=n_iter
            )
            counts[n_iter] = len(forwards)
    finally:
        hook.remove()
    # APGD runs one forward per iteration on the points not yet broken: points of this batch survive the
    # first iterations, so 6 iterations take more forwards than 2
    assert counts[6] > counts[2], counts
    assert AutoAttack("custom", ["apgd-ce"], n_iter=5).describe() == "custom ['apgd-ce'] n_iter=5"
    assert AutoAttack().describe() == "standard"
    with pytest.raises(ValueError, match=r"autoattack\.n_iter=-1"):
        AutoAttack(n_iter=-1)
