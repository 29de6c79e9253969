"""Context utilisation: loss by position within a window, against each model run on the window at once."""

import pytest
import torch
import torch.nn.functional as F

from newllm.models.cvfp import NewLLM
from newllm.models.lstm import LSTMLM
from newllm.models.transformer import TransformerLM
from newllm.training.position_loss import log_bins, position_losses

V = 23


def reference(model, ids, window):
    """Each window fed whole, from an empty state: the per-position CE averaged over windows."""
    n = (ids.numel() - 1) // (window + 1)
    rows = ids[: n * (window + 1)].reshape(n, window + 1)
    with torch.no_grad():
        logits, _ = model(rows[:, :-1], None)
    return F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none").double().mean(0)


@pytest.mark.parametrize("make", [lambda: NewLLM(V, 8, 8, 2, 2), lambda: LSTMLM(V, embed_dim=8, hidden_dim=8, num_layers=1, dropout=0.0)],
                         ids=["newllm", "lstm"])
def test_stateful_models_carry_their_state_across_pieces(make):
    torch.manual_seed(0)
    model, ids = make().eval(), torch.randint(0, V, (300,))
    curve, n = position_losses(model, ids, window=20, max_context=6, batch_size=4)  # pieces of 6, state carried
    assert n == 300 // 21 and curve.shape == (20,)
    torch.testing.assert_close(curve, reference(model, ids, 20), rtol=1e-5, atol=1e-6)


def test_a_windowed_model_sees_at_most_its_trained_context():
    """The Transformer (n_positions 8) over windows of 24: the first 8 positions are its plain pass over the
    window's start; later ones come from sliding windows and are each scored once."""
    torch.manual_seed(0)
    model = TransformerLM(V, n_layer=1, n_head=2, n_embd=16, seq_len=8, dropout=0.0).eval()
    ids = torch.randint(0, V, (400,))
    curve, n = position_losses(model, ids, window=24, max_context=8)
    rows = ids[: n * 25].reshape(n, 25)
    with torch.no_grad():
        logits, _ = model(rows[:, :8], None)
    start = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:9], reduction="none").double().mean(0)
    torch.testing.assert_close(curve[:8], start, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(curve).all() and curve.shape == (24,)


def test_log_bins_average_doubling_ranges():
    curve = torch.arange(1.0, 16.0)  # positions 1..15
    assert log_bins(curve) == {1: 1.0, 2: 2.5, 4: 5.5, 8: 11.5}  # [1], [2, 3], [4..7], [8..15]
    assert list(log_bins(curve[:14])) == [1, 2, 4]  # [8..15] is not whole: dropped


@pytest.mark.parametrize("make, windowed", [(lambda: LSTMLM(V, embed_dim=8, hidden_dim=8, num_layers=1, dropout=0.0), False),
                                            (lambda: TransformerLM(V, n_layer=1, n_head=2, n_embd=16, seq_len=8,
                                                                   dropout=0.0), True)], ids=["lstm", "transformer"])
def test_truncation_scores_each_target_from_only_its_last_d_tokens(make, windowed):
    """Against a per-target loop: token t + 1 predicted from x[t-d+1 .. t] alone, fed whole (at most the
    Transformer's 8 trained positions); pieces of 3 with the state carried for the LSTM."""
    from newllm.training.position_loss import effective_context, truncation_losses

    torch.manual_seed(0)
    model, ids = make().eval(), torch.randint(0, V, (120,))
    got = truncation_losses(model, ids, window=16, max_context=8 if windowed else 3, targets=30, batch_size=7)
    assert sorted(got) == [1, 2, 4, 8, 16]
    ts = torch.linspace(15, 118, 30).long().unique()
    for d, loss in got.items():
        seen = min(d, 8) if windowed else d
        with torch.no_grad():
            want = sum(float(F.cross_entropy(model(ids[t - seen + 1:t + 1][None], None)[0][0, -1], ids[t + 1]))
                       for t in ts.tolist()) / len(ts)
        assert loss == pytest.approx(want, rel=1e-5), d
    if windowed:
        assert got[16] == pytest.approx(got[8], rel=1e-6)  # past its trained positions it sees no more
    assert effective_context(got) in got


def test_effective_context_is_the_shortest_distance_within_one_percent():
    from newllm.training.position_loss import effective_context

    assert effective_context({1: 3.0, 2: 2.5, 4: 2.02, 8: 2.0}) == 4
    assert effective_context({1: 2.0, 2: 2.0}) == 1
