"""`newllm compare`: the ablation table and figure over the MLflow runs of the training stages.

Every `dvc exp run -S key=value` leaves one MLflow run per stage that reran (named `<stage>:<exp>`, params
logged flat, final metrics as `summary/<key>`, `final.<key>` in runs logged before). This module reads those runs back, keeps the FINISHED runs
of the training stages (the newest per stage, params hash and experiment: re-runs and `newllm sync`
replays count once), finds per model the params that differ across its runs (`seed` excluded: seeds are
replicates) and reports val PPL / val loss mean ± std over the seeds of each ablation:
`reports/ablations.md` and `reports/figures/ablations.png`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from newllm.config import Params
from newllm.errors import PipelineError
from newllm.registry import MODELS

# Training record -> model name in the report, in registry order. A run's `dvc.stage` is one of its
# protocol cells, sweep/<record>/lr<lr> or seeds/<record>/seed<n> (protocol.py); older runs were <record>.
TRAIN_STAGES = {s.record: s.display for s in MODELS.values()}


def model_record(stage: Any) -> str | None:
    """The training record a run's `dvc.stage` belongs to, or None for a non-training stage."""
    parts = str(stage).split("/")
    record = parts[1] if len(parts) == 3 and parts[0] in ("sweep", "seeds") else str(stage)
    return record if record in TRAIN_STAGES else None
REPLICATE_PARAMS = ("seed",)  # differ across runs without making an ablation
# A protocol cell's own param: runs that differ in it are never pooled as seeds, even against runs from
# before the sweep that did not log it (grouped as "(unset)").
CELL_PARAMS = ("lr",)
METRICS = ("val_ppl", "val_loss", "params_total")  # read from `summary/<key>` (older runs: `final.<key>`)
BASELINE_LABEL = "(none: all runs share params)"
UNSET = "(unset)"
MD_NAME, FIGURE_NAME = "ablations.md", "figures/ablations.png"


class CompareError(PipelineError):
    """Nothing to compare: the experiment holds no finished training runs."""


# ----------------------------------------------------------------------------------------------- read
def load_runs(client: Any, experiment_id: str) -> pd.DataFrame:
    """All FINISHED runs of the experiment, one row each: run_id, run_name, status, start_time (ms),
    stage, exp_name, params_hash, then `params.<dotted key>` (strings) and `metrics.<key>` (latest values).

    tracking.py is the module that writes MLflow; this is the project's one read outside it, kept here
    behind this single function so the grouping below never sees an MLflow object.
    """
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            rows.append({
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "status": run.info.status,
                "start_time": run.info.start_time,
                "stage": tags.get("dvc.stage"),
                "exp_name": tags.get("dvc.exp_name"),
                "params_hash": tags.get("params_hash"),
                **{f"params.{k}": v for k, v in run.data.params.items()},
                **{f"metrics.{k}": v for k, v in run.data.metrics.items()},
            })
        token = page.token
        if not token:
            break
    base = ["run_id", "run_name", "status", "start_time", "stage", "exp_name", "params_hash"]
    return pd.DataFrame(rows, columns=base + sorted({k for r in rows for k in r} - set(base)))


# ----------------------------------------------------------------------------------------------- group
def select_runs(df: pd.DataFrame) -> pd.DataFrame:
    """FINISHED runs of the training stages, the newest per (stage, params_hash, exp_name)."""
    if df.empty or "stage" not in df:
        return df.iloc[0:0]
    keep = df[df["stage"].map(model_record).notna()]
    if "status" in keep:
        keep = keep[keep["status"] == "FINISHED"]
    keep = keep.sort_values("start_time", ascending=False, kind="stable")
    keys = [k for k in ("stage", "params_hash", "exp_name") if k in keep]
    return keep.drop_duplicates(subset=keys, keep="first")


def _value(v: Any) -> str:
    return UNSET if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def differing_params(runs: pd.DataFrame, ignore: Iterable[str] = REPLICATE_PARAMS) -> list[str]:
    """The params (without the `params.` prefix) that take more than one value across `runs`. Only params
    logged by every run count: every param the pipeline knows is logged (null ones as "None"), so a param
    missing from some runs means they come from a version that logged less, not from an ablation; a cell
    param (`lr`) counts even then."""
    skip = {f"params.{k}" for k in ignore}
    cells = {f"params.{k}" for k in CELL_PARAMS}
    out = []
    for col in runs.columns:
        if (col.startswith("params.") and col not in skip and (runs[col].notna().all() or col in cells)
                and runs[col].map(_value).nunique() > 1):
            out.append(col.removeprefix("params."))
    return sorted(out)


def _sort_key(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _stats(values: pd.Series) -> tuple[float, float]:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def _final(g: pd.DataFrame, key: str) -> pd.Series | None:
    """A final metric per run: `summary/<key>`, or `final.<key>` for a run logged before the rename."""
    cols = [c for c in (f"metrics.summary/{key}", f"metrics.final.{key}") if c in g]
    if not cols:
        return None
    values = g[cols[0]]
    return values.fillna(g[cols[1]]) if len(cols) == 2 else values


def group_ablations(df: pd.DataFrame, ignore: Iterable[str] = REPLICATE_PARAMS) -> pd.DataFrame:
    """Group the runs of `load_runs` (or any frame with its columns) into ablations.

    One row per (model, values of the params that differ across that model's runs), in report order:
    model, stage, ablation (label such as `context_dim=512`), ablation_params (dict), n_seeds (runs in
    the group), seeds, exps, run_ids, val_ppl_mean/std, val_loss_mean/std, params_total. std is the
    sample std over the group's runs (NaN for a single run).
    """
    ignore = tuple(ignore)
    runs = select_runs(df)
    out: list[dict[str, Any]] = []
    for stage, model in TRAIN_STAGES.items():
        mine = runs[runs["stage"].map(model_record) == stage] if not runs.empty else runs
        if mine.empty:
            continue
        keys = differing_params(mine, ignore)
        values = mine[[f"params.{k}" for k in keys]].map(_value) if keys else pd.DataFrame(index=mine.index)
        group_of = values.apply(tuple, axis=1) if keys else pd.Series([()] * len(mine), index=mine.index)
        for combo in sorted(set(group_of), key=lambda c: [_sort_key(v) for v in c]):
            g = mine[group_of == combo]
            seeds = sorted({_value(s) for s in g["params.seed"]}, key=_sort_key) if "params.seed" in g else []
            row: dict[str, Any] = {
                "model": model, "stage": stage,
                "ablation": ", ".join(f"{k}={v}" for k, v in zip(keys, combo, strict=True)) or BASELINE_LABEL,
                "ablation_params": dict(zip(keys, combo, strict=True)),
                "n_seeds": len(g), "seeds": seeds,
                "exps": sorted({_value(e) for e in g["exp_name"]}) if "exp_name" in g else [],
                "run_ids": list(g["run_id"]) if "run_id" in g else [],
            }
            for key in ("val_ppl", "val_loss"):
                values = _final(g, key)
                row[f"{key}_mean"], row[f"{key}_std"] = _stats(values) if values is not None else (math.nan, math.nan)
            sizes = _final(g, "params_total")
            sizes = pd.to_numeric(sizes, errors="coerce").dropna() if sizes is not None else pd.Series(dtype=float)
            row["params_total"] = int(sizes.median()) if not sizes.empty else None
            out.append(row)
    columns = ["model", "stage", "ablation", "ablation_params", "n_seeds", "seeds", "exps", "run_ids",
               "val_ppl_mean", "val_ppl_std", "val_loss_mean", "val_loss_std", "params_total"]
    frame = pd.DataFrame(out, columns=columns)
    # each model's ablations best first (lower val PPL is better); models stay in report order
    order = {m: i for i, m in enumerate(dict.fromkeys(frame["model"]))}
    frame = frame.assign(_m=frame["model"].map(order)).sort_values(["_m", "val_ppl_mean"], kind="stable",
                                                                   na_position="last")
    frame["best"] = frame.groupby("model")["val_ppl_mean"].transform("min").eq(frame["val_ppl_mean"]) \
        & frame.groupby("model")["model"].transform("size").gt(1)
    return frame.drop(columns="_m").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- write
def _pm(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(groups: pd.DataFrame) -> str:
    """Each model's ablations best first, its best in bold (lower is better)."""
    lines = ["| model | ablation params | runs (seeds) | val PPL (lower is better) | val loss | params_total |",
             "|---|---|---|---|---|---|"]
    for g in groups.itertuples(index=False):
        seeds = f" (seed {', '.join(g.seeds)})" if g.seeds else ""
        size = f"{g.params_total:,}" if g.params_total is not None and not pd.isna(g.params_total) else "—"
        ppl = _pm(g.val_ppl_mean, g.val_ppl_std, 2)
        lines.append(f"| {g.model} | {g.ablation.replace('|', '/')} | {g.n_seeds}{seeds} | "
                     f"{f'**{ppl}** (best)' if getattr(g, 'best', False) else ppl} | "
                     f"{_pm(g.val_loss_mean, g.val_loss_std, 4)} | {size} |")
    return "\n".join(lines) + "\n"


def write_markdown(groups: pd.DataFrame, path: Path, figure: Path | None = None, source: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ["# Ablations", ""]
    if source:
        text += [source, ""]
    text += ["Runs are grouped per model by the params that differ across that model's runs; seeds are "
             "replicates (mean ± sample std over them). Metrics are the stages' final (best-epoch) values; "
             "lower is better, each model's best in bold. A baseline's ablation params are New-LLM's: it is "
             "re-sized to match New-LLM's parameter count under them, it has no context_dim of its own.",
             "", markdown_table(groups)]
    if figure is not None:
        text += [f"![val PPL per ablation]({Path(os.path.relpath(figure, path.parent)).as_posix()})", ""]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(text))
    tmp.replace(path)
    return path


def plot_ablations(groups: pd.DataFrame, path: Path) -> Path:
    """Val PPL mean ± std (error bars) per ablation value, one panel per model on one shared y-axis, each
    model's best starred."""
    from newllm.report.figures import pyplot

    plt = pyplot()
    models = list(dict.fromkeys(groups["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(max(4.5 * len(models), 5), 4.2), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models, strict=True):
        g = groups[groups["model"] == model]
        x = range(len(g))
        ax.errorbar(x, g["val_ppl_mean"], yerr=g["val_ppl_std"].fillna(0.0), fmt="o", capsize=5, ms=6)
        best = [i for i, b in enumerate(g["best"] if "best" in g else []) if b]
        if best:
            ax.plot(best, g["val_ppl_mean"].iloc[best], "*", ms=16, color="tab:orange", label="best", zorder=3)
            ax.legend(loc="best", fontsize=8)
        for xi, (mean, n) in enumerate(zip(g["val_ppl_mean"], g["n_seeds"], strict=True)):
            if not math.isnan(mean):
                ax.annotate(f"n={n}", (xi, mean), textcoords="offset points", xytext=(8, 0), fontsize=8,
                            va="center")
        labels = ["all runs (same params)" if a == BASELINE_LABEL else a.replace(", ", "\n") for a in g["ablation"]]
        ax.set_xticks(list(x), labels, rotation=30 if len(g) > 3 else 0, ha="right" if len(g) > 3 else "center",
                      fontsize=8)
        ax.set_xlim(-0.6, len(g) - 0.4)
        ax.set(title=model, ylabel="val perplexity" if ax is axes[0][0] else None)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Val PPL per ablation (mean ± std over seeds; lower is better)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(params: Params, out_dir: Path = Path("reports")) -> tuple[pd.DataFrame, Path, Path]:
    """Read the experiment's runs, group them, write `<out_dir>/ablations.md` and
    `<out_dir>/figures/ablations.png`; return (groups, markdown path, figure path)."""
    from newllm import tracking

    client, exp_id = tracking.init_store(params)
    groups = group_ablations(load_runs(client, exp_id))
    uri = tracking.tracking_uri(params)
    if groups.empty:
        raise CompareError(f"no FINISHED runs of {', '.join(TRAIN_STAGES)} in experiment "
                           f"{params.tracking.experiment!r} of {uri}: run `dvc repro` or `dvc exp run` first")
    out_dir = Path(out_dir)
    figure = plot_ablations(groups, out_dir / FIGURE_NAME)
    n = int(groups["n_seeds"].sum())
    md = write_markdown(groups, out_dir / MD_NAME, figure,
                        source=f"{n} run(s) of experiment `{params.tracking.experiment}` in `{uri}`.")
    table = groups.drop(columns=["ablation_params", "run_ids"]).assign(
        seeds=groups["seeds"].map(", ".join), exps=groups["exps"].map(", ".join))
    tracking.log_compare(params, table, md, figure)
    return groups, md, figure
