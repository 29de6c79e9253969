"""`newllm compare`: the ablation table and figure over the MLflow runs of the training stages.

Every `dvc exp run -S key=value` leaves one MLflow run per stage that reran (named `<stage>:<exp>`, params
logged flat, final metrics as `summary/<key>`, `final.<key>` in runs logged before). This module reads those
runs back and keeps, as the report does, each model's result cells: its replicate seeds and its sweep cell
at the lr they were trained with (the lr its experiment picked on val; the other sweep cells only chose it).
It groups them per model by the params that differ across that model's runs (`seed` excluded: seeds are
replicates) and ranks the groups by test PPL, the report's headline, mean ± std over seeds, val beside it
(the selection criterion); a group whose gap to the best is inside twice the standard error of that
difference is marked as not distinguishable from it. `reports/ablations.md` and
`reports/figures/ablations.png` (both git-ignored: they describe a store, not a commit).
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
SCORES = ("test_ppl", "test_loss", "val_ppl", "val_loss")  # read from `summary/<key>` (older runs: `final.<key>`)
RANK_BY = "test_ppl"  # the report's headline; val chose the lr, and so is shown as the selection criterion
SE_FACTOR = 2.0  # a gap to the best inside this many standard errors of the difference is not a difference
BASELINE_LABEL = "(none: all runs share params)"
UNSET = "(unset)"
MD_NAME, FIGURE_NAME = "ablations.md", "figures/ablations.png"


class CompareError(PipelineError):
    """Nothing to compare: the experiment holds no finished training runs."""


# ----------------------------------------------------------------------------------------------- read
def load_runs(client: Any, experiment_id: str) -> pd.DataFrame:
    """All FINISHED runs of the experiment, one row each: run_id, run_name, status, start_time (ms),
    stage, exp_name, parent_id (its DVC experiment's parent run), params_hash, then `params.<dotted key>`
    (strings) and `metrics.<key>` (latest values; a parent's are its report's `headline/<key>`).

    newllm.tracking is the package that writes MLflow; this is the project's one read outside it, kept here
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
                "parent_id": tags.get("mlflow.parentRunId"),
                "params_hash": tags.get("params_hash"),
                **{f"params.{k}": v for k, v in run.data.params.items()},
                **{f"metrics.{k}": v for k, v in run.data.metrics.items()},
            })
        token = page.token
        if not token:
            break
    base = ["run_id", "run_name", "status", "start_time", "stage", "exp_name", "parent_id", "params_hash"]
    return pd.DataFrame(rows, columns=base + sorted({k for r in rows for k in r} - set(base)))


# ----------------------------------------------------------------------------------------------- group
def select_runs(df: pd.DataFrame) -> pd.DataFrame:
    """FINISHED runs of the training stages, the newest per (stage, params_hash, exp_name); of each model's
    lr sweep in an experiment, only the cell at its chosen lr (result_cells)."""
    if df.empty or "stage" not in df:
        return df.iloc[0:0]
    keep = df[df["stage"].map(model_record).notna()]
    if "status" in keep:
        keep = keep[keep["status"] == "FINISHED"]
    keep = keep.sort_values("start_time", ascending=False, kind="stable")
    keys = [k for k in ("stage", "params_hash", "exp_name") if k in keep]
    return result_cells(keep.drop_duplicates(subset=keys, keep="first"), chosen_lrs(df))


def chosen_lrs(df: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(parent run id, model record) -> the lr that experiment's report says it chose (`<record>_lr` of
    report.json, on the parent as `headline/<record>_lr`)."""
    out: dict[tuple[str, str], float] = {}
    for record in TRAIN_STAGES:
        col = f"metrics.headline/{record}_lr"
        if col in df:
            out.update({(str(run_id), record): float(v) for run_id, v in zip(df["run_id"], df[col], strict=True)
                        if not pd.isna(v)})
    return out


def result_cells(runs: pd.DataFrame, chosen: dict[tuple[str, str], float] | None = None) -> pd.DataFrame:
    """Per (model, experiment): its replicate cells (`seeds/...`) and the sweep cell (`sweep/...`) at the lr
    the experiment chose: the one its report names (`chosen`, by parent run), else its replicates' lr, else
    the sweep cell with the lowest val loss (pick_lr's rule, protocol.pick). The sweep's other cells chose
    the lr and are not results; an experiment whose replicates DVC reused from another keeps no cell of its
    own beyond its sweep's, and those replicates count in the other experiment's group, whose params match."""
    from newllm.protocol import pick

    chosen = chosen or {}
    kind = runs["stage"].map(lambda s: str(s).split("/")[0])
    sweep = kind == "sweep"
    if not sweep.any():
        return runs
    lr = pd.to_numeric(runs["params.lr"], errors="coerce") if "params.lr" in runs else pd.Series(math.nan, runs.index)
    parent = runs["parent_id"] if "parent_id" in runs else pd.Series(None, index=runs.index)
    experiment = parent.where(parent.notna(), runs["exp_name"]).map(_value)
    record = runs["stage"].map(model_record)
    drop = []
    for (rec, exp), cells in runs[sweep].groupby([record[sweep], experiment[sweep]]):
        replicates = lr[(kind == "seeds") & (record == rec) & (experiment == exp)].dropna()
        if (rec_exp := (str(parent[cells.index[0]]), rec)) in chosen:
            best = chosen[rec_exp]
        elif not replicates.empty:
            best = float(replicates.iloc[0])
        else:
            val = _final(cells, "val_loss")
            scores = {float(lr[i]): float(v) for i, v in (val.items() if val is not None else [])
                      if not math.isnan(lr[i]) and not pd.isna(v)}
            best = pick(scores) if scores else math.nan
        drop += [i for i in cells.index if not lr[i] == best]
    return runs.drop(index=drop)


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
    sample std over the group's runs (NaN for a single run); groups ranked by test PPL (rank_groups).
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
            for key in SCORES:
                values = _final(g, key)
                row[f"{key}_mean"], row[f"{key}_std"] = _stats(values) if values is not None else (math.nan, math.nan)
            sizes = _final(g, "params_total")
            sizes = pd.to_numeric(sizes, errors="coerce").dropna() if sizes is not None else pd.Series(dtype=float)
            row["params_total"] = int(sizes.median()) if not sizes.empty else None
            out.append(row)
    columns = ["model", "stage", "ablation", "ablation_params", "n_seeds", "seeds", "exps", "run_ids",
               *(f"{k}_{s}" for k in SCORES for s in ("mean", "std")), "params_total"]
    return rank_groups(pd.DataFrame(out, columns=columns))


def rank_groups(frame: pd.DataFrame) -> pd.DataFrame:
    """Each model's groups best first by test PPL (lower is better), models in report order; `best` marks a
    model's best when it has several groups, `vs_best` says of every other group whether its gap to the best
    exceeds SE_FACTOR standard errors of the difference (sqrt(s1²/n1 + s2²/n2), over the seeds)."""
    key = f"{RANK_BY}_mean"
    order = {m: i for i, m in enumerate(dict.fromkeys(frame["model"]))}
    frame = frame.assign(_m=frame["model"].map(order)).sort_values(["_m", key], kind="stable", na_position="last")
    frame["best"] = frame.groupby("model")[key].transform("min").eq(frame[key]) \
        & frame.groupby("model")["model"].transform("size").gt(1)
    frame["vs_best"] = ""
    for _, g in frame.groupby("model", sort=False):
        if len(g) < 2 or math.isnan(g[key].iloc[0]):
            continue
        top = g.iloc[0]
        for i, row in g.iloc[1:].iterrows():
            frame.at[i, "vs_best"] = _versus(row, top)
    return frame.drop(columns="_m").reset_index(drop=True)


def _versus(row: Any, top: Any) -> str:
    mean, std = f"{RANK_BY}_mean", f"{RANK_BY}_std"
    gap = row[mean] - top[mean]
    if math.isnan(gap):
        return ""
    if math.isnan(row[std]) or math.isnan(top[std]):
        return f"+{gap:.2f} (one seed: no spread to judge by)"
    se = math.sqrt(row[std] ** 2 / row["n_seeds"] + top[std] ** 2 / top["n_seeds"])
    return f"+{gap:.2f}, {'inside' if gap <= SE_FACTOR * se else 'beyond'} {SE_FACTOR:g} SE (SE {se:.2f})"


# ----------------------------------------------------------------------------------------------- write
def _pm(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(groups: pd.DataFrame) -> str:
    """Each model's ablations best first by test PPL, its best in bold; val PPL beside it, labelled as what
    chose each model's lr (lower is better)."""
    lines = ["| model | ablation params | runs (seeds) | test PPL (ranked by) | gap to best (2 SE test) | "
             "val PPL (selection criterion) | params_total |",
             "|---|---|---|---|---|---|---|"]
    for g in groups.itertuples(index=False):
        seeds = f" (seed {', '.join(g.seeds)})" if g.seeds else ""
        size = f"{g.params_total:,}" if g.params_total is not None and not pd.isna(g.params_total) else "—"
        ppl = _pm(g.test_ppl_mean, g.test_ppl_std, 2)
        vs = "best" if getattr(g, "best", False) else getattr(g, "vs_best", "") or "—"
        lines.append(f"| {g.model} | {g.ablation.replace('|', '/')} | {g.n_seeds}{seeds} | "
                     f"{f'**{ppl}**' if getattr(g, 'best', False) else ppl} | {vs} | "
                     f"{_pm(g.val_ppl_mean, g.val_ppl_std, 2)} | {size} |")
    return "\n".join(lines) + "\n"


def write_markdown(groups: pd.DataFrame, path: Path, figure: Path | None = None, source: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ["# Ablations", ""]
    if source:
        text += [source, ""]
    text += ["Each model's result cells (its replicate seeds and its sweep cell at the lr they were trained "
             "with) grouped by the params that differ across that model's runs; seeds are replicates (mean ± "
             "sample std over them). Ranked by test PPL, the report's headline (lower is better, each model's "
             "best in bold); a gap inside twice its standard error is not a difference these seeds can show. "
             "Val PPL chose each model's lr, so it is the selection criterion, not the result. A baseline's "
             "ablation params are New-LLM's: it is re-sized to match New-LLM's parameter count under them.",
             "", markdown_table(groups)]
    if figure is not None:
        text += [f"![test PPL per ablation]({Path(os.path.relpath(figure, path.parent)).as_posix()})", ""]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(text))
    tmp.replace(path)
    return path


def y_limits(g: pd.DataFrame, pad: float = 0.15) -> tuple[float, float]:
    """A panel's y-range: its groups' test PPL mean ± std and nothing else, padded by `pad` of the span, so
    an ablation's differences fill the panel."""
    mean, std = g[f"{RANK_BY}_mean"], g[f"{RANK_BY}_std"].fillna(0.0)
    lo, hi = float((mean - std).min()), float((mean + std).max())
    span = hi - lo or max(abs(hi) * 0.05, 1e-3)
    return lo - pad * span, hi + pad * span


def plot_ablations(groups: pd.DataFrame, path: Path) -> Path:
    """Test PPL mean ± std (error bars) per ablation, one panel per model with its own y-axis (y_limits),
    at most three panels a row, each model's best starred."""
    from newllm.report.figures import pyplot

    plt = pyplot()
    models = list(dict.fromkeys(groups["model"]))
    cols = min(3, len(models))
    rows = math.ceil(len(models) / cols)
    width = max(6.0 if cols == 1 else 4.5, 0.9 * groups.groupby("model").size().max() + 2)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax, model in zip(axes.flat, models, strict=False):
        g = groups[groups["model"] == model]
        x = range(len(g))
        ax.errorbar(x, g[f"{RANK_BY}_mean"], yerr=g[f"{RANK_BY}_std"].fillna(0.0), fmt="o", capsize=5, ms=6)
        best = [i for i, b in enumerate(g["best"] if "best" in g else []) if b]
        if best:
            ax.plot(best, g[f"{RANK_BY}_mean"].iloc[best], "*", ms=16, color="tab:orange", label="best", zorder=3)
            ax.legend(loc="best", fontsize=8)
        for xi, (mean, n) in enumerate(zip(g[f"{RANK_BY}_mean"], g["n_seeds"], strict=True)):
            if not math.isnan(mean):
                ax.annotate(f"n={n}", (xi, mean), textcoords="offset points", xytext=(8, 0), fontsize=8,
                            va="center")
        labels = ["all runs (same params)" if a == BASELINE_LABEL else a.replace(", ", "\n") for a in g["ablation"]]
        ax.set_xticks(list(x), labels, rotation=30 if len(g) > 3 else 0, ha="right" if len(g) > 3 else "center",
                      fontsize=8)
        ax.set_xlim(-0.6, len(g) - 0.4)
        if g[f"{RANK_BY}_mean"].notna().any():
            ax.set_ylim(*y_limits(g))
        ax.set(title=model, ylabel="test perplexity")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Test PPL per ablation: mean ± std over seeds, lower is better"
                 + ("; each panel its own scale" if cols > 1 else ""), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(params: Params, out_dir: Path = Path("reports"), every_model: bool = False
            ) -> tuple[pd.DataFrame, Path, Path]:
    """Read the experiment's runs, group them, write `<out_dir>/ablations.md` (every model) and
    `<out_dir>/figures/ablations.png` (New-LLM's panel; `every_model`: one panel per model); return
    (groups, markdown path, figure path)."""
    from newllm import tracking

    client, exp_id = tracking.init_store(params)
    groups = group_ablations(load_runs(client, exp_id))
    uri = tracking.tracking_uri(params)
    if groups.empty:
        raise CompareError(f"no FINISHED runs of {', '.join(TRAIN_STAGES)} in experiment "
                           f"{params.tracking.experiment!r} of {uri}: run `dvc repro` or `dvc exp run` first")
    out_dir = Path(out_dir)
    newllm = groups["stage"] == MODELS["newllm"].record
    drawn = groups if every_model or not newllm.any() else groups[newllm]
    figure = plot_ablations(drawn, out_dir / FIGURE_NAME)
    n = int(groups["n_seeds"].sum())
    md = write_markdown(groups, out_dir / MD_NAME, figure,
                        source=f"{n} run(s) of experiment `{params.tracking.experiment}` in `{uri}`.")
    table = groups.drop(columns=["ablation_params", "run_ids"]).assign(
        seeds=groups["seeds"].map(", ".join), exps=groups["exps"].map(", ".join))
    tracking.log_compare(params, table, md, figure)
    return groups, md, figure
