"""Training-curve figures (matplotlib, headless). Stages log them to MLflow; the report embeds them."""

from __future__ import annotations

from typing import Any


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (stages and reports run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lm_curves(history: list[dict[str, Any]], title: str):
    """Train (dashed) and val loss per epoch, and val perplexity, side by side."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "--", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "-o", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy (nats/token)", title=f"{title}: loss")
    ax_loss.legend()
    ax_ppl.plot(epochs, [h["val_ppl"] for h in history], "-o", color="tab:red")
    ax_ppl.set(xlabel="epoch", ylabel="val perplexity", title=f"{title}: val PPL", yscale="log")
    fig.tight_layout()
    return fig


def phase1_curves(history: list[dict[str, Any]], title: str = "Phase 1 (CVFP)"):
    """Effective Rank % and convergence % per iteration, and the loss terms."""
    plt = pyplot()
    its = [h["iteration"] for h in history]
    learned = [h for h in history if "total_loss" in h]  # iteration 0 is the sequential pass: no loss
    fig, (ax_er, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_er.plot(its, [h["er_pct"] for h in history], "-o", label="Effective Rank % of dim")
    ax_er.plot([h["iteration"] for h in learned], [100 * h["convergence_rate"] for h in learned], "-s",
               label="converged tokens %")
    ax_er.set(xlabel="iteration", ylabel="%", title=f"{title}: ER and convergence", ylim=(0, 100))
    ax_er.legend()
    for key in ("cvfp_loss", "diversity_loss", "total_loss"):
        ax_loss.plot([h["iteration"] for h in learned], [h[key] for h in learned], label=key)
    ax_loss.set(xlabel="iteration", title=f"{title}: losses")
    ax_loss.legend()
    fig.tight_layout()
    return fig


def lr_sweep(val_by_lr: dict[str, dict[float, float]]):
    """Val loss against learning rate, one line per model; the chosen (lowest) cell ringed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, val) in enumerate(val_by_lr.items()):
        lrs = sorted(val)
        if not lrs:  # no cell beat its initial weights: nothing to draw (the tables say so)
            continue
        ax.plot(lrs, [val[lr] for lr in lrs], "-o", color=f"C{i}", label=name)
        best = min(lrs, key=lambda lr: val[lr])
        ax.plot([best], [val[best]], "o", ms=14, mfc="none", color=f"C{i}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="best val loss (nats/token)",
           title="Learning-rate sweep (on one seed): the ringed cell is each model's lr")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def context_use_figure(curves: dict[str, dict[str, float]], title: str, faint: dict[str, dict[str, float]] | None = None,
                       xlabel: str = "tokens of context seen (each window starts with no past)"):
    """Test loss against the tokens of context seen ({label: {str(tokens): loss}}), log-2 x; `faint` curves
    (e.g. a study's smaller cells) are drawn light behind, in the same colour per label."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {label: f"C{i}" for i, label in enumerate(curves)}
    for label, curve in (faint or {}).items():
        xs = sorted(int(p) for p in curve)
        ax.plot(xs, [curve[str(x)] for x in xs], color=colours.get(label.split(" (")[0], "grey"), alpha=0.25)
    for label, curve in curves.items():
        xs = sorted(int(p) for p in curve)
        ax.plot(xs, [curve[str(x)] for x in xs], "-o", color=colours[label], label=label, markersize=4)
    ax.set_xscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel="test loss (nats/token)", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
