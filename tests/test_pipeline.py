"""End to end: real `dvc repro` / `dvc exp run` on a throw-away copy of the project with tiny params."""

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run
from mlflow.tracking import MlflowClient

from newllm.report.browser import find_chromium, render_page
from newllm.report.tables import _fmt

pytestmark = pytest.mark.slow


def _runs_by_stage(proj: Path) -> dict[str, list]:
    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("newllm")
    out: dict[str, list] = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        out.setdefault(r.data.tags["dvc.stage"], []).append(r)
    return out


def _check_report(project: Path) -> None:
    """Every main-table value equals the metrics file it comes from; the HTML renders in a real browser."""
    md = (project / "reports/report.md").read_text()
    rows = [line.strip("|").split("|") for line in md.split("## Main table")[1].split("##")[0].splitlines()
            if line.startswith("| ") and not line.startswith("| model")]
    stages = {"New-LLM": "phase2_train", "Transformer": "baselines/transformer", "LSTM": "baselines/lstm",
              "CVP": "baselines/cvp", "New-LLM, Phase 1 off": "controls/phase1_off",
              "New-LLM, end-to-end": "controls/end_to_end"}
    assert [r[0].strip() for r in rows] == list(stages)
    for row in rows:
        m = json.loads((project / f"reports/metrics/{stages[row[0].strip()]}.json").read_text())
        cells = [c.strip() for c in row]
        assert cells[1] == f"{m['params_trainable']:,} / {m['params_total']:,}"
        assert cells[2:4] == [_fmt(m["train_tokens"]), _fmt(m["optimizer_steps"])]
        assert cells[4].startswith(f"{m['best_epoch']} / {m['epochs_run']}")
        assert cells[5:9] == [_fmt(m["val_loss"]), _fmt(m["test_loss"]), _fmt(m["test_ppl"]), _fmt(m["test_accuracy"])]
    report = json.loads((project / "reports/metrics/report.json").read_text())
    p2 = json.loads((project / "reports/metrics/phase2_train.json").read_text())
    assert report["newllm_test_ppl"] == p2["test_ppl"] and report["newllm_val_ppl"] == p2["val_ppl"]
    if find_chromium() is None:  # CI installs Debian's chromium (.ci/run); elsewhere the check is optional
        assert not os.environ.get("CI"), "CI must have chromium for the report's browser check"
        warnings.warn("no chromium binary: report.html was not rendered in a browser", stacklevel=1)
        return
    shot = project / "report.png"
    dom = render_page(project / "reports/report.html", screenshot=shot)
    assert "<table" in dom and dom.count("data:image/png;base64,") == 3 and "Main table" in dom
    assert shot.stat().st_size > 10_000
    if os.environ.get("NEWLLM_SAVE_SCREENSHOTS") == "1":
        dest = REPO / "reports" / "screenshots"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / "report.png")


def test_repro_then_tokenizer_ablation_reruns_only_downstream(project: Path):
    first = run(["dvc", "repro"], project)
    assert "Running stage 'generate_dataset'" in first.stdout and "Running stage 'tokenize'" in first.stdout
    assert (project / "data/dataset/train.txt").is_file() and (project / "data/tokens/train.npy").is_file()
    for stage in ("tokenize", "phase1_cvfp", "phase2_train", "baselines/transformer", "baselines/lstm", "baselines/cvp"):
        assert (project / f"reports/metrics/{stage}.json").is_file(), stage
    _check_report(project)
    runs = _runs_by_stage(project)
    assert {s: len(r) for s, r in runs.items() if s in ("generate_dataset", "tokenize")} == {
        "generate_dataset": 1, "tokenize": 1}
    assert all(r.info.status == "FINISHED" for rs in runs.values() for r in rs)

    t0 = time.time()
    again = run(["dvc", "repro"], project)
    assert "Running stage" not in again.stdout and time.time() - t0 < 15

    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    exp = run(["dvc", "exp", "run", "-n", "char-tok", "-S", "tokenizer.kind=char"], project)
    assert "Running stage 'tokenize'" in exp.stdout
    assert "Running stage 'generate_dataset'" not in exp.stdout
    runs = _runs_by_stage(project)
    assert len(runs["generate_dataset"]) == 1 and len(runs["tokenize"]) == 2
    char_run = next(r for r in runs["tokenize"] if r.data.tags["dvc.exp_name"] == "char-tok")
    assert char_run.data.params["tokenizer.kind"] == "char" and char_run.info.run_name == "tokenize:char-tok"

    # A New-LLM size param reruns both phases and every baseline (each is sized to New-LLM's params).
    ctx = run(["dvc", "exp", "run", "-n", "ctx32", "-S", "context_dim=32"], project)
    ran = _ran(ctx.stdout)
    assert ran == {"phase1_cvfp", "phase2_train", "param_budget", "baseline@transformer", "baseline@lstm",
                   "baseline@cvp", "phase1_off", "end_to_end", "report"}, ran
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], project).stdout
    assert "ctx32" in shown and "char-tok" in shown
    runs = _runs_by_stage(project)
    p2 = {r.data.tags["dvc.exp_name"]: r for r in runs["phase2_train"]}
    assert p2["ctx32"].data.params["context_dim"] == "32" and p2["workspace"].data.params["context_dim"] == "16"
    assert [m.step for m in MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_metric_history(
        p2["ctx32"].info.run_id, "val_loss")] == [1, 2]
    assert len(runs["phase1_cvfp"]) == 3 and len(runs["lstm"]) == 3

    # A New-LLM param that keeps its size reruns no baseline.
    p1 = run(["dvc", "exp", "run", "-n", "p1lr", "-S", "phase1.lr=0.005"], project)
    assert _ran(p1.stdout) == {"phase1_cvfp", "phase2_train", "report"}, p1.stdout

    # A model's own lr (each section has one) reruns that model only; the report follows its checkpoint.
    lr = run(["dvc", "exp", "run", "-n", "tlr", "-S", "transformer.lr=3e-4"], project)
    assert _ran(lr.stdout) == {"baseline@transformer", "report"}, lr.stdout
    tlr = next(r for r in _runs_by_stage(project)["transformer"] if r.data.tags["dvc.exp_name"] == "tlr")
    assert tlr.data.params["transformer.lr"] == "0.0003" and tlr.data.params["transformer.epochs"] == "2"


def test_bad_params_leave_no_output_and_no_running_run(project: Path):
    params = (project / "params.yaml").read_text().replace("kind: word", "kind: wordpiece")
    (project / "params.yaml").write_text(params)
    res = run(["dvc", "repro"], project, check=False)
    assert res.returncode != 0
    assert "tokenizer.kind must be one of: word, char, bpe, gpt2" in res.stderr + res.stdout
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


def _ran(stdout: str) -> set[str]:
    return {line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage")}


def test_an_added_model_is_one_module_one_registry_entry_one_params_section(project: Path):
    """Register a toy model in a copy of the project: it trains in its own stage, appears in the report
    and in `newllm generate`, and nothing else needs an edit (dvc.yaml included)."""
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
    params["baselines"].append("bigram")
    params["bigram"] = {"lr": 0.01, "embed_dim": 8}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run(["git", "status", "--porcelain", "--untracked-files=all"], project).stdout.split()
    assert sorted(changed[1::2]) == ["params.yaml", "src/newllm/models/bigram.py", "src/newllm/registry.py"]

    own = {"PYTHONPATH": str(project / "src")}  # the copy's package, not the installed one
    out = run(["dvc", "repro"], project, extra_env=own).stdout
    assert "Running stage 'baseline@bigram'" in out
    m = json.loads((project / "reports/metrics/baselines/bigram.json").read_text())
    assert m["params_total"] == 2 * 8 * json.loads((project / "data/tokens/meta.json").read_text())["vocab_size"] \
        + json.loads((project / "data/tokens/meta.json").read_text())["vocab_size"]
    md = (project / "reports/report.md").read_text()
    # no width search: it runs, unmatched, with no ratio
    row = next(line for line in md.splitlines() if line.startswith("| Bigram (unmatched) |"))
    assert "New-LLM / Bigram" not in md
    assert f"{m['val_loss']:.4f}" in row
    gen = run(["newllm", "generate", "--model", "bigram", "--prompt", "the", "--max-new-tokens", "5"], project,
              extra_env=own)
    assert gen.stdout.startswith("the") and len(gen.stdout.split()) >= 2


def test_touching_one_model_file_reruns_only_its_stage_and_the_report(project: Path):
    run(["dvc", "repro"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "repro"], project)
    assert "up to date" in run(["dvc", "status"], project).stdout
    with (project / "src/newllm/models/lstm.py").open("a") as f:
        f.write("# touched\n")
    status = yaml.safe_load(run(["dvc", "status", "--json"], project).stdout) or {}
    assert sorted(status) == ["baseline@lstm", "report"], status
    with (project / "src/newllm/training/phase1.py").open("a") as f:
        f.write("# touched\n")
    status = yaml.safe_load(run(["dvc", "status", "--json"], project).stdout) or {}
    assert sorted(status) == ["baseline@lstm", "phase1_cvfp", "phase1_off", "phase2_train", "report"], status
