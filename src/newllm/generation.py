"""Streaming text generation for every model of the pipeline (New-LLM, Transformer, LSTM, CVP).

`stream_tokens` yields token ids one at a time, as they are sampled, so a caller can print each before the
next is computed. Recurrent models (New-LLM, LSTM, CVP: `logits, state = model(ids, state)`) read the
prompt once and then one token per step, carrying only their fixed-size state: memory is O(1) in the length
of the output. The Transformer uses its KV cache (`TransformerLM.stream`), whose memory grows with the
context up to n_positions. `decode_stream` turns the ids into text pieces as they arrive.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from newllm.models.transformer import sample


def _pick(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator,
          greedy: bool) -> int:
    return int(logits.argmax()) if greedy else sample(logits, temperature, top_k, generator)


def stream_tokens(model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, seed: int = 0, greedy: bool = False) -> Iterator[int]:
    """Yield `max_new_tokens` sampled token ids, one per step, continuing `prompt_ids` (not repeated).

    Sampling: logits / temperature, optional top-k, a multinomial draw from a torch.Generator seeded with
    `seed` (same seed, same model -> same tokens); `greedy` takes the argmax instead. The model is put in
    eval mode while the generator runs and restored afterwards. Bad arguments raise here, not at the
    first `next()`.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. the end-of-line id)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy for argmax decoding")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if not getattr(model, "streamable", True):
        raise ValueError("a CVP model with a positional table indexes positions within a training window; "
                         "it cannot stream one token at a time (train it with positional: false)")
    return _stream(model, list(prompt_ids), max_new_tokens, temperature, top_k, seed, greedy)


@torch.no_grad()  # as a decorator it covers each resumption of the generator, never the consumer's code
def _stream(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, temperature: float,
            top_k: int | None, seed: int, greedy: bool) -> Iterator[int]:
    if max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)  # `sample` draws on the CPU
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        if hasattr(model, "stream"):  # a model with its own decoding (the Transformer: its KV cache)
            # greedy == top-1: the only token left after the top-k mask, whatever the draw
            yield from model.stream(prompt, max_new_tokens, 1.0 if greedy else temperature,
                                    1 if greedy else top_k, gen)
            return
        # recurrent: the prompt in one call, then one token per call; the state is all that is carried
        logits, state = model(prompt.unsqueeze(0), None)
        for i in range(max_new_tokens):
            tok = _pick(logits[0, -1], temperature, top_k, gen, greedy)
            yield tok
            if i + 1 < max_new_tokens:  # no forward for a token nobody will ask for
                logits, state = model(prompt.new_tensor([[tok]]), state)
    finally:
        model.train(was_training)


def decode_stream(tokenizer, ids: Iterable[int], prompt_ids: Sequence[int] = (),
                  eos_id: int | None = None) -> Iterator[str]:
    """Text pieces for a stream of token ids, each yielded as soon as it is complete.

    Decodes incrementally (the prefix/read-offset scheme of HF text-generation-inference): the new piece is
    decode(window + new) minus decode(window), so the tokenizer's own joining rule applies -- word-level
    tokenizers (no decoder) join with spaces, char-level ones fuse, byte-level BPE waits until a multi-byte
    character is complete (no "\\ufffd" pieces). `prompt_ids` is the text already shown, used only so the
    first piece gets the right separator. `eos_id` is rendered as a newline (it ends a line in our streams).
    The window is trimmed after each piece, so memory stays constant however long the stream.
    """
    context = list(prompt_ids)
    if eos_id is not None and eos_id in context:  # a new line starts after the last end-of-line
        context = context[len(context) - context[::-1].index(eos_id):]
    window = context[-6:]  # a few tokens are enough to know the separator
    read = len(window)  # window[:read] is text already shown
    for tok in ids:
        if eos_id is not None and tok == eos_id:
            yield "\n"
            window, read = [], 0
            continue
        window.append(tok)
        before = tokenizer.decode(window[:read], skip_special_tokens=False)
        after = tokenizer.decode(window, skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            yield after[len(before):]
            window = window[read:]  # keep only the last piece as the next window's context
            read = len(window)


def encode_prompt(tokenizer, text: str, eos_id: int) -> list[int]:
    """Prompt ids as training saw a line: training streams put an end-of-line before every line, so a
    prompt starts with one (the report's samples and `newllm generate` share this)."""
    return [eos_id, *tokenizer.encode(text, add_special_tokens=False).ids]
