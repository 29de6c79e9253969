"""The study report: one page over a study's cells (newllm.study), from each cell's report metrics.

- test PPL against total params per model, log-log, mean ± std over seeds, with a fitted slope per model;
- New-LLM / Transformer test PPL ratio at each size, against the research's expectation (1.5-2x, goal 1.2x);
- context utilisation: test loss against the number of tokens seen within a window, per model;
- the research's decision band (docs/research.md §5) applied to New-LLM's test perplexity at each size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from newllm.registry import MODELS
from newllm.report.document import Document, Table
from newllm.report.figures import context_use_figure, pyplot
from newllm.report.tables import decision_band


def models() -> dict[str, str]:
    """report.json's key of every registered model (report/build.py: New-LLM's is `newllm`, every other's its
    record) -> its display name; read when a report is built, so a newly registered model is in it."""
    return {("newllm" if s.role == "newllm" else s.record): s.display for s in MODELS.values()}


EXPECTED, GOAL = (1.5, 2.0), 1.2  # the research's expectation for New-LLM / Transformer test PPL, and its goal


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x (None with fewer than 2 distinct x)."""
    if len(set(xs)) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def points(cells: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{model: [{cell, params, ppl, std}]} ordered by params, for every model a cell's report scored."""
    out: dict[str, list[dict[str, Any]]] = {}
    for cell, c in cells.items():
        r = c["report"]
        for key in models():
            if r.get(f"{key}_test_ppl") is not None and r.get(f"{key}_params_total"):
                out.setdefault(key, []).append({"cell": cell, "params": r[f"{key}_params_total"],
                                                "ppl": r[f"{key}_test_ppl"], "std": r.get(f"{key}_test_ppl_std") or 0.0})
    return {k: sorted(v, key=lambda p: p["params"]) for k, v in out.items()}


def scaling_figure(pts: dict[str, list[dict[str, Any]]]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, ps in pts.items():
        s = slope([p["params"] for p in ps], [p["ppl"] for p in ps])
        label = models()[key] + ("" if s is None else f" (slope {s:.2f})")
        ax.errorbar([p["params"] for p in ps], [p["ppl"] for p in ps], yerr=[p["std"] for p in ps], marker="o",
                    capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total parameters")
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title("Test PPL against size, mean ± std over seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def context_figure(cells: dict[str, dict[str, Any]]):
    """Loss against tokens seen, per model: the largest cell drawn, the others faint behind it."""
    names = list(cells)
    use = lambda c: cells[c]["report"].get("context_use") or {}  # noqa: E731
    names_of = models()
    faint = {f"{names_of.get(k, k)} ({c})": curve for c in names[:-1] for k, curve in use(c).items()}
    return context_use_figure({names_of.get(k, k): curve for k, curve in sorted(use(names[-1]).items())},
                              f"Context utilisation at {names[-1]} (faint: the smaller cells)", faint=faint)


def horizon(curve: dict[str, float], tolerance: float = 0.01) -> int:
    """The fewest tokens seen after which the loss is within `tolerance` nats of its value at the longest."""
    xs = sorted(int(p) for p in curve)
    final = curve[str(xs[-1])]
    return next(x for x in xs if all(curve[str(y)] - final <= tolerance for y in xs if y >= x))


def _trend(ratios: list[float], new: float | None, tf: float | None) -> str:
    """Whether the gap closes with size, read with both slopes: a ratio that falls while New-LLM's PPL rises
    is the Transformer getting worse faster (overfitting the budget), not New-LLM catching up."""
    ends = f"{ratios[0]:.3f} at the smallest cell, {ratios[-1]:.3f} at the largest"
    if ratios[-1] >= ratios[0]:
        return f"With size the gap does not close: {ends}."
    if new is not None and tf is not None and new >= 0:
        return (f"The ratio falls with size ({ends}) only because the Transformer's PPL rises faster than "
                f"New-LLM's (log-log slopes {tf:+.3f} and {new:+.3f}): the larger models overfit this token "
                "budget; New-LLM does not catch up.")
    return f"With size the gap closes: {ends}."


def build_study_report(label: str, cells: dict[str, dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Write study.md, study.html and figures under out_dir; return the study's summary metrics."""
    pts = points(cells)
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    doc = Document(f"Study {label}")
    slopes = {k: slope([p["params"] for p in ps], [p["ppl"] for p in ps]) for k, ps in pts.items()}
    ratios = {c: cells[c]["report"].get("test_ppl_ratio_vs_transformer") for c in cells}
    first = next(iter(cells.values()))["report"]
    doc.text(f"{len(cells)} cell(s), {first.get('seeds', '?')} seeds each; every number is test perplexity "
             "(val selected the lr and the epoch), mean ± std over seeds, on the same tokens for every model.")

    doc.heading("Scaling")
    scale_png = figs / "scaling.png"
    _save(scaling_figure(pts), scale_png)
    doc.figure(scale_png, "Test PPL against total params, log-log, mean ± std over seeds; slope of the fit in the legend")
    names_of = models()
    header = ["cell", *(f"{names_of[k]} params" for k in pts), *(f"{names_of[k]} test PPL" for k in pts),
              "New-LLM / Transformer", "decision band (New-LLM)"]
    rows = []
    for cell, c in cells.items():
        r = c["report"]
        rows.append([cell, *(f"{r.get(f'{k}_params_total', 0):,}" for k in pts),
                     *(f"{r[f'{k}_test_ppl']:.2f} ± {r.get(f'{k}_test_ppl_std') or 0:.2f}"
                       if r.get(f"{k}_test_ppl") is not None else "-" for k in pts),
                     f"{ratios[cell]:.3f}" if ratios[cell] else "-", r.get("decision_band", "-")])
    doc.table(Table(header, rows))
    lines = [f"{names_of[k]}: log-log slope {s:.3f} (PPL ∝ params^{s:.3f})" for k, s in slopes.items() if s is not None]
    measured = [v for v in ratios.values() if v]
    if measured:
        inside = sum(EXPECTED[0] <= v <= EXPECTED[1] for v in measured)
        lines.append(f"New-LLM / Transformer test PPL ratio: {', '.join(f'{v:.3f}' for v in measured)} across the cells; "
                     f"the research expected {EXPECTED[0]}–{EXPECTED[1]}× ({inside} of {len(measured)} cells inside), "
                     f"goal {GOAL}× ({sum(v <= GOAL for v in measured)} of {len(measured)} at or below it).")
        if len(measured) >= 2:
            lines.append(_trend(measured, slopes.get("newllm"), slopes.get("transformer")))
    doc.bullets(lines)

    doc.heading("Context utilisation")
    use_png = figs / "context_use.png"
    _save(context_figure(cells), use_png)
    doc.figure(use_png, "Test loss against the number of tokens seen (each window starts with no past), per model")
    last = list(cells)[-1]
    use = cells[last]["report"].get("context_use") or {}
    doc.bullets([f"{names_of.get(k, k)} ({last}): loss {curve[min(curve, key=int)]:.3f} with 1 token of context, "
                 f"{curve[max(curve, key=int)]:.3f} with {max(int(p) for p in curve)}+; within 0.01 nats of that "
                 f"from {horizon(curve)} tokens on" for k, curve in sorted(use.items())])

    new_ppl = {c: cells[c]["report"].get("newllm_test_ppl") for c in cells}
    doc.heading("The research's decision bands (docs/research.md §5)")
    bands = []
    for c, v in new_ppl.items():
        tf = cells[c]["report"].get("transformer_test_ppl")
        if v is not None:  # the Transformer's band beside it: what this token budget allows any model
            bands.append(f"{c}: New-LLM test PPL {v:.2f}: {decision_band(v)}"
                         + (f"; the Transformer on the same tokens: {tf:.2f}, {decision_band(tf)}" if tf else ""))
    budget = (next(iter(cells.values())).get("params") or {}).get("train.max_tokens")
    if budget:
        bands.append(f"The bands were stated for models trained on the whole corpus; these cells train on its first "
                     f"{budget:,} tokens, so a band judges the budget as much as the model.")
    doc.bullets(bands)

    (out_dir / "study.md").write_text(doc.markdown(out_dir), encoding="utf-8")
    (out_dir / "study.html").write_text(doc.html(), encoding="utf-8")
    summary = {"cells": list(cells), "slopes": slopes, "ratio_vs_transformer": ratios, "newllm_test_ppl": new_ppl}
    (out_dir / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
