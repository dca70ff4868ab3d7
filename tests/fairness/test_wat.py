"""WAT: exponential class weights from cumulative validation losses."""

from __future__ import annotations

import pytest
import torch

from confspec_lightning.fairness import WAT
from confspec_lightning.fairness.wat import wat_loss_vector, wat_weights
from confspec_lightning.objectives import combine_terms

from helpers import trades_output


# --------------------------------------------------------------------- WAT
def test_wat_weights_and_loss_hand_computed():
    cumulative = torch.tensor([1.0, 2.0, 4.0, 2.0], dtype=torch.float64)
    w = wat_weights(cumulative, eta=0.1)
    e = torch.exp(0.1 * cumulative)
    torch.testing.assert_close(w, 3 * e / e.sum())
    vec = wat_loss_vector(torch.tensor([2.0, 0.0, 6.0], dtype=torch.float64), torch.tensor([2.0, 0.0, 3.0]))
    torch.testing.assert_close(vec, torch.tensor([1.0, 0.0, 2.0, 8 / 5], dtype=torch.float64))
    wat = WAT(eta=0.1)
    wat.bind(3)
    wat.cumulative_loss.copy_(cumulative)
    output, target = trades_output()
    loss, _ = combine_terms(output, [wat.loss_adjustment(output, target)])
    per_sample = output.terms["ce"] + 6.0 * output.terms["kl"]
    wf = w.float()
    expected = (wf[target] * per_sample).mean() + wf[3] * per_sample.mean()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match=r"wat\.eta=-1"):
        WAT(eta=-1)
