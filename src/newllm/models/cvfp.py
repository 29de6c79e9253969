"""New-LLM, generation B: CVFP (Context Vector Fixed-Point), "E plan". Pure nn.Modules: no files, no tracking.

The past is held in one fixed-size context vector per position, updated token by token (no attention):

    x_t     = LN_e(E[w_t])                                      InputEmbedding ("embed_norm")
    c_t^0   = c_{t-1}^L   (zero at the start of a stream)       the context carried across tokens
    c_t^l   = LN(c_t^{l-1} + ReLU(W_c^l [c_t^{l-1} ; x_t] + b))  ContextLayer l = 1..L (ContextBlock)
    h_t^0   = x_t
    h_t^l   = LN(h_t^{l-1} + ReLU(W_h^l [c_t^{k(l)} ; h_t^{l-1}] + b))   TokenLayer l (TokenBlock)
    logits  = W_o h_t^L + b_o                                   head (optionally tied to E)

with k(l) = l for plan E (token layer l reads context layer l; needs as many token as context layers) and
k(l) = L for plan A (every token layer reads the block's last output).

Training happens in two phases (newllm.training.phase1 and the generic trainer):
- Phase 1 trains the ContextBlock alone, towards a fixed point of the recurrence (no next-token loss).
- Phase 2 freezes the ContextBlock, computes every position's per-layer contexts once (they are a
  deterministic function of the tokens before it), and trains TokenBlock + head in parallel over positions
  with cross-entropy (`Phase2Model`).

The embedding is the context path's input, so it lives with the ContextBlock:
- `embedding: learned` (the offline default): randomly initialised, trained in Phase 1 together with the
  ContextBlock, and frozen with it in Phase 2 (the cached contexts were computed from it).
- `embedding: gpt2` (`InputEmbedding.from_gpt2`): GPT-2's pretrained input matrix, frozen throughout. Its
  embed_norm LayerNorm (2 * embed_dim parameters) still trains in Phase 1 and freezes in Phase 2, exactly
  like the learned case, so "the embedding module" has one rule for both.
A tied head (`tie_head`) shares the embedding matrix, so it is frozen whenever the embedding is (only its
bias trains in Phase 2): that is what the research did with GPT-2's matrix.

Initialisation (the research's, kept as the default): every Linear in the context and token layers
N(0, 0.1^2), biases N(0, 0.01^2). With fan-in 2D this gives pre-activations of std ~0.1*sqrt(2D) (3.9 at
D = 768), larger than the unit-scale residual, but every layer ends in a LayerNorm, so activations stay
O(1) at any depth and the scale only sets how much of each update is new token vs carried context. That
makes the recurrence contract, which is what lets the Phase 1 Jacobi iterates track the exact recurrence
while the weights move: on 40 k WikiText-2 words (D = 128, 2 layers, default Phase 1) the final parallel
contexts had mean cosine 0.93 to an exact recomputation with N(0, 0.1^2) but 0.15 with N(0, 0.02^2)
(a near-identity, long-memory recurrence), with train ER 86 % vs 68 % and a slightly lower Phase 2
validation loss (6.52 vs 6.58). `init_std` keeps it a knob. The head is not followed by a LayerNorm, so its
scale sets the initial logits directly: it uses N(0, 0.02^2) (GPT-2's), so the initial loss is ~log(vocab)
instead of ~log(vocab) + 0.1^2 * D / 2 nats.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from newllm.errors import PipelineError

TokenPlan = Literal["E", "A"]


def _init_linear(m: nn.Linear, std: float, bias_std: float) -> None:
    nn.init.normal_(m.weight, mean=0.0, std=std)
    if m.bias is not None:
        nn.init.normal_(m.bias, mean=0.0, std=bias_std)


# ----------------------------------------------------------------------------------------------- context
class ContextLayer(nn.Module):
    """c' = LN(c + ReLU(W [c; x] + b)); without `norm`, c' = c + ReLU(W [c; x] + b).

    W [c; x] + b is stored as two Linears, W_c c + (W_x x + b): the same function and parameter count as
    one context_dim x (context_dim + embed_dim) matrix, but the token half does not depend on the
    recurrence, so callers can compute it once per distinct token for every position at once
    (`NewLLM.token_projections`), and the gradient w.r.t. a detached input context is never formed.
    """

    def __init__(self, context_dim: int, embed_dim: int, norm: bool = True):
        super().__init__()
        self.w_c = nn.Linear(context_dim, context_dim, bias=False)
        self.w_x = nn.Linear(embed_dim, context_dim)
        # Without the LayerNorm the residual stack grows without bound (the research saw NaNs): ablation only.
        self.norm = nn.LayerNorm(context_dim) if norm else nn.Identity()

    def token_proj(self, x: Tensor) -> Tensor:
        return self.w_x(x)

    def forward(self, c: Tensor, x: Tensor | None = None, *, xp: Tensor | None = None) -> Tensor:
        """c (..., Dc) and either x (..., De) or its precomputed projection xp = token_proj(x)."""
        if xp is None:
            xp = self.w_x(x)
        if c.dim() == 2 and xp.dim() == 2:  # the hot paths: one fused xp + c @ W_c^T
            h = torch.addmm(xp, c, self.w_c.weight.t())
        else:
            h = self.w_c(c) + xp
        return self.norm(c + h.relu_())  # in place: h is a fresh tensor nobody else holds


class ContextBlock(nn.Module):
    """L ContextLayers; layer 0 reads the previous position's context, every layer reads the token."""

    def __init__(self, context_dim: int, embed_dim: int, num_layers: int, norm: bool = True):
        super().__init__()
        self.context_dim, self.embed_dim, self.num_layers = context_dim, embed_dim, num_layers
        self.layers = nn.ModuleList(ContextLayer(context_dim, embed_dim, norm) for _ in range(num_layers))

    def outputs(self, prev_context: Tensor, x: Tensor | None = None, *, xp: Sequence[Tensor] | None = None
                ) -> list[Tensor]:
        """Every layer's output, a list of L (..., Dc) tensors, from the token x (..., De) or the L
        layers' precomputed token halves xp[l] = layers[l].token_proj(x) (..., Dc)."""
        outs, c = [], prev_context
        for i, layer in enumerate(self.layers):
            c = layer(c, x) if xp is None else layer(c, xp=xp[i])
            outs.append(c)
        return outs

    def forward(self, prev_context: Tensor, x: Tensor) -> Tensor:
        """prev_context (N, Dc), x (N, De) -> (N, L, Dc); N independent positions (any leading dims).

        The block's output context (the next position's c^0) is the last layer's, out[..., -1, :].
        """
        return torch.stack(self.outputs(prev_context, x), dim=-2)


# ----------------------------------------------------------------------------------------------- token
class TokenLayer(nn.Module):
    """h' = LN(h + ReLU(W [c; h] + b))."""

    def __init__(self, context_dim: int, embed_dim: int):
        super().__init__()
        self.fc = nn.Linear(context_dim + embed_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, c: Tensor, h: Tensor) -> Tensor:
        return self.norm(h + F.relu(self.fc(torch.cat([c, h], dim=-1))))


class TokenBlock(nn.Module):
    """Token layers over the per-layer contexts. Plan E: layer l reads context layer l; plan A: the last."""

    def __init__(self, context_dim: int, embed_dim: int, num_layers: int, plan: TokenPlan = "E"):
        super().__init__()
        if plan not in ("E", "A"):
            raise ValueError(f"token plan must be 'E' or 'A', got {plan!r}")
        self.plan, self.num_layers = plan, num_layers
        self.layers = nn.ModuleList(TokenLayer(context_dim, embed_dim) for _ in range(num_layers))

    def forward(self, contexts: Tensor, x: Tensor) -> Tensor:
        """contexts (..., L, Dc), x (..., De) -> h (..., De)."""
        if self.plan == "E" and contexts.size(-2) != self.num_layers:
            raise ValueError(f"token plan E needs one context layer per token layer: got {contexts.size(-2)} "
                             f"context layers for {self.num_layers} token layers")
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(contexts[..., i if self.plan == "E" else -1, :], h)
        return h


# ----------------------------------------------------------------------------------------------- embedding
class InputEmbedding(nn.Module):
    """x = LN(E[w]): a token embedding followed by a LayerNorm ("embed_norm")."""

    def __init__(self, vocab_size: int, embed_dim: int):
        super().__init__()
        self.vocab_size, self.embed_dim = vocab_size, embed_dim
        self.wte = nn.Embedding(vocab_size, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        # The embed_norm makes the scale irrelevant to the context path; 1/sqrt(D) gives a tied head
        # unit-scale initial logits.
        nn.init.normal_(self.wte.weight, mean=0.0, std=embed_dim ** -0.5)

    def forward(self, ids: Tensor) -> Tensor:
        return self.norm(self.wte(ids))

    @classmethod
    def from_gpt2(cls, path_or_name: str | Path = "gpt2", local_files_only: bool = False) -> InputEmbedding:
        """GPT-2's pretrained input embedding matrix (wte), frozen; the embed_norm stays trainable.

        `path_or_name` is a local folder in `save_pretrained` layout or a hub name already in the HF cache
        (or downloadable, when not offline). Raises RuntimeError naming the path when the weights cannot be
        loaded: never a silent random fallback.
        """
        try:
            from transformers import GPT2Model

            gpt2 = GPT2Model.from_pretrained(str(path_or_name), local_files_only=local_files_only)
        except (OSError, ValueError) as e:
            raise RuntimeError(
                f"GPT-2 embedding weights could not be loaded from {str(path_or_name)!r}: {e}\n"
                "Provide a local folder in save_pretrained layout and point embedding_path at it, e.g. once, "
                "online: python -c \"from transformers import GPT2Model; "
                "GPT2Model.from_pretrained('gpt2').save_pretrained('models/gpt2')\" "
                "then set embedding_path: models/gpt2 -- or use embedding: learned."
            ) from e
        weight = gpt2.get_input_embeddings().weight.detach().clone()
        emb = cls(weight.size(0), weight.size(1))
        with torch.no_grad():
            emb.wte.weight.copy_(weight)
        emb.wte.weight.requires_grad_(False)
        return emb


# ----------------------------------------------------------------------------------------------- model
class NewLLM(nn.Module):
    """Embedding + ContextBlock + TokenBlock + head. `forward` runs the exact token-by-token recurrence."""

    def __init__(self, vocab_size: int, context_dim: int, embed_dim: int, context_layers: int,
                 token_layers: int, token_plan: TokenPlan = "E", context_norm: bool = True,
                 tie_head: bool = False, embedding: InputEmbedding | None = None,
                 init_std: float = 0.1, bias_std: float = 0.01, head_std: float = 0.02):
        super().__init__()
        if token_plan == "E" and context_layers != token_layers:
            raise ValueError(f"token plan E needs context_layers == token_layers (token layer l reads context "
                             f"layer l), got {context_layers} and {token_layers}; use plan A to decouple them")
        if embedding is None:
            embedding = InputEmbedding(vocab_size, embed_dim)
        if (embedding.vocab_size, embedding.embed_dim) != (vocab_size, embed_dim):
            raise ValueError(f"embedding is {embedding.vocab_size} x {embedding.embed_dim}, the model wants "
                             f"vocab_size {vocab_size} x embed_dim {embed_dim}")
        self.vocab_size, self.context_dim, self.embed_dim = vocab_size, context_dim, embed_dim
        self.embedding = embedding
        # Phase 1's weights (embedding + ContextBlock) are built and initialised before anything else draws
        # from the RNG, so for a given seed they depend only on (vocab_size, context_dim, embed_dim,
        # context_layers, context_norm) -- the params Phase 1's stage reads -- not on the token block or head.
        self.context_block = ContextBlock(context_dim, embed_dim, context_layers, context_norm)
        self._init_block(self.context_block, init_std, bias_std)
        self.token_block = TokenBlock(context_dim, embed_dim, token_layers, token_plan)
        self._init_block(self.token_block, init_std, bias_std)
        self.head = nn.Linear(embed_dim, vocab_size)
        _init_linear(self.head, head_std, 0.0)
        if tie_head:  # the head shares (and is frozen with) the embedding matrix; its bias stays its own
            self.head.weight = self.embedding.wte.weight

    @classmethod
    def from_config(cls, cfg, vocab_size: int, load_pretrained: bool = True) -> NewLLM:
        """From the top-level model params (context_dim, ..., embedding, embedding_path, tie_head).

        `load_pretrained=False` skips reading GPT-2's matrix (shapes only, e.g. to count params or to load
        a checkpoint that already holds it)."""
        embedding = None
        if cfg.embedding == "gpt2":
            try:
                embedding = (InputEmbedding.from_gpt2(cfg.embedding_path or "gpt2") if load_pretrained
                             else InputEmbedding(vocab_size, cfg.embed_dim))
            except RuntimeError as e:  # never a silent random fallback: stop with the how-to
                raise PipelineError(str(e).replace("\n", " ")) from None
            if embedding.vocab_size != vocab_size:
                raise PipelineError(f"GPT-2 embedding has {embedding.vocab_size} rows, the tokenizer {vocab_size}")
            embedding.wte.weight.requires_grad_(False)
        return cls(vocab_size, cfg.context_dim, cfg.embed_dim, cfg.context_layers, cfg.token_layers,
                   cfg.token_plan, cfg.context_norm, cfg.tie_head, embedding)

    @staticmethod
    def _init_block(block: nn.Module, std: float, bias_std: float) -> None:
        for m in block.modules():
            if isinstance(m, nn.Linear):
                _init_linear(m, std, bias_std)

    @property
    def num_context_layers(self) -> int:
        return self.context_block.num_layers

    def sequential_contexts(self, tokens: Tensor, initial: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The exact recurrence: tokens (N,) or S independent streams (S, N) ->
        (contexts (..., N, L, Dc), last context (..., Dc)).

        c_t^0 = c_{t-1}^L, starting from `initial` (zero when None). Runs under the caller's grad mode.
        """
        single = tokens.dim() == 1
        ids = tokens.unsqueeze(0) if single else tokens
        xp = self.token_projections(ids)  # L x (S, N, Dc)
        c = initial if initial is not None else xp[0].new_zeros(ids.size(0), self.context_dim)
        if single and c.dim() == 1:
            c = c.unsqueeze(0)
        per_token = list(zip(*(p.unbind(1) for p in xp), strict=True))  # N x (L x (S, Dc)) views
        per_layer: list[list[Tensor]] = [[] for _ in range(self.num_context_layers)]
        for xp_t in per_token:
            outs = self.context_block.outputs(c, xp=xp_t)
            c = outs[-1]  # c_t^0 = c_{t-1}^L
            for acc, out in zip(per_layer, outs, strict=True):
                acc.append(out)
        if per_token:
            contexts = torch.stack([torch.stack(acc, dim=1) for acc in per_layer], dim=2)  # (S, N, L, Dc)
        else:
            contexts = torch.stack(xp, dim=-2)
        return (contexts[0], c[0]) if single else (contexts, c)

    def token_projections(self, ids: Tensor) -> list[Tensor]:
        """Every context layer's token half W_x^l LN(E[w]) + b^l for token ids (...) -> L x (..., Dc).

        It depends on the token id alone, so it is computed once per distinct id and gathered: the same
        numbers as per position, with the matmuls (and their gradients) over the distinct tokens only --
        a 1,000-token text has ~400 distinct words, a 2 M-token corpus ~30 k.
        """
        uniq, inverse = torch.unique(ids, return_inverse=True)
        x = self.embedding(uniq)
        return [layer.token_proj(x)[inverse] for layer in self.context_block.layers]

    def token_logits(self, contexts: Tensor, x_ids: Tensor) -> Tensor:
        """contexts (..., L, Dc) of the positions of x_ids (...) -> logits (..., V); parallel over positions."""
        return self.head(self.token_block(contexts, self.embedding(x_ids)))

    def forward(self, ids: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """ids (B, T), state = the context carried from the previous call (B, Dc) or None (zero) ->
        (logits (B, T, V), new state). The state is O(1) in T: feeding a sequence at once or in pieces
        with the state carried gives the same logits."""
        contexts, last = self.sequential_contexts(ids, initial=state)
        return self.token_logits(contexts, ids), last


class Phase2Model(nn.Module):
    """Phase 2 view of a NewLLM: embedding and ContextBlock frozen, contexts supplied from a cache.

    Called by the generic trainer as `model(x, state, contexts=...)`, with contexts (B, T, L, Dc) the
    per-position, per-layer contexts of x's positions (see newllm.training.context_cache.compute_contexts); no
    state is carried (the cache already holds every position's past). The wrapped model is `self.llm`, so
    after training it is the full NewLLM, ready for generation with its exact recurrence.
    """

    def __init__(self, llm: NewLLM):
        super().__init__()
        self.llm = llm
        llm.embedding.requires_grad_(False)
        llm.context_block.requires_grad_(False)

    def forward(self, x_ids: Tensor, state: object = None, contexts: Tensor | None = None
                ) -> tuple[Tensor, None]:
        if contexts is None:
            raise ValueError("Phase2Model needs contexts=(B, T, L, Dc), the cached ContextBlock outputs of "
                             "x's positions (compute_contexts), passed as an extra by the trainer")
        if contexts.shape[:2] != x_ids.shape or contexts.size(-1) != self.llm.context_dim:
            raise ValueError(f"contexts {tuple(contexts.shape)} do not match x {tuple(x_ids.shape)} "
                             f"(want (B, T, L, {self.llm.context_dim}))")
        dtype = self.llm.head.bias.dtype
        return self.llm.token_logits(contexts.to(dtype), x_ids), None

