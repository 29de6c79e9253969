"""A study: one DVC experiment per cell of a grid (e.g. context_dim 128 ... 1024), all on the same data and
protocol, then one report over them (newllm.report.study).

Why queued DVC experiments and not `matrix:` stages: a cell is the whole protocol (each model's lr sweep,
seeds, the matched baselines re-sized to the cell's New-LLM, the controls), which the pipeline already is;
a matrix would have to duplicate every stage per size in dvc.yaml, and `dvc repro` would then run the study
on every repro. Each cell runs as `dvc exp run --temp -n <study>-<profile>-<cell>` (the workspace is left as
it is) and its MLflow runs carry the tag `newllm.study` (`tracking.study`, not a stage dependency). A
rerun cell restores from DVC's run-cache every stage whose inputs did not change (tests/test_study.py).

The definition (studies/*.yaml):

    name: wikitext2
    cells:     {d128: {context_dim: 128}, ...}       # one experiment each: params.yaml keys, dotted
    set:       {dataset.source: wikitext2, ...}      # every cell
    profiles:  {cpu: {train.max_tokens: 50000, ...}, gpu: {...}}   # the size of the study
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from newllm.errors import PipelineError


@dataclass
class Study:
    name: str
    cells: dict[str, dict[str, Any]]
    set: dict[str, Any]
    profiles: dict[str, dict[str, Any]]
    path: Path

    def label(self, profile: str) -> str:
        return f"{self.name}-{profile}"

    def experiment(self, profile: str, cell: str) -> str:
        return f"{self.label(profile)}-{cell}"

    def overrides(self, profile: str, cell: str) -> dict[str, Any]:
        """Every params.yaml key the cell sets (dotted), in the order set < profile < cell."""
        if profile not in self.profiles:
            raise PipelineError(f"{self.path}: no profile {profile!r} (has: {', '.join(self.profiles)})")
        return {**self.set, **self.profiles[profile], **self.cells[cell], "tracking.study": self.label(profile)}


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"study file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"name", "cells", "set", "profiles"}
    if unknown:
        raise PipelineError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (name, cells, set, profiles)")
    for key in ("name", "cells", "profiles"):
        if not raw.get(key):
            raise PipelineError(f"{path}: `{key}` is missing or empty")
    return Study(str(raw["name"]), {str(k): dict(v or {}) for k, v in raw["cells"].items()},
                 dict(raw.get("set") or {}), {str(k): dict(v or {}) for k, v in raw["profiles"].items()}, path)


def params_of(study: Study, profile: str, cell: str, base: Path = Path("params.yaml")) -> Any:
    """The validated params a cell runs with (params.yaml with its overrides): a bad key fails here, before
    any experiment starts."""
    from newllm.config import ConfigError, parse_params

    raw = yaml.safe_load(base.read_text())
    for dotted, value in study.overrides(profile, cell).items():
        keys = dotted.split(".")
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise PipelineError(f"{study.path}: {dotted}: params.yaml has no section {k!r}")
            node = node[k]
        if keys[-1] not in node:
            raise PipelineError(f"{study.path}: {dotted}: params.yaml has no key {keys[-1]!r} there")
        node[keys[-1]] = value
    try:
        return parse_params(raw)
    except ConfigError as e:
        raise PipelineError(f"{study.path} ({cell}, {profile}): {e}") from None


def set_args(overrides: dict[str, Any]) -> list[str]:
    """-S key=value for `dvc exp run`. DVC parses the value with Hydra's override grammar: numbers, null and
    lists as YAML writes them; a string quoted, so a path with `,` `=` `[` or a quote stays one string."""
    out = []
    for key, value in overrides.items():
        if isinstance(value, str):
            text = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
        out += ["-S", f"{key}={text}"]
    return out


def run_study(study: Study, profile: str, cells: list[str] | None = None) -> None:
    """Every cell as `dvc exp run --temp -n <name>`, one after another, its output streamed; a cell that
    fails stops the study. A cell already run from this commit is removed first and run again: DVC then
    restores the stages it finds in its run-cache (`-f` would force every stage to run)."""
    chosen = cells or list(study.cells)
    for cell in chosen:
        if cell not in study.cells:
            raise PipelineError(f"{study.path}: no cell {cell!r} (has: {', '.join(study.cells)})")
        params_of(study, profile, cell)  # every cell's params checked before the first runs
    t_start = time.monotonic()
    for i, cell in enumerate(chosen, start=1):
        name = study.experiment(profile, cell)
        if name in experiment_refs(head_only=True):  # DVC refuses a name taken at this commit
            subprocess.run(["dvc", "exp", "remove", name], check=True, capture_output=True)
        cmd = ["dvc", "exp", "run", "--temp", "-n", name, *set_args(study.overrides(profile, cell))]
        elapsed = time.monotonic() - t_start
        eta = f", about {elapsed / (i - 1) * (len(chosen) - i + 1) / 60:.0f} min left" if i > 1 else ""
        print(f"study {study.label(profile)}: cell {i}/{len(chosen)} {name} ({elapsed / 60:.1f} min so far{eta})",
              flush=True)
        print("  " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise PipelineError(f"study {study.label(profile)}: {name} failed (its finished stages are cached: "
                                f"rerun the same command to go on)")
    print(f"study {study.label(profile)}: {len(chosen)} cell(s) done in {(time.monotonic() - t_start) / 60:.1f} min; "
          f"`newllm study report {study.path} --profile {profile}` writes its report", flush=True)


def experiment_refs(head_only: bool = False) -> dict[str, str]:
    """{experiment name: git ref} of the DVC experiments in this repo (refs/exps/<sha[:2]>/<sha[2:]>/<name>,
    one per baseline commit a name was run from): the most recent run of each name, or, with head_only,
    those run from HEAD."""
    prefix = "refs/exps"
    if head_only:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        prefix = f"refs/exps/{head[:2]}/{head[2:]}"
    out = subprocess.run(["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname)", prefix],
                         capture_output=True, text=True, check=True).stdout.split()
    refs: dict[str, str] = {}
    for ref in out:
        if ref.count("/") >= 4:
            refs.setdefault(ref.rsplit("/", 1)[-1], ref)  # newest first: keep the first
    return refs


def read_json(ref: str, path: str) -> dict[str, Any] | None:
    import json

    res = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 else None


def collect(study: Study, profile: str) -> dict[str, dict[str, Any]]:
    """{cell: {"params": its overrides, "report": its reports/metrics/report.json}} of the cells run so far."""
    refs = experiment_refs()
    out = {}
    for cell in study.cells:
        ref = refs.get(study.experiment(profile, cell))
        report = read_json(ref, "reports/metrics/report.json") if ref else None
        if report is not None:
            out[cell] = {"params": study.overrides(profile, cell), "report": report}
    if not out:
        raise PipelineError(f"no experiment of study {study.label(profile)} found (run "
                            f"`newllm study run {study.path} --profile {profile}` first)")
    return out
