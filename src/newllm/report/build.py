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

FIGURES = ("val_loss_curves.png", "phase1.png", "memory_vs_length.png", "lr_sweep.png", "context_use.png")



def loss_curves_figure(root: Path, declared: dict, cells: dict[str, str]):
    """Val loss per epoch of every model (`cells`: model record -> the run drawn) on one figure (train
    dashed, same colour)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (stage, cell) in enumerate(cells.items()):
        curve = read_curve(root, declared[cell])
        if not curve:
            continue
        colour = f"C{i}"
        epochs = [row["step"] for row in curve]
        ax.plot(epochs, [row["val_loss"] for row in curve], "-o", color=colour, label=f"{display(stage)} val")
        ax.plot(epochs, [row["train_loss"] for row in curve], "--", color=colour, alpha=0.7,
                label=f"{display(stage)} train")
    ax.set(xlabel="epoch", ylabel="cross-entropy (nats/token)", title="Loss per epoch (val solid, train dashed)")
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    return fig


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
    for control in CONTROLS:
        record = MODELS[control].record
        c = summary[record]
        gap = c["test_loss"] - new["test_loss"]
        parts.append(f"{MODELS[control].display}: mean test loss {c['test_loss']:.4f} vs New-LLM's "
                     f"{new['test_loss']:.4f}, {abs(gap):.4f} nats/token in "
                     f"{'New-LLM' if gap > 0 else 'the control'}'s favour; {_gap(per_seed, record, NEWLLM)}.")
    return " ".join(parts)


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


def _samples(params: Params, models: dict[str, Any], tokenizer, eos_id: int) -> list[list[str]]:
    from newllm.generation import decode_stream, encode_prompt, stream_tokens

    cfg = params.report
    rows = []
    for prompt in cfg.prompts:
        prompt_ids = encode_prompt(tokenizer, prompt, eos_id)
        for name, model in models.items():
            for mode, kwargs in (("greedy", {"greedy": True}),
                                 (f"top-{cfg.top_k}", {"top_k": cfg.top_k, "temperature": cfg.temperature})):
                ids = stream_tokens(model, prompt_ids, cfg.max_new_tokens, seed=params.seed, **kwargs)
                pieces = decode_stream(tokenizer, ids, prompt_ids=prompt_ids, eos_id=eos_id)
                text = "".join(pieces).replace("\n", " ⏎ ")  # end of a line, shown inline
                rows.append([prompt, name, mode, text.strip()])
    return rows


def _key(record: str) -> str:
    """A model's prefix in the report's metrics: `newllm` for New-LLM's Phase 2 record, else its record."""
    return "newllm" if record == NEWLLM else record


def context_use(loaded: dict[str, Any], cache: Any, window: int) -> dict[str, dict[str, float]]:
    """{model key: {p: mean test loss of the predictions that have seen p .. 2p - 1 tokens}}, p = 1, 2, 4, ..."""
    import torch

    from newllm.training.position_loss import log_bins, position_losses

    test = torch.from_numpy(cache.test.astype("int64"))
    if test.numel() < window + 2:
        raise PipelineError(f"params.yaml: report.context_window ({window}) needs more than {window + 1} test "
                            f"tokens; the test split has {test.numel():,}")
    out = {}
    for s, model in loaded.items():  # a stateful model takes the whole window at once; the Transformer its n_positions
        curve, _ = position_losses(model, test, window, max_context=getattr(model, "seq_len", window))
        out[_key(s)] = {str(p): round(v, 5) for p, v in log_bins(curve).items()}
    return out


def build_report(params: Params, root: Path, out_dir: Path) -> dict[str, Any]:
    """Write report.md, report.html and figures under out_dir; return the report's metrics."""
    import torch

    from newllm.data.token_cache import load_cache
    from newllm.models.factory import load_model
    from newllm.report.fixed_point import fixed_point_analysis, fixed_point_rows
    from newllm.report.probes import memory_figure, memory_vs_length

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

    doc = Document("New-LLM comparison report")
    doc.text(answer(summary, per_seed, rel))
    doc.heading("Protocol")
    missing = [lr for lr in FULL_LRS if lr not in params.protocol.lrs]
    doc.bullets(([f"**A smaller lr sweep than the full protocol's**: {len(params.protocol.lrs)} values instead of "
                  f"{len(FULL_LRS)} (missing {', '.join(f'{lr:g}' for lr in missing)}), so that the default run "
                  f"fits in 10 minutes on 2 CPU cores. The full protocol: `{full_sweep_command()}`."]
                 if missing else []) + [
        f"Dataset: `{params.dataset.source}` ({data['train_lines']:,} train / {data['val_lines']:,} val / "
        f"{data['test_lines']:,} test lines); tokenizer `{params.tokenizer.kind}`, vocabulary {cache.vocab_size:,}; "
        f"{len(cache.train):,} train, {len(cache.val):,} val and {len(cache.test):,} test tokens, the same for "
        "every model.",
        "Val selects (early stopping, the best epoch, whose weights are kept, and the learning rate); **test is "
        f"the headline** of every table, ratio and sentence. Every model trains until {params.train.patience} epochs without a "
        f"val improvement, capped at {params.train.epochs} epochs; a model whose best epoch is its last is "
        "flagged undertrained, one that never beats its initial weights (epoch 0) is flagged as such. A "
        "non-finite loss stops its run as a failure: no diverged run is ever reported.",
        "Every baseline is sized to New-LLM's total parameter count (±10 %) by a width search."
        if params.protocol.match_params else "Baselines are NOT sized to New-LLM (protocol.match_params: false).",
        f"Learning rate: every model goes through the same sweep, {', '.join(f'{lr:g}' for lr in params.protocol.lrs)}, "
        f"on seed {params.seed}; its lowest val loss picks its lr (a pick at either end of the sweep is marked "
        "(edge): the optimum may lie outside it). The chosen lr is retrained on the other seeds.",
        f"Seeds: {', '.join(map(str, seeds(params)))} (initialisation and dropout; the same data and batches). "
        "Tables give mean ± sample standard deviation over them; a difference between two models counts as "
        "larger than the seed spread when it exceeds twice its standard error (with 3 seeds a rough guide, not "
        f"a significance test). Seed {params.seed}'s run is the cell the sweep selected, so its val loss is the "
        "lowest of its sweep: the val column leans low; test is never looked at by the selection."
        + ("" if len(seeds(params)) > 2 else " **Fewer than 3 seeds: the spread is barely measured.**"),
        f"DVC experiment `{dvc_exp_name()}`; " + _changed_line(params) + f" Git commit `{git_commit()[:7] or 'unknown'}`; "
        f"params hash `{params_hash(params, 'report', root)}` (the report's MLflow tag).",
        "Every model is evaluated by the same function on the same val and test tokens; losses are "
        "cross-entropy in nats per token, PPL = exp(loss), accuracy = top-1 next-token accuracy. Parameter "
        "counts include frozen parts (New-LLM's ContextBlock and embedding) and count tied matrices once.",
        f"New-LLM's input embedding is `{params.embedding}`: "
        + ("trained in Phase 1 by the fixed-point objective together with the ContextBlock, then frozen, so it "
           "never receives a next-token gradient (the baselines train theirs end to end)."
           if params.embedding == "learned" else "GPT-2's pretrained matrix, frozen throughout.")
        + f" Val/test contexts restart every {len(cache.val) // params.eval_batch_size:,} tokens, at the same "
        "row starts where the recurrent baselines' state restarts. The Transformer, which carries no state, "
        f"is scored (val and test, headline included) with a sliding {params.transformer.seq_len}-token window "
        f"of stride {params.transformer.seq_len // 2}: the same tokens, each seeing up to "
        f"{params.transformer.seq_len - 1} tokens of context instead of none at a window start.",
    ])

    doc.heading("Main table")
    doc.table(table)
    lines = []
    for stage in records:
        if f"test_ppl_ratio_vs_{stage}" in rel:
            lines.append(f"New-LLM / {display(stage)}: mean test loss ratio {rel[f'test_loss_ratio_vs_{stage}']:.3f}, "
                         f"mean test PPL ratio {rel[f'test_ppl_ratio_vs_{stage}']:.3f} (below 1: New-LLM is better); "
                         f"{_gap(per_seed, NEWLLM, stage)}.")
    lines.append(f"New-LLM's train wall time counts Phase 1 ({p1['wall_time_s']:.2f} s on seed {params.seed}), the "
                 f"context cache ({new.get('context_cache_s', 0.0):.2f} s) and Phase 2 "
                 f"({new['train_wall_time_s']:.2f} s); its tokens/s is Phase 2's, on cached contexts.")
    band = decision_band(new["test_ppl"])  # on the mean over seeds
    lines.append(f"The research's decision bands (docs/research.md §5: < 50 continue, 50–100 needs architecture work, > 100 "
                 f"rethink) put New-LLM's test perplexity {new['test_ppl']:.2f} {band}. They were set for "
                 "WikiText; on a small template corpus low perplexities are easy.")
    doc.bullets(lines)

    doc.heading("Learning-rate sweep")
    picked = read_metrics(root, declared["pick_lr"])
    sweep = {s: picked[s] for s in records}
    doc.figure(_save(lr_sweep({display(s): {float(lr): v for lr, v in c["val_loss_by_lr"].items() if v is not None}
                               for s, c in sweep.items()}), figs / FIGURES[3]),
               f"Best val loss against lr, seed {params.seed}; the ringed cell is each model's lr")
    lrs = sorted(next(iter(sweep.values()))["val_loss_by_lr"], key=float)
    doc.table(Table(["model", *(f"val loss at lr {float(lr):g}" for lr in lrs), "chosen"],
                    [[display(s), *(c["val_loss_by_lr"][lr] or "never improved" for lr in lrs),
                      f"{c['lr']:g}" + (" (edge)" if c["at_sweep_edge"] else "")] for s, c in sweep.items()]))

    doc.heading("Training curves")
    doc.figure(_save(loss_curves_figure(root, declared, on_seed), figs / FIGURES[0]),
               f"Val (solid) and train (dashed) loss per epoch, seed {params.seed}, each at its chosen lr")
    p1_curve = read_curve(root, declared[phase1_record(params.seed)])
    history = [{"iteration": int(r["step"]), **r} for r in p1_curve]
    doc.figure(_save(phase1_curves(history), figs / FIGURES[1]), "Phase 1: Effective Rank % and convergence % per iteration")
    doc.text(f"Phase 1 (seed {params.seed}) ran {p1['iterations_run']} iterations: train ER {p1['train_er_pct']:.1f} % of "
             f"context_dim, val ER {p1['val_er_pct']} %, convergence {100 * p1['convergence_rate']:.1f} %, mean "
             f"cosine between the parallel-trained contexts and an exact sequential recomputation "
             f"{p1['sequential_cosine']:.4f} (research: 0.9969); over the seeds "
             + ", ".join(f"{read_metrics(root, declared[phase1_record(s)])['sequential_cosine']:.4f}" for s in seeds(params))
             + ".")

    doc.heading("Memory and speed versus sequence length (streaming inference, measured)")
    probe_models = {display(s): model for s, model in loaded.items() if by_record(s).memory_probe}
    rows = memory_vs_length(probe_models, params.report.memory_lengths, cache.vocab_size)
    doc.figure(_save(memory_figure(rows), figs / FIGURES[2]), "Peak memory and ms/token against sequence length")
    cols = [c for c in ("model", "method", "length", "state_bytes", "peak_bytes", "ms_per_token", "ms_min", "ms_max",
                        "status") if c in rows[0]]
    doc.table(Table(cols, [[r.get(c, "") for c in cols] for r in rows]))
    doc.text("New-LLM keeps one context per layer whatever the length (O(1) state); the Transformer's KV cache "
             "grows linearly and full re-attention recomputes the whole prefix for every token. Rows past the "
             "Transformer's trained positions say so in `status`.")

    doc.heading("Context utilisation: how far back each model's predictions benefit")
    use = context_use(loaded, cache, params.report.context_window)
    doc.figure(_save(context_use_figure({display(s): use[_key(s)] for s in loaded}, "Test loss against the tokens seen"),
                     figs / FIGURES[4]), "Test loss of the prediction that has seen p tokens, per model (seed "
               f"{params.seed}), averaged over p .. 2p - 1; windows of {params.report.context_window} test tokens, each "
               "from an empty state")
    doc.text("Every window starts with no past (New-LLM and CVP from a zero context, the LSTM from a zero state), "
             "so the prediction at p has seen exactly p tokens, or at most the Transformer's trained "
             f"{params.transformer.seq_len} positions. Where a curve flattens, more past stops helping: for New-LLM "
             "the memory horizon of its fixed-size context.")

    doc.heading("Fixed-point analysis of the trained ContextBlock (docs/research.md §4)")
    fp = fixed_point_analysis(models[MODELS["newllm"].display], params.report.fixed_point_threshold,
                              params.report.fixed_point_max_steps, seed=params.seed)
    fp_rows = fixed_point_rows(fp)
    doc.table(Table(["quantity", "ours", "research"], [[r["quantity"], r["ours"], r["research"]] for r in fp_rows]))

    doc.heading("Samples")
    doc.text(f"Continuations of the same prompts, {params.report.max_new_tokens} new tokens, greedy and "
             f"top-{params.report.top_k} sampling (seed {params.seed}).")
    doc.table(Table(["prompt", "model", "decoding", "continuation"],
                    _samples(params, models, cache.tokenizer(), int(cache.meta["eos_id"]))))

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
              **{f"{_key(s)}_params_total": summary[s]["params_total"] for s in records},
              **{k: round(v, 4) for k, v in rel.items()}, "decision_band": band, **mem, "context_use": use,
              "fixed_point_steps_mean": fp["convergence"].get("steps_mean"),
              "single_vs_iterated_cosine": fp["single_vs_iterated"].get("cosine")}
    return result
