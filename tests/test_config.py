import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, default_params, env, merge, write_params

from newllm import dag
from newllm.config import ConfigError, changed_params, params_hash, parse_params, stage_params, stages
from newllm.registry import MODELS, TrainConfig

RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def test_the_dataclasses_hold_no_defaults_params_yaml_holds_them_all():
    for cls in (type(default_params()), *(s.config for s in MODELS.values())):
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f"{cls}.{f.name}"
    shared = {k for k in RAW["train"]}
    assert shared == {f.name for f in dataclasses.fields(TrainConfig)}
    for spec in MODELS.values():  # a model section restates no shared training key: one place for each fact
        assert not shared & set(RAW[spec.section]), spec.section
        assert "lr" not in RAW[spec.section]  # the lr is the protocol's sweep, the same for every model


def test_a_model_section_inherits_train_and_may_override_it():
    p = default_params(train={"epochs": 7}, lstm={"epochs": 3})
    assert (p.lstm.epochs, p.transformer.epochs, p.phase2.epochs, p.end_to_end.epochs, p.train.epochs) == (3, 7, 7, 7, 7)
    assert p.lstm.seq_len == p.train.seq_len == 32


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"contxt_dim": 3}, "unknown key 'contxt_dim'"),
        ({"phase1": {"lrr": 0.1}}, "unknown key 'phase1.lrr'"),
        ({"context_dim": "big"}, "context_dim must be an integer, got 'big'"),
        ({"context_dim": 1.5}, "context_dim must be an integer"),
        ({"context_norm": "yes"}, "context_norm must be true or false"),
        ({"phase1": {"lr": "fast"}}, "phase1.lr must be a number"),
        ({"context_dim": 0}, "context_dim must be >= 1, got 0"),
        ({"phase1": {"dist_reg_weight": 1.5}}, "phase1.dist_reg_weight must be <= 1.0"),
        ({"phase1": {"lr": 0}}, "phase1.lr must be > 0.0"),
        ({"tokenizer": {"kind": "sentencepiece"}}, "tokenizer.kind must be one of: word, char, bpe, gpt2"),
        ({"phase1": {"target": "moving"}}, "phase1.target must be one of: fixed, previous"),
        ({"baselines": ["transformer", "rnn"]}, "baselines[1] must be one of: transformer, lstm, cvp"),
        ({"context_layers": 3, "token_layers": 2}, "context_layers (3) must equal token_layers (2)"),
        ({"dataset": {"source": "text", "path": "/no/such/file.txt"}}, "dataset.path: file not found"),
        ({"dataset": {"source": "wikitext2", "wikitext_dir": "/no/such/dir"}}, "dataset.wikitext_dir: folder not found"),
        ({"dataset": {"source": "hf"}}, "dataset.hf_name is required"),
        ({"embedding": "gpt2"}, "embed_dim must be 768 with embedding gpt2"),
        ({"phase1": 3}, "phase1 must be a mapping"),
        ({"train": {"epochs": 0}}, "train.epochs must be >= 1, got 0"),
        ({"train": {"lr": 0.1}}, "unknown key 'train.lr'"),  # the lr is swept: protocol.lrs
        ({"lstm": {"lr": 0.1}}, "unknown key 'lstm.lr'"),
        ({"protocol": {"lrs": []}}, "protocol.lrs is empty"),
        ({"protocol": {"lrs": [0.001, 0.001]}}, "protocol.lrs has duplicates"),
        ({"protocol": {"lrs": [0.001, 0]}}, "protocol.lrs must be > 0.0, got 0"),
        ({"protocol": {"lrs": ["fast"]}}, "protocol.lrs[0] must be a number"),
        ({"protocol": {"replicates": []}}, "protocol.replicates is empty"),
        ({"protocol": {"replicates": [1, 1]}}, "protocol.replicates must not repeat a seed"),
        ({"protocol": {"replicates": [0, 1]}}, "or the top-level seed (0)"),
        ({"protocol": {"replicates": [-1]}}, "protocol.replicates must be >= 0"),
        ({"lstm": {"epochs": "many"}}, "lstm.epochs must be an integer"),  # an override is validated too
        ({"baselines": ["transformer", "transformer"]}, "baselines has duplicates"),
        ({"baselines": []}, "baselines is empty"),
        ({"dataset": {"test_fraction": 0.0}}, "dataset.test_fraction must be > 0 for source template"),
    ],
)
def test_validation_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_params(merge(RAW, raw))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_key_or_section_is_named():
    for path in (("phase1", "noise"), ("train", "seq_len"), ("protocol", "lrs"), ("seed",), ("cvp",)):
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        node = raw
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        with pytest.raises(ConfigError, match="missing (key|section) '" + ".".join(path)):
            parse_params(raw)


def test_plan_a_decouples_layer_counts_and_floats_accept_yaml_strings():
    p = default_params(token_plan="A", context_layers=3, token_layers=1, phase1={"lr": "1e-3"})
    assert (p.context_layers, p.token_layers, p.phase1.lr) == (3, 1, 0.001)


def test_stage_params_are_what_a_stage_reads_plus_what_its_inputs_were_made_with():
    p = default_params()
    flat = stage_params(p, "tokenize")
    assert "tokenizer.kind" in flat and "dataset.source" in flat and "phase1.lr" not in flat
    lstm = stage_params(p, "sweep/lstm/lr0.001")
    assert "tokenizer.kind" in lstm and "lstm.epochs" in lstm and "phase1.lr" not in lstm
    assert lstm["lr"] == 0.001 and lstm["seed"] == 0  # the cell's lr; the sweep runs on `seed`
    replicate = stage_params(p, "seeds/lstm/seed2")
    assert replicate["seed"] == 2 and "protocol.lrs" in replicate  # its lr was picked from that sweep
    assert "phase1.dist_reg_weight" in stage_params(p, "sweep/phase2_train/lr0.001")  # its ContextBlock's recipe
    # a seed replicate reruns the models on the same data, never a new dataset
    assert "seed" not in stage_params(p, "generate_dataset") and "seed" not in stage_params(p, "tokenize")
    cell = "sweep/lstm/lr0.001"
    assert params_hash(p, cell) != params_hash(default_params(tokenizer={"kind": "char"}), cell)
    assert params_hash(p, cell) != params_hash(default_params(train={"epochs": 3}), cell)
    assert params_hash(p, cell) != params_hash(p, "sweep/lstm/lr0.003")


def test_stage_params_and_outs_come_from_dvc_yaml():
    p = default_params()
    declared = stages(p)
    cell = declared["sweep/lstm/lr0.001"]
    assert cell.name == "baseline_sweep@lstm-0.001" and cell.outs == ("data/checkpoints/sweep/lstm/lr0.001.pt",
                                                                      "reports/timing/sweep/lstm/lr0.001.json")
    assert cell.params == ("seed", "device", "distributed", "eval_batch_size", "train", "lstm")
    assert declared["seeds/lstm/seed1"].name == "baseline_seeds@lstm-1"
    assert "data/lr/lstm.json" in declared["seeds/lstm/seed1"].deps
    assert "sweep/transformer/lr0.001" not in stages(default_params(baselines=["lstm"]))  # the matrix follows `baselines`
    assert set(dag.upstream_params(declared, "sweep/phase2_train/lr0.001")) >= {"phase1", "tokenizer", "dataset"}
    # every compared model has one cell per lr and one per replicate seed, a registered one not in `baselines`
    # none; Phase 1 one per seed
    from newllm.registry import compared

    assert not any(r.startswith(("sweep/mingru/", "seeds/mingru/")) for r in declared)  # not in the default baselines
    for spec in compared(p.baselines):
        for lr in p.protocol.lrs:
            assert f"sweep/{spec.record}/lr{lr}" in declared
        for seed in p.protocol.replicates:
            assert f"seeds/{spec.record}/seed{seed}" in declared
    assert {"phase1/seed0", "phase1/seed1", "phase1/seed2"} <= set(declared)
    # Phase 1's checkpoints reach New-LLM's own cells and nothing else (so phase1.lr reruns no baseline)
    readers = {r for r, s in declared.items() if any(d.startswith("data/checkpoints/phase1/") for d in s.deps)}
    assert readers == {r for r in declared if r.startswith(("sweep/phase2_train/", "seeds/phase2_train/"))}
    grid = stages(default_params(protocol={"lrs": [0.003], "replicates": [5]}))
    assert "sweep/lstm/lr0.003" in grid and "seeds/lstm/seed5" in grid and "sweep/lstm/lr0.001" not in grid


def test_bad_params_fail_fast_before_heavy_imports_and_write_nothing(tmp_path: Path):
    write_params(tmp_path / "params.yaml", context_dim=-4)
    stage = REPO / "stages" / "generate_dataset.py"
    probe = ("import sys, runpy\n"
             f"try:\n    runpy.run_path({str(stage)!r}, run_name='__main__')\n"
             "except SystemExit:\n"
             "    assert 'torch' not in sys.modules and 'mlflow' not in sys.modules, 'heavy import before validation'\n"
             "    raise\n")
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert "context_dim must be >= 1" in res.stderr and time.time() - t0 < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no data, no mlflow.db


def test_changed_params_lists_what_differs_from_a_baseline():
    base = default_params()
    assert changed_params(base, default_params()) == {}
    exp = default_params(context_dim=512, protocol={"replicates": [1, 2, 3]}, train={"epochs": 7})
    changed = changed_params(exp, base)
    assert changed["context_dim"] == (512, 256) and changed["protocol.replicates"] == ([1, 2, 3], [1, 2])
    assert changed["lstm.epochs"] == (7, 200)  # an inherited train: key shows in each model that reads it


def test_newllms_architecture_is_one_object_built_from_the_top_level_keys():
    from newllm.config import NEWLLM_KEYS

    p = default_params(context_dim=48, token_plan="A")
    arch = p.newllm_config()
    assert tuple(f.name for f in dataclasses.fields(arch)) == NEWLLM_KEYS  # the checkpoint meta's order
    assert arch.context_dim == 48 and arch.token_plan == "A" and arch.embed_dim == p.embed_dim
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.context_dim = 1
