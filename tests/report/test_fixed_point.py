"""Fixed-point analysis (docs/research.md §4): iteration counts on known contractions, distances on known vectors, and
the analysis of a (tiny, untrained) NewLLM ContextBlock."""

import math

import pytest
import torch

from newllm.models.cvfp import NewLLM
from newllm.report.fixed_point import (
    RESEARCH,
    cosine,
    first_below,
    fixed_point_analysis,
    fixed_point_rows,
    iterate_to_fixed_point,
    l2,
)


def test_cosine_and_l2_on_known_vectors():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [6.0, 8.0], [-2.0, 0.0]])
    assert cosine(a, b).tolist() == pytest.approx([0.0, 1.0, -1.0])
    assert l2(a, b).tolist() == pytest.approx([math.sqrt(2), 5.0, 3.0])


def test_contraction_converges_in_the_expected_number_of_steps():
    """c <- a c + b from 0: the change at step n is a^(n-1) b, so mean change^2 = a^(2(n-1)) mean(b^2)."""
    a = torch.tensor([[0.5], [0.5], [0.1], [-1.0]])  # the last row oscillates between b and 0 forever
    b = torch.tensor([[1.0, 1.0], [4.0, 4.0], [1.0, 1.0], [1.0, 1.0]])
    c, steps, changes = iterate_to_fixed_point(lambda c: a * c + b, torch.zeros(4, 2), 1e-3, max_steps=30)
    # 0.25^(n-1) < 1e-3 -> n = 6;  16 * 0.25^(n-1) < 1e-3 -> n = 8;  0.01^(n-1) < 1e-3 -> n = 3
    assert steps.tolist() == [6, 8, 3, -1]
    assert changes.shape == (30, 4)  # the oscillating row kept the iteration going to max_steps
    assert torch.allclose(c[:3], b[:3] / (1 - a[:3]), atol=1e-6)  # the fixed point b / (1 - a)


def test_iteration_stops_once_every_row_converged():
    _, steps, changes = iterate_to_fixed_point(lambda c: 0.5 * c + 1, torch.zeros(2, 3), 1e-3, max_steps=50)
    assert steps.tolist() == [6, 6] and changes.size(0) == 6


def test_first_below_reads_any_threshold_off_the_changes():
    changes = torch.tensor([[1.0, 1.0, 1.0], [0.05, 0.5, 1.0], [0.001, 0.05, 1.0]])
    assert first_below(changes, 0.1).tolist() == [2, 3, -1]
    assert first_below(changes, 2.0).tolist() == [1, 1, 1]


def tiny_newllm(layers: int) -> NewLLM:
    torch.manual_seed(0)
    return NewLLM(20, context_dim=16, embed_dim=8, context_layers=layers, token_layers=layers)


def test_analysis_of_a_newllm_context_block():
    res = fixed_point_analysis(tiny_newllm(2), threshold=1e-4, max_steps=200)
    assert res["tokens"] == 20 and res["context_layers"] == 2
    conv = res["convergence"]
    by = conv["by_threshold"]
    assert list(by) == [1e-4, 1e-3, 1e-2, 1e-1]
    pct = [v["converged_pct"] for v in by.values()]
    assert pct == sorted(pct) and conv["converged_pct"] == pct[0] > 0  # looser threshold: more converged
    medians = [v["steps_median"] for v in by.values()]
    assert medians == sorted(medians, reverse=True)
    assert res["tokens_compared"] == round(pct[0] * 20 / 100) and res["converged_only"]
    for key in ("single_vs_iterated", "first_vs_all"):
        assert -1 <= res[key]["cosine"] <= 1 and res[key]["l2"] >= 0
        assert res[key]["research"] == RESEARCH[key]
    # the context is LayerNormed (gain 1 at init): its norm is sqrt(context_dim)
    assert res["first_vs_all"]["norm"] == pytest.approx(4.0, rel=1e-3)
    rows = fixed_point_rows(res)
    assert len(rows) == 4 + 2 + 2 and all({"quantity", "ours", "research"} <= set(r) for r in rows)


def test_single_layer_block_has_no_first_vs_all_comparison():
    res = fixed_point_analysis(tiny_newllm(1), threshold=1e-3, max_steps=100, token_ids=[0, 3, 5])
    assert res["tokens"] == 3 and "note" in res["first_vs_all"]
    assert len(fixed_point_rows(res)) == 3 + 2  # thresholds {1e-3, 1e-2, 1e-1}, then single vs iterated
