"""The baseline models: parameter matching, shapes, causality, state carrying, CVP switches, minGRU's scan."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import section

from newllm.models.cvp import CVPLM
from newllm.models.factory import count_params
from newllm.models.lstm import LSTMLM
from newllm.models.mamba import MambaLM
from newllm.models.mingru import MinGRULM, scan_log
from newllm.models.transformer import TransformerLM, gpt2_param_count, match_width

V, T = 50, 12


def n_params(model) -> int:
    return count_params(model)[1]


def tiny(kind: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "transformer":
        return TransformerLM(V, n_layer=2, n_head=2, n_embd=16, seq_len=T, dropout=kw.pop("dropout", 0.0))
    if kind == "lstm":
        return LSTMLM(V, embed_dim=16, hidden_dim=16, num_layers=2, dropout=kw.pop("dropout", 0.0), **kw)
    if kind == "mingru":
        return MinGRULM(V, dim=16, num_layers=2, expansion=1.5, dropout=kw.pop("dropout", 0.0))
    if kind == "mamba":
        return MambaLM(V, dim=16, num_layers=2, state_size=4, expand=2, conv_kernel=4)
    args = dict(embed_dim=8, context_dim=12, hidden_dim=16, num_layers=2, dropout=0.0, seq_len=T)
    return CVPLM(V, **{**args, **kw})


def tokens(b=3, t=T, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- params
@pytest.mark.parametrize("target,vocab,n_layer,n_head,seq_len", [
    (3_009_768, 1000, 6, 4, 32), (400_000, 252, 2, 4, 32), (5_000_000, 8000, 4, 8, 64),
    (1_500_000, 33278, 2, 2, 35), (25_000_000, 33278, 6, 8, 128)])
def test_match_width_lands_within_10_percent(target, vocab, n_layer, n_head, seq_len):
    d = match_width(target, vocab, n_layer, n_head, seq_len)
    assert d % n_head == 0
    m = TransformerLM(vocab, n_layer, n_head, d, seq_len) if target < 4_000_000 else None
    n = n_params(m) if m is not None else gpt2_param_count(vocab, n_layer, d, seq_len)
    assert abs(n - target) <= 0.10 * target


def test_param_formula_counts_tied_head_once():
    m = TransformerLM(V, 3, 4, 24, T)
    assert m.gpt.lm_head.weight is m.gpt.transformer.wte.weight
    assert n_params(m) == gpt2_param_count(V, 3, 24, T)


def test_match_width_refuses_an_unreachable_target():
    with pytest.raises(ValueError, match="±10%"):
        match_width(1000, 33278, 2, 4, 32)  # the embedding alone is far larger


def test_from_config_builds_each_model():
    assert TransformerLM.from_config(section("transformer", n_layer=1, n_head=2, n_embd=8, seq_len=8), V).seq_len == 8
    assert LSTMLM.from_config(section("lstm", embed_dim=8, hidden_dim=8, tie_weights=True), V).head.weight.shape == (V, 8)
    cvp = CVPLM.from_config(section("cvp", embed_dim=8, context_dim=8, hidden_dim=8, gating=True), V)
    assert cvp.forget is not None and cvp.norm is not None


# ----------------------------------------------------------------------------------------------- shapes, causality
@pytest.mark.parametrize("kind", ["transformer", "lstm", "cvp", "mingru", "mamba"])
def test_forward_shapes_and_causality(kind):
    m = tiny(kind).eval()
    x = tokens()
    logits, state = m(x)
    assert logits.shape == (3, T, V)
    if kind in ("transformer", "mamba"):
        assert state is None
    elif kind == "lstm":
        assert state[0].shape == state[1].shape == (2, 3, 16)
    elif kind == "mingru":
        assert [h.shape for h in state] == [(3, 24), (3, 24)]  # each layer's h: expansion 1.5 x dim 16
    else:
        assert state.shape == (3, 12)
    cut = 5
    x2 = x.clone()
    x2[:, cut + 1:] = (x2[:, cut + 1:] + 7) % V  # change only the future of position `cut`
    logits2, _ = m(x2)
    torch.testing.assert_close(logits2[:, :cut + 1], logits[:, :cut + 1])
    assert not torch.allclose(logits2[:, cut + 1:], logits[:, cut + 1:])


@pytest.mark.parametrize("kind", ["transformer", "lstm", "cvp", "mingru", "mamba"])
def test_one_step_lowers_the_loss(kind):
    m = tiny(kind)
    x, y = tokens(seed=2), tokens(seed=3)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)

    def loss():
        return F.cross_entropy(m(x)[0].reshape(-1, V), y.reshape(-1))

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert loss().item() < before.item()


@pytest.mark.parametrize("kind,kw", [("lstm", {}), ("cvp", {}), ("cvp", {"gating": True, "context_clip": 0.5}),
                                     ("cvp", {"context_norm": False}), ("mingru", {})])
def test_state_carried_across_windows_equals_one_long_forward(kind, kw):
    m = tiny(kind, **kw).eval()
    x = tokens(t=T)
    full, _ = m(x)
    a, s = m(x[:, :5])
    b, s = m(x[:, 5:9], s)
    c, _ = m(x[:, 9:], s)
    torch.testing.assert_close(torch.cat([a, b, c], dim=1), full)


def test_mingru_scan_equals_its_own_step_token_by_token():
    """Training's log-space scan and generation's step are one recurrence: a window in one call equals the
    same tokens fed one call each (the state carried), and the scan equals the loop it replaces."""
    m = tiny("mingru").eval()
    x = tokens(t=T)
    full, state = m(x)
    steps, s = [], None
    for t in range(T):
        out, s = m(x[:, t:t + 1], s)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    for a, b in zip(s, state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # scan_log against the plain loop h_t = a_t h_{t-1} + b_t, from a given h0
    g = torch.Generator().manual_seed(0)
    a, b, h0 = torch.rand(2, 40, 3, generator=g), torch.rand(2, 40, 3, generator=g), torch.rand(2, 3, generator=g)
    h, loop = h0, []
    for t in range(40):
        h = a[:, t] * h + b[:, t]
        loop.append(h)
    torch.testing.assert_close(scan_log(a.log(), b.log(), h0), torch.stack(loop, dim=1), rtol=1e-4, atol=1e-6)


def test_transformer_kv_cache_steps_match_the_full_forward():
    m = tiny("transformer").eval()
    x = tokens(b=2, t=8)
    full, _ = m(x)
    logits, cache = m.step(x[:, :3])
    steps = [logits]
    for t in range(3, 8):
        logits, cache = m.step(x[:, t:t + 1], cache)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_mamba_parallel_scan_equals_the_sequential_reference_and_its_recurrent_steps():
    """mamba.py's parallel scan (use_mambapy) against HF's own loop over positions, and the generation
    path (the prompt through the scan, then one cached step per token) against the window in one call."""
    m = tiny("mamba").eval()
    x = tokens(b=2, t=T)
    full, _ = m(x)
    m.mamba.config.use_mambapy = False
    for layer in m.mamba.backbone.layers:
        layer.mixer.use_mambapy = False  # the mixer reads it at construction
    torch.testing.assert_close(m(x)[0], full, rtol=1e-4, atol=1e-5)
    logits, cache = m.step(x[:, :5])
    steps = [logits]
    more, cache = m.step(x[:, 5:8], cache)  # several tokens after a cache: stepped one by one
    steps.append(more)
    for t in range(8, T):
        logits, cache = m.step(x[:, t:t + 1], cache)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    out = list(m.stream(torch.tensor([1, 2, 3]), max_new_tokens=2 * T, top_k=5,
                        generator=torch.Generator().manual_seed(0)))
    assert len(out) == 2 * T and all(0 <= t < V for t in out)  # no window: the state is fixed-size


def test_transformer_stream_generates_past_the_position_table():
    m = tiny("transformer")
    out = list(m.stream(torch.tensor([1, 2, 3]), max_new_tokens=2 * T + 3, top_k=5,
                        generator=torch.Generator().manual_seed(0)))
    assert len(out) == 2 * T + 3 and all(0 <= t < V for t in out)
    assert m.training  # mode restored


def test_lstm_tying():
    with pytest.raises(ValueError, match="embed_dim == hidden_dim"):
        LSTMLM(V, embed_dim=8, hidden_dim=16, tie_weights=True)
    m = LSTMLM(V, embed_dim=16, hidden_dim=16, tie_weights=True)
    assert m.head.weight is m.embed.weight
    assert n_params(m) == n_params(LSTMLM(V, 16, 16)) - V * 16


# ----------------------------------------------------------------------------------------------- CVP switches
def reference_cvp(m: CVPLM, x: torch.Tensor) -> torch.Tensor:
    """docs/research.md §2 written out literally, token by token, with [e_t ; c_{t-1}] concatenated."""
    w1 = torch.cat([m.in_e.weight, m.in_c.weight], dim=1)
    c = torch.zeros(x.size(0), m.context_dim)
    out = []
    for t in range(x.size(1)):
        e = m.embed(x[:, t]) + (m.pos.weight[t] if m.pos is not None else 0)
        h = F.relu(F.linear(torch.cat([e, c], dim=-1), w1, m.in_e.bias))
        for layer in m.fnn:
            h = F.relu(layer(h))
        delta = m.update(h)
        if m.forget is not None:
            c = torch.sigmoid(m.forget(h)) * c + torch.sigmoid(m.input_gate(h)) * delta
        else:
            c = c + delta
        if m.norm is not None:
            c = F.layer_norm(c, (m.context_dim,), m.norm.weight, m.norm.bias)
        if m.context_clip > 0:
            c = c.clamp(-m.context_clip, m.context_clip)
        out.append(m.head(h))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("kw", [{}, {"context_norm": False}, {"gating": True}, {"gating": True, "context_norm": False},
                                {"context_clip": 0.05, "context_norm": False}, {"positional": True},
                                {"num_layers": 1}, {"num_layers": 3}])
def test_cvp_matches_the_spec_formula(kw):
    m = tiny("cvp", **kw).eval()
    x = tokens()
    torch.testing.assert_close(m(x)[0], reference_cvp(m, x))


def test_cvp_modules_exist_only_with_their_switch():
    plain = tiny("cvp", context_norm=False)
    assert plain.forget is None and plain.input_gate is None and plain.norm is None and plain.pos is None
    names = {n for n, _ in plain.named_parameters()}
    assert not any(k in n for n in names for k in ("forget", "input_gate", "norm", "pos"))
    gated = tiny("cvp", context_norm=False, gating=True)
    assert n_params(gated) == n_params(plain) + 2 * 16 * 12  # two bias-free 16 -> 12 gates
    normed = tiny("cvp", context_norm=True)
    assert n_params(normed) == n_params(plain) + 2 * 12
    pos = tiny("cvp", context_norm=False, positional=True)
    assert n_params(pos) == n_params(plain) + T * 8


def test_cvp_switches_change_the_computation():
    x = tokens()
    base = tiny("cvp", context_norm=False).eval()
    with torch.no_grad():  # N(0, 0.02) makes every output tiny: scale up so differences are visible
        for p in base.parameters():
            p.normal_(0.0, 0.5)
    ref = base(x)[0]
    for kw in ({"context_norm": True}, {"gating": True, "context_norm": False},
               {"context_clip": 0.01, "context_norm": False}, {"positional": True, "context_norm": False}):
        other = tiny("cvp", **kw).eval()
        other.load_state_dict(base.state_dict(), strict=False)  # same shared weights, the switch differs
        torch.nn.init.normal_(other.pos.weight) if other.pos is not None else None
        assert not torch.allclose(other(x)[0], ref), kw


def test_cvp_clip_bounds_the_state_and_norm_normalises_it():
    x = tokens(t=T)
    unclipped = tiny("cvp", context_norm=False)
    torch.nn.init.normal_(unclipped.update.bias, 0.0, 1.0)  # make the context drift far
    clipped = tiny("cvp", context_norm=False, context_clip=0.5)
    clipped.load_state_dict(unclipped.state_dict())
    assert unclipped(x)[1].abs().max() > 0.5
    assert clipped(x)[1].abs().max() <= 0.5
    normed = tiny("cvp", context_norm=True)
    c = normed(x)[1]
    torch.testing.assert_close(c.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)


def test_cvp_positional_refuses_a_window_longer_than_its_table():
    with pytest.raises(ValueError, match="position table"):
        tiny("cvp", positional=True)(tokens(t=T + 1))


@pytest.mark.parametrize("name, cls", [("lstm", LSTMLM), ("cvp", CVPLM), ("transformer", TransformerLM),
                                       ("mingru", MinGRULM), ("mamba", MambaLM)])
@pytest.mark.parametrize("target", [60_000, 363_778])
def test_every_baseline_is_sized_to_the_target_within_10_percent(name, cls, target):
    cfg = section(name, seq_len=T)
    matched = cls.matched_config(cfg, V, target)
    model = cls.from_config(dataclasses.replace(cfg, **matched), V)  # built for real, counted for real
    assert abs(n_params(model) - target) <= 0.10 * target, (matched, n_params(model))


def test_the_width_search_refuses_an_unreachable_target():
    with pytest.raises(ValueError, match="no width within"):
        LSTMLM.matched_config(section("lstm"), 33278, 1000)
