import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, env

from newllm.config import (
    STAGE_PARAMS,
    ConfigError,
    Params,
    load_params,
    params_hash,
    parse_params,
    stage_params,
    to_dict,
)


def test_params_yaml_matches_the_dataclass_defaults():
    assert to_dict(load_params(REPO / "params.yaml")) == to_dict(Params())


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
    ],
)
def test_validation_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_plan_a_decouples_layer_counts_and_floats_accept_yaml_strings():
    p = parse_params({"token_plan": "A", "context_layers": 3, "token_layers": 1, "phase1": {"lr": "1e-3"}})
    assert (p.context_layers, p.token_layers, p.phase1.lr) == (3, 1, 0.001)


def test_stage_params_are_what_a_stage_reads_plus_what_its_inputs_were_made_with():
    flat = stage_params(Params(), "tokenize")
    assert "tokenizer.kind" in flat and "dataset.source" in flat and "phase1.lr" not in flat
    lstm = stage_params(Params(), "lstm")
    assert "context_dim" not in lstm and "tokenizer.kind" in lstm and "lstm.lr" in lstm
    assert "phase1.dist_reg_weight" in stage_params(Params(), "phase2_train")  # its ContextBlock's recipe
    # a seed replicate (`-S seed=1`) reruns the models on the same data, never a new dataset
    assert "seed" not in stage_params(Params(), "generate_dataset") and "seed" not in stage_params(Params(), "tokenize")
    assert params_hash(Params(), "lstm") != params_hash(parse_params({"tokenizer": {"kind": "char"}}), "lstm")


def test_dvc_yaml_declares_exactly_the_params_each_stage_reads():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        if "foreach" in stage:
            for item in stage["foreach"] if isinstance(stage["foreach"], list) else []:
                assert item in STAGE_PARAMS
            continue
        assert sorted(stage.get("params", [])) == sorted(STAGE_PARAMS[name]), name


def test_bad_params_fail_fast_before_heavy_imports_and_write_nothing(tmp_path: Path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"context_dim": -4}))
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
