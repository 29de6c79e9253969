"""Phase 1's numbers pinned before its split into phase1.py, phase1_chunks.py and context_cache.py: a
refactor of the driver must keep them (on the machine that pinned them they stayed bit-identical; the
tolerance leaves room for another CPU's float kernels, far below what a changed update would move)."""

from dataclasses import replace

import pytest
import torch
from helpers import default_params

from newllm.models.cvfp import NewLLM
from newllm.training.phase1 import train_phase1

# total loss per iteration 1..3, train ER, val ER, cosine against the exact recurrence
PINNED = {
    "dense": ([-0.10292, -0.098519, -0.103792], 9.41363, 9.25698, 0.197271),
    "chunked": ([-0.10292, -0.09852, -0.103789], 9.40121, 9.25571, 0.196189),
    "sequential": ([-0.10292, 0.206487, 0.889323], 11.67656, 9.71213, 0.253766),
    "noise_prev": ([-0.09783, -0.101055, -0.101373], 11.06183, 9.72771, 0.436),
}
CASES = {"dense": {}, "chunked": {"chunk_tokens": 64}, "sequential": {"mode": "sequential"},
         "noise_prev": {"noise": 0.05, "target": "previous", "steps_per_iteration": 2}}


@pytest.fixture
def one_thread():
    """The pins were taken on one torch thread: a thread pool's other reduction order moves the trained
    block's ERs and cosine by up to ~4e-3 (measured in CI)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", PINNED)
def test_phase1_keeps_its_pinned_numbers(case, tmp_path, one_thread):
    cfg = replace(default_params().phase1, iterations=4, min_converged=2.0, dist_reg_weight=0.5, lr=0.01,
                  **CASES[case])
    g = torch.Generator()
    ids, val = torch.randint(0, 17, (300,), generator=g.manual_seed(1)), torch.randint(0, 17, (60,), generator=g.manual_seed(2))
    torch.manual_seed(0)
    res = train_phase1(NewLLM(17, 16, 12, 2, 2), ids, cfg, device="cpu", val_ids=val, seed=3, scratch=tmp_path)
    losses, train_er, val_er, cosine = PINNED[case]
    assert [h["total_loss"] for h in res.history[1:]] == pytest.approx(losses, rel=1e-4, abs=1e-5)
    # a looser bound on the trained block's ERs and cosine, for other CPUs' float kernels; a changed update
    # moves them by far more (a 2 % lr change: 4 % and 20 %)
    assert (res.train_er, res.val_er, res.sequential_cosine) == pytest.approx((train_er, val_er, cosine), rel=2e-3)
