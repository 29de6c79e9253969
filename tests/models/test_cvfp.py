"""New-LLM (CVFP) modules: the update rules, the plan E / A wiring, the exact recurrence, GPT-2 loading."""

import pytest
import torch
import torch.nn.functional as F

from newllm.models.cvfp import (
    ContextBlock,
    ContextLayer,
    InputEmbedding,
    NewLLM,
    Phase2Model,
    TokenBlock,
)
from newllm.models.factory import count_params

V, DC, DE, L = 23, 12, 10, 3


def tiny(plan="E", token_layers=L, **kw) -> NewLLM:
    torch.manual_seed(0)
    return NewLLM(V, DC, DE, L, token_layers, token_plan=plan, **kw)


def test_context_layer_is_residual_relu_then_layernorm():
    torch.manual_seed(0)
    for norm in (True, False):
        layer = ContextLayer(DC, DE, norm=norm)
        c, x = torch.randn(5, DC), torch.randn(5, DE)
        W = torch.cat([layer.w_c.weight, layer.w_x.weight], dim=1)  # the research's W over [c; x]
        pre = c + F.relu(torch.cat([c, x], dim=-1) @ W.T + layer.w_x.bias)
        want = F.layer_norm(pre, (DC,), layer.norm.weight, layer.norm.bias) if norm else pre
        torch.testing.assert_close(layer(c, x), want)
        torch.testing.assert_close(layer(c, xp=layer.token_proj(x)), want)


def test_context_block_chains_layers_and_feeds_the_token_to_each():
    torch.manual_seed(0)
    block = ContextBlock(DC, DE, L)
    prev, x = torch.randn(7, DC), torch.randn(7, DE)
    out = block(prev, x)
    c = prev
    for i, layer in enumerate(block.layers):
        c = layer(c, x)
        torch.testing.assert_close(out[:, i], c)


def test_context_block_positions_are_independent():
    """Batched over N positions = each position alone (what makes Phase 1 parallel)."""
    torch.manual_seed(0)
    block = ContextBlock(DC, DE, L)
    prev, x = torch.randn(6, DC), torch.randn(6, DE)
    batched = block(prev, x)
    for n in range(6):
        torch.testing.assert_close(batched[n], block(prev[n:n + 1], x[n:n + 1])[0])


def _token_layer_context_inputs(block: TokenBlock, contexts, x) -> list[torch.Tensor]:
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for layer in block.layers]
    block(contexts, x)
    for h in hooks:
        h.remove()
    return seen


def test_plan_e_token_layer_l_reads_context_layer_l():
    torch.manual_seed(0)
    block = TokenBlock(DC, DE, L, plan="E")
    contexts, x = torch.randn(4, L, DC), torch.randn(4, DE)
    seen = _token_layer_context_inputs(block, contexts, x)
    for i in range(L):
        assert torch.equal(seen[i], contexts[:, i])
    # behaviourally: perturbing context layer l moves the output, and token layers < l do not see it
    base = block(contexts, x)
    for i in range(L):
        bumped = contexts.clone()
        bumped[:, i] += 1.0
        assert not torch.allclose(block(bumped, x), base)
        seen_b = _token_layer_context_inputs(block, bumped, x)
        for j in range(L):
            assert torch.equal(seen_b[j], seen[j]) == (j != i)


def test_plan_a_every_token_layer_reads_the_last_context():
    torch.manual_seed(0)
    block = TokenBlock(DC, DE, 2, plan="A")  # plan A decouples the layer counts
    contexts, x = torch.randn(4, L, DC), torch.randn(4, DE)
    for seen in _token_layer_context_inputs(block, contexts, x):
        assert torch.equal(seen, contexts[:, -1])
    bumped = contexts.clone()
    bumped[:, :-1] += 1.0  # non-last layers are not read at all
    torch.testing.assert_close(block(bumped, x), block(contexts, x))


def test_plan_e_requires_equal_layer_counts():
    with pytest.raises(ValueError, match="context_layers == token_layers"):
        NewLLM(V, DC, DE, 3, 2, token_plan="E")
    NewLLM(V, DC, DE, 3, 2, token_plan="A")


def test_sequential_contexts_carry_the_context_token_to_token():
    model = tiny()
    ids = torch.randint(0, V, (9,))
    contexts, last = model.sequential_contexts(ids)
    c = torch.zeros(1, DC)
    for t in range(9):
        out = model.context_block(c, model.embedding(ids[t:t + 1]))  # (1, L, DC)
        torch.testing.assert_close(contexts[t], out[0])
        c = out[:, -1]  # c_t^0 = c_{t-1}^L
    torch.testing.assert_close(last, c[0])


def test_token_projections_per_distinct_token_equal_per_position():
    model = tiny()
    ids = torch.tensor([[3, 5, 3, 3], [7, 5, 0, 3]])
    x = model.embedding(ids)
    for layer, got in zip(model.context_block.layers, model.token_projections(ids), strict=True):
        torch.testing.assert_close(got, layer.token_proj(x))


def test_forward_with_state_equals_whole_sequence():
    model = tiny()
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        whole, s_whole = model(ids)
        a, s = model(ids[:, :4])
        b, s2 = model(ids[:, 4:], s)
    torch.testing.assert_close(torch.cat([a, b], dim=1), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(s2, s_whole, rtol=0, atol=1e-6)
    assert s.shape == (2, DC)  # the state is one context per stream, whatever the length


def test_forward_logits_read_the_carried_context():
    """The logits at t depend on earlier tokens (through the context), not on later ones."""
    model = tiny()
    ids = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        base, _ = model(ids)
        changed = ids.clone()
        changed[0, 2] = (ids[0, 2] + 1) % V
        other, _ = model(changed)
    torch.testing.assert_close(other[:, :2], base[:, :2])
    assert not torch.allclose(other[:, 3:], base[:, 3:])


def test_research_init_scales():
    model = NewLLM(V, 64, 64, 2, 2)
    w = model.context_block.layers[0].w_c.weight
    assert abs(w.std().item() - 0.1) < 0.01
    assert abs(model.token_block.layers[0].fc.bias.std().item() - 0.01) < 0.005
    assert abs(model.head.weight.std().item() - 0.02) < 0.003
    assert model.head.bias.abs().max() == 0


def test_tied_head_shares_the_embedding_and_counts_once():
    untied, tied = tiny(), tiny(tie_head=True)
    assert tied.head.weight is tied.embedding.wte.weight
    assert count_params(untied)[1] - count_params(tied)[1] == V * DE


def test_phase1_weights_depend_only_on_the_context_path_params():
    """Same seed -> same embedding + ContextBlock whatever the token block and head (Phase 1's stage does
    not read token_layers / token_plan / tie_head, so they must not change its initial weights)."""
    def phase1_state(model: NewLLM) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if k.startswith(("embedding.", "context_block."))}

    ref = phase1_state(tiny("A", token_layers=2))
    for other in (tiny("A", token_layers=3), tiny("E"), tiny(tie_head=True)):
        got = phase1_state(other)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), k


def test_phase2_model_freezes_the_context_path():
    model = tiny()
    p2 = Phase2Model(model)
    trainable, total = count_params(p2)
    frozen = sum(p.numel() for m in (model.embedding, model.context_block) for p in m.parameters())
    assert trainable == total - frozen
    ids = torch.randint(0, V, (2, 5))
    contexts = torch.randn(2, 5, L, DC)
    logits, state = p2(ids, None, contexts=contexts)
    assert state is None and logits.shape == (2, 5, V)
    logits.sum().backward()
    assert all(p.grad is None for m in (model.embedding, model.context_block) for p in m.parameters())
    assert all(p.grad is not None for p in model.token_block.parameters())
    with pytest.raises(ValueError, match="contexts"):
        p2(ids)


# ----------------------------------------------------------------------------------------------- GPT-2
def test_from_gpt2_loads_wte_frozen(tmp_path):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    emb = InputEmbedding.from_gpt2(tmp_path / "gpt2", local_files_only=True)
    assert torch.equal(emb.wte.weight, gpt2.wte.weight)
    assert not emb.wte.weight.requires_grad
    assert emb.norm.weight.requires_grad  # the embed_norm trains in Phase 1 like the learned case
    model = NewLLM(50, 8, 16, 2, 2, embedding=emb, tie_head=True)
    assert model.head.weight is emb.wte.weight and not model.head.weight.requires_grad


def test_from_gpt2_missing_weights_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-gpt2"
    with pytest.raises(RuntimeError, match="no-such-gpt2") as e:
        InputEmbedding.from_gpt2(missing, local_files_only=True)
    assert "save_pretrained" in str(e.value)
