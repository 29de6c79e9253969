"""Studies: a grid of DVC experiments (newllm.study) and the report over them (newllm.report.study)."""

import json
import math
import sqlite3
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, make_project, ran_stages, run

from newllm.errors import PipelineError
from newllm.report.study import build_study_report, slope
from newllm.study import load_study, params_of, set_args


def write_study(path, **over):
    study = {"name": "s", "cells": {"a": {"context_dim": 8}, "b": {"context_dim": 16}},
             "set": {"baselines": ["transformer"]}, "profiles": {"tiny": {"tokenizer.max_eval_tokens": 300}}}
    path.write_text(yaml.safe_dump({**study, **over}))
    return path


def test_a_cell_is_set_then_profile_then_cell_and_tagged_with_the_study(tmp_path):
    s = load_study(write_study(tmp_path / "s.yaml", set={"context_dim": 4, "seed": 3}))
    assert s.overrides("tiny", "a") == {"context_dim": 8, "seed": 3, "tokenizer.max_eval_tokens": 300,
                                        "tracking.study": "s-tiny"}
    assert s.experiment("tiny", "b") == "s-tiny-b"
    assert set_args({"baselines": ["transformer", "lstm"], "x": None, "lr": 0.0003, "p": "/a b,c/it's"}) == [
        "-S", "baselines=[transformer, lstm]", "-S", "x=null", "-S", "lr=0.0003", "-S", "p='/a b,c/it\\'s'"]


@pytest.mark.parametrize("over, message", [
    ({"colour": 1}, "unknown key"), ({"cells": {}}, "`cells` is missing"),
    ({"set": {"phase1.nope": 1}}, "phase1.nope: params.yaml has no key 'nope'"),
    ({"set": {"nope.x": 1}}, "no section 'nope'"),
    ({"cells": {"a": {"context_dim": -1}}}, r"\(a, tiny\).*context_dim must be >= 1"),
])
def test_bad_definitions_fail_naming_the_key(tmp_path, over, message):
    with pytest.raises(PipelineError, match=message):
        s = load_study(write_study(tmp_path / "s.yaml", **over))
        params_of(s, "tiny", "a", REPO / "params.yaml")
    with pytest.raises(PipelineError, match="no profile 'gpu'"):
        load_study(write_study(tmp_path / "t.yaml")).overrides("gpu", "a")


def test_the_wikitext2_study_validates_in_every_profile(tmp_path):
    data = tmp_path / "wt2"
    data.mkdir()
    for f in ("train.txt", "valid.txt", "test.txt"):
        (data / f).write_text(" = Title = \n some text here \n")
    s = load_study(REPO / "studies" / "wikitext2.yaml")
    s.set["dataset.wikitext_dir"] = str(data)
    for profile in s.profiles:
        for cell in s.cells:
            p = params_of(s, profile, cell, REPO / "params.yaml")
            assert p.dataset.source == "wikitext2" and p.tracking.study == f"wikitext2-{profile}"
    assert [params_of(s, "cpu", c, REPO / "params.yaml").context_dim for c in s.cells] == [128, 256, 512, 1024]


def test_the_study_report_fits_slopes_and_states_the_expectation(tmp_path):
    def report(n, new, tf):
        return {"seeds": 3, "newllm_params_total": n, "transformer_params_total": n, "newllm_test_ppl": new,
                "newllm_test_ppl_std": 0.1, "transformer_test_ppl": tf, "transformer_test_ppl_std": 0.1,
                "test_ppl_ratio_vs_transformer": new / tf, "decision_band": "x",
                "context_use": {"newllm": {"1": 6.0, "2": 5.5, "4": 5.4, "8": 5.4},
                                "transformer": {"1": 6.0, "2": 5.0, "4": 4.6, "8": 4.5}}}
    cells = {"a": {"report": report(1e6, 200.0, 100.0), "params": {"train.max_tokens": 20000}},
             "b": {"report": report(4e6, 150.0, 90.0), "params": {"train.max_tokens": 20000}}}
    summary = build_study_report("s-tiny", cells, tmp_path)
    assert summary["slopes"]["newllm"] == pytest.approx(math.log(150 / 200) / math.log(4))
    assert slope([1, 10, 100], [100, 10, 1]) == pytest.approx(-1.0)
    md = (tmp_path / "study.md").read_text()
    assert "expected 1.5–2.0× (2 of 2 cells inside)" in md and "the gap closes" in md
    assert "within 0.01 nats of that from 4 tokens on" in md  # New-LLM's horizon in the toy curve
    assert "b: New-LLM test PPL 150.00: above 100: rethink the approach; the Transformer on the same tokens: 90.00, " \
           "between 50 and 100: needs architecture work" in md and "first 20,000 tokens" in md
    assert (tmp_path / "figures" / "scaling.png").stat().st_size > 0 and (tmp_path / "study.html").is_file()
    # a model added to the registry is in the study report, under its display name (no table of its own here)
    from newllm.registry import MODELS, LSTMConfig, ModelSpec

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(MODELS, "toy", ModelSpec("toy", "Toy RNN", LSTMConfig, "LSTMLM"))
        for c, ppl in (("a", 300.0), ("b", 250.0)):
            cells[c]["report"].update(toy_test_ppl=ppl, toy_test_ppl_std=1.0, toy_params_total=cells[c]["report"]["newllm_params_total"])
        assert build_study_report("s-tiny", cells, tmp_path)["slopes"]["toy"] == pytest.approx(math.log(250 / 300) / math.log(4))
        assert "Toy RNN: log-log slope" in (tmp_path / "study.md").read_text()
    # both get worse with size, the Transformer faster: the ratio falls, but the gap has not closed
    cells["b"]["report"] = report(4e6, 220.0, 150.0)
    build_study_report("s-tiny", cells, tmp_path)
    md = (tmp_path / "study.md").read_text()
    assert "the gap closes" not in md and "only because the Transformer's PPL rises faster" in md, md


@pytest.mark.slow
def test_a_study_runs_each_cell_as_a_cached_experiment(tmp_path):
    """Two cells of the tiny pipeline as DVC experiments: both recorded, every run tagged, the workspace
    untouched, the report written; a cell rerun with one seed more trains only that seed."""
    proj = make_project(tmp_path / "p", {"baselines": ["transformer"]})
    # the cells differ in the Transformer alone: cell b restores every New-LLM stage of cell a from the run-cache
    cells = {"a": {"transformer.n_layer": 1}, "b": {"transformer.n_layer": 2}}
    write_study(proj / "study.yaml", cells=cells)
    run(["git", "add", "study.yaml"], proj)
    run(["git", "commit", "-qm", "study"], proj)
    newllm = [sys.executable, "-m", "newllm.cli"]
    before = (proj / "params.yaml").read_text()
    out = run([*newllm, "study", "run", "study.yaml", "--profile", "tiny"], proj, timeout=1200)
    assert "cell 2/2 s-tiny-b" in out.stdout
    cell_b = out.stdout.split("cell 2/2 s-tiny-b")[1]
    assert "Stage 'phase2_sweep@0.01' is cached" in cell_b and "Running stage 'baseline_sweep@transformer-0.01'" in cell_b
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=proj,
                          capture_output=True, text=True).stdout
    assert "/s-tiny-a" in refs and "/s-tiny-b" in refs
    assert (proj / "params.yaml").read_text() == before  # --temp: the workspace stays the baseline
    with sqlite3.connect(proj / "mlflow.db") as con:
        tagged = con.execute("select count(*) from tags where key = 'newllm.study' and value = 's-tiny'").fetchone()[0]
        parents = {r[0] for r in con.execute("select name from runs where name like 's-tiny-% @ %'")}
    assert tagged >= 2 * 10 and {name.split(" @ ")[0] for name in parents} == {"s-tiny-a", "s-tiny-b"}

    rep = run([*newllm, "study", "report", "study.yaml", "--profile", "tiny"], proj)
    summary = json.loads((proj / "reports" / "study" / "s-tiny" / "study.json").read_text())
    assert summary["cells"] == ["a", "b"] and "study.html" in rep.stdout
    assert all(v is not None for v in summary["ratio_vs_transformer"].values())

    # Adding a seed reruns only the new seed's stages: DVC's run-cache restores every other one
    write_study(proj / "study.yaml", cells=cells, profiles={"tiny": {"tokenizer.max_eval_tokens": 300,
                                                        "protocol.replicates": [1, 2]}})
    run(["git", "commit", "-qam", "a seed more"], proj)
    again = run([*newllm, "study", "run", "study.yaml", "--profile", "tiny", "--cells", "a"], proj, timeout=600)
    log = again.stdout + again.stderr
    ran = ran_stages(log)
    assert "Stage 'phase1_cvfp' is cached" in log and "Stage 'phase2_sweep@0.01' is cached" in log
    assert {s for s in ran if not s.endswith("2")} == {"validate", "report"}, ran  # validate: params.yaml changed
    assert {"phase1_seeds@2", "phase2_seeds@2"} <= ran
