"""The report's first sentence compares New-LLM with the model the registry marks as the reference, the second
with the best fixed-state baseline."""

import dataclasses

from newllm.registry import MODELS, REFERENCE
from newllm.report import build


def _model(ppl: float, loss: float) -> dict:
    return {"test_ppl": ppl, "test_ppl_std": 0.1, "test_loss": loss, "seeds": [0, 1, 2]}


def _inputs():
    records = ["phase2_train", "transformer", "lstm", "phase1_off", "end_to_end", "mingru"]
    summary = {r: _model(7.0 + i, 2.0 + i / 10) for i, r in enumerate(records)}
    per_seed = {r: [{"test_loss": 2.0 + i / 10 + d} for d in (-0.01, 0.0, 0.01)] for i, r in enumerate(records)}
    rel = {"test_ppl_ratio_vs_transformer": 7.0 / 8.0, "test_ppl_ratio_vs_lstm": 7.0 / 9.0,
           "test_ppl_ratio_vs_mingru": 7.0 / 12.0}
    return summary, per_seed, rel


def test_the_headline_compares_with_the_registrys_reference(monkeypatch):
    assert REFERENCE is MODELS["transformer"]  # the default: the parameter-matched Transformer
    text = build.answer(*_inputs())
    assert text.startswith("On test, over 3 seeds, New-LLM's perplexity is 7.00 ± 0.10 against 8.00 ± 0.10 for "
                           "the parameter-matched Transformer: 0.875x (better)"), text
    monkeypatch.setattr(build, "REFERENCE", dataclasses.replace(MODELS["lstm"]))  # mark another model instead
    text = build.answer(*_inputs())
    assert "against 9.00 ± 0.10 for the parameter-matched LSTM: 0.778x (better)" in text, text


def test_the_second_sentence_names_the_best_fixed_state_baseline():
    summary, per_seed, rel = _inputs()
    text = build.answer(summary, per_seed, rel)
    # the LSTM (9.00) beats minGRU (12.00); the Transformer (8.00) is not fixed-state
    assert ("Against the best fixed-state baseline of the 2 in this run, the LSTM (9.00 ± 0.10), New-LLM's "
            "perplexity is 0.778x (better); the test-loss difference -0.2000 nats/token is larger") in text, text
    summary["mingru"] = _model(6.0, 1.5)  # now minGRU is the best, and New-LLM worse than it
    per_seed["mingru"] = [{"test_loss": 1.5 + d} for d in (-0.01, 0.0, 0.01)]
    rel["test_ppl_ratio_vs_mingru"] = 7.0 / 6.0
    assert "the minGRU (6.00 ± 0.10), New-LLM's perplexity is 1.167x (worse)" in build.answer(summary, per_seed, rel)
    del rel["test_ppl_ratio_vs_lstm"], rel["test_ppl_ratio_vs_mingru"]  # unmatched: no ratio, not compared
    assert "No parameter-matched fixed-state baseline (LSTM, CVP, minGRU, Mamba) ran" in build.answer(
        summary, per_seed, rel)
