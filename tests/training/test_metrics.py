"""The research's metrics on matrices whose answer is known."""

import math

import pytest
import torch
import torch.nn.functional as F

from newllm.training.metrics import convergence_rate, effective_rank, perplexity, singular_values


def with_singular_values(s: list[float], rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(dim, len(s), generator=g, dtype=torch.float64))
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("k", [1, 5, 32])
def test_k_equal_singular_values_give_er_k(k, method):
    m = with_singular_values([3.0] * k, rows=200, dim=64).float()
    assert effective_rank(m, method=method) == pytest.approx(k, rel=1e-4)


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_rank_one_uncentred_matrix_has_er_one(method):
    """Identical rows: centring would leave nothing; the research's uncentred ER says 1."""
    row = torch.randn(1, 96)
    assert effective_rank(row.expand(500, 96).contiguous(), method=method) == pytest.approx(1.0, abs=1e-3)


def test_er_normalises_singular_values_not_their_squares():
    m = with_singular_values([3.0, 1.0], rows=50, dim=10)
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert effective_rank(m) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)  # 1.7548
    assert effective_rank(m) != pytest.approx(1.384, rel=1e-2)  # what p = s^2 / sum s^2 would give


def test_gram_and_svd_agree_on_realistic_matrices():
    torch.manual_seed(0)
    for rows in (300, 1500):
        m = F.layer_norm(torch.randn(rows, 128) @ torch.randn(128, 128) * 0.1 + torch.randn(128), (128,))
        ref = singular_values(m, "svd")
        # the Gram route resolves singular values to ~sqrt(eps64) = 1e-8 of the largest (a LayerNormed
        # matrix has one ~0: LN removes the mean direction)
        torch.testing.assert_close(singular_values(m), ref, rtol=1e-6, atol=1e-7 * ref.max().item())
        assert effective_rank(m) == pytest.approx(effective_rank(m, method="svd"), rel=1e-6)


def test_row_subsampling_is_seeded():
    torch.manual_seed(0)
    m = torch.randn(400, 32) @ torch.randn(32, 32)
    a = effective_rank(m, max_rows=50, generator=torch.Generator().manual_seed(3))
    b = effective_rank(m, max_rows=50, generator=torch.Generator().manual_seed(3))
    c = effective_rank(m, max_rows=50, generator=torch.Generator().manual_seed(4))
    assert a == b and a != c
    assert effective_rank(m, max_rows=400) == effective_rank(m)  # no subsampling at or under the cap


def test_convergence_rate_counts_tokens_under_threshold():
    prev = torch.zeros(4, 3)
    # per-token mean squared change: 0.05, 0.2, 0.0, 0.09 (threshold 0.1 -> 3 of 4 converged)
    curr = torch.tensor([[0.05 ** 0.5] * 3, [0.2 ** 0.5] * 3, [0.0] * 3, [0.3, 0.3, 0.3]])
    assert convergence_rate(curr, prev, 0.1) == pytest.approx(0.75)
    assert convergence_rate(curr, prev, 0.01) == pytest.approx(0.25)
    assert convergence_rate(curr.reshape(2, 2, 3), prev.reshape(2, 2, 3), 0.1) == pytest.approx(0.75)


def test_perplexity_is_exp_of_mean_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(20, 7), torch.randint(0, 7, (20,))
    ce = F.cross_entropy(logits, y).item()
    assert perplexity(ce) == pytest.approx(math.exp(ce))
    assert perplexity(math.log(7)) == pytest.approx(7.0)
    assert math.isfinite(perplexity(1e6))
