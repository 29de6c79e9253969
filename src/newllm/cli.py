"""`newllm` command line: tracking-store chores and (later) compare / generate."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from newllm.config import STAGE_PARAMS
from newllm.pipeline import load_params_or_exit


def _init_store(args: argparse.Namespace) -> int:
    from newllm import tracking

    params = load_params_or_exit(args.params)
    _, exp_id = tracking.init_store(params)
    print(f"MLflow store {tracking.tracking_uri(params)}: experiment {params.tracking.experiment!r} (id {exp_id})")
    return 0


def _sync(args: argparse.Namespace) -> int:
    from newllm import tracking

    params = load_params_or_exit(args.params)
    created = tracking.sync(params, list(STAGE_PARAMS))
    print(f"synced {len(created)} run(s) into {tracking.tracking_uri(params)}: {', '.join(created) or 'none missing'}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from newllm import tracking

    params = load_params_or_exit(args.params)
    tracking.init_store(params)
    uri = tracking.tracking_uri(params)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port)]
    print(f"MLflow UI on http://127.0.0.1:{args.port} (store {uri}); Ctrl-C to stop", flush=True)
    return subprocess.call(cmd, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


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
