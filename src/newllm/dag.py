"""dvc.yaml, read: the one statement of each stage's params, deps and outs.

Stages take their outs (removed on failure) and params (logged to MLflow, hashed into `params_hash`) from
here instead of restating them. A stage's *identity* also covers what its input files were made with:
the params of every stage upstream of it in the DAG (`upstream_params`), so two runs on different data
never look alike in MLflow. What our dvc.yaml uses is resolved as DVC does: `foreach` (a list or
`${<param>}`), `matrix` (axes of lists or `${<param>}`), and `${item}`, `${item.<axis>}`, `${key}`,
`${<param>}` and `${<param>[i]}` in the stage body.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from newllm.errors import PipelineError

DVC_YAML = "dvc.yaml"
METRICS_DIR = "reports/metrics/"  # a stage's record is its metrics file's path under here
TIMING_DIR = "reports/timing/"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the same documents, parsed ~10x faster
_PARSED: dict[tuple[str, int, int], Any] = {}


def read_yaml(path: Path) -> Any:
    """yaml.safe_load of a file, parsed once per process while it is unchanged (a stage start reads
    dvc.yaml for its outs, params, tags and resume key: five parses of 600 lines were 0.75 s)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _PARSED:
        _PARSED[key] = yaml.load(path.read_text(), Loader=_LOADER)
    return copy.deepcopy(_PARSED[key])


@dataclass(frozen=True)
class Stage:
    name: str  # DVC's: "tokenize", "baseline_sweep@lstm-0.001"
    record: str  # its metrics file under reports/metrics/ and MLflow `dvc.stage` tag: "tokenize", "lstm/lr0.001"
    cmd: str
    params: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]  # cached outputs (removed when the stage fails)
    records: tuple[str, ...]  # its metrics and plots files (git-tracked, written only on success)
    cell: tuple[tuple[str, Any], ...] = ()  # a matrix cell's values but `model`: (("lr", 0.001),)

    @property
    def metrics_file(self) -> Path | None:
        """Where its final metrics go (the one .json among `records`)."""
        return next((Path(p) for p in self.records if p.endswith(".json")), None)

    @property
    def timing_file(self) -> Path | None:
        """Where its wall times and tokens/s go (an out under reports/timing/): kept out of the metrics
        file, where they would make every `dvc exp show` / `dvc metrics diff` row differ."""
        return next((Path(p) for p in self.outs if p.startswith(TIMING_DIR)), None)

    @property
    def checkpoint(self) -> Path:
        """Its model checkpoint: the one `.pt` among its outs (what the stage writes, what others load)."""
        found = [Path(p) for p in self.outs if p.endswith(".pt")]
        if len(found) != 1:
            raise PipelineError(f"{DVC_YAML}: stage {self.name} declares {len(found)} checkpoints (.pt outs), not one")
        return found[0]

    def dep(self, under: str) -> Path:
        """Its one dependency at or under `under` (a path prefix, e.g. "data/budget/"), as dvc.yaml lists it."""
        found = [Path(d) for d in self.deps if d == under or d.startswith(under)]
        if len(found) != 1:
            raise PipelineError(f"{DVC_YAML}: stage {self.name} has {len(found)} deps under {under}, not one")
        return found[0]

    @property
    def plots_file(self) -> Path | None:
        """Where its per-step curve goes (the one .csv among `records`)."""
        return next((Path(p) for p in self.records if p.endswith(".csv")), None)


def _paths(entries: list[Any]) -> tuple[str, ...]:
    """dvc.yaml lists a path as a string or as a one-key mapping {path: options}."""
    return tuple(e if isinstance(e, str) else next(iter(e)) for e in entries or [])


_REF = re.compile(r"\$\{([\w.\[\]]+)\}")


def _lookup(ref: str, context: dict[str, Any], where: str) -> Any:
    """`a.b[0]` in `context` (params, `item`, `key`), as DVC's interpolation reads it."""
    value: Any = context
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", ref):
        try:
            value = value[int(part[1:-1])] if part.startswith("[") else value[part]
        except (KeyError, IndexError, TypeError):
            raise PipelineError(f"{where}: ${{{ref}}} does not resolve") from None
    return value


def _substitute(node: Any, context: dict[str, Any], where: str) -> Any:
    if isinstance(node, str):
        full = _REF.fullmatch(node)
        if full:
            return _lookup(full.group(1), context, where)
        return _REF.sub(lambda m: str(_lookup(m.group(1), context, where)), node)
    if isinstance(node, list):
        return [_substitute(n, context, where) for n in node]
    if isinstance(node, dict):
        return {_substitute(k, context, where): _substitute(v, context, where) for k, v in node.items()}
    return node


def _stage(name: str, body: dict[str, Any], where: Path, cell: dict[str, Any]) -> Stage:
    records = _paths(body.get("metrics")) + _paths(body.get("plots"))
    metrics = next((p for p in records if p.endswith(".json")), None)
    if metrics is not None and not metrics.startswith(METRICS_DIR):
        raise PipelineError(f"{where}: stage {name}'s metrics file {metrics} is not under {METRICS_DIR}")
    record = name if metrics is None else metrics[len(METRICS_DIR):-len(".json")]  # `validate` has none
    return Stage(name, record, body.get("cmd", ""), _paths(body.get("params")), _paths(body.get("deps")),
                 _paths(body.get("outs")), records, tuple((k, v) for k, v in cell.items() if k != "model"))


def _cells(name: str, body: dict[str, Any], params: dict[str, Any], where: Path) -> list[tuple[str, dict]]:
    """(DVC's stage name, interpolation context) of each generated stage: `foreach` gives `name@item`,
    `matrix` `name@v1-v2` (DVC's naming); a plain stage is one cell."""
    resolve = lambda v: _substitute(v, params, f"{where}: stage {name}")  # noqa: E731
    if "foreach" in body:
        return [(f"{name}@{item}", {"item": item, "key": str(item)}) for item in resolve(body["foreach"])]
    if "matrix" in body:
        axes = {k: resolve(v) for k, v in body["matrix"].items()}
        cells = []
        for values in itertools.product(*axes.values()):
            key = "-".join(map(str, values))
            cells.append((f"{name}@{key}", {"item": dict(zip(axes, values, strict=True)), "key": key}))
        return cells
    return [(name, {})]


def load_stages(params: dict[str, Any], root: Path = Path(".")) -> dict[str, Stage]:
    """Every stage of root/dvc.yaml, keyed by record (its metrics file under reports/metrics/, without
    .json: "tokenize", "sweep/lstm/lr0.001"); `params` (validated, as a mapping) resolves `${...}`."""
    path = Path(root) / DVC_YAML
    if not path.is_file():
        raise PipelineError(f"{path} not found: run stages from the project root (as `dvc repro` does)")
    stages: dict[str, Stage] = {}
    for name, body in (read_yaml(path) or {}).get("stages", {}).items():
        template = body.get("do", body)
        for cell, context in _cells(name, body, params, path):
            item = context.get("item")
            stage = _stage(cell, _substitute(template, {**params, **context}, f"{path}: stage {cell}"), path,
                           item if isinstance(item, dict) else {})
            stages[stage.record] = stage
    return stages


def produces(out: str, dep: str) -> bool:
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
            if any(produces(out, dep) for out in other.outs + other.records for dep in stage.deps):
                seen.add(other.record)
                keys.extend(k for k in other.params if k not in keys)
                visit(other)

    visit(stages[record])
    return tuple(keys)
