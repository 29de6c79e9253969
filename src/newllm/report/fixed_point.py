"""Fixed points of a trained ContextBlock (docs/research.md §4), measured on our model beside the research's numbers.

Feeding one token w again and again iterates c <- CB(c, x_w) from c = 0. The research found that this
converges in 5-9 steps; that the fixed points of a 1-layer and a 2-layer model are nearly orthogonal; and
that one pass from zero already lands close to the fixed point ("one pass holds 97 %"). We measure:

(a) convergence: the first step n >= 1 at which mean_d (c_n - c_{n-1})^2 < threshold (the Phase 1
    convergence criterion, per token), for a sample of tokens; mean / median / range, and the share of
    tokens that converged within max_steps.
(b) first layer vs all layers: the fixed point of the first ContextLayer iterated alone (c <- layer_1(c, x))
    vs that of the whole block, for the same token: cosine (and its angle), L2, and L2 as % of the
    all-layers fixed point's norm. The research compared separately trained 1- and 2-layer models; we have
    one trained model, so its first layer stands in for the shallow model (same trained weights).
(c) single pass vs iterated: CB(0, x) vs the fixed point of the whole block: L2 and cosine.
Every figure is the mean over the sampled tokens (for (b), (c): those whose iteration converged).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from newllm.models.cvfp import NewLLM

# docs/research.md §4, the original research's figures (the research: GPT-2 embeddings, 768-d tokens, 1 vs 2 layers)
RESEARCH = {
    "steps": "5-9",
    "first_vs_all": {"cosine": 0.045, "angle_deg": 87.4, "l2": 22.15, "l2_pct_of_norm": 138.0},
    "single_vs_iterated": {"l2": 3.69, "cosine": 0.973},
}


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of (..., D) tensors."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def l2(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Euclidean distance of (..., D) tensors."""
    return (a - b).norm(dim=-1)


def iterate_to_fixed_point(step: Callable[[Tensor], Tensor], c0: Tensor, threshold: float, max_steps: int
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """Iterate c <- step(c) from c0 (N, D), all rows at once, until every row's mean squared change is
    below `threshold` or max_steps steps were taken.

    Returns (c after the last step (N, D), steps (N,) long, changes (n, N)): steps[i] is the first step n
    at which row i's change mean_d (c_n - c_{n-1})^2 fell below threshold, or -1 if it never did;
    changes[n - 1] is every row's change at step n (so other thresholds can be read off afterwards).
    Converged rows keep iterating while others have not (which only brings them closer to their fixed point).
    """
    c, changes = c0, []
    converged = torch.zeros(c0.size(0), dtype=torch.bool, device=c0.device)
    for _ in range(max_steps):
        nxt = step(c)
        changes.append((nxt - c).pow(2).mean(dim=-1))
        c = nxt
        converged |= changes[-1] < threshold
        if bool(converged.all()):
            break
    hist = torch.stack(changes)
    return c, first_below(hist, threshold), hist


def first_below(changes: Tensor, threshold: float) -> Tensor:
    """changes (n, N) -> (N,) the first step (1-based) whose change is below threshold, -1 if none is."""
    below = changes < threshold
    first = below.float().argmax(dim=0) + 1  # argmax finds the first True (or 0 when all are False)
    return torch.where(below.any(dim=0), first, torch.full_like(first, -1))


def sample_tokens(vocab_size: int, max_tokens: int = 256, seed: int = 0) -> list[int]:
    """Every id when the vocabulary is small, else a seeded random sample of max_tokens ids."""
    if vocab_size <= max_tokens:
        return list(range(vocab_size))
    return torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[:max_tokens].tolist()


def _compare(a: Tensor, b: Tensor) -> dict[str, float]:
    """Mean row-wise cosine (and the angle of that mean), L2, and L2 as % of b's norm."""
    cos, dist, norm = cosine(a, b), l2(a, b), b.norm(dim=-1)
    return {"cosine": float(cos.mean()), "angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, float(cos.mean()))))),
            "l2": float(dist.mean()), "l2_pct_of_norm": float(100 * (dist / norm).mean()), "norm": float(norm.mean())}


def _steps_stats(steps: Tensor) -> dict:
    conv = steps[steps > 0].float()
    some = conv.numel() > 0
    return {"converged_pct": 100 * conv.numel() / steps.numel(),
            "steps_mean": float(conv.mean()) if some else None, "steps_median": float(conv.median()) if some else None,
            "steps_min": int(conv.min()) if some else None, "steps_max": int(conv.max()) if some else None}


@torch.no_grad()
def fixed_point_analysis(model: NewLLM, threshold: float = 1e-4, max_steps: int = 50,
                         token_ids: Sequence[int] | None = None, max_tokens: int = 256, seed: int = 0,
                         also_thresholds: Sequence[float] = (1e-3, 1e-2, 1e-1)) -> dict:
    """(a), (b), (c) of the module doc on `model`'s ContextBlock; each with the research's figures beside.

    token_ids: the tokens to feed (default: `sample_tokens(vocab, max_tokens, seed)`). (a) is reported at
    `threshold` and, for context, at `also_thresholds` (the research's Phase 1 used 0.1; its "5-9 steps"
    does not state one). (b) and (c) are computed over the tokens that converged at `threshold` within
    max_steps (`tokens_compared`; for (b) in both iterations): an iterate that never settled is not a fixed
    point; when none did, over all tokens, flagged by `converged_only: False`. L2 % is relative to the
    all-layers fixed point's norm.
    """
    if max_steps < 1 or threshold <= 0:
        raise ValueError(f"need max_steps >= 1 and threshold > 0, got {max_steps} and {threshold}")
    model = model.eval()
    ids = torch.tensor(token_ids if token_ids is not None else sample_tokens(model.vocab_size, max_tokens, seed),
                       dtype=torch.long, device=next(model.parameters()).device)
    block = model.context_block
    xp = model.token_projections(ids)  # the token half of every layer, computed once: L x (N, Dc)
    zero = xp[0].new_zeros(ids.numel(), model.context_dim)

    def all_layers(c: Tensor) -> Tensor:
        return block.outputs(c, xp=xp)[-1]

    thresholds = sorted({threshold, *also_thresholds})
    # run until the strictest threshold is met (or max_steps), then read every threshold off the changes
    fixed, _, changes = iterate_to_fixed_point(all_layers, zero, thresholds[0], max_steps)
    steps = first_below(changes, threshold)
    keep = steps > 0
    converged_only = bool(keep.any())
    if not converged_only:
        keep = torch.ones_like(keep)
    single = all_layers(zero)
    out: dict = {
        "tokens": ids.numel(), "context_dim": model.context_dim, "context_layers": block.num_layers,
        "convergence": {"threshold": threshold, "max_steps": max_steps, **_steps_stats(steps),
                        "by_threshold": {t: _steps_stats(first_below(changes, t)) for t in thresholds},
                        "research_steps": RESEARCH["steps"]},
        "tokens_compared": int(keep.sum()), "converged_only": converged_only,
        "single_vs_iterated": {**_compare(single[keep], fixed[keep]), "research": RESEARCH["single_vs_iterated"]},
    }
    if block.num_layers > 1:
        first, first_steps, _ = iterate_to_fixed_point(lambda c: block.layers[0](c, xp=xp[0]), zero, threshold,
                                                       max_steps)
        both = keep & (first_steps > 0) if converged_only else keep  # a fixed point on both sides
        if not bool(both.any()):
            both = keep
        out["first_vs_all"] = {**_compare(first[both], fixed[both]), "tokens_compared": int(both.sum()),
                               "first_layer_converged_pct": 100 * float((first_steps > 0).float().mean()),
                               "research": RESEARCH["first_vs_all"]}
    else:
        out["first_vs_all"] = {"note": "a 1-layer ContextBlock: its first layer is all of it",
                               "research": RESEARCH["first_vs_all"]}
    return out


def fixed_point_rows(result: dict) -> list[dict]:
    """The analysis as report table rows: quantity, ours, research."""
    c, s, f = result["convergence"], result["single_vs_iterated"], result["first_vs_all"]

    def fmt(v: float | None, digits: int = 3) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    rows = [
        *({"quantity": f"steps to converge, τ={t:g} (mean / median)",
           "ours": f"{fmt(st['steps_mean'], 1)} / {fmt(st['steps_median'], 0)} ({st['converged_pct']:.1f} % of "
                   f"tokens within {c['max_steps']})", "research": c["research_steps"]}
          for t, st in c["by_threshold"].items()),
        {"quantity": "single pass vs iterated: L2", "ours": fmt(s["l2"], 2), "research": f"{s['research']['l2']}"},
        {"quantity": "single pass vs iterated: cosine", "ours": fmt(s["cosine"]),
         "research": f"{s['research']['cosine']}"},
    ]
    if "cosine" in f:
        r = f["research"]
        rows += [
            {"quantity": "first layer vs all layers: cosine (angle)", "ours": f"{f['cosine']:.3f} ({f['angle_deg']:.1f}°)",
             "research": f"{r['cosine']} ({r['angle_deg']}°)"},
            {"quantity": "first layer vs all layers: L2 (% of norm)", "ours": f"{f['l2']:.2f} ({f['l2_pct_of_norm']:.0f} %)",
             "research": f"{r['l2']} ({r['l2_pct_of_norm']:.0f} %)"},
        ]
    return rows
