"""dvc.yaml's code deps are exactly the modules each stage's entry file imports (transitively), so a code
change reruns every stage it can affect and no other."""

import ast
from pathlib import Path

import pytest
from helpers import REPO, VENV_BIN, default_params, run, use_project_dvc_yaml, write_params

from newllm import dag
from newllm.config import load_params, stages
from newllm.registry import MODELS

SRC = REPO / "src"
# Imported by stages but unable to change a result (dvc.yaml's header says why); not deps. The training
# stages draw only MLflow copies of their curves with report/figures.py; the report draws its outputs with it.
# protocol.py names the cells (the harness's job) and holds the rule that picks an lr: a dep of pick_lr.
NOT_DEPS = {"newllm/pipeline.py", "newllm/warm.py", "newllm/progress.py", "newllm/records.py", "newllm/gitinfo.py", *(f"newllm/tracking/{m}.py" for m in ("__init__", "store", "naming", "runs", "sync", "ui")), "newllm/dag.py", "newllm/errors.py", "newllm/registry.py",
            "newllm/report/figures.py", "newllm/protocol.py",
            "newllm/training/resume.py"}  # saves and restores a trainer's state: a resume gives identical numbers
# the report also depends on the registry (display names), its figures, the protocol (which runs it reads) and
# gitinfo.py (its text says what the experiment changed against which commit)
EXTRA_DEPS = {"report": {"newllm/report/figures.py", "newllm/registry.py", "newllm/protocol.py", "newllm/gitinfo.py"},
              "pick_lr": {"newllm/protocol.py"}}


def _module_file(module: str) -> Path | None:
    p = SRC.joinpath(*module.split("."))
    for f in (p.with_suffix(".py"), p / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imports(path: Path) -> set[str]:
    """Every newllm module `path` imports, at any level (function-local imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("newllm")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("newllm"):
            out |= {f"{node.module}.{a.name}" if _module_file(f"{node.module}.{a.name}") else node.module
                    for a in node.names}
    return out


def _is_docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def import_closure(entry: Path, extra: tuple[str, ...] = ()) -> set[str]:
    """src-relative files (newllm/...) of every module `entry` (and the `extra` modules) imports, with
    their packages' __init__."""
    seen: set[Path] = {SRC / f for f in extra}
    todo = [entry, *seen]
    while todo:
        for module in _imports(todo.pop()):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                f = _module_file(".".join(parts[:i]))
                if f is not None and f not in seen:
                    seen.add(f)
                    todo.append(f)
    return {str(f.relative_to(SRC)) for f in seen if not _is_docstring_only(f)}


def _covered(path: str, deps: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("record", list(stages(default_params(), REPO)))
def test_code_deps_are_the_imports_of_the_stage(record):
    stage = stages(default_params(), REPO)[record]
    entry = REPO / stage.deps[0]
    assert entry.parent.name == "stages" and entry.is_file(), f"{stage.name}: its entry file comes first"
    # the factory imports a named model's module by its registry entry: it and all it imports
    dynamic = tuple(f"newllm/models/{MODELS[arg].module}.py" for arg in stage.cmd.split()[2:] if arg in MODELS)
    imported = import_closure(entry, dynamic)
    needed = imported - NOT_DEPS | EXTRA_DEPS.get(record, set())
    deps = {d.removeprefix("src/") for d in stage.deps if d.startswith("src/")}
    missing = sorted(f for f in needed if not _covered(f, deps))
    assert not missing, f"{stage.name} imports {missing}: add them to its deps in dvc.yaml"
    stale = sorted(d for d in deps if d.endswith(".py") and d not in imported)  # a data file (a template) is read
    assert not stale, f"{stage.name} lists {stale} in dvc.yaml but does not import them"
    for d in stage.deps:
        assert (REPO / d).exists() or d.startswith(("data/", "reports/")), f"{stage.name}: no such dep {d}"


@pytest.mark.parametrize("lrs", [[0.001, 0.003, 0.01], [0.00001, 0.0003, 2.5]])
def test_stage_names_and_records_follow_dvcs_own_resolution(tmp_path: Path, lrs):
    """dag.py resolves foreach/matrix as DVC does: the same stage names, with the protocol's cells in them."""
    use_project_dvc_yaml(tmp_path)
    write_params(tmp_path / "params.yaml", protocol={"lrs": lrs, "replicates": [1, 2]})
    run(["git", "init", "-q"], tmp_path)
    run([str(VENV_BIN / "dvc"), "init", "-q"], tmp_path)
    out = run([str(VENV_BIN / "dvc"), "stage", "list", "--name-only"], tmp_path).stdout.split()
    ours = stages(load_params(tmp_path / "params.yaml"), tmp_path)
    assert sorted(out) == sorted(s.name for s in ours.values())
    assert {f"sweep/lstm/lr{lr}" for lr in lrs} | {"seeds/lstm/seed2", "phase1/seed1", "pick_lr"} <= set(ours)


def test_a_stage_names_its_checkpoint_and_its_deps_by_path_not_position():
    from newllm.dag import Stage
    from newllm.errors import PipelineError

    declared = stages(load_params(REPO / "params.yaml"), REPO)
    assert declared["sweep/lstm/lr0.01"].checkpoint == Path("data/checkpoints/sweep/lstm/lr0.01.pt")
    assert declared["sweep/lstm/lr0.01"].dep("data/budget/") == Path("data/budget/lstm.json")
    assert declared["phase1/seed0"].checkpoint == Path("data/checkpoints/phase1/seed0.pt")
    two = Stage("x", "x", "", (), ("a/1", "a/2"), ("m.pt", "n.pt"), ())
    with pytest.raises(PipelineError, match="declares 2 checkpoints"):
        _ = two.checkpoint
    with pytest.raises(PipelineError, match="2 deps under a/"):
        two.dep("a/")


def test_dvc_yaml_lists_its_stages_in_pipeline_order():
    """Read top to bottom, dvc.yaml is the DAG: no stage comes before a stage whose output it reads."""
    import yaml

    names = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    declared = stages(load_params(REPO / "params.yaml"), REPO).values()
    position = {s.name: names.index(s.name.split("@")[0]) for s in declared}
    for s in declared:
        for other in declared:
            if any(dag.produces(out, dep) for out in other.outs for dep in s.deps):
                assert position[other.name] <= position[s.name], f"{s.name} reads {other.name}'s output above it"
