"""End to end: real `dvc repro` / `dvc exp run` on a throw-away copy of the project with tiny params."""

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import pytest
import yaml
from faults import copy_of
from helpers import REPO, ran_stages, run
from mlflow.tracking import MlflowClient

from newllm.report.browser import find_chromium, render_page
from newllm.report.tables import _fmt

pytestmark = pytest.mark.slow


def _runs_by_stage(proj: Path) -> dict[str, list]:
    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("newllm")
    out: dict[str, list] = {}
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = {r.info.run_id for r in runs if "dvc.stage" not in r.data.tags}  # one per DVC experiment
    for r in runs:
        if r.info.run_id not in parents:
            assert r.data.tags.get("mlflow.parentRunId") in parents, r.info.run_name  # every stage run is nested
            out.setdefault(r.data.tags["dvc.stage"], []).append(r)
    return out


def _answers(proj: Path) -> dict[str, tuple[dict[str, float], list[str], int]]:
    """Each DVC experiment's parent run: (its headline/ and report/ metrics, its root artifacts, its duration
    in ms)."""
    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("newllm")
    return {r.data.tags["dvc.exp_name"]: ({k: v for k, v in r.data.metrics.items() if k.startswith(("headline/", "report/"))},
                                          sorted(a.path for a in client.list_artifacts(r.info.run_id)),
                                          r.info.end_time - r.info.start_time)
            for r in client.search_runs([exp.experiment_id], max_results=1000) if "dvc.stage" not in r.data.tags}


def _check_answer(proj: Path, exp_name: str) -> None:
    """The experiment's parent run carries its report's headline (every top-level number of report.json
    under headline/, the nested curves under report/), the report and its loss-curve figure, and lasts as
    long as the experiment's stages did."""
    from newllm.config import flatten

    metrics, artifacts, duration = _answers(proj)[exp_name]
    report = json.loads((proj / "reports/metrics/report.json").read_text())
    want = {f"{'report' if isinstance(report[k.split('.')[0]], dict) else 'headline'}/{k}": float(v)
            for k, v in flatten(report).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert metrics == pytest.approx(want) and "headline/newllm_test_ppl" in metrics, sorted(set(want) ^ set(metrics))
    assert any(k.startswith("report/context_use.") for k in metrics), sorted(metrics)
    assert artifacts == ["report.html", "val_loss_curves.png"] and duration > 1000, (artifacts, duration)


def _check_progress(log: str, n_ran: int) -> None:
    """Every stage that ran printed `[stage N/M]`, N counting up to M = the stages that ran (M may start
    higher, while a rerun stage's output may still turn out unchanged, and only falls); the experiment's
    parent run is named, with its UI address, once."""
    lines = re.findall(r"^\[stage (\d+)/(\d+)\] (\S+): (\d+:\d\d) elapsed", log, re.M)
    assert [int(n) for n, *_ in lines] == list(range(1, n_ran + 1)), log[-3000:]
    totals = [int(m) for _, m, *_ in lines]
    assert totals[-1] == n_ran and totals == sorted(totals, reverse=True), totals
    assert len(re.findall(r"^View this experiment's run '.+ @ [0-9a-f]{7}' at: http://127\.0\.0\.1:5000/#/experiments/"
                          r"\d+/runs/[0-9a-f]{32}\?workflowType=machine_learning", log, re.M)) == 1, log[-3000:]


MODELS = {"New-LLM": "phase2_train", "Transformer": "transformer", "LSTM": "lstm", "CVP": "cvp",
          "New-LLM, Phase 1 off": "phase1_off", "New-LLM, end-to-end": "end_to_end"}


def _seed_metrics(project: Path, record: str) -> list[dict]:
    """A model's metrics files with its chosen lr: the sweep cell on seed 0, then each replicate seed."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    lr = json.loads((project / f"data/lr/{record}.json").read_text())["lr"]
    files = [f"sweep/{record}/lr{lr}"] + [f"seeds/{record}/seed{s}" for s in params["protocol"]["replicates"]]
    return [json.loads((project / f"reports/metrics/{f}.json").read_text()) for f in files]


def _pm(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{_fmt(mean)} ± {_fmt(std)}"


def _check_report(project: Path) -> None:
    """Every main-table value equals the mean ± std of the metrics files it comes from (computed here
    independently); the HTML renders in a real browser."""
    md = (project / "reports/report.md").read_text()
    rows = [line.strip("|").split("|") for line in md.split("## Main table")[1].split("##")[0].splitlines()
            if line.startswith("| ") and not line.startswith("| model")]
    assert [r[0].strip() for r in rows] == list(MODELS)
    for row in rows:
        seeds = _seed_metrics(project, MODELS[row[0].strip()])
        assert len(seeds) >= 2 and len({m["seed"] for m in seeds}) == len(seeds)
        m = seeds[0]
        cells = [c.strip() for c in row]
        assert cells[1] == f"{m['params_trainable']:,} / {m['params_total']:,}"
        assert cells[2].split()[0] == f"{m['lr']:g}"
        assert cells[5].startswith(", ".join(f"{r['best_epoch']}/{r['epochs_run']}" for r in seeds))
        for col, key in zip(range(6, 10), ("val_loss", "test_loss", "test_ppl", "test_accuracy"), strict=True):
            assert cells[col] == _pm([r[key] for r in seeds]), (row[0], key)
    report = json.loads((project / "reports/metrics/report.json").read_text())
    assert "DVC experiment `workspace`; params as committed at `" in md  # the workspace says where it is
    p2 = _seed_metrics(project, "phase2_train")
    assert report["newllm_test_ppl"] == pytest.approx(sum(r["test_ppl"] for r in p2) / len(p2), abs=1e-4)
    assert report["seeds"] == len(p2)
    if find_chromium() is None:  # CI installs Debian's chromium (.ci/run); elsewhere the check is optional
        assert not os.environ.get("CI"), "CI must have chromium for the report's browser check"
        warnings.warn("no chromium binary: report.html was not rendered in a browser", stacklevel=1)
        return
    shot = project / "report.png"
    dom = render_page(project / "reports/report.html", screenshot=shot)
    from newllm.report.build import FIGURES

    assert "<table" in dom and dom.count("data:image/png;base64,") == len(FIGURES) and "Main table" in dom
    assert shot.stat().st_size > 10_000
    if os.environ.get("NEWLLM_SAVE_SCREENSHOTS") == "1":
        dest = REPO / "reports" / "screenshots"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / "report.png")


def _cells(family: str, values: list, baselines=("transformer", "lstm", "cvp")) -> set[str]:
    """DVC's names of one axis value's cells across every model (`_sweep` by lr, `_seeds` by seed)."""
    return {f"{f}_{family}@{v}" for f in ("phase2", "phase1_off", "end_to_end") for v in values} | {
        f"baseline_{family}@{b}-{v}" for b in baselines for v in values}


def _set(value, *keys):
    """An edit of params.yaml's text that sets params[keys[0]][keys[1]]... to `value`."""
    def edit(text: str) -> str:
        params = yaml.safe_load(text)
        node = params
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        return yaml.safe_dump(params, sort_keys=False)
    return edit


CHECK = {"validate"}  # the params check: reruns when params.yaml changes or its marker is missing, reruns nothing else


def _status_after(project: Path, path: str, expected: set[str], edit=lambda text: text + "# touched\n") -> None:
    """The stages `dvc status` says an edit of `path` (by default, a comment appended) makes stale,
    checked against `expected`; the edit is then undone."""
    f = project / path
    text = f.read_text()
    f.write_text(edit(text))
    try:
        status = yaml.safe_load(run(["dvc", "status", "--json"], project).stdout) or {}
        assert set(status) == expected | (CHECK if path == "params.yaml" else set()), (path, sorted(status))
    finally:
        f.write_text(text)


def _chosen(project: Path) -> dict[str, float]:
    return {f.stem: json.loads(f.read_text())["lr"] for f in (project / "data/lr").glob("*.json")}


def _team_clone(project: Path) -> Path:
    """The team loop of README's "Scaling out": push the commit to a shared git repo and every output and
    the run-cache to a DVC remote (local folders here); a fresh clone pulls them and `dvc repro` then
    recomputes nothing (validate, the params check, runs: its marker is not committed); returns the clone."""
    team, remote, clone = (project.parent / n for n in ("team.git", "dvc-remote", "clone"))
    run(["git", "init", "-q", "--bare", str(team)], project.parent)
    run(["dvc", "remote", "add", "-d", "team", str(remote)], project)
    run(["git", "commit", "-qam", "the team's DVC remote"], project)
    run(["git", "remote", "add", "origin", str(team)], project)
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], project)
    run(["dvc", "push", "--run-cache"], project)
    run(["git", "clone", "-q", "-b", "main", str(team), str(clone)], project.parent)
    run(["dvc", "pull", "--run-cache"], clone)
    assert (clone / "data/checkpoints/phase1/seed0.pt").is_file()
    assert ran_stages(run(["dvc", "repro"], clone).stdout) == CHECK
    assert not yaml.safe_load(run(["dvc", "status", "--json"], clone).stdout)
    return clone


def test_repro_then_ablations_rerun_only_what_they_change(project: Path):
    first = run(["dvc", "repro"], project)
    ran = ran_stages(first.stdout)
    assert ran == CHECK | {"generate_dataset", "tokenize", "phase1_cvfp", "phase1_seeds@1", "param_budget", "pick_lr",
                   "report"} | _cells("sweep", [0.01]) | _cells("seeds", [1]), ran
    _check_progress(first.stdout, len(ran))
    assert (project / "data/dataset/train.txt").is_file() and (project / "data/tokens/train.npy").is_file()
    _check_report(project)
    _check_answer(project, "workspace")
    runs = _runs_by_stage(project)
    assert all(len(r) == 1 and r[0].info.status == "FINISHED" for r in runs.values()), runs
    replicate = runs["seeds/lstm/seed1"][0].data.params  # a cell logs its own seed and the lr it was given
    assert replicate["seed"] == "1" and float(replicate["lr"]) == _chosen(project)["lstm"] == 0.01
    assert runs["sweep/lstm/lr0.01"][0].data.params["seed"] == "0"

    t0 = time.time()
    again = run(["dvc", "repro"], project)
    assert ran_stages(again.stdout) == set() and time.time() - t0 < 15  # a no-op runs no stage

    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    assert not yaml.safe_load(run(["dvc", "status", "--json"], project).stdout)
    clone = _team_clone(project)
    # What an edit makes stale, asked of `dvc status` (then undone): a model file, that model's cells and
    # the report (which rebuilds every model); Phase 1's code, New-LLM's cells and the Phase 1 control's
    # (they compute contexts with it); a Phase 1 param, Phase 1 alone (its checkpoint then reaches only
    # New-LLM's cells: tests/test_config.py checks the deps).
    _status_after(project, "src/newllm/models/lstm.py", {"baseline_seeds@lstm-1", "baseline_sweep@lstm-0.01", "report"})
    phase1 = {"phase1_cvfp", "phase1_seeds@1"}
    _status_after(project, "src/newllm/training/phase1.py", phase1)  # Phase 2 reads the checkpoint, not the code
    _status_after(project, "src/newllm/training/context_cache.py", {
        "phase2_sweep@0.01", "phase2_seeds@1", "phase1_off_sweep@0.01", "phase1_off_seeds@1"})
    _status_after(project, "params.yaml", phase1, _set(0.005, "phase1", "lr"))

    # One more lr in the sweep runs its cells only; a replicate reruns only when its model's pick moved.
    before = _chosen(project)
    lrs = run(["dvc", "exp", "run", "-n", "lr2", "-S", "protocol.lrs=[0.01,0.03]"], project)
    after = _chosen(project)
    moved = [r for r in after if after[r] != before[r]]
    family = {"phase2_train": "phase2_seeds@1", "phase1_off": "phase1_off_seeds@1", "end_to_end": "end_to_end_seeds@1"}
    expected = CHECK | _cells("sweep", [0.03]) | {"pick_lr", "report"} | {family.get(r, f"baseline_seeds@{r}-1") for r in moved}
    assert ran_stages(lrs.stdout) == expected, (lrs.stdout[-3000:], moved)
    _check_progress(lrs.stdout, len(expected))

    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], project).stdout
    assert "lr2" in shown
    # An experiment travels the same way: its git ref to the team repo, its outputs to the DVC remote.
    run(["dvc", "exp", "push", "--run-cache", "origin", "lr2"], project)
    run(["dvc", "exp", "pull", "--run-cache", "origin", "lr2"], clone)
    assert "lr2" in run(["dvc", "exp", "show", "--no-pager", "--csv"], clone).stdout
    run(["dvc", "exp", "apply", "lr2"], clone)
    assert (clone / "reports/metrics/report.json").read_text() == (project / "reports/metrics/report.json").read_text()
    assert ran_stages(run(["dvc", "repro"], clone).stdout) == set()  # lr2's outputs came with it
    # DVC's own views: only params and results differ (no timing column), and `dvc plots diff` of the
    # experiment against its baseline plots losses and renders with no network (its vega is inlined).
    changed = run(["dvc", "exp", "show", "--no-pager", "--csv", "--only-changed"], project).stdout.splitlines()[0]
    assert "protocol.lrs" in changed and "val_loss" in changed, changed
    assert not any(k in changed for k in ("tokens_per_s", "wall_time", "context_cache_s")), changed
    run(["newllm", "plots-template"], project)
    specs = json.loads(run(["dvc", "plots", "diff", "HEAD", "--json"], project).stdout)["data"]
    spec = json.dumps(specs["reports/plots/sweep/lstm/lr0.01.csv"][0]["content"])
    assert '"y": {"field": "val_loss"' in spec, spec[:2000]  # losses, not the CSV's last column (a time)
    out = run(["dvc", "plots", "diff", "HEAD", "-o", "plots_out"], project).stdout
    page = (project / "plots_out" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "vegaEmbed" in page, out
    from newllm.report.browser import find_chromium, render_page

    if find_chromium() is not None:
        dom = render_page(project / "plots_out" / "index.html", budget_ms=8000)
        assert "<canvas" in dom or 'class="marks"' in dom, dom[-1500:]  # vega drew the plots
    _check_answer(project, "lr2")  # its own parent, its own answer (the workspace holds lr2's report now)
    # the runs link (`make ui`) opens the answer's view: the parents, best test PPL first, the changed param shown
    tags = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_experiment_by_name("newllm").tags
    view = json.loads(tags["mlflow.sharedViewState.answer"])
    assert view["orderByKey"] == "metrics.`headline/newllm_test_ppl`" and view["orderByAsc"] is True
    assert view["selectedColumns"][:2] == ["params.`protocol.lrs`", "metrics.`headline/newllm_test_ppl`"], view
    md = (project / "reports/report.md").read_text()  # the workspace now holds lr2, and its report says so
    assert "DVC experiment `lr2`; params changed against commit `" in md
    assert "`protocol.lrs=[0.01, 0.03]` (committed: [0.01])" in md
    runs = _runs_by_stage(project)
    assert len(runs["generate_dataset"]) == 1 and len(runs["tokenize"]) == 1  # nothing upstream reran
    (new,) = runs["sweep/phase2_train/lr0.03"]
    assert new.data.tags["dvc.exp_name"] == "lr2" and new.info.run_name == "protocol.lrs=[0.01, 0.03] | sweep/phase2_train/lr0.03"
    assert new.data.params["lr"] == "0.03" and new.data.params["context_dim"] == "16"
    assert [m.step for m in MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_metric_history(
        new.info.run_id, "curves/val_loss")] == [1, 2]

    # A New-LLM size param makes New-LLM's, the controls' and the budget's cells stale (the baselines follow
    # the budget file they are sized by); the data stages never rerun for a model param.
    own = _cells("sweep", [0.01, 0.03], baselines=()) | _cells("seeds", [1], baselines=())
    _status_after(project, "params.yaml", {"phase1_cvfp", "phase1_seeds@1", "param_budget"} | own,
                  _set(32, "context_dim"))


@pytest.mark.parametrize("edit, message", [
    ({"tokenizer": {"kind": "wordpiece"}}, "tokenizer.kind must be one of: word, char, bpe, gpt2"),
    ({"protocol": {"lrs": []}}, "protocol.lrs is empty"),  # DVC then declares no sweep cell at all
    ({"protocol": {"lrs": [0.01, 0.01]}}, "protocol.lrs has duplicates"),  # DVC merges the two cells
    ({"protocol": {"replicates": [1, 1]}}, "protocol.replicates must not repeat a seed"),
    ({"baselines": ["transformer", "gru"]}, "baselines[1] must be one of: transformer, lstm, cvp"),
])
def test_bad_params_leave_no_output_and_no_running_run(project: Path, edit: dict, message: str):
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, value in edit.items():
        params[section] = {**params[section], **value} if isinstance(value, dict) else value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = run(["dvc", "repro"], project, check=False)
    assert res.returncode != 0
    assert message in res.stderr + res.stdout
    assert not (project / "data/dataset").exists() and not (project / "mlflow.db").exists()


BIGRAM_MODULE = '''"""A toy baseline: next token from the current one alone (embedding -> linear head)."""

from torch import Tensor, nn


class BigramLM(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.head = nn.Linear(embed_dim, vocab_size)

    @classmethod
    def from_config(cls, cfg, vocab_size: int) -> "BigramLM":
        return cls(vocab_size, cfg.embed_dim)

    def forward(self, x: Tensor, state: None = None) -> tuple[Tensor, None]:
        return self.head(self.embed(x)), None
'''
BIGRAM_CONFIG = '''@dataclass
class BigramConfig(TrainConfig):
    embed_dim: int = knob(lo=1)


'''


def test_an_added_model_is_one_module_one_registry_entry_one_params_section(reproduced: Path, tmp_path: Path):
    """Register a toy model in a copy of a reproduced project (conftest.py): it trains in its own stage,
    appears in the report and in `newllm generate`, and nothing else needs an edit (dvc.yaml included)."""
    project = copy_of(reproduced, tmp_path, "proj")
    (project / "src/newllm/models/bigram.py").write_text(BIGRAM_MODULE)
    registry = project / "src/newllm/registry.py"
    text = registry.read_text()
    cvp_entry = '    ModelSpec("cvp", "CVP", CVPConfig, "CVPLM", memory_probe=False),\n'
    assert cvp_entry in text
    text = text.replace(cvp_entry, cvp_entry + '    ModelSpec("bigram", "Bigram", BigramConfig, "BigramLM"),\n')
    text = text.replace("# ----------------------------------------------------------------------------------------------- table",
                        BIGRAM_CONFIG + "# ---------------------------------------------------------------------------------------------- table")
    registry.write_text(text)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["baselines"] = ["bigram"]  # alone, to keep the test short
    params["bigram"] = {"embed_dim": 8}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run(["git", "status", "--porcelain", "--untracked-files=all"], project).stdout.split()
    assert sorted(changed[1::2]) == ["params.yaml", "src/newllm/models/bigram.py", "src/newllm/registry.py"]

    own = {"PYTHONPATH": str(project / "src")}  # the copy's package, not the installed one
    out = run(["dvc", "repro"], project, extra_env=own).stdout
    assert "Running stage 'baseline_sweep@bigram-0.01'" in out and "Running stage 'baseline_seeds@bigram-1'" in out
    m = json.loads((project / "reports/metrics/sweep/bigram/lr0.01.json").read_text())
    assert m["params_total"] == 2 * 8 * json.loads((project / "data/tokens/meta.json").read_text())["vocab_size"] \
        + json.loads((project / "data/tokens/meta.json").read_text())["vocab_size"]
    md = (project / "reports/report.md").read_text()
    # no width search: it runs, unmatched, with no ratio
    row = next(line for line in md.splitlines() if line.startswith("| Bigram (unmatched) |"))
    assert "New-LLM / Bigram" not in md
    assert f"{m['best_epoch']}/{m['epochs_run']}" in row
    gen = run(["newllm", "generate", "--model", "bigram", "--prompt", "the", "--max-new-tokens", "5"], project,
              extra_env=own)
    assert gen.stdout.startswith("the") and len(gen.stdout.split()) >= 2
