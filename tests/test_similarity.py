"""The similarity measures against hand-computed values, a direct HSIC, and CKA's invariances."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from layerfold.errors import LayerfoldError
from layerfold.similarity import (
    SIMILARITIES,
    angular_similarity,
    cka_linear,
    cka_rbf,
    cosine,
    hsic_unbiased,
    linear_kernel,
    rbf_kernel,
    similarity_matrix,
)

KINDS = ("cka-linear", "cka-rbf", "cosine", "angular")


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(_randn(d, d, seed=seed))
    return q * torch.sign(torch.diagonal(r))  # a Haar-random orthogonal matrix


def hsic_by_definition(k: torch.Tensor, l: torch.Tensor) -> float:
    """Song et al. (2012), the U-statistic their estimator (their eq. 5) rewrites:
    HSIC_1 = 1/(n)_4 sum over distinct (i, j, q, r) of k_ij l_ij + k_ij l_qr - 2 k_ij l_iq."""
    n = k.shape[0]
    k, l = k.tolist(), l.tolist()
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i][j] * l[i][j] + k[i][j] * l[q][r] - 2 * k[i][j] * l[i][q]
    return total / math.perm(n, 4)


# --- hand-computed values ---------------------------------------------------------------------

def test_cosine_by_hand() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([[1.0, 1.0], [0.0, 5.0], [-3.0, -4.0]])
    # per token: 1/sqrt(2), 1, -1
    assert cosine(x, y) == pytest.approx((1 / math.sqrt(2) + 1 - 1) / 3, abs=1e-12)


def test_cosine_averages_over_every_token_of_every_sample() -> None:
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])
    assert cosine(x, y) == pytest.approx(0.75, abs=1e-12)  # 1, 0, 1, 1


def test_angular_by_hand_on_token_matrices() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 3.0], [-2.0, 0.0]])  # 90 and 180 degrees: 1 - 1/2 and 1 - 1
    assert angular_similarity(x, y) == pytest.approx(0.25, abs=1e-12)


def test_angular_uses_each_samples_last_token() -> None:
    s60 = [math.cos(math.pi / 3), math.sin(math.pi / 3)]
    x = torch.tensor([[[5.0, -7.0], [1.0, 0.0]], [[0.0, 1.0], [2.0, 0.0]]], dtype=torch.float64)
    y = torch.tensor([[[-1.0, 9.0], s60], [[3.0, 3.0], [-1.0, 0.0]]], dtype=torch.float64)  # 60, 180 deg
    # last tokens: 60 degrees -> 1 - 1/3, 180 degrees -> 0; first tokens ignored
    assert angular_similarity(x, y) == pytest.approx((2 / 3 + 0) / 2, abs=1e-12)


def test_rbf_kernel_median_heuristic_by_hand() -> None:
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    # squared distances 1, 9, 4 (each twice); torch's median of an even count is the lower one: 4
    k = rbf_kernel(x)
    expected = torch.exp(-torch.tensor([[0.0, 1.0, 9.0], [1.0, 0.0, 4.0], [9.0, 4.0, 0.0]]) / 8.0)
    assert torch.allclose(k, expected.double(), atol=1e-12)


# --- unbiased HSIC ----------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", [linear_kernel, rbf_kernel], ids=["linear", "rbf"])
def test_hsic_unbiased_matches_song_et_al_definition(kernel) -> None:
    x = _randn(7, 3, seed=1)
    y = x[:, :2] ** 2 + 0.5 * _randn(7, 2, seed=2)
    k, l = kernel(x), kernel(y)
    assert float(hsic_unbiased(k, l)) == pytest.approx(hsic_by_definition(k, l), rel=1e-9, abs=1e-12)


def test_hsic_unbiased_ignores_the_kernel_diagonal() -> None:
    k, l = linear_kernel(_randn(8, 3, seed=3)), linear_kernel(_randn(8, 3, seed=4))
    shifted = k + torch.diag(_randn(8, seed=5).abs())
    assert float(hsic_unbiased(shifted, l)) == pytest.approx(float(hsic_unbiased(k, l)), abs=1e-12)


# --- CKA --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cka", [cka_linear, cka_rbf], ids=["linear", "rbf"])
def test_cka_is_one_under_orthogonal_transform(cka) -> None:
    x = _randn(60, 8, seed=6)
    assert cka(x, x @ _orthogonal(8, seed=7)) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("cka", [cka_linear, cka_rbf], ids=["linear", "rbf"])
def test_cka_is_invariant_to_isotropic_scaling(cka) -> None:
    x = _randn(60, 8, seed=8)
    y = torch.tanh(x[:, :5]) + 0.3 * _randn(60, 5, seed=9)
    base = cka(x, y)
    assert base < 0.99  # a real comparison, not the trivial 1
    assert cka(3.7 * x, y) == pytest.approx(base, abs=1e-9)
    assert cka(x, 0.02 * y) == pytest.approx(base, abs=1e-9)


def test_linear_cka_is_invariant_to_translation() -> None:
    x = _randn(60, 8, seed=10)
    y = x @ _randn(8, 4, seed=11) + 0.5 * _randn(60, 4, seed=12)
    assert cka_linear(x + 5.0, y - 2.0) == pytest.approx(cka_linear(x, y), abs=1e-9)


@pytest.mark.parametrize("cka", [cka_linear, cka_rbf], ids=["linear", "rbf"])
def test_cka_of_unrelated_data_is_near_zero_and_related_data_higher(cka) -> None:
    x = _randn(200, 10, seed=13)
    unrelated = cka(x, _randn(200, 10, seed=14))
    related = cka(x, x[:, :6] + 0.5 * _randn(200, 6, seed=15))
    assert -0.05 < unrelated < 0.1
    assert 0.3 < related < 1.0


def test_cka_accepts_samples_by_tokens_by_hidden() -> None:
    x = _randn(3, 10, 6, seed=16)
    y = torch.relu(x) + 0.1 * _randn(3, 10, 6, seed=17)
    assert cka_rbf(x, y) == pytest.approx(cka_rbf(x.reshape(30, 6), y.reshape(30, 6)), abs=1e-12)


# --- matrices ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_similarity_matrix_symmetric_with_unit_diagonal(kind: str) -> None:
    base = _randn(2, 6, 5, seed=18)
    outputs = [base + 0.3 * i * _randn(2, 6, 5, seed=19 + i) for i in range(4)]
    m = similarity_matrix(outputs, kind)
    assert m.shape == (4, 4) and m.dtype == torch.float64
    assert torch.equal(m, m.T)
    assert torch.equal(torch.diagonal(m), torch.ones(4, dtype=torch.float64))
    fn = SIMILARITIES.get(kind)
    assert m[0, 2].item() == pytest.approx(fn(outputs[0], outputs[2]), abs=1e-12)
    assert m[0, 3].item() < m[0, 1].item()  # noise grows with i: layer 1 is closest to layer 0


def test_unknown_similarity_suggests_a_name() -> None:
    with pytest.raises(LayerfoldError, match="Did you mean 'cka-rbf'"):
        similarity_matrix([_randn(4, 2), _randn(4, 2)], "cka-rfb")
