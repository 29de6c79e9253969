"""dvc.yaml, read: the one statement of each stage's params, deps and outs.

Stages take their outs (removed on failure) and params (logged to MLflow, hashed into `params_hash`) from
here instead of restating them. A stage's *identity* also covers what its input files were made with:
the params of every stage upstream of it in the DAG (`upstream_params`), so two runs on different data
never look alike in MLflow. Only what our dvc.yaml uses is resolved: `foreach` over a literal list or
over `${<param>}`, and `${item}` inside its `do:`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from newllm.errors import PipelineError

DVC_YAML = "dvc.yaml"


@dataclass(frozen=True)
class Stage:
    name: str  # DVC's: "tokenize", "baseline@lstm"
    record: str  # its metrics/plots file and MLflow `dvc.stage` tag: "tokenize", "lstm"
    cmd: str
    params: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]  # cached outputs (removed when the stage fails)
    records: tuple[str, ...]  # its metrics and plots files (git-tracked, written only on success)

    @property
    def metrics_file(self) -> Path | None:
        """Where its final metrics go (the one .json among `records`)."""
        return next((Path(p) for p in self.records if p.endswith(".json")), None)

    @property
    def plots_file(self) -> Path | None:
        """Where its per-step curve goes (the one .csv among `records`)."""
        return next((Path(p) for p in self.records if p.endswith(".csv")), None)


def _paths(entries: list[Any]) -> tuple[str, ...]:
    """dvc.yaml lists a path as a string or as a one-key mapping {path: options}."""
    return tuple(e if isinstance(e, str) else next(iter(e)) for e in entries or [])


def _substitute(node: Any, item: str) -> Any:
    if isinstance(node, str):
        return node.replace("${item}", item)
    if isinstance(node, list):
        return [_substitute(n, item) for n in node]
    if isinstance(node, dict):
        return {_substitute(k, item): _substitute(v, item) for k, v in node.items()}
    return node


def _stage(name: str, record: str, body: dict[str, Any]) -> Stage:
    return Stage(name, record, body.get("cmd", ""), _paths(body.get("params")), _paths(body.get("deps")), _paths(body.get("outs")),
                 _paths(body.get("metrics")) + _paths(body.get("plots")))


def load_stages(params: dict[str, Any], root: Path = Path(".")) -> dict[str, Stage]:
    """Every stage of root/dvc.yaml, keyed by record; `params` (the raw params.yaml mapping) resolves
    `foreach: ${key}`."""
    path = Path(root) / DVC_YAML
    if not path.is_file():
        raise PipelineError(f"{path} not found: run stages from the project root (as `dvc repro` does)")
    stages: dict[str, Stage] = {}
    for name, body in (yaml.safe_load(path.read_text()) or {}).get("stages", {}).items():
        if "foreach" not in body:
            stages[name] = _stage(name, name, body)
            continue
        items = body["foreach"]
        if isinstance(items, str):
            ref = re.fullmatch(r"\$\{([\w.]+)\}", items)
            if ref is None:
                raise PipelineError(f"{path}: stage {name}: foreach {items!r} is not a list or ${{param}}")
            items = params
            for key in ref.group(1).split("."):
                items = items[key]
        for item in items:
            stages[str(item)] = _stage(f"{name}@{item}", str(item), _substitute(body["do"], str(item)))
    return stages


def _produces(out: str, dep: str) -> bool:
    """Whether writing `out` can change `dep` (the same path, or one inside the other)."""
    return out == dep or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep.rstrip("/") + "/")


def upstream_params(stages: dict[str, Stage], record: str) -> tuple[str, ...]:
    """The params of every stage whose outputs `record` depends on, directly or through others."""
    seen: set[str] = set()
    keys: list[str] = []

    def visit(stage: Stage) -> None:
        for other in stages.values():
            if other.record in seen or other.record == stage.record:
                continue
            if any(_produces(out, dep) for out in other.outs + other.records for dep in stage.deps):
                seen.add(other.record)
                keys.extend(k for k in other.params if k not in keys)
                visit(other)

    visit(stages[record])
    return tuple(keys)
