"""The comparison report: every number comes from this workspace's metrics files, checkpoints and probes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from newllm.config import Params, params_hash, stages
from newllm.errors import PipelineError
from newllm.gitinfo import changed_vs_baseline, dvc_exp_name, file_at, git_commit
from newllm.protocol import FULL_LRS, checkpoint, full_sweep_command, phase1_record, runs, seeds
from newllm.registry import CONTROLS, MODELS, REFERENCE, by_record
from newllm.report.analyses import context_use, loss_curves_figure, metric_key, samples, truncation
from newllm.report.document import Document
from newllm.report.figures import context_use_figure, lr_sweep, phase1_curves, pyplot
from newllm.report.tables import (
    NEWLLM,
    Table,
    beyond_spread,
    decision_band,
    difference,
    display,
    main_table,
    model_stages,
    ratios,
    read_curve,
    read_metrics,
)

TEMPLATE = Path(__file__).with_name("templates") / "report.md"  # the report's prose, with placeholders
FIGURES = ("val_loss_curves.png", "phase1.png", "memory_vs_length.png", "lr_sweep.png", "context_use.png",
           "truncation.png")



def _gap(per_seed: dict[str, list[dict[str, Any]]], a: str, b: str) -> str:
    """How mean test loss of `a` minus `b` compares with the seed spread, in words."""
    diff, se = difference([m["test_loss"] for m in per_seed[a]], [m["test_loss"] for m in per_seed[b]])
    verdict = beyond_spread(diff, se)
    if verdict is None:
        return "one seed each: no seed spread is measured, so this difference may be noise"
    return (f"the test-loss difference {diff:+.4f} nats/token is {'larger' if verdict else 'not larger'} than "
            f"twice its seed standard error ({se:.4f})" + ("" if verdict else ": within the seed noise"))


def answer(summary: dict[str, dict[str, Any]], per_seed: dict[str, list[dict[str, Any]]],
           rel: dict[str, float]) -> str:
    """The report's first sentence: New-LLM against the registry's reference model (REFERENCE: the
    parameter-matched Transformer) on test, then the controls."""
    new = summary[NEWLLM]
    n = len(new["seeds"])
    spread = lambda m: f" ± {m['test_ppl_std']:.2f}" if m["test_ppl_std"] is not None else ""  # noqa: E731
    parts = []
    ref = REFERENCE
    ratio = rel.get(f"test_ppl_ratio_vs_{ref.record}") if ref is not None else None
    if ratio is not None:
        t = summary[ref.record]
        parts.append(f"On test, over {n} seed{'s' if n > 1 else ''}, New-LLM's perplexity is {new['test_ppl']:.2f}"
                     f"{spread(new)} against {t['test_ppl']:.2f}{spread(t)} for the parameter-matched {ref.display}: "
                     f"{ratio:.3f}x ({'better' if ratio < 1 else 'worse'}); {_gap(per_seed, NEWLLM, ref.record)}.")
    else:
        parts.append(f"On test, New-LLM's perplexity is {new['test_ppl']:.2f}{spread(new)} (no matched "
                     f"{ref.display if ref is not None else 'reference model'} in this run).")
    parts.append(_best_fixed_state(summary, per_seed, rel, spread))
    for control in CONTROLS:
        record = MODELS[control].record
        c = summary[record]
        gap = c["test_loss"] - new["test_loss"]
        parts.append(f"{MODELS[control].display}: mean test loss {c['test_loss']:.4f} vs New-LLM's "
                     f"{new['test_loss']:.4f}, {abs(gap):.4f} nats/token in "
                     f"{'New-LLM' if gap > 0 else 'the control'}'s favour; {_gap(per_seed, record, NEWLLM)}.")
    return " ".join(parts)


def _best_fixed_state(summary: dict[str, dict[str, Any]], per_seed: dict[str, list[dict[str, Any]]],
                      rel: dict[str, float], spread) -> str:
    """The second sentence: New-LLM against the fixed-state baseline (registry: `fixed_state`) with the
    lowest mean test loss among those matched to it in this run."""
    matched = [s for s in MODELS.values() if s.role == "baseline" and s.fixed_state
               and s.record in summary and f"test_ppl_ratio_vs_{s.record}" in rel]
    if not matched:
        names = ", ".join(s.display for s in MODELS.values() if s.role == "baseline" and s.fixed_state)
        return f"No parameter-matched fixed-state baseline ({names}) ran in this run."
    best = min(matched, key=lambda s: summary[s.record]["test_loss"])
    b, ratio = summary[best.record], rel[f"test_ppl_ratio_vs_{best.record}"]
    return (f"Against the best fixed-state baseline of the {len(matched)} in this run, the {best.display} "
            f"({b['test_ppl']:.2f}{spread(b)}), New-LLM's perplexity is {ratio:.3f}x "
            f"({'better' if ratio < 1 else 'worse'}); {_gap(per_seed, NEWLLM, best.record)}.")


def _changed_line(params: Params, most: int = 12) -> str:
    """Which params this workspace's run changed against the commit it starts from (after `dvc exp run`,
    the workspace holds the experiment: the report says so)."""
    rev, changed = changed_vs_baseline(params)
    if changed is None:
        return (f"the params.yaml committed at `{rev[:7]}` does not validate under this version: no comparison."
                if rev and file_at(rev, "params.yaml") is not None else "no committed params.yaml to compare with.")
    if not changed:
        return f"params as committed at `{rev[:7]}`."
    shown = ", ".join(f"`{k}={here}` (committed: {there})" for k, (here, there) in list(changed.items())[:most])
    more = f" and {len(changed) - most} more" if len(changed) > most else ""
    return f"params changed against commit `{rev[:7]}`: {shown}{more}."


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def build_report(params: Params, root: Path, out_dir: Path) -> dict[str, Any]:
    """Write report.md, report.html and figures under out_dir; return the report's metrics."""
    import torch

    from newllm.data.token_cache import load_cache
    from newllm.models.factory import load_model
    from newllm.report.fixed_point import fixed_point_analysis, fixed_point_rows
    from newllm.report.probes import memory_figure, memory_vs_length
    from newllm.training.position_loss import effective_context

    cache = load_cache(root / "data" / "tokens")
    declared = stages(params, root)
    records = model_stages(params.baselines)
    table, per_seed, summary = main_table(root, declared, params)
    scored = {f"{display(s)} seed {m['seed']}": m.get("val_tokens") for s, ms in per_seed.items() for m in ms}
    if len(set(scored.values())) != 1:
        raise PipelineError(f"models were scored on different numbers of val tokens {scored}: rerun "
                            "`dvc repro` so every model goes through the same evaluation")
    rel = ratios(summary)
    new = summary[NEWLLM]
    p1 = read_metrics(root, declared[phase1_record(params.seed)])
    data = read_metrics(root, declared["generate_dataset"])
    figs = out_dir / "figures"
    # the runs on `seed` (each model's chosen sweep cell) are the ones drawn, probed and sampled
    on_seed = {s: runs(params, s, root)[params.seed] for s in records}

    torch.manual_seed(params.seed)
    loaded = {s: load_model(by_record(s).name, cache.vocab_size, checkpoint(params, by_record(s).name, root))
              for s in records}
    models = {display(s): model for s, model in loaded.items()}

    # the blocks (tables, figures) in the template's order, then its prose values
    picked = read_metrics(root, declared["pick_lr"])
    sweep = {s: picked[s] for s in records}
    lrs = sorted(next(iter(sweep.values()))["val_loss_by_lr"], key=float)
    p1_curve = read_curve(root, declared[phase1_record(params.seed)])
    probe_models = {display(s): model for s, model in loaded.items() if by_record(s).memory_probe}
    rows = memory_vs_length(probe_models, params.report.memory_lengths, cache.vocab_size)
    cols = [c for c in ("model", "method", "length", "state_bytes", "peak_bytes", "ms_per_token", "ms_min", "ms_max",
                        "status") if c in rows[0]]
    use = context_use(loaded, cache, params.report.context_window)
    cut = truncation(loaded, cache, params.report.context_window)
    effective = {k: effective_context({int(d): v for d, v in c.items()}) for k, c in cut.items()}
    fp = fixed_point_analysis(models[MODELS["newllm"].display], params.report.fixed_point_threshold,
                              params.report.fixed_point_max_steps, seed=params.seed)
    blocks = {
        "main_table": ("table", table),
        "lr_sweep_figure": ("figure", (_save(lr_sweep({display(s): {float(lr): v for lr, v in c["val_loss_by_lr"].items()
                                                                    if v is not None} for s, c in sweep.items()}),
                                             figs / FIGURES[3]),
                                       f"Best val loss against lr, seed {params.seed}; the ringed cell is each model's lr")),
        "lr_sweep_table": ("table", Table(["model", *(f"val loss at lr {float(lr):g}" for lr in lrs), "chosen"],
                                          [[display(s), *(c["val_loss_by_lr"][lr] or "never improved" for lr in lrs),
                                            f"{c['lr']:g}" + (" (edge)" if c["at_sweep_edge"] else "")]
                                           for s, c in sweep.items()])),
        "loss_curves_figure": ("figure", (_save(loss_curves_figure(root, declared, on_seed), figs / FIGURES[0]),
                                          f"Val (solid) and train (dashed) loss per epoch, seed {params.seed}, each at "
                                          "its chosen lr")),
        "phase1_figure": ("figure", (_save(phase1_curves([{"iteration": int(r["step"]), **r} for r in p1_curve]),
                                           figs / FIGURES[1]),
                                     "Phase 1: Effective Rank % and convergence % per iteration")),
        "memory_figure": ("figure", (_save(memory_figure(rows), figs / FIGURES[2]),
                                     "Peak memory and ms/token against sequence length")),
        "memory_table": ("table", Table(cols, [[r.get(c, "") for c in cols] for r in rows])),
        "context_use_figure": ("figure", (_save(context_use_figure({display(s): use[metric_key(s)] for s in loaded},
                                                                   "Test loss against the tokens seen"), figs / FIGURES[4]),
                                          "Test loss of the prediction that has seen p tokens, per model (seed "
                                          f"{params.seed}), averaged over p .. 2p - 1; windows of "
                                          f"{params.report.context_window} test tokens, each from an empty state")),
        "truncation_figure": ("figure", (_save(context_use_figure({display(s): cut[metric_key(s)] for s in loaded},
                                                                  "Test loss when only the last d tokens are seen",
                                                                  xlabel="d: tokens of context kept"), figs / FIGURES[5]),
                                         "Test loss of the same targets (up to 512 test positions, each with "
                                         f"{params.report.context_window} tokens of past), each predicted from its "
                                         f"last d tokens only (seed {params.seed})")),
        "truncation_table": ("table", Table(["model", *(f"d = {d}" for d in next(iter(cut.values()))), "effective context"],
                                            [[display(s), *cut[metric_key(s)].values(), effective[metric_key(s)]]
                                             for s in loaded])),
        "fixed_point_table": ("table", Table(["quantity", "ours", "research"],
                                             [[r["quantity"], r["ours"], r["research"]] for r in fixed_point_rows(fp)])),
        "samples_table": ("table", Table(["prompt", "model", "decoding", "continuation"],
                                         samples(params, models, cache.tokenizer(), int(cache.meta["eos_id"])))),
    }
    missing = [lr for lr in FULL_LRS if lr not in params.protocol.lrs]
    band = decision_band(new["test_ppl"])  # on the mean over seeds
    seq = params.transformer.seq_len
    values = {
        "answer": answer(summary, per_seed, rel),
        "sweep_note": (f"**A smaller lr sweep than the full protocol's**: {len(params.protocol.lrs)} values instead of "
                       f"{len(FULL_LRS)} (missing {', '.join(f'{lr:g}' for lr in missing)}), so that the default run "
                       f"fits in 10 minutes on 2 CPU cores. The full protocol: `{full_sweep_command()}`."
                       if missing else ""),
        "source": params.dataset.source, **{f"{k}_lines": data[f"{k}_lines"] for k in ("train", "val", "test")},
        "tokenizer": params.tokenizer.kind, "vocab": cache.vocab_size,
        **{f"{k}_tokens": len(getattr(cache, k)) for k in ("train", "val", "test")},
        "patience": params.train.patience, "epochs": params.train.epochs,
        "matching": ("Every baseline is sized to New-LLM's total parameter count (±10 %) by a width search."
                     if params.protocol.match_params else
                     "Baselines are NOT sized to New-LLM (protocol.match_params: false)."),
        "lrs": ", ".join(f"{lr:g}" for lr in params.protocol.lrs), "seed": params.seed,
        "seeds": ", ".join(map(str, seeds(params))),
        "few_seeds": "" if len(seeds(params)) > 2 else " **Fewer than 3 seeds: the spread is barely measured.**",
        "exp": dvc_exp_name(), "changed": _changed_line(params), "commit": git_commit()[:7] or "unknown",
        "params_hash": params_hash(params, "report", root), "embedding": params.embedding,
        "embedding_note": ("trained in Phase 1 by the fixed-point objective together with the ContextBlock, then "
                           "frozen, so it never receives a next-token gradient (the baselines train theirs end to end)."
                           if params.embedding == "learned" else "GPT-2's pretrained matrix, frozen throughout."),
        "eval_row": len(cache.val) // params.eval_batch_size,
        "reference": REFERENCE.display if REFERENCE is not None else "reference model",
        "window": seq, "stride": seq // 2, "window_context": seq - 1,
        "ratio_lines": [f"New-LLM / {display(s)}: mean test loss ratio {rel[f'test_loss_ratio_vs_{s}']:.3f}, mean test "
                        f"PPL ratio {rel[f'test_ppl_ratio_vs_{s}']:.3f} (below 1: New-LLM is better); "
                        f"{_gap(per_seed, NEWLLM, s)}." for s in records if f"test_ppl_ratio_vs_{s}" in rel],
        "phase1_s": p1["wall_time_s"], "cache_s": new.get("context_cache_s", 0.0), "phase2_s": new["train_wall_time_s"],
        "new_ppl": new["test_ppl"], "band": band,
        "p1_iterations": p1["iterations_run"], "p1_train_er": p1["train_er_pct"], "p1_val_er": p1["val_er_pct"],
        "p1_convergence": 100 * p1["convergence_rate"], "p1_cosine": p1["sequential_cosine"],
        "p1_cosines": ", ".join(f"{read_metrics(root, declared[phase1_record(s)])['sequential_cosine']:.4f}"
                                for s in seeds(params)),
        "context_window": params.report.context_window, "max_new_tokens": params.report.max_new_tokens, "top_k": params.report.top_k,
    }
    doc = Document("New-LLM comparison report")
    doc.fill(TEMPLATE.read_text(encoding="utf-8"), values, blocks)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(doc.markdown(out_dir), encoding="utf-8")
    (out_dir / "report.html").write_text(doc.html(), encoding="utf-8")

    longest = max(params.report.memory_lengths)
    mem = {re.sub(r"[^a-z0-9]+", "_", f"{r['model']} {r.get('method', '')} peak bytes at {longest}".lower()):
           r["peak_bytes"] for r in rows if r["length"] == longest and isinstance(r.get("peak_bytes"), (int, float))}
    r4 = lambda v: None if v is None else round(v, 4)  # noqa: E731
    result = {"newllm_test_ppl": r4(new["test_ppl"]), "newllm_test_ppl_std": r4(new["test_ppl_std"]),
              "newllm_test_loss": round(new["test_loss"], 6), "seeds": len(new["seeds"]),
              **{f"{s}_test_ppl": r4(summary[s]["test_ppl"]) for s in records[1:]},
              **{f"{s}_test_ppl_std": r4(summary[s]["test_ppl_std"]) for s in records[1:]},
              **{f"{s}_lr": summary[s]["lr"] for s in records},
              **{f"{metric_key(s)}_params_total": summary[s]["params_total"] for s in records},
              **{k: round(v, 4) for k, v in rel.items()}, "decision_band": band, **mem, "context_use": use,
              "truncation": cut, **{f"{k}_effective_context": d for k, d in effective.items()},
              "fixed_point_steps_mean": fp["convergence"].get("steps_mean"),
              "single_vs_iterated_cosine": fp["single_vs_iterated"].get("cosine")}
    return result
