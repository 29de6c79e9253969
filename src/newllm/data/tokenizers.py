"""Tokenizers, all Hugging Face `tokenizers` objects, trained on the train split only.

Every kind ends each line with an end-of-line token, so a corpus becomes one token stream in which
sentence boundaries stay visible to the model.

The special tokens (<unk>, <eos>) are reserved before training, at ids 0 and 1, and a literal occurrence in
the text maps to its special id: WikiText and PTB write unknown words as a literal `<unk>`, which must be
the tokenizer's unknown token, not a second, ordinary word that takes its id (that left id 0 unused and
an id equal to the vocabulary size in the stream).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from newllm.config import TokenizerConfig
from newllm.errors import PipelineError

UNK, EOS = "<unk>", "<eos>"
SPECIALS = [UNK, EOS]
GPT2_EOS = "<|endoftext|>"


class TokenizerError(PipelineError):
    """A tokenizer cannot be built (e.g. GPT-2's files are not available offline)."""


def _word_level(cfg: TokenizerConfig, pre_tokenizer, decoder) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    if cfg.lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        tok.decoder = decoder
    trainer = trainers.WordLevelTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                        special_tokens=SPECIALS, show_progress=False)
    return tok, trainer


def build_tokenizer(cfg: TokenizerConfig, train_lines: list[str]) -> Tokenizer:
    if cfg.kind == "word":
        tok, trainer = _word_level(cfg, pre_tokenizers.WhitespaceSplit(), None)
    elif cfg.kind == "char":
        # Every character is a token (spaces included); Fuse joins them back without separators.
        tok, trainer = _word_level(cfg, pre_tokenizers.Split(Regex("."), behavior="isolated"), decoders.Fuse())
    elif cfg.kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                      special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    elif cfg.kind == "gpt2":
        return load_gpt2_tokenizer(cfg.path)
    else:
        raise TokenizerError(f"unknown tokenizer.kind {cfg.kind!r}")
    tok.add_special_tokens(SPECIALS)  # matched in the raw text before any split: a literal <unk> is UNK
    # The trainer would also count each literal as an ordinary token and give it a second id.
    tok.train_from_iterator((_without_specials(line) for line in train_lines), trainer=trainer)
    return tok


def _without_specials(line: str) -> str:
    for special in SPECIALS:
        line = line.replace(special, " ")
    return line


def load_gpt2_tokenizer(path: str | None) -> Tokenizer:
    """GPT-2's pretrained tokenizer from a local folder (save_pretrained layout) or the HF cache."""
    from transformers import AutoTokenizer

    source = path or "gpt2"
    try:
        hf = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise TokenizerError(
            f"cannot load the GPT-2 tokenizer from {source!r} ({type(e).__name__}); offline, set tokenizer.path "
            "to a folder written by `AutoTokenizer.from_pretrained('gpt2').save_pretrained(folder)` on a machine "
            "with hub access") from None
    tok = hf.backend_tokenizer
    if tok.token_to_id(GPT2_EOS) is None:
        raise TokenizerError(f"the tokenizer at {source!r} has no {GPT2_EOS} token: not a GPT-2 tokenizer")
    return tok


def eos_id(tok: Tokenizer) -> int:
    for token in (EOS, GPT2_EOS):
        i = tok.token_to_id(token)
        if i is not None:
            return i
    raise TokenizerError("tokenizer has no end-of-line token")


def unk_id(tok: Tokenizer) -> int | None:
    return tok.token_to_id(UNK)


def encode_lines(tok: Tokenizer, lines: list[str]) -> list[int]:
    """One stream: each line's ids followed by the end-of-line id."""
    eos = eos_id(tok)
    ids: list[int] = []
    for enc in tok.encode_batch(lines, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return ids
