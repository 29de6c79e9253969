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
         test: float | None = None, **params) -> dict:
    """A run as load_runs reads it: val PPL `ppl`, test PPL `test` (default: the same)."""
    params = {"seed": 0, "device": "auto", "context_dim": 256, **params}
    test = ppl if test is None else test
    return {"run_id": f"r{t}", "run_name": f"{stage}:{exp}", "status": status, "start_time": t, "stage": stage,
            "exp_name": exp, "params_hash": phash or f"{stage}-{sorted(params.items())}",
            **{f"params.{k}": str(v) for k, v in params.items()},
            "metrics.final.val_ppl": ppl, "metrics.final.val_loss": math.log(ppl),
            "metrics.final.test_ppl": test, "metrics.final.test_loss": math.log(test),
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
    assert "test PPL (ranked by)" in table and "val PPL (selection criterion)" in table
    assert "| New-LLM | context_dim=32 | 3 (seed 0, 1, 2) | **8.17 ± 1.26** | best | 8.17 ± 1.26 |" in table
    # 10.0 - 8.17 = 1.83 against 2 SE = 2 sqrt(1.0²/3 + 1.26²/3) = 1.86: inside, these seeds cannot tell them apart
    assert "| New-LLM | context_dim=16 | 3 (seed 0, 1, 2) | 10.00 ± 1.00 | +1.83, inside 2 SE (SE 0.93) |" in table


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
    assert list(g["ablation"]) == ["context_dim=128", "context_dim=1024", "context_dim=256"]  # by test PPL
    tied = group_ablations(df.assign(**{"metrics.final.test_ppl": 5.0}))
    assert list(tied["ablation"]) == ["context_dim=128", "context_dim=256", "context_dim=1024"]  # ties: by value
    assert g["val_ppl_std"].isna().all() and list(g["n_seeds"]) == [1, 1, 1]
    table = ablations.markdown_table(g)
    assert "| CVP | context_dim=128 | 1 (seed 0) | **5.00** | best | 5.00 | 1,128 |" in table
    assert "| CVP | context_dim=256 | 1 (seed 0) | 7.00 | +2.00 (one seed: no spread to judge by) |" in table


def test_ranks_on_test_not_val_and_says_when_a_gap_exceeds_twice_its_standard_error():
    rows, t = [], 0
    # context_dim 512 is best on val but worse on test; 128 is best on test; 64 is far worse, beyond its spread
    for ctx, val, test in ((512, [7.0, 7.1, 7.2], [7.8, 7.9, 8.0]), (128, [7.3, 7.4, 7.5], [7.7, 7.8, 7.9]),
                           (64, [9.0, 9.1, 9.2], [9.9, 10.0, 10.1])):
        for seed, (v, te) in enumerate(zip(val, test, strict=True)):
            t += 1
            rows.append(_run("phase2_train", v, t, exp=f"c{ctx}", test=te, context_dim=ctx, seed=seed))
    g = group_ablations(pd.DataFrame(rows))
    assert list(g["ablation"]) == ["context_dim=128", "context_dim=512", "context_dim=64"]
    assert list(g["best"]) == [True, False, False]
    se = math.sqrt(2 * 0.1 ** 2 / 3)  # both groups: std 0.1 over 3 seeds
    assert g.loc[1, "vs_best"] == f"+0.10, inside 2 SE (SE {se:.2f})"  # 0.1 <= 2 x 0.082
    assert g.loc[2, "vs_best"] == f"+2.20, beyond 2 SE (SE {se:.2f})"


def test_a_sweep_counts_only_its_cell_at_the_chosen_lr():
    rows = [  # experiment e: a sweep on seed 0, replicates at the lr it chose (0.003); f: a sweep alone
        _run("sweep/lstm/lr0.001", 9.0, 1, exp="e", lr=0.001), _run("sweep/lstm/lr0.003", 7.0, 2, exp="e", lr=0.003),
        _run("sweep/lstm/lr0.01", 30.0, 3, exp="e", lr=0.01),
        _run("seeds/lstm/seed1", 7.5, 4, exp="e", lr=0.003, seed=1), _run("seeds/lstm/seed2", 7.2, 5, exp="e", lr=0.003, seed=2),
        _run("sweep/lstm/lr0.001", 8.0, 6, exp="f", lr=0.001, context_dim=128),
        _run("sweep/lstm/lr0.003", 6.5, 7, exp="f", lr=0.003, context_dim=128),  # lowest val loss: pick_lr's choice
    ]
    kept = ablations.select_runs(pd.DataFrame(rows))
    assert sorted(kept["run_id"]) == ["r2", "r4", "r5", "r7"], kept["stage"]
    g = group_ablations(pd.DataFrame(rows))
    assert list(g["ablation"]) == ["context_dim=128", "context_dim=256"] and list(g["n_seeds"]) == [1, 3]


def test_an_experiment_that_reused_its_baselines_replicates_adds_none_of_its_sweep_cells():
    """`dvc exp run -S protocol.lrs=[0.01,0.03]`: the Transformer's new cell at 0.03 lost, so its replicates
    (at 0.01) were reused from the baseline's runs, not rerun; the report of each experiment names its lr."""
    def parent(run_id: str, lr: float) -> dict:
        return {"run_id": run_id, "status": "FINISHED", "start_time": 0, "stage": None,
                "metrics.headline/transformer_lr": lr}

    def cell(stage: str, ppl: float, t: int, parent_id: str, **params) -> dict:
        return {**_run(stage, ppl, t, exp=parent_id, **params), "parent_id": parent_id}

    rows = [parent("base", 0.01), parent("lrs2", 0.01),
            cell("sweep/transformer/lr0.01", 7.0, 1, "base", lr=0.01),
            cell("seeds/transformer/seed1", 7.4, 2, "base", lr=0.01, seed=1),
            cell("sweep/transformer/lr0.03", 9.0, 3, "lrs2", lr=0.03)]  # the only cell lrs2 ran for it
    kept = ablations.select_runs(pd.DataFrame(rows))
    assert sorted(kept["run_id"]) == ["r1", "r2"]
    g = group_ablations(pd.DataFrame(rows))
    assert list(g["ablation"]) == [BASELINE_LABEL] and g.loc[0, "test_ppl_mean"] == pytest.approx(7.2)


def test_a_panel_spans_its_own_values_only():
    low, high = ablations.y_limits(pd.DataFrame({"test_ppl_mean": [7.8, 7.7], "test_ppl_std": [0.1, 0.2]}))
    assert 7.2 < low < 7.5 and 7.9 < high < 8.1  # 7.5..7.9 padded by 15 %, nowhere near another model's 28


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
        run.finish({"val_ppl": val_ppl, "val_loss": math.log(val_ppl), "test_ppl": val_ppl + 0.5,
                    "test_loss": math.log(val_ppl + 0.5), "params_total": 10 * params.context_dim})


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
    assert "| New-LLM | context_dim=16 | 2 (seed 0, 1) | 11.00 ± 0.71 | +3.00, beyond 2 SE (SE 0.71) | 10.50 ± 0.71 |" in md
    assert "| New-LLM | context_dim=32 | 2 (seed 0, 1) | **8.00 ± 0.71** | best | 7.50 ± 0.71 |" in md
    assert "![test PPL per ablation](figures/ablations.png)" in md
    assert (tmp_path / "out" / "figures" / "ablations.png").read_bytes()[:4] == b"\x89PNG"
    assert "context_dim=32" in capsys.readouterr().out
    # the table and figure are also in MLflow, in a run of their own
    (compare_run,) = client.search_runs([exp_id], "tags.`dvc.stage` = 'compare'")
    assert compare_run.info.status == "FINISHED"
    assert tracking.PARENT_ID_TAG not in compare_run.data.tags  # it reads every experiment: nested under none
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
