"""`newllm compare`: grouping of constructed runs, and end to end over a real SQLite MLflow store."""

import math
import statistics
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import default_params, use_project_dvc_yaml, write_params

from newllm import cli, tracking
from newllm.config import Params
from newllm.report import ablations
from newllm.report.ablations import BASELINE_LABEL, differing_params, group_ablations, markdown_table


def _run(stage: str, ppl: float, t: int, status: str = "FINISHED", exp: str = "e", phash: str | None = None,
         **params) -> dict:
    params = {"seed": 0, "device": "auto", "context_dim": 256, **params}
    return {"run_id": f"r{t}", "run_name": f"{stage}:{exp}", "status": status, "start_time": t, "stage": stage,
            "exp_name": exp, "params_hash": phash or f"{stage}-{sorted(params.items())}",
            **{f"params.{k}": str(v) for k, v in params.items()},
            "metrics.final.val_ppl": ppl, "metrics.final.val_loss": math.log(ppl),
            "metrics.final.params_total": 1000 + int(params["context_dim"])}


@pytest.fixture
def runs() -> pd.DataFrame:
    rows = []
    t = 0
    ppl = {16: [9.0, 10.0, 11.0], 32: [7.0, 8.0, 9.5]}
    for ctx, values in ppl.items():
        for seed, p in enumerate(values):
            t += 1
            rows.append(_run("phase2_train", p, t, exp=f"ctx{ctx}-s{seed}", context_dim=ctx, seed=seed))
    # An older run of the same (stage, params, exp) as the newest ctx16/seed0 one: a re-run, ignored.
    rows.append(_run("phase2_train", 99.0, 0, exp="ctx16-s0", context_dim=16, seed=0))
    # Not counted: a failed run with a param value nobody else has, a non-training stage.
    rows.append(_run("phase2_train", 1.0, 50, status="FAILED", exp="bad", context_dim=64))
    rows.append(_run("tokenize", 1.0, 51, exp="ctx16-s0"))
    # Two LSTM seeds with identical params: one group, no ablation params.
    rows.append(_run("lstm", 20.0, 60, seed=0))
    rows.append(_run("lstm", 22.0, 61, seed=1))
    return pd.DataFrame(rows)


def test_groups_seeds_into_mean_and_std_per_ablation(runs):
    g = group_ablations(runs)
    assert list(g["model"]) == ["New-LLM", "New-LLM", "LSTM"]  # models in report order, each best first
    assert list(g["ablation"]) == ["context_dim=32", "context_dim=16", BASELINE_LABEL]
    assert list(g["best"]) == [True, False, False]  # a model with one group has no "best"
    assert list(g["n_seeds"]) == [3, 3, 2]
    assert g.loc[1, "seeds"] == ["0", "1", "2"] and g.loc[1, "ablation_params"] == {"context_dim": "16"}
    for i, values in enumerate(([7.0, 8.0, 9.5], [9.0, 10.0, 11.0], [20.0, 22.0])):
        assert g.loc[i, "val_ppl_mean"] == pytest.approx(statistics.mean(values))
        assert g.loc[i, "val_ppl_std"] == pytest.approx(statistics.stdev(values))
        assert g.loc[i, "val_loss_mean"] == pytest.approx(statistics.mean(map(math.log, values)))
    assert list(g["params_total"]) == [1032, 1016, 1256]
    assert "r0" not in g.loc[1, "run_ids"]  # the older re-run lost to the newest
    table = markdown_table(g)
    assert "val PPL (lower is better)" in table and table.count("(best)") == 1
    assert "| New-LLM | context_dim=32 | 3 (seed 0, 1, 2) | **8.17 ± 1.26** (best) |" in table


def test_differing_params_excludes_seed_and_params_some_runs_never_logged(runs):
    p2 = runs[(runs["stage"] == "phase2_train") & (runs["status"] == "FINISHED")]
    assert differing_params(p2) == ["context_dim"]
    assert differing_params(p2, ignore=()) == ["context_dim", "seed"]
    extra = p2.assign(**{"params.phase2.lr": ["0.002"] * (len(p2) - 1) + [None]})
    assert differing_params(extra) == ["context_dim"]  # an older run that did not log phase2.lr
    changed = p2.assign(**{"params.phase2.lr": ["0.002"] * (len(p2) - 1) + ["0.01"]})
    assert differing_params(changed) == ["context_dim", "phase2.lr"]
    # a sweep cell's lr is never pooled away, even against older runs that did not log it
    swept = p2.assign(**{"params.lr": [None] + ["0.003"] * (len(p2) - 1)})  # the first: ctx16, seed 0
    assert differing_params(swept) == ["context_dim", "lr"]
    g = group_ablations(swept)
    assert sorted(g["ablation"]) == ["context_dim=16, lr=(unset)", "context_dim=16, lr=0.003", "context_dim=32, lr=0.003"]
    assert list(g["val_ppl_mean"]) == sorted(g["val_ppl_mean"])


def test_single_run_has_no_std_and_sorts_best_first_then_numerically():
    df = pd.DataFrame([_run("cvp", 5.0, 1, context_dim=128), _run("cvp", 6.0, 2, context_dim=1024),
                       _run("cvp", 7.0, 3, context_dim=256)])
    g = group_ablations(df)
    assert list(g["ablation"]) == ["context_dim=128", "context_dim=1024", "context_dim=256"]  # by val PPL
    tied = group_ablations(df.assign(**{"metrics.final.val_ppl": 5.0}))
    assert list(tied["ablation"]) == ["context_dim=128", "context_dim=256", "context_dim=1024"]  # ties: by value
    assert g["val_ppl_std"].isna().all() and list(g["n_seeds"]) == [1, 1, 1]
    table = ablations.markdown_table(g)
    assert "| CVP | context_dim=128 | 1 (seed 0) | **5.00** (best) | 1.6094 | 1,128 |" in table


def test_empty_frame_gives_no_groups():
    assert group_ablations(pd.DataFrame()).empty


# ----------------------------------------------------------------------------------------------- real store
CELL = "sweep/phase2_train/lr0.001"  # one sweep cell of New-LLM (dvc.yaml)
OTHER = {"replicates": [9]}  # replicate seeds apart from the seeds 0 and 1 these runs are made with


def _stage(stage: str, params: Params, exp: str, val_ppl: float, monkeypatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", exp)
    with tracking.stage_run(stage, params) as run:
        for step, loss in enumerate((4.0, math.log(val_ppl))):
            run.log_step({"val_loss": loss}, step=step)
        run.finish({"val_ppl": val_ppl, "val_loss": math.log(val_ppl), "params_total": 10 * params.context_dim})


def test_compare_through_a_sqlite_store_and_the_cli(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    use_project_dvc_yaml(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tc = {"uri": uri, "experiment": "t"}
    ppl = {(16, 0): 9.0, (16, 1): 11.0, (32, 0): 7.0, (32, 1): 8.0}
    for (ctx, seed), value in ppl.items():
        _stage(CELL, default_params(context_dim=ctx, seed=seed, tracking=tc, protocol=OTHER), f"ctx{ctx}-s{seed}", value, monkeypatch)
    time.sleep(0.01)
    # A re-run of ctx16/seed0 in the same experiment: only the newest counts.
    _stage(CELL, default_params(context_dim=16, seed=0, tracking=tc, protocol=OTHER), "ctx16-s0", 10.0, monkeypatch)
    # A failed run and a non-training stage are ignored.
    monkeypatch.setenv("DVC_EXP_NAME", "broken")
    with pytest.raises(RuntimeError), tracking.stage_run(CELL, default_params(context_dim=64, tracking=tc)):
        raise RuntimeError("boom")
    _stage("tokenize", default_params(tracking=tc), "ctx16-s0", 1.0, monkeypatch)

    client, exp_id = tracking.init_store(default_params(tracking=tc))
    df = ablations.load_runs(client, exp_id)
    assert df["stage"].notna().sum() == 6 and set(df["status"]) == {"FINISHED"}
    # every stage run is nested under its DVC experiment's parent, named by what it changed
    parents = df[df["stage"].isna()]
    assert len(parents) >= 1 and parents["run_name"].str.len().gt(0).all()
    assert {"params.context_dim", "params.lr", "metrics.summary/val_ppl"} <= set(df.columns)
    g = group_ablations(df)
    assert list(g["ablation"]) == ["context_dim=32", "context_dim=16"]
    assert list(g["n_seeds"]) == [2, 2] and list(g["seeds"]) == [["0", "1"], ["0", "1"]]
    assert list(g["val_ppl_mean"]) == pytest.approx([7.5, 10.5])
    assert list(g["val_ppl_std"]) == pytest.approx([statistics.stdev([7.0, 8.0]), statistics.stdev([10.0, 11.0])])
    assert sorted(g.loc[1, "exps"]) == ["ctx16-s0", "ctx16-s1"]

    params_file = tmp_path / "params.yaml"
    write_params(params_file, tracking={"uri": uri, "experiment": "t"})
    assert cli.main(["--params", str(params_file), "compare", "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "ablations.md").read_text()
    assert "| New-LLM | context_dim=16 | 2 (seed 0, 1) | 10.50 ± 0.71 |" in md
    assert "| New-LLM | context_dim=32 | 2 (seed 0, 1) | **7.50 ± 0.71** (best) |" in md
    assert "![val PPL per ablation](figures/ablations.png)" in md
    assert (tmp_path / "out" / "figures" / "ablations.png").read_bytes()[:4] == b"\x89PNG"
    assert "context_dim=32" in capsys.readouterr().out
    # the table and figure are also in MLflow, in a run of their own
    (compare_run,) = client.search_runs([exp_id], "tags.`dvc.stage` = 'compare'")
    assert compare_run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(compare_run.info.run_id)}
    assert {"ablations.json", "ablations.md", "figures"} <= logged


def test_compare_on_an_empty_experiment_fails_with_a_message(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    params_file = tmp_path / "params.yaml"
    write_params(params_file, tracking={"uri": f"sqlite:///{tmp_path / 'm.db'}", "experiment": "t"})
    assert cli.main(["--params", str(params_file), "compare"]) == 1
    assert "no FINISHED runs of phase2_train" in capsys.readouterr().err
    assert not (tmp_path / "reports" / "ablations.md").exists()
