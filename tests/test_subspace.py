"""The per-step direction without an SVD: subspace iteration against the full SVD, ties, warm starts, G's entries."""

from __future__ import annotations

import pytest
import torch

from confspec_lightning import functional as CF


def matrix_with_spectrum(singular: list[float], k: int, seed: int = 0) -> torch.Tensor:
    """A non-negative (K, K) matrix whose top singular values are close to ``singular`` (the rest small).

    Non-negative rank-one blocks on disjoint rows and columns: block i is s_i a_i b_i^T with unit a_i, b_i >= 0,
    so its singular values are exactly ``singular``; a little non-negative noise fills the rest.
    """
    gen = torch.Generator().manual_seed(seed)
    m = 0.001 * torch.rand(k, k, dtype=torch.float64, generator=gen)
    rows = torch.randperm(k, generator=gen).chunk(len(singular))
    cols = torch.randperm(k, generator=gen).chunk(len(singular))
    for s, r, c in zip(singular, rows, cols, strict=True):
        a = torch.rand(len(r), dtype=torch.float64, generator=gen) + 0.1
        b = torch.rand(len(c), dtype=torch.float64, generator=gen) + 0.1
        m[r[:, None], c[None, :]] += s * torch.outer(a / a.norm(), b / b.norm())
    return m


def svd_pair(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m)
    return u[:, 0].abs(), vh[0].abs(), s


@pytest.mark.parametrize("k", [2, 3, 10, 100, 1000])
@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_well_separated_pair_equals_the_svd_from_a_cold_start(k, ratio):
    """sigma_2 / sigma_1 <= 0.5: the default 8 iterations from the uniform start give the SVD's pair."""
    m = matrix_with_spectrum([3.0, 3.0 * ratio], k) if k > 2 else torch.tensor([[3.0, 0.0], [0.5, 3.0 * ratio]])
    u, v, sigma, basis = CF.top_singular_subspace(m.double(), CF.initial_subspace(k))
    u_ref, v_ref, s_ref = svd_pair(m.double())
    assert float(u @ u_ref) >= 1 - 1e-6 and float(v @ v_ref) >= 1 - 1e-6
    assert float(sigma[0]) == pytest.approx(float(s_ref[0]), rel=1e-9)
    assert float(sigma[1]) == pytest.approx(float(s_ref[1]), rel=1e-6)
    assert (u >= 0).all() and (v >= 0).all() and basis.shape == (k, 2)
    torch.testing.assert_close(basis.t() @ basis, torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("gap", [0.0, 1e-3])
def test_a_tie_of_the_top_two_is_resolved_by_the_rayleigh_ritz_step(gap):
    """sigma_1 = sigma_2 (or 0.1 % apart) with sigma_3 far below: the Ritz value is sigma_1 and u^T M v = sigma_1,
    at the rate (sigma_3 / sigma_1)^2 of the 2-column subspace, not the (sigma_2 / sigma_1)^2 of power iteration."""
    m = matrix_with_spectrum([2.0 + gap, 2.0, 0.5], 30, seed=1)
    u, v, sigma, _ = CF.top_singular_subspace(m, CF.initial_subspace(30))
    s_ref = torch.linalg.svdvals(m)
    assert float(sigma[0]) == pytest.approx(float(s_ref[0]), rel=1e-9)
    assert float(u @ m @ v) == pytest.approx(float(s_ref[0]), rel=1e-9)
    if gap > 0:  # separated by 0.1 %: the very vectors of the SVD
        u_ref, v_ref, _ = svd_pair(m)
        assert float(v @ v_ref) >= 1 - 1e-6 and float(u @ u_ref) >= 1 - 1e-6


def test_a_near_tie_of_three_gives_a_vector_of_the_near_tied_subspace():
    """Three top values within 1 %: the vector need not be the SVD's, but u^T M v lies in the near-tied band
    [sigma_3, sigma_1] (the penalty the paper form adds, and its gradient G = u v^T, are those of a nearly
    maximal singular pair)."""
    m = matrix_with_spectrum([2.0, 1.99, 1.98, 0.1], 40, seed=2)
    u, v, sigma, _ = CF.top_singular_subspace(m, CF.initial_subspace(40))
    s_ref = torch.linalg.svdvals(m)
    assert float(s_ref[2]) <= float(u @ m @ v) <= float(s_ref[0])
    assert float(s_ref[2]) <= float(sigma[0]) <= float(s_ref[0]) * (1 + 1e-12)  # a Ritz value never exceeds sigma_1


def test_warm_start_tracks_a_slowly_changing_matrix_with_one_iteration_per_step():
    """An EMA of batch matrices changes a little per step: the previous step's basis makes one iteration enough."""
    gen = torch.Generator().manual_seed(3)
    base = matrix_with_spectrum([3.0, 1.0, 0.5], 50, seed=3)
    matrix, basis = base.clone(), CF.initial_subspace(50)
    for _ in range(60):
        matrix = 0.9 * matrix + 0.1 * (base + 0.05 * torch.rand(50, 50, dtype=torch.float64, generator=gen))
        u, v, _, basis = CF.top_singular_subspace(matrix, basis, iterations=1)
    u_ref, v_ref, _ = svd_pair(matrix)
    assert float(v @ v_ref) >= 1 - 1e-9 and float(u @ u_ref) >= 1 - 1e-9


def test_column_scale_is_the_scaled_matrix_and_a_zero_matrix_gives_nothing():
    m = matrix_with_spectrum([2.0, 0.5], 12, seed=4)
    scale = torch.rand(12, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.5
    scaled = CF.top_singular_subspace(m, CF.initial_subspace(12), column_scale=scale)
    explicit = CF.top_singular_subspace(m * scale, CF.initial_subspace(12))
    for a, b in zip(scaled, explicit, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    u, v, sigma, basis = CF.top_singular_subspace(torch.zeros(5, 5), CF.initial_subspace(5))
    assert u.abs().sum() == 0 and v.abs().sum() == 0 and sigma.abs().sum() == 0
    assert torch.isfinite(basis).all()


def test_bad_iteration_count_is_named():
    with pytest.raises(ValueError, match="iterations=0"):
        CF.top_singular_subspace(torch.eye(3), CF.initial_subspace(3), iterations=0)


@pytest.mark.parametrize(("rescale", "guard"), [(True, True), (False, True), (False, False)])
def test_factored_direction_equals_the_materialised_one(rescale, guard):
    torch.manual_seed(5)
    u, v = torch.rand(7, dtype=torch.float64), torch.rand(7, dtype=torch.float64)
    factored = CF.SpectralDirection(u, v, rescale=rescale, guard=guard)
    expected = CF.direction_from_singular_vectors(u, v, rescale) if guard else torch.outer(u, v)
    assert torch.equal(factored.matrix(), expected)  # the same float operations: bit for bit
    a, b = factored.affine()
    torch.testing.assert_close(a * torch.outer(u, v) + b, expected, rtol=1e-12, atol=1e-12)
    rows, cols = torch.tensor([0, 3, 6]), torch.tensor([2, 2, 5])
    assert torch.equal(factored.entries(rows, cols), expected[rows, cols])
    # degenerate (no errors): the code form's G is all ones
    zero = CF.SpectralDirection(torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64), rescale, True)
    assert torch.equal(zero.matrix(), torch.ones(7, 7, dtype=torch.float64))


@pytest.mark.parametrize("rescale", [False, True])
def test_factored_penalty_and_weights_equal_the_materialised_ones(rescale):
    torch.manual_seed(6)
    logits = torch.randn(20, 5, requires_grad=True)
    target = torch.randint(0, 5, (20,))
    contributions = CF.surrogate_contributions(logits, target, "soft")
    counts = CF.counts_per_class(target, 5)
    u, v = torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    factored = CF.SpectralDirection(u, v, rescale=rescale, guard=True)
    matrix = factored.matrix()
    p_factored = CF.spectral_penalty(factored, contributions, target, counts)
    p_matrix = CF.spectral_penalty(matrix, contributions, target, counts)
    assert float(p_factored) == pytest.approx(float(p_matrix), rel=1e-6)
    g_factored = torch.autograd.grad(p_factored, logits, retain_graph=True)[0]
    g_matrix = torch.autograd.grad(p_matrix, logits)[0]
    torch.testing.assert_close(g_factored, g_matrix, rtol=1e-5, atol=1e-7)
    w_factored = CF.csr_weights(factored, logits.detach(), target, include_diagonal=True)
    assert torch.equal(w_factored, CF.csr_weights(matrix, logits.detach(), target, include_diagonal=True))


@pytest.mark.parametrize("surrogate", ["kl", "counts", "soft"])
@pytest.mark.parametrize("normalize", [True, False])
def test_the_batch_operator_has_the_products_of_the_formed_matrix(surrogate, normalize):
    """The batch source never forms L: its products from the samples' contributions equal L's, and the top pair
    found through them is the formed matrix's."""
    torch.manual_seed(7)
    k, b = 12, 64
    logits, target = torch.randn(b, k), torch.randint(0, k, (b,))
    contributions = CF.surrogate_contributions(logits, target, surrogate).double()
    counts = CF.counts_per_class(target, k)
    formed = CF.surrogate_confusion(contributions, target, counts if normalize else None)
    compact = CF.charges(logits, target, surrogate)  # Charges for counts and kl, dense for soft
    assert isinstance(compact, CF.Charges) == (surrogate != "soft")
    for given in (contributions, compact):
        operator = CF.BatchSurrogateOperator(given, target, k, counts if normalize else None)
        block = torch.rand(k, 2, dtype=torch.float64)
        torch.testing.assert_close(operator.times(block), formed @ block)
        torch.testing.assert_close(operator.times_transposed(block), formed.t() @ block)
        from_operator = CF.top_singular_subspace(operator, CF.initial_subspace(k), iterations=30)
        from_matrix = CF.top_singular_subspace(formed, CF.initial_subspace(k), iterations=30)
        for a, c in zip(from_operator[:3], from_matrix[:3], strict=True):
            torch.testing.assert_close(a, c)


@pytest.mark.parametrize("surrogate", ["kl", "counts"])
def test_the_compact_charges_hold_the_dense_contributions(surrogate):
    """Charges (one cell per sample) give the dense form's matrix, penalty and gradient, bit for bit."""
    torch.manual_seed(8)
    k, b = 6, 40
    logits, target = torch.randn(b, k, requires_grad=True), torch.randint(0, k, (b,))
    dense = CF.surrogate_contributions(logits, target, surrogate, gamma=0.1)
    compact = CF.charges(logits, target, surrogate, gamma=0.1)
    expected = torch.zeros(k, k, dtype=torch.float64)
    CF.add_contributions_(expected, dense, target)
    got = torch.zeros(k, k, dtype=torch.float64)
    CF.add_contributions_(got, compact, target)
    assert torch.equal(got, expected)
    if surrogate == "kl":
        direction, counts = torch.rand(k, k), CF.counts_per_class(target, k)
        p_dense = CF.spectral_penalty(direction, dense, target, counts)
        p_compact = CF.spectral_penalty(direction, compact, target, counts)
        assert torch.equal(p_dense, p_compact)
        g_dense = torch.autograd.grad(p_dense, logits, retain_graph=True)[0]
        assert torch.equal(torch.autograd.grad(p_compact, logits)[0], g_dense)
