"""Phase 2's context cache: the frozen ContextBlock's exact contexts of every position, computed once.

Pure code: no MLflow; the stage names the scratch folder. `build_caches` is what the Phase 2 stage feeds
the trainer (`fit_lm(extras=...)`), `compute_contexts` the one pass behind it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from newllm.data.disk_array import scratch_tensor
from newllm.models.cvfp import NewLLM

CACHE_CHUNK_POSITIONS = 32768  # positions (over all streams) compute_contexts holds at a time: ~130 MB at L x Dc = 2 x 512


def context_cache_shape(model: NewLLM, n_tokens: int, streams: int = 1) -> tuple[int, int, int]:
    """The (rows, L, Dc) storage compute_contexts fills for n_tokens (S streams padded to equal length)."""
    S = max(1, min(streams, n_tokens))
    return S * math.ceil(n_tokens / S), model.num_context_layers, model.context_dim


def prefix_layout(n_tokens: int, streams: int, prefix: int) -> tuple[int, int]:
    """(tokens, streams) for compute_contexts to give a stream's first `prefix` positions the very contexts
    of its whole-stream layout (S streams of ceil(N / S)): only the streams that hold the prefix, each as long."""
    n = -(-n_tokens // streams)
    k = min(streams, -(-prefix // n)) if prefix else streams
    return min(n_tokens, k * n), k


@torch.no_grad()
def compute_contexts(model: NewLLM, ids: Tensor, streams: int = 1, chunk: int = 2048,
                     dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                     out: Tensor | None = None) -> Tensor:
    """Phase 2's cache: (N,) token ids -> (N, L, Dc) per-position, per-layer contexts, on the CPU.

    One no-grad pass of the exact recurrence with the (frozen) ContextBlock: the context is carried from
    token to token, never reset per token (the research's bug 3). The stream is cut into S contiguous
    chunks (ceil(N / S) tokens; the last padded at its end, the padding's outputs discarded) run as one
    batch, each starting from zero; S = 1 is the single-stream recurrence. `chunk` bounds the positions
    of a stream embedded at a time, and CACHE_CHUNK_POSITIONS those of all S streams (memory stays flat
    whatever S and N), the context being carried across chunks; `dtype` is the stored dtype
    (bf16 halves the cache; Phase2Model casts it back). `out` (shape `context_cache_shape`) is storage
    to fill instead of a new in-memory tensor, e.g. a DiskArray when the cache does not fit in RAM: it is
    filled chunk by chunk, with the same numbers. Computed in fp32 on every device (no autocast):
    under bf16 the rounding compounds along the recurrence (cos down to 0.91 against fp32 at D = 256 on
    an H100), and this loop is launch-bound on a GPU anyway.
    """
    if ids.dim() != 1:
        raise ValueError(f"compute_contexts wants a 1-D token stream, got shape {tuple(ids.shape)}")
    p = next(model.parameters())
    device = p.device if device is None else torch.device(device)
    n_tok = ids.numel()
    S = max(1, min(streams, n_tok))
    n = math.ceil(n_tok / S)
    grid = torch.cat([ids, ids.new_zeros(S * n - n_tok)]).reshape(S, n)
    shape = (S, n, model.num_context_layers, model.context_dim)
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif out.shape != (S * n, *shape[2:]):
        raise ValueError(f"out has shape {tuple(out.shape)}, want {(S * n, *shape[2:])} (context_cache_shape)")
    out = out.reshape(shape)  # a view of a Tensor; a DiskArray is written slab by slab
    c, step = None, max(1, min(chunk, CACHE_CHUNK_POSITIONS // S))
    for s in range(0, n, step):
        ctx, c = model.sequential_contexts(grid[:, s:s + step].to(device), initial=c)
        out[:, s:s + step] = ctx.to(dtype).cpu()
    return out.reshape(S * n, *out.shape[2:])[:n_tok]


def build_caches(llm: NewLLM, cache: Any, train_streams: int, train_prefix: int, eval_streams: int,
                 scratch: Path, device: torch.device) -> dict[str, dict[str, Tensor]]:
    """{split: {"contexts": (n, L, Dc)}} of a token cache's train, val and test splits (empty ones left out).

    Train: only the prefix the trainer reads (`train_prefix` tokens, 0 = all), in the whole stream's layout
    of `train_streams` streams. Val/test: `eval_streams` rows, each restarting from a zero context, as the
    recurrent baselines' state does, so no model sees more past than another on the tokens all are scored
    on. A split too large for RAM goes to a file under `scratch` (the caller removes it)."""
    out = {}
    for split in ("train", "val", "test"):
        ids = torch.from_numpy(getattr(cache, split).astype("int64"))
        if not ids.numel():
            continue
        if split == "train":
            n_ids, streams = prefix_layout(len(ids), train_streams, train_prefix)
            ids = ids[:n_ids]
        else:
            streams = eval_streams
            ids = ids[: len(ids) // streams * streams]
        storage = scratch_tensor(context_cache_shape(llm, len(ids), streams), path=scratch / f"{split}.bin")
        if not isinstance(storage, Tensor):
            print(f"phase2: {split} contexts ({storage.numel() * 4 / 2**30:.1f} GiB) kept on disk in {scratch}")
        out[split] = {"contexts": compute_contexts(llm, ids, streams=streams, device=device, out=storage)}
    return out
