"""confspec_lightning.evaluation.bound: conv operator norms, spectral complexity and the bound's terms by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from confspec_lightning.evaluation import bound as BT
from confspec_lightning.models.normalize import Normalize

KERNEL = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).reshape(1, 1, 2, 2)
#: The 2x2 kernel [[1, 2], [3, 4]] on a 1-channel 3x3 input (row-major x00 .. x22), stride 1, no padding: output
#: y_pq = x_pq + 2 x_p(q+1) + 3 x_(p+1)q + 4 x_(p+1)(q+1), one row per output position, written out by hand.
HAND = torch.tensor(
    [
        [1, 2, 0, 3, 4, 0, 0, 0, 0],
        [0, 1, 2, 0, 3, 4, 0, 0, 0],
        [0, 0, 0, 1, 2, 0, 3, 4, 0],
        [0, 0, 0, 0, 1, 2, 0, 3, 4],
    ],
    dtype=torch.float64,
)


def conv_of(geometry: BT.ConvGeometry):
    return lambda x: torch.nn.functional.conv2d(x, KERNEL, None, geometry.stride, geometry.padding)


def test_conv_operator_matches_the_hand_written_matrix():
    geometry = BT.ConvGeometry()
    assert torch.equal(BT.dense_operator(conv_of(geometry), (1, 3, 3)), HAND)
    norms = BT.conv2d_operator_norms(KERNEL, (1, 3, 3), geometry)
    assert norms["spectral"] == pytest.approx(float(torch.linalg.matrix_norm(HAND, ord=2)), rel=1e-9)
    assert norms["frobenius"] == pytest.approx(math.sqrt(4 * 30))  # every tap meets the input 4 times
    assert norms["l21"] == pytest.approx(4 * math.sqrt(30))  # 4 rows of norm sqrt(1 + 4 + 9 + 16)
    assert norms["converged"]


@pytest.mark.parametrize(
    ("stride", "padding", "frobenius_squared"),
    [
        (1, 1, 9 * 30),  # 4x4 output; each tap meets the 3x3 input at 3 x 3 of the 16 positions (not 16 * 30)
        (2, 1, 1 * 1 + 4 * 2 + 9 * 2 + 16 * 4),  # 2x2 output; taps (0,0) once, (0,1) and (1,0) twice, (1,1) 4 times
    ],
)
def test_conv_operator_with_padding_and_stride(stride, padding, frobenius_squared):
    geometry = BT.ConvGeometry(stride=(stride, stride), padding=(padding, padding))
    dense = BT.dense_operator(conv_of(geometry), (1, 3, 3))
    norms = BT.conv2d_operator_norms(KERNEL, (1, 3, 3), geometry)
    assert norms["frobenius"] ** 2 == pytest.approx(frobenius_squared)
    assert float(dense.norm()) ** 2 == pytest.approx(frobenius_squared)
    assert norms["spectral"] == pytest.approx(float(torch.linalg.matrix_norm(dense, ord=2)), rel=1e-9)
    assert norms["l21"] == pytest.approx(float(dense.norm(dim=1).sum()))


def test_conv_operator_norms_against_the_dense_matrix_of_a_general_conv():
    """Several channels, groups, dilation, stride 2 on an odd input (the adjoint's output padding)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False).double()
    dense = BT.dense_operator(conv, (4, 9, 7))
    norms = BT.conv2d_operator_norms(conv.weight, (4, 9, 7), BT.ConvGeometry.of(conv))
    assert norms["spectral"] == pytest.approx(float(torch.linalg.matrix_norm(dense, ord=2)), rel=1e-8)
    assert norms["frobenius"] == pytest.approx(float(dense.norm()), rel=1e-12)
    assert norms["l21"] == pytest.approx(float(dense.norm(dim=1).sum()), rel=1e-12)
    with pytest.raises(ValueError, match="input channels"):
        BT.conv2d_operator_norms(conv.weight, (3, 9, 7), BT.ConvGeometry.of(conv))
    with pytest.raises(ValueError, match="padding_mode"):
        BT.ConvGeometry.of(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"))


def test_spectral_complexity_of_a_two_layer_network_by_hand():
    """W1 = diag(3, 4): ||W1||_2 = 4, ||W1||_F^2 = 25, row norms 3 + 4; W2 = [1, 1]: sqrt(2), 2, sqrt(2).
    Neyshabur: (16 * 2) * (25/16 + 2/2) = 82. Bartlett: 4 sqrt(2) * ((7/4)^(2/3) + 1)^(3/2)."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
    layers = BT.layer_operators(net, torch.zeros(1, 2))
    assert [(layer.name, layer.kind, layer.input_shape) for layer in layers] == [
        ("0", "linear", (2,)),
        ("2", "linear", (2,)),
    ]
    norms = [layer.norms() for layer in layers]
    result = BT.spectral_complexity(*([n[key] for n in norms] for key in ("spectral", "frobenius", "l21")))
    assert 10 ** result["log10_neyshabur"] == pytest.approx(82.0)
    assert result["ratio_sum"] == pytest.approx(41 / 16)
    assert 10 ** result["log10_bartlett"] == pytest.approx(4 * math.sqrt(2) * ((7 / 4) ** (2 / 3) + 1) ** 1.5)
    assert max(layer.width for layer in layers) == 2


def test_normalisation_and_batchnorm_are_folded_as_diagonal_scalings():
    """normalize (std 0.5) -> conv [[1, 2], [3, 4]] -> bn (scale 2 / sqrt(3 + eps)) -> relu -> flatten -> linear;
    the folded conv is the kernel times 2 (1 / std) times the BN scale, the linear layer untouched."""
    conv = nn.Conv2d(1, 1, 2, bias=False)
    bn = nn.BatchNorm2d(1)
    with torch.no_grad():
        conv.weight.copy_(KERNEL.float())
        bn.running_var.fill_(3.0)
        bn.weight.fill_(2.0)
    net = nn.Sequential(Normalize([0.5], [0.5]), conv, bn, nn.ReLU(), nn.Flatten(), nn.Linear(4, 1)).train()
    layers = BT.layer_operators(net, torch.zeros(1, 1, 3, 3))
    assert net.training  # restored
    assert [layer.name for layer in layers] == ["1", "5"]
    assert layers[0].folded == ["0", "2"] and layers[0].input_shape == (1, 3, 3)
    expected = KERNEL * 2 * 2 / math.sqrt(3 + bn.eps)
    assert torch.allclose(layers[0].weight, expected)
    assert torch.allclose(layers[1].weight, net[5].weight.double())


def test_bound_terms_on_a_hand_case():
    """C = [[0, 0.5], [0.25, 0]]: ||C||_2 = 0.5, ||C||_1 = 0.5 (column 1), nu_train = 1; counts (4, 8): m_min 4.
    B = 1, d = h = 2, SC = 1, gamma = 0.5, delta = 0.05: complexity = sqrt((1 * 4 * 2 ln 4 * 1 + ln(2 * 4 / 0.05))
    / (0.25 * 4))."""
    rates = torch.tensor([[0.0, 0.5], [0.25, 0.0]])
    terms = BT.bound_terms(rates, torch.tensor([4, 8]), 0.0, depth=2, width=2, input_radius=1.0, gamma=0.5, delta=0.05)
    complexity = math.sqrt(8 * math.log(4) + math.log(160))
    assert terms["spectral_norm"] == pytest.approx(0.5)
    assert terms["l1_norm"] == pytest.approx(0.5)
    assert terms["nu_train"] == pytest.approx(1.0)
    assert terms["nu_sqrt_k"] == pytest.approx(math.sqrt(2))
    assert (terms["m_min"], terms["m"]) == (4.0, 12.0)
    assert terms["complexity"] == pytest.approx(complexity)
    assert terms["bound"] == pytest.approx(math.sqrt(2) * 0.5 + complexity)
    assert terms["bound_nu_train"] == pytest.approx(0.5 + complexity)
    huge = BT.bound_terms(rates, torch.tensor([4, 8]), 700.0, depth=2, width=2, input_radius=1.0, gamma=0.5)
    assert huge["complexity"] == math.inf and huge["log10_complexity_term"] > 300  # no overflow error
    with pytest.raises(ValueError, match="gamma"):
        BT.bound_terms(rates, torch.tensor([4, 8]), 0.0, depth=2, width=2, input_radius=1.0, gamma=0.0)


def test_input_radius():
    """Two 2-pixel images, norms 1 and 0.5; l_inf eps 0.1: 1 + 0.1 sqrt(2), capped at sqrt(2)."""
    x = torch.tensor([[[[1.0, 0.0]]], [[[0.5, 0.0]]]])
    assert BT.input_radius(x, 0.1, "linf") == pytest.approx(1 + 0.1 * math.sqrt(2))
    assert BT.input_radius(x, 0.1, "l2") == pytest.approx(1.1)
    assert BT.input_radius(x, 1.0, "linf") == pytest.approx(math.sqrt(2))
