"""Streaming generation: determinism, real streaming, exactness of the carried state, O(1) state, decoding,
and the `newllm generate` command."""

from pathlib import Path

import pytest
import torch
from helpers import section, use_project_dvc_yaml, write_params
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from newllm import cli
from newllm.data.token_cache import write_cache
from newllm.data.tokenizers import EOS, UNK
from newllm.generation import decode_stream, stream_tokens
from newllm.models.cvfp import NewLLM
from newllm.models.cvp import CVPLM
from newllm.models.factory import save_model
from newllm.models.lstm import LSTMLM
from newllm.models.transformer import TransformerLM
from newllm.report.probes import tensor_bytes

V = 40
PROMPT = [1, 5, 7]
KINDS = ["newllm", "transformer", "lstm", "cvp"]


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "newllm":
        return NewLLM(V, context_dim=12, embed_dim=8, context_layers=2, token_layers=2)
    if kind == "transformer":
        return TransformerLM(V, n_layer=1, n_head=2, n_embd=8, seq_len=64, dropout=0.0)
    if kind == "lstm":
        return LSTMLM(V, embed_dim=8, hidden_dim=8, num_layers=2, dropout=0.0)
    return CVPLM(V, embed_dim=8, context_dim=8, hidden_dim=8, dropout=0.0)


def count_calls(model: torch.nn.Module) -> list[int]:
    """Counts the model's forward passes (TransformerLM: its KV-cache steps)."""
    calls = [0]
    name = "step" if isinstance(model, TransformerLM) else "forward"
    inner = getattr(model, name)

    def counted(*a, **kw):
        calls[0] += 1
        return inner(*a, **kw)

    setattr(model, name, counted)
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_tokens_other_seed_other_tokens(kind):
    m = tiny(kind)
    a = list(stream_tokens(m, PROMPT, 15, seed=3))
    assert len(a) == 15 and all(0 <= t < V for t in a)
    assert list(stream_tokens(m, PROMPT, 15, seed=3)) == a
    assert list(stream_tokens(m, PROMPT, 15, seed=4)) != a
    assert list(stream_tokens(m, PROMPT, 15, greedy=True)) == list(stream_tokens(m, PROMPT, 15, greedy=True, seed=9))


@pytest.mark.parametrize("kind", KINDS)
def test_first_token_arrives_before_the_rest_is_computed(kind):
    m = tiny(kind)
    full = list(stream_tokens(m, PROMPT, 10, seed=1))
    calls = count_calls(m)
    it = stream_tokens(m, PROMPT, 10, seed=1)
    assert calls[0] == 0  # nothing computed until asked
    assert next(it) == full[0]
    assert calls[0] == 1  # only the prompt's forward: the other 9 tokens do not exist yet
    assert [full[0], *it] == full
    # one forward per further token (TransformerLM.stream also runs one step past the last token)
    assert calls[0] == 10 + isinstance(m, TransformerLM)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_stream_matches_a_full_recomputation(kind):
    """The carried state (or KV cache) is exact: feeding prompt + output at once gives the same argmaxes."""
    m = tiny(kind).eval()
    out = list(stream_tokens(m, PROMPT, 12, greedy=True))
    with torch.no_grad():
        logits, _ = m(torch.tensor([PROMPT + out[:-1]]))
    assert logits[0, len(PROMPT) - 1:].argmax(-1).tolist() == out


def test_top_k_1_is_greedy_and_the_model_mode_is_restored():
    m = tiny("newllm").train()
    assert list(stream_tokens(m, PROMPT, 8, top_k=1, seed=5)) == list(stream_tokens(m, PROMPT, 8, greedy=True))
    assert m.training


@pytest.mark.parametrize("kind", ["newllm", "lstm", "cvp"])
def test_recurrent_state_does_not_grow_with_output_length(kind):
    m = tiny(kind)
    sizes: list[int] = []
    inner = m.forward

    def recording(x, state=None):
        logits, new = inner(x, state)
        sizes.append(tensor_bytes(new))
        return logits, new

    m.forward = recording
    list(stream_tokens(m, PROMPT, 200, seed=0))
    assert len(sizes) == 200 and len(set(sizes)) == 1
    assert sizes[0] <= 4 * 2 * 2 * 12  # at most (h, c) x 2 layers x width floats: nothing per token


def test_bad_arguments_fail_at_the_call_not_at_first_next():
    m = tiny("lstm")
    with pytest.raises(ValueError, match="empty"):
        stream_tokens(m, [], 5)
    with pytest.raises(ValueError, match="temperature"):
        stream_tokens(m, PROMPT, 5, temperature=0.0)
    with pytest.raises(ValueError, match="positional"):
        stream_tokens(CVPLM(V, positional=True), PROMPT, 5)
    assert list(stream_tokens(m, PROMPT, 0)) == []


# ----------------------------------------------------------------------------------------------- decoding
def word_tokenizer(lines: list[str]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=[UNK, EOS], show_progress=False))
    return tok


def test_decode_stream_word_level_spaces_and_end_of_line():
    tok = word_tokenizer(["the cat sat", "a dog ran"])
    eos = tok.token_to_id(EOS)
    ids = [tok.token_to_id(w) for w in ["cat", "sat"]] + [eos] + [tok.token_to_id(w) for w in ["a", "dog"]]
    prompt = [eos, tok.token_to_id("the")]
    pieces = list(decode_stream(tok, iter(ids), prompt_ids=prompt, eos_id=eos))
    assert pieces == [" cat", " sat", "\n", "a", " dog"]
    assert list(decode_stream(tok, iter(ids[:2])))[0] == "cat"  # no prompt: no leading separator


def test_decode_stream_byte_level_never_splits_a_character():
    text = ["héllo wörld 😀 naïve café", "😀 😀 héllo"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=260, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = tok.encode("café 😀 wörld").ids
    pieces = list(decode_stream(tok, iter(ids)))
    assert "".join(pieces) == tok.decode(ids) == "café 😀 wörld"
    assert not any("\ufffd" in p for p in pieces)


# ----------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A project folder with params, a token cache and one trained (well, initialised) LSTM checkpoint."""
    monkeypatch.chdir(tmp_path)
    lstm = {"embed_dim": 8, "hidden_dim": 8, "num_layers": 1, "dropout": 0.0}
    write_params(tmp_path / "params.yaml", lstm=lstm, seed=0)
    lines = ["the cat sat on the mat", "a dog ran in the park"]
    tok = word_tokenizer(lines)
    write_cache(tmp_path / "data" / "tokens", tok, {"train": [2, 3, 4, 1], "val": [2, 3, 1]},
                {"vocab_size": tok.get_vocab_size(), "eos_id": tok.token_to_id(EOS), "unk_id": 0, "kind": "word"})
    torch.manual_seed(0)
    cfg = section("lstm", **lstm)
    model = LSTMLM.from_config(cfg, tok.get_vocab_size())
    use_project_dvc_yaml(tmp_path)  # where each cell's checkpoint is
    (tmp_path / "data" / "lr").mkdir()
    (tmp_path / "data" / "lr" / "lstm.json").write_text('{"lr": 0.001}')  # as if pick_lr had chosen it
    save_model(tmp_path / "data/checkpoints/sweep/lstm/lr0.001.pt", "lstm", model, cfg, tok.get_vocab_size())
    return tok


def test_generate_command_streams_seeded_text(workspace, capsys):
    argv = ["generate", "--model", "lstm", "--prompt", "the cat", "--max-new-tokens", "6", "--seed", "2"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the cat") and out.endswith("\n")
    assert "the lr chosen on val; " in err and "params" in err  # which params the checkpoint was trained under
    words = out.split()
    assert len(words) >= 2 + 6 - out.count("\n") + 1  # end-of-line tokens print as line breaks
    assert set(words) <= set(workspace.get_vocab())
    assert cli.main(argv) == 0 and capsys.readouterr().out == out  # same seed, same text
    assert cli.main(argv[:-1] + ["3"]) == 0 and capsys.readouterr().out != out


def test_generate_command_missing_checkpoint_is_one_clear_line(workspace, capsys):
    assert cli.main(["generate", "--model", "newllm", "--prompt", "the"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data/lr/phase2_train.json not found: the lr sweep has not") and "\n" not in err
    Path("data/lr/phase2_train.json").write_text('{"lr": 0.003}')
    assert cli.main(["generate", "--model", "newllm", "--prompt", "the"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: checkpoint not found: ") and err.endswith("(run the stage that writes it: `dvc repro`)")
    assert "data/checkpoints/sweep/phase2_train/lr0.003.pt" in err
    write_params(Path("params.yaml"), baselines=["transformer"])
    assert cli.main(["generate", "--model", "lstm", "--prompt", "the"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: lstm is not trained under these params: add it to params.yaml's baselines (transformer)"

