"""The streaming memory/speed probe: exact tensor accounting, flat New-LLM memory, growing KV cache, and
honest rows for a Transformer beyond its trained positions."""

import pytest
import torch

from newllm.models.cvfp import NewLLM
from newllm.models.lstm import LSTMLM
from newllm.models.mamba import MambaLM
from newllm.models.transformer import TransformerLM
from newllm.report.probes import LiveTensorBytes, memory_figure, memory_vs_length, tensor_bytes

V = 30


def tiny_models(n_positions: int = 1024) -> dict:
    torch.manual_seed(0)
    return {"newllm": NewLLM(V, context_dim=16, embed_dim=8, context_layers=2, token_layers=2),
            "transformer": TransformerLM(V, n_layer=1, n_head=2, n_embd=16, seq_len=n_positions, dropout=0.0),
            "lstm": LSTMLM(V, embed_dim=8, hidden_dim=8, num_layers=1, dropout=0.0)}


def test_live_tensor_bytes_counts_new_storage_once_and_frees_it():
    w = torch.randn(100, 10)  # made before the mode: never counted
    with LiveTensorBytes() as mem:
        a = w.t() @ w  # a new 10 x 10 float32: 400 bytes
        assert mem.live == 400
        view = a[:5].t()  # a view shares a's storage
        a.relu_()  # in place: no new memory
        assert mem.live == 400
        b = w.t().contiguous()  # a copy of w: 4000 bytes
        assert mem.live == 4400 and mem.peak == 4400
        del a, b
        assert mem.live == 400  # b freed; a's storage lives on in the view
        del view
        assert mem.live == 0 and mem.peak == 4400
        mem.reset_peak()
        assert mem.peak == 0


def test_tensor_bytes_walks_states_and_kv_caches():
    x = torch.zeros(3, 4)
    assert tensor_bytes((x, x[1:], [torch.zeros(2)], {"k": None})) == 48 + 8  # a shared storage once
    m = TransformerLM(V, n_layer=2, n_head=2, n_embd=8, seq_len=64, dropout=0.0)
    _, cache = m.step(torch.zeros(1, 10, dtype=torch.long))
    assert tensor_bytes(cache) == 2 * 2 * 10 * 8 * 4  # layers x (K, V) x tokens x width x float32


def test_newllm_memory_is_flat_while_the_kv_cache_grows():
    rows = memory_vs_length(tiny_models(), [64, 512], V, steps=4, full_steps=2, chunk=64)
    by = {(r["model"], r["method"], r["length"]): r for r in rows}
    assert all(r["status"] == "ok" and r["trained_positions"] for r in rows)
    assert all(r["ms_per_token"] > 0 and r["peak_bytes"] >= r["state_bytes"] > 0 for r in rows
               if r["method"] != "full re-attention")
    assert all(0 < r["ms_min"] <= r["ms_per_token"] <= r["ms_max"] for r in rows)  # median of repeats, range
    for name in ("newllm", "lstm"):
        small, large = by[(name, "stream, state carried", 64)], by[(name, "stream, state carried", 512)]
        assert large["state_bytes"] == small["state_bytes"]
        assert large["peak_bytes"] <= 1.5 * small["peak_bytes"]
    assert by[("newllm", "stream, state carried", 64)]["state_bytes"] == 16 * 4  # one context vector
    kv_small, kv_large = by[("transformer", "KV cache", 64)], by[("transformer", "KV cache", 512)]
    assert kv_large["state_bytes"] == 8 * kv_small["state_bytes"]  # linear in L
    assert kv_large["peak_bytes"] > 4 * kv_small["peak_bytes"]
    full_small, full_large = by[("transformer", "full re-attention", 64)], by[("transformer", "full re-attention", 512)]
    assert full_large["peak_bytes"] > 4 * full_small["peak_bytes"]  # it recomputes the whole prefix


@pytest.mark.parametrize("mode", ["stop", "extend"])
def test_transformer_beyond_its_positions_is_labelled_never_silently_compared(mode):
    models = {"transformer": tiny_models(n_positions=32)["transformer"]}
    rows = memory_vs_length(models, [16, 96], V, steps=4, full_steps=2, chunk=32, beyond_positions=mode)
    assert len(rows) == 4
    for r in rows:
        if r["length"] == 16:
            assert r["status"] == "ok" and r["trained_positions"] and r["peak_bytes"] is not None
        else:
            assert not r["trained_positions"] and "beyond trained positions (n_positions=32)" in r["status"]
            if mode == "stop":
                assert r["status"].endswith("not run") and r["peak_bytes"] is None and r["ms_per_token"] is None
            else:
                assert r["status"].startswith("cost only") and r["peak_bytes"] > 0
    assert models["transformer"].config.n_positions == 32  # the trained model itself is left alone


def test_memory_figure_has_two_log_x_panels():
    rows = memory_vs_length(tiny_models(n_positions=32), [16, 64], V, steps=2, full_steps=1, chunk=16)
    fig = memory_figure(rows)
    assert len(fig.axes) == 2 and all(ax.get_xscale() == "log" for ax in fig.axes)


def test_peak_memory_is_what_a_fully_tracked_prefix_gives():
    """The memory pass feeds all but the prefix's last chunk outside the tracker (for speed): its peak
    equals the reference, the whole prefix and the steps under one tracker, for every model and method."""
    from newllm.report import probes

    # one memory step: from the second on, a step's carried state was allocated by the previous one, so
    # only the first shows whether the prefix's state was counted
    models, length, chunk = tiny_models(), 300, 64  # 299 = 4 whole chunks + a partial one
    ids = torch.randint(0, V, (1, length), generator=torch.Generator().manual_seed(0))
    rows = memory_vs_length(models, [length], V, steps=4, full_steps=2, chunk=chunk, memory_steps=1)
    for name, model in models.items():
        for runner, _ in probes._runners(name, model.eval(), None, chunk, 4, 2):
            with torch.no_grad(), LiveTensorBytes() as mem:
                state = runner.prefix(ids[:, :length - 1], None)
                mem.reset_peak()
                runner.step(ids, state, length - 1)
            (row,) = [r for r in rows if (r["model"], r["method"]) == (name, runner.method)]
            assert row["peak_bytes"] == mem.peak > 0, (name, runner.method)


def test_mamba_streams_through_its_recurrent_cache_at_a_fixed_size():
    """A model with its own `step` (Mamba: its forward carries no state) is probed through that cache."""
    torch.manual_seed(0)
    m = MambaLM(V, dim=8, num_layers=2, state_size=4, expand=2, conv_kernel=4)
    rows = memory_vs_length({"mamba": m}, [16, 128], V, steps=2, chunk=16)
    small, large = rows
    assert small["method"] == large["method"] == "recurrent cache" and small["status"] == "ok"
    # per layer: the conv window (expand*dim, kernel) and the SSM state (expand*dim, state_size), float32
    # (and each layer's int64 count of the tokens seen)
    assert large["state_bytes"] == small["state_bytes"] == 2 * (16 * 4 + 16 * 4) * 4 + 2 * 8
