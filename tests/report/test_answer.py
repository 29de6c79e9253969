"""The report's first sentence compares New-LLM with the model the registry marks as the reference."""

import dataclasses

from newllm.registry import MODELS, REFERENCE
from newllm.report import build


def _model(ppl: float, loss: float) -> dict:
    return {"test_ppl": ppl, "test_ppl_std": 0.1, "test_loss": loss, "seeds": [0, 1, 2]}


def _inputs():
    records = ["phase2_train", "transformer", "lstm", "phase1_off", "end_to_end"]
    summary = {r: _model(7.0 + i, 2.0 + i / 10) for i, r in enumerate(records)}
    per_seed = {r: [{"test_loss": 2.0 + i / 10 + d} for d in (-0.01, 0.0, 0.01)] for i, r in enumerate(records)}
    rel = {"test_ppl_ratio_vs_transformer": 7.0 / 8.0, "test_ppl_ratio_vs_lstm": 7.0 / 9.0}
    return summary, per_seed, rel


def test_the_headline_compares_with_the_registrys_reference(monkeypatch):
    assert REFERENCE is MODELS["transformer"]  # the default: the parameter-matched Transformer
    text = build.answer(*_inputs())
    assert text.startswith("On test, over 3 seeds, New-LLM's perplexity is 7.00 ± 0.10 against 8.00 ± 0.10 for "
                           "the parameter-matched Transformer: 0.875x (better)"), text
    monkeypatch.setattr(build, "REFERENCE", dataclasses.replace(MODELS["lstm"]))  # mark another model instead
    text = build.answer(*_inputs())
    assert "against 9.00 ± 0.10 for the parameter-matched LSTM: 0.778x (better)" in text, text
