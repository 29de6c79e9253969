from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED_DATA, section

from newllm.data import tokenizers as tk
from newllm.data.token_cache import TokenCacheError, load_cache, write_cache

TRAIN = ["the cat sat on the mat", "a dog ran in the park", "The Cat ran"]


@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
def test_round_trip_on_seen_text(kind):
    tok = tk.build_tokenizer(section("tokenizer", kind=kind, vocab_size=300, lowercase=False), TRAIN)
    for line in TRAIN:
        ids = tok.encode(line).ids
        assert tok.decode(ids) == line


def test_stream_ends_every_line_with_eos():
    tok = tk.build_tokenizer(section("tokenizer", kind="word"), TRAIN)
    ids = tk.encode_lines(tok, ["the cat", "a dog"])
    eos = tk.eos_id(tok)
    assert ids[2] == eos and ids[-1] == eos and len(ids) == 6


def test_unknown_words_map_to_unk_and_vocab_comes_from_train_only():
    tok = tk.build_tokenizer(section("tokenizer", kind="word"), TRAIN)
    ids = tok.encode("the zebra sat").ids
    assert ids[1] == tk.unk_id(tok) and ids[0] != ids[1]
    assert tok.token_to_id("zebra") is None
    assert tok.encode("THE").ids == tok.encode("the").ids  # lowercase on by default


def test_char_tokenizer_handles_unseen_characters():
    tok = tk.build_tokenizer(section("tokenizer", kind="char"), TRAIN)
    ids = tok.encode("cat!").ids
    assert len(ids) == 4 and ids[-1] == tk.unk_id(tok)


def test_bpe_respects_vocab_size_and_never_needs_unk():
    tok = tk.build_tokenizer(section("tokenizer", kind="bpe", vocab_size=270), TRAIN * 5)
    assert tok.get_vocab_size() <= 270
    assert tok.decode(tok.encode("zebra ünïcode").ids) == "zebra ünïcode"


def test_gpt2_tokenizer_from_a_local_folder(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=300, special_tokens=[tk.GPT2_EOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    GPT2TokenizerFast(tokenizer_object=raw, eos_token=tk.GPT2_EOS).save_pretrained(tmp_path)
    tok = tk.build_tokenizer(section("tokenizer", kind="gpt2", path=str(tmp_path)), [])
    assert tk.eos_id(tok) == raw.token_to_id(tk.GPT2_EOS)
    assert tok.encode("the cat").ids == raw.encode("the cat").ids


def test_gpt2_tokenizer_offline_without_files_is_a_clear_error(tmp_path: Path):
    with pytest.raises(tk.TokenizerError, match="tokenizer.path"):
        tk.load_gpt2_tokenizer(str(tmp_path / "missing"))


def test_token_cache_round_trip_and_damage_detection(tmp_path: Path):
    tok = tk.build_tokenizer(section("tokenizer", kind="word"), TRAIN)
    streams = {"train": tk.encode_lines(tok, TRAIN), "val": tk.encode_lines(tok, TRAIN[:1]), "test": []}
    write_cache(tmp_path / "tokens", tok, streams, {"vocab_size": tok.get_vocab_size()})
    cache = load_cache(tmp_path / "tokens")
    assert np.array_equal(cache.train, streams["train"]) and cache.test.size == 0
    assert cache.tokenizer().get_vocab_size() == cache.vocab_size
    (tmp_path / "tokens" / "val.npy").write_bytes(b"garbage")
    with pytest.raises(TokenCacheError, match="damaged token cache"):
        load_cache(tmp_path / "tokens")
    with pytest.raises(TokenCacheError, match="run `dvc repro tokenize`"):
        load_cache(tmp_path / "nowhere")


WIKITEXT = SHARED_DATA / "wikitext-2"


@pytest.mark.skipif(not WIKITEXT.is_dir(), reason=f"{WIKITEXT} is absent (the shared WikiText-2 copy)")
@pytest.mark.parametrize("kind, vocab_size", [("word", 8000), ("bpe", 2000), ("char", 300)])
def test_wikitext_literal_unk_is_the_special_unk_and_every_id_fits(kind, vocab_size, tmp_path: Path):
    train = (WIKITEXT / "train.txt").read_text(encoding="utf-8").splitlines()[:3000]
    valid = (WIKITEXT / "valid.txt").read_text(encoding="utf-8").splitlines()[:500]
    tok = tk.build_tokenizer(section("tokenizer", kind=kind, vocab_size=vocab_size), train)
    assert (tk.unk_id(tok), tk.eos_id(tok)) == (0, 1)  # reserved before training
    assert tok.encode("a <unk> b", add_special_tokens=False).tokens.count(tk.UNK) == 1
    streams = {"train": tk.encode_lines(tok, train), "val": tk.encode_lines(tok, valid)}
    literals = sum(line.count(tk.UNK) for line in train)
    unk = int(np.sum(np.asarray(streams["train"]) == 0))
    assert unk >= literals  # every literal is UNK (a word-level vocab cap adds out-of-vocabulary words)
    assert unk == literals if kind != "word" else unk > literals
    meta = {"vocab_size": tok.get_vocab_size(), "eos_id": 1, "unk_id": 0, "kind": kind}
    write_cache(tmp_path / "tokens", tok, streams, meta)
    assert load_cache(tmp_path / "tokens").train.max() < tok.get_vocab_size()


def test_a_cache_with_an_id_outside_the_vocabulary_is_never_written(tmp_path: Path):
    tok = tk.build_tokenizer(section("tokenizer", kind="word"), TRAIN)
    bad = {"train": [2, 3, tok.get_vocab_size()], "val": [2, 3]}
    with pytest.raises(TokenCacheError, match="train has ids outside the vocabulary"):
        write_cache(tmp_path / "tokens", tok, bad, {"vocab_size": tok.get_vocab_size(), "kind": "word"})
    assert not (tmp_path / "tokens").exists() and not (tmp_path / "tokens.tmp").exists()
