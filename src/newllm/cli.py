"""`newllm` command line: validate params, the MLflow store (init, sync, UI), compare ablations, generate."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from newllm.pipeline import load_params_or_exit
from newllm.registry import MODELS


def _init_store(args: argparse.Namespace) -> int:
    from newllm import tracking

    params = load_params_or_exit(args.params)
    _, exp_id = tracking.init_store(params)
    print(f"MLflow store {tracking.tracking_uri(params)}: experiment {params.tracking.experiment!r} (id {exp_id})")
    return 0


def _sync(args: argparse.Namespace) -> int:
    from newllm import tracking

    params = load_params_or_exit(args.params)
    created = tracking.sync(params)
    print(f"synced {len(created)} run(s) into {tracking.tracking_uri(params)}: {', '.join(created) or 'none missing'}")
    return 0


def _check_port_free(port: int) -> None:
    """Fail in one line when 127.0.0.1:port is taken: MLflow would print a URL that serves another store."""
    import socket

    from newllm.errors import PipelineError

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise PipelineError(f"port {port} on 127.0.0.1 is already in use (another MLflow UI?): choose "
                                f"another, `newllm ui --port {port + 1}` or `make ui PORT={port + 1}`") from None


def curves_stage(params) -> str:
    """The run `make ui`'s curves link overlays across experiments: New-LLM on its first replicate seed (at
    the lr its experiment picked), else its sweep cell on the first lr."""
    from newllm import protocol

    reps = params.protocol.replicates
    return (protocol.seed_record("phase2_train", reps[0]) if reps else
            protocol.sweep_record("phase2_train", params.protocol.lrs[0]))


def _ui(args: argparse.Namespace) -> int:
    from newllm import tracking

    params = load_params_or_exit(args.params)
    _check_port_free(args.port)
    client, exp_id = tracking.init_store(params)
    uri = tracking.tracking_uri(params)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port)]
    stage = curves_stage(params)
    answer = tracking.has_answer_view(client, exp_id)
    links = tracking.ui_links(f"http://127.0.0.1:{args.port}", exp_id, stage, answer)
    print(f"MLflow UI over {uri}; Ctrl-C to stop\n  runs:   {links['runs']}\n"
          + ("          (one row per experiment, best New-LLM test PPL first)\n" if answer else "")
          + f"  curves: {links['curves']}\n          ({stage} of every experiment, best val loss first)",
          flush=True)
    # No background job workers: the UI alone is what a laptop needs (MLflow 3 starts several otherwise).
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.call(cmd, env=env)


def _screenshots(args: argparse.Namespace) -> int:
    """README's pictures from this project's own store and report: the pages `make ui` prints, served by a
    real `mlflow server` on a free loopback port, and the top of reports/report.html."""
    import contextlib
    import tempfile

    from newllm import tracking
    from newllm.report.browser import check_mlflow_pages, mlflow_pages, render_page

    params = load_params_or_exit(args.params)
    client, exp_id = tracking.init_store(params)
    uri, out = tracking.tracking_uri(params), Path(args.out)
    with contextlib.ExitStack() as stack:
        if uri.startswith(("http://", "https://")):  # a tracking server already serves the UI
            base = uri
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="newllm-ui-")))
            base = stack.enter_context(tracking.local_server(uri, work))
        doms = mlflow_pages(tracking.ui_links(base, exp_id, curves_stage(params),
                                              tracking.has_answer_view(client, exp_id)), out)
    metric, legend = check_mlflow_pages(doms)  # the pages are what README says, or a one-line error
    print(f"curves page: first chart {metric}, one line per run: {'; '.join(legend)}")
    if Path("reports/report.html").is_file():
        render_page(Path("reports/report.html"), screenshot=out / "report.png", budget_ms=3000, window=(1200, 1400))
    print(f"wrote {', '.join(sorted(p.name for p in out.glob('*.png')))} to {out}/")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from newllm.report import ablations

    params = load_params_or_exit(args.params)
    groups, md, figure = ablations.compare(params, Path(args.out), every_model=args.every_model)
    print(ablations.markdown_table(groups), end="")
    print(f"wrote {md} and {figure}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from newllm.data.token_cache import load_cache
    from newllm.errors import PipelineError
    from newllm.generation import decode_stream, encode_prompt, stream_tokens
    from newllm.models.factory import load_model
    from newllm.protocol import checkpoint

    params = load_params_or_exit(args.params)
    rep = params.report  # unset flags fall back to the report's generation settings
    cache = load_cache()
    tok, eos = cache.tokenizer(), int(cache.meta["eos_id"])
    path = checkpoint(params, args.model)
    print(f"{args.model}: {path} (seed {params.seed}, the lr chosen on val; {_workspace_params(params)})", file=sys.stderr)
    model = load_model(args.model, cache.vocab_size, path)
    prompt = rep.prompts[0] if args.prompt is None else args.prompt
    ids = encode_prompt(tok, prompt, eos)
    unk = cache.meta.get("unk_id")
    if unk is not None and unk in ids:
        print(f"warning: {ids.count(unk)} prompt token(s) not in the vocabulary (read as <unk>)", file=sys.stderr)
    top_k = rep.top_k if args.top_k is None else (args.top_k or None)  # --top-k 0: no top-k
    try:
        tokens = stream_tokens(model, ids, rep.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
                               rep.temperature if args.temperature is None else args.temperature, top_k,
                               params.seed if args.seed is None else args.seed, args.greedy)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    print(prompt, end="", flush=True)
    for piece in decode_stream(tok, tokens, prompt_ids=ids, eos_id=eos):
        print(piece, end="", flush=True)  # each piece as soon as it is sampled
    print()
    return 0


def _workspace_params(params) -> str:
    """Which params the workspace's checkpoints were trained under, against the commit (after `dvc exp run`
    the workspace holds the last experiment; `dvc exp apply <name>` brings another)."""
    from newllm import tracking

    rev, changed = tracking.changed_vs_baseline(params)
    if changed is None:
        return "no committed params.yaml to compare with"
    return (f"params as committed at {rev[:7]}" if not changed else
            f"params changed against commit {rev[:7]}: {tracking.ablation_label(changed)}")


PLOTS_TEMPLATE = Path(".dvc") / "plots_offline.html"  # .dvc/config: [plots] html_template = plots_offline.html


def _plots_template(args: argparse.Namespace) -> int:
    """Write the HTML template `dvc plots show/diff` use (.dvc/config points at it): DVC's own page loads
    Vega, Vega-Lite and vega-embed from a CDN and renders blank offline; this one inlines them, bundled by
    vl-convert from their published packages."""
    import vl_convert

    from newllm.errors import PipelineError

    if not PLOTS_TEMPLATE.parent.is_dir():
        raise PipelineError("no .dvc folder here: run `newllm plots-template` from the project root")
    bundle = vl_convert.javascript_bundle().replace("</script", "<\\/script")  # the HTML parser must not end it
    page = ("<!DOCTYPE html>\n<html>\n<head>\n{refresh_tag}\n<meta charset=\"utf-8\">\n<title>DVC plots</title>\n"
            f"<script>\n{bundle}\n</script>\n<style>table {{ border-spacing: 15px; }}</style>\n</head>\n"
            "<body>\n{plot_divs}\n</body>\n</html>\n")
    tmp = PLOTS_TEMPLATE.with_name(f".{PLOTS_TEMPLATE.name}.tmp")
    tmp.write_text(page)
    tmp.replace(PLOTS_TEMPLATE)
    print(f"wrote {PLOTS_TEMPLATE} (Vega {vl_convert.get_vega_version()}, vega-embed "
          f"{vl_convert.get_vega_embed_version()}, inlined: `dvc plots diff` renders offline)")
    return 0


def _study(args: argparse.Namespace) -> int:
    from newllm import study
    from newllm.errors import PipelineError

    s = study.load_study(args.file)
    if getattr(args, "data", None):
        data = Path(args.data).resolve()
        if not all((data / f).is_file() for f in ("train.txt", "valid.txt", "test.txt")):
            raise PipelineError(f"--data {data}: want WikiText-2's raw files train.txt, valid.txt, test.txt there")
        s.set["dataset.wikitext_dir"] = str(data)
    if args.action == "run":
        study.run_study(s, args.profile, args.cells.split(",") if args.cells else None)
        return 0
    from newllm.report.study import build_study_report

    out = Path(args.out) / s.label(args.profile)
    summary = build_study_report(s.label(args.profile), study.collect(s, args.profile), out)
    print(f"study report of {len(summary['cells'])} cell(s): {out / 'study.html'} and {out / 'study.md'}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    load_params_or_exit(args.params)
    print(f"{args.params}: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="newllm", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("validate", help="check params.yaml and exit").set_defaults(fn=_validate)
    sub.add_parser("init-store", help="create the MLflow store and experiment").set_defaults(fn=_init_store)
    sub.add_parser("sync", help="replay reports/metrics + reports/plots into MLflow (idempotent)").set_defaults(fn=_sync)
    ui = sub.add_parser("ui", help="MLflow UI on 127.0.0.1 over the project's store")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(fn=_ui)
    shots = sub.add_parser("screenshots", help="README's pictures: the MLflow pages `make ui` prints, and the report")
    shots.add_argument("--out", default="reports/screenshots")
    shots.set_defaults(fn=_screenshots)
    sub.add_parser("plots-template", help="write the offline HTML template of `dvc plots show/diff`"
                   ).set_defaults(fn=_plots_template)
    compare = sub.add_parser("compare", help="ablation table + figure over the MLflow runs of the training stages")
    compare.add_argument("--out", default="reports", help="output folder: <out>/ablations.md, <out>/figures/ablations.png")
    compare.add_argument("--every-model", action="store_true",
                         help="one figure panel per model (default: New-LLM's alone; the table lists every model)")
    compare.set_defaults(fn=_compare)
    gen = sub.add_parser("generate", help="stream text from a trained model (unset flags: params report.*)")
    gen.add_argument("--model", choices=list(MODELS), default="newllm")
    gen.add_argument("--prompt", help="text to continue (default: the first of report.prompts)")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (0: all)")
    gen.add_argument("--seed", type=int, help="sampling seed (default: params seed)")
    gen.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    gen.set_defaults(fn=_generate)
    st = sub.add_parser("study", help="run a study (one DVC experiment per cell) or write its report")
    st.add_argument("action", choices=["run", "report"])
    st.add_argument("file", help="the study definition, e.g. studies/wikitext2.yaml")
    st.add_argument("--profile", required=True, help="the study's size: one of its profiles (cpu, gpu, ...)")
    st.add_argument("--data", help="run: the WikiText-2 folder (sets dataset.wikitext_dir)")
    st.add_argument("--cells", help="run: only these cells, comma-separated (default: all)")
    st.add_argument("--out", default="reports/study", help="report: output folder (default: reports/study)")
    st.set_defaults(fn=_study)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except Exception as e:
        from newllm.errors import PipelineError

        if isinstance(e, PipelineError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
