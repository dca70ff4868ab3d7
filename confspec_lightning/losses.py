"""Per-sample losses, written once: the attacks' objectives and the training objectives both use them (float32).

* :func:`cross_entropy` CE(z, y);
* :func:`kl_divergence` KL(softmax(p) || softmax(q)) (TRADES's boundary term and its attack);
* :func:`margin` the Carlini-Wagner margin max_{j != y} z_j - z_y (the CW attack);
* :func:`mart_boosted_ce` MART's boosted CE, CE(z, y) - log(1.0001 - max_{j != y} p_j).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross entropy in float32."""
    return F.cross_entropy(logits.float(), target, reduction="none")


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Per-sample KL(softmax(p_logits) || softmax(q_logits)) in float32; gradients flow through both."""
    log_p = p_logits.float().log_softmax(dim=1)
    log_q = q_logits.float().log_softmax(dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)


def margin(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample max_{j != y} z_j - z_y (> 0: misclassified), float32 (Carlini & Wagner, 2017)."""
    z = logits.float()
    is_true = F.one_hot(target, z.shape[1]).bool()
    true_logit = z.gather(1, target.long().unsqueeze(1)).squeeze(1)
    return z.masked_fill(is_true, -torch.inf).amax(dim=1) - true_logit


def mart_boosted_ce(logits: Tensor, target: Tensor) -> Tensor:
    """MART's boosted CE (Wang et al., ICLR 2020): CE(z, y) - log(1.0001 - max_{j != y} p_j(z)), float32.

    The second term pushes down the largest wrong-class probability; 1.0001 keeps the log finite (the reference
    code's constant).
    """
    probabilities = logits.float().softmax(dim=1)
    is_true = F.one_hot(target, probabilities.shape[1]).bool()
    top_wrong = probabilities.masked_fill(is_true, 0.0).amax(dim=1)
    return cross_entropy(logits, target) - torch.log(1.0001 - top_wrong)
