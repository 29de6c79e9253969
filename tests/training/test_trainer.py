"""The generic LM trainer and the shared evaluation."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from newllm.models.cvp import CVPLM
from newllm.models.lstm import LSTMLM
from newllm.models.transformer import TransformerLM
from newllm.registry import TrainConfig
from newllm.training.batches import batchify, detach_state, sliding_windows, windows
from newllm.training.trainer import cosine_lr, evaluate, train_lm

V = 20


def stream(n: int, seed: int = 0) -> torch.Tensor:
    """A learnable toy stream: a noisy cycle 0, 1, ..., V-1, 0, ..."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) % V
    noise = torch.rand(n, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, V, (n,), generator=g), ids)


def cfg(**kw) -> TrainConfig:
    base = dict(optimizer="adam", weight_decay=0.0, batch_size=4, seq_len=8, epochs=2, grad_clip=1.0,
                scheduler="constant", plateau_factor=0.25, patience=0, min_delta=0.0, max_tokens=0)
    return TrainConfig(**{**base, **kw})


def lstm(seed: int = 0, dropout: float = 0.1) -> LSTMLM:
    torch.manual_seed(seed)
    return LSTMLM(V, embed_dim=8, hidden_dim=8, num_layers=1, dropout=dropout)


# ----------------------------------------------------------------------------------------------- data plumbing
def test_batchify_makes_contiguous_streams_and_cuts_extras_alike():
    data = torch.arange(23)
    b = batchify(data, 4)
    assert b.shape == (4, 5)
    assert b[1].tolist() == [5, 6, 7, 8, 9]  # row b = a contiguous slice, tail (20..22) dropped
    extras = torch.arange(23 * 3).reshape(23, 3)
    e = batchify(extras, 4)
    assert e.shape == (4, 5, 3)
    assert torch.equal(e[2, 1], extras[11])
    with pytest.raises(ValueError, match="too few"):
        batchify(torch.arange(5), 4)


def test_windows_predict_every_position_but_the_first_exactly_once():
    for n, t in [(10, 3), (10, 9), (9, 8), (2, 5)]:
        covered = [p for i, L in windows(n, t) for p in range(i + 1, i + 1 + L)]
        assert covered == list(range(1, n))
        assert all(L <= t for _, L in windows(n, t))


def test_detach_state_handles_nesting():
    a = torch.ones(2, requires_grad=True) * 2
    s = detach_state((a, [a, {"k": a}]))
    assert not s[0].requires_grad and not s[1][0].requires_grad and not s[1][1]["k"].requires_grad
    assert detach_state(None) is None


# ----------------------------------------------------------------------------------------------- evaluation
def test_evaluate_equals_cross_entropy_over_all_positions_by_hand():
    """LSTM state carried over uneven windows (seq_len 7 does not divide 49) == one forward over each
    whole stream; loss, accuracy and count computed directly."""
    model = lstm(dropout=0.5).train()  # evaluate must switch dropout off by itself
    ids = stream(203)
    out = evaluate(model, ids, seq_len=7, batch_size=4)
    assert model.training
    data = ids[:200].reshape(4, 50)
    with torch.no_grad():
        model.eval()
        logits, _ = model(data[:, :-1])
    y = data[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).item()
    assert out["tokens"] == 4 * 49
    assert out["loss"] == pytest.approx(ce, rel=1e-6)
    assert out["ppl"] == pytest.approx(math.exp(ce), rel=1e-6)
    assert out["accuracy"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())


def test_evaluate_is_token_weighted_for_a_stateless_model():
    torch.manual_seed(0)
    model = TransformerLM(V, 1, 2, 8, seq_len=6, dropout=0.0).train()
    model.windowed = False  # non-overlapping windows here (sliding ones: the tests below)
    ids = stream(100)
    out = evaluate(model, ids, seq_len=6, batch_size=3)  # 33 columns: windows of 6,6,6,6,6,2
    assert model.training  # evaluate ran in eval mode and gave back the mode it found
    assert evaluate(model, ids, cfg(seq_len=6), 3) == out  # a TrainConfig may stand for seq_len
    data = ids[:99].reshape(3, 33)
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, 32, 6):
            x, y = data[:, i:min(i + 6, 32)], data[:, i + 1:min(i + 7, 33)]
            total += F.cross_entropy(model(x)[0].reshape(-1, V), y.reshape(-1), reduction="sum").item()
            n += y.numel()
    assert out["tokens"] == n == 96
    assert out["loss"] == pytest.approx(total / n, rel=1e-6)


class Oracle(nn.Module):
    """Predicts the token given as the per-position extra `hint`: perfect only if extras are aligned."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, state=None, hint=None):
        return self.scale * 50.0 * F.one_hot(hint, V).float(), None


def test_extras_windows_are_aligned_with_the_inputs():
    ids = stream(101)
    hint = torch.roll(ids, -1)  # the next token, per input position
    out = evaluate(Oracle(), ids, seq_len=8, batch_size=4, extras={"hint": hint})
    assert out["accuracy"] == 1.0 and out["loss"] < 1e-6
    res = train_lm(Oracle(), ids, ids, cfg(epochs=1), lr=1e-3, extras_train={"hint": hint},
                   extras_val={"hint": hint}, device="cpu", progress=False)
    assert res.history[0]["val_accuracy"] == 1.0 and res.history[0]["train_loss"] < 1e-6


# ----------------------------------------------------------------------------------------------- training
def _strip_time(history):
    return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "epoch_time_s")} for h in history]


@pytest.mark.parametrize("make", [lambda: lstm(dropout=0.3),
                                  lambda: (torch.manual_seed(0), CVPLM(V, 8, 8, 8, 1, 0.3, seq_len=8))[1]])
def test_training_is_deterministic_under_a_seed_and_learns(make):
    train, val = stream(800, seed=1), stream(200, seed=2)
    runs = [train_lm(make(), train, val, cfg(epochs=3), lr=0.01, device="cpu", seed=7, progress=False) for _ in range(2)]
    assert _strip_time(runs[0].history) == _strip_time(runs[1].history)
    h = runs[0].history
    assert set(h[0]) == {"train_loss", "val_loss", "val_ppl", "val_accuracy", "tokens_per_s", "lr", "epoch_time_s"}
    assert h[-1]["val_loss"] < math.log(V)  # better than uniform on the cycle
    other = train_lm(make(), train, val, cfg(epochs=3), lr=0.01, device="cpu", seed=8, progress=False)
    assert _strip_time(other.history) != _strip_time(h)  # the seed drives dropout


def test_early_stopping_plateau_and_best_checkpoint():
    """min_delta so large that no epoch beats the initial weights (epoch 0): the model ends holding them."""
    model = lstm()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    before = evaluate(model, stream(120, 2), 8, 4)
    seen = []
    res = train_lm(model, stream(400, 1), stream(120, 2),
                   cfg(epochs=10, patience=3, min_delta=1e9, scheduler="plateau", plateau_factor=0.25), lr=0.01,
                   device="cpu", progress=False, on_epoch=lambda e, m: seen.append(e))
    assert res.epochs_run == 3 and res.stopped_early and seen == [1, 2, 3]
    # no epoch improves, so each next one runs at lr / 4
    assert [h["lr"] for h in res.history] == pytest.approx([0.01, 0.0025, 0.000625])
    assert res.best_epoch == 0 and res.initial_val_loss == pytest.approx(before["loss"], rel=1e-12)
    # the model holds the initial weights again, not the last epoch's
    for k, v in model.state_dict().items():
        assert torch.equal(v, initial[k]) and torch.equal(v, res.best_state[k])
    again = evaluate(model, stream(120, 2), 8, 4)
    assert again["loss"] == pytest.approx(before["loss"], rel=1e-12)
    assert again["loss"] != pytest.approx(res.history[-1]["val_loss"], rel=1e-6)
    assert res.best_val_loss == res.initial_val_loss
    assert res.best_val_ppl == pytest.approx(math.exp(res.best_val_loss))


def test_the_best_epoch_is_kept_when_later_ones_are_worse():
    model = lstm()
    res = train_lm(model, stream(400, 1), stream(120, 2), cfg(epochs=12, patience=2), lr=0.3, device="cpu",
                   progress=False)  # a large lr: val gets worse again
    assert 1 <= res.best_epoch < res.epochs_run
    assert res.best_val_loss == min(h["val_loss"] for h in res.history) < res.initial_val_loss
    assert evaluate(model, stream(120, 2), 8, 4)["loss"] == pytest.approx(res.best_val_loss, rel=1e-9)


def test_a_non_finite_loss_stops_training_in_that_step():
    from newllm.errors import Diverged

    seen = []
    with pytest.raises(Diverged, match=r"loss became (nan|inf) at epoch 1 step 2 \(last finite loss \d+\.\d+\)"):
        train_lm(lstm(), stream(400, 1), stream(120, 2), cfg(optimizer="sgd", grad_clip=0.0, epochs=50), lr=1e38,
                 device="cpu", progress=False, on_epoch=lambda e, m: seen.append(m))
    assert seen == []  # stopped inside the first epoch, before any epoch was reported


def test_an_exploded_but_finite_run_never_beats_its_initial_weights():
    """lr 1e15: losses ~1e15 stay finite, so no error -- but best_epoch 0, the untrained model, never an epoch.
    (At lr 1e30 the weights' products overflow float32 on some CPUs' kernels: NaN, a divergence instead.)"""
    model = lstm()
    before = evaluate(model, stream(120, 2), 8, 4)["loss"]
    res = train_lm(model, stream(400, 1), stream(120, 2), cfg(optimizer="sgd", grad_clip=0.0, epochs=3, patience=2),
                   lr=1e15, device="cpu", progress=False)
    assert min(h["val_loss"] for h in res.history) > 1e12
    assert res.best_epoch == 0 and res.best_val_loss == pytest.approx(before, rel=1e-12)


def _no_time(history):
    return [{k: v for k, v in m.items() if k not in ("tokens_per_s", "epoch_time_s")} for m in history]


@pytest.mark.parametrize("make", [lstm, lambda: CVPLM(V, embed_dim=8, context_dim=8, hidden_dim=8, num_layers=1)], ids=["lstm", "cvp"])
@pytest.mark.parametrize("at", ["mid-epoch", "epoch end"])
def test_resume_from_a_saved_state_gives_the_uninterrupted_run(make, at):
    """Save every step (checkpoint_every_s=0), restart a fresh model from one state: the rest of the run,
    the kept weights and the curve are those of the uninterrupted run, bit for bit (CPU)."""
    conf = cfg(epochs=4, patience=2, scheduler="plateau", min_delta=0.01)
    torch.manual_seed(0)
    full_model, saved = make(), []
    full = train_lm(full_model, stream(400, 1), stream(120, 2), conf, lr=0.02, device="cpu", progress=False,
                    on_checkpoint=lambda s: saved.append(copy.deepcopy(s)), checkpoint_every_s=0.0)
    pick = [s for s in saved if (s["step"] > 0) == (at == "mid-epoch") and s["epoch"] >= 1][0]
    torch.manual_seed(123)  # a fresh model with other weights: all must come from the state
    again_model = make()
    again = train_lm(again_model, stream(400, 1), stream(120, 2), conf, lr=0.02, device="cpu", progress=False,
                     resume=pick)
    assert _no_time(again.history) == _no_time(full.history)
    assert (again.best_epoch, again.best_val_loss, again.steps, again.train_tokens) == \
        (full.best_epoch, full.best_val_loss, full.steps, full.train_tokens)
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, again_model.state_dict()[k]), k


def test_patience_zero_never_stops_and_constant_lr_stays():
    res = train_lm(lstm(), stream(300), stream(100, 3), cfg(epochs=3, patience=0, min_delta=1e9), lr=0.01, device="cpu",
                   progress=False)
    assert res.epochs_run == 3 and not res.stopped_early
    assert {h["lr"] for h in res.history} == {0.01}


def test_cosine_schedule_and_sgd():
    c = cfg(scheduler="cosine", epochs=4)
    assert cosine_lr(c, 0.1, 0) == pytest.approx(0.1)
    assert cosine_lr(c, 0.1, 2) == pytest.approx(0.05, rel=1e-4)
    res = train_lm(lstm(), stream(300), stream(100, 3), cfg(scheduler="cosine", epochs=4, optimizer="sgd",
                   weight_decay=0.01, grad_clip=0.0), lr=0.1, device="cpu", progress=False)
    assert [h["lr"] for h in res.history] == pytest.approx([cosine_lr(c, 0.1, e) for e in range(4)])


def test_max_tokens_trains_on_a_prefix_and_counts_tokens():
    res = train_lm(lstm(), stream(1000), stream(100, 3), cfg(epochs=2, max_tokens=200, optimizer="adamw"), lr=0.01,
                   device="cpu", progress=False)
    assert res.train_tokens == 2 * 4 * 49  # batchify(200, 4) -> 50 columns -> 49 predictions a row
    assert res.tokens_per_s > 0 and res.wall_time_s > 0 and res.device == "cpu"


def test_stateless_transformer_trains_through_the_same_loop():
    torch.manual_seed(0)
    m = TransformerLM(V, 1, 2, 16, seq_len=8, dropout=0.0)
    res = train_lm(m, stream(800, 1), stream(200, 2), cfg(epochs=3), lr=0.01, device="cpu", progress=False)
    assert res.best_val_loss < math.log(V)


@pytest.mark.parametrize("n, window", [(10, 4), (33, 32), (100, 32), (5, 8), (64, 7)])
def test_sliding_windows_score_every_position_once_with_at_least_half_a_window_of_context(n, window):
    scored = []
    for start, length, k in sliding_windows(n, window):
        assert 1 <= k <= length <= window
        targets = list(range(start + 1, start + 1 + length))[length - k:]
        if start > 0:  # past the first window, each scored target sees >= window // 2 earlier tokens
            assert min(t - start for t in targets) >= window // 2
        scored += targets
    assert scored == list(range(1, n))  # the same predictions as non-overlapping windows


def _copy_two_back(n: int, seed: int) -> torch.Tensor:
    """3 symbols, each a copy of the one two before it (10 % noise): the current token alone says nothing
    of the next, the one before it nearly all. Not periodic, so no window phase can be memorised."""
    g = torch.Generator().manual_seed(seed)
    noise, draw = torch.rand(n, generator=g) < 0.1, torch.randint(0, 3, (n,), generator=g)
    ids = draw.clone()
    for t in range(2, n):
        ids[t] = draw[t] if noise[t] else ids[t - 2]
    return ids


def test_a_windowed_model_is_scored_on_the_same_tokens_with_more_context():
    torch.manual_seed(0)
    train, val = _copy_two_back(800, 5), _copy_two_back(300, 6)
    m = TransformerLM(V, 1, 2, 32, seq_len=8, dropout=0.0)
    train_lm(m, train, val, cfg(epochs=20), lr=0.01, device="cpu", progress=False)
    sliding = evaluate(m, val, 8, 4)
    m.windowed = False  # the same weights, read in non-overlapping windows
    plain = evaluate(m, val, 8, 4)
    assert sliding["tokens"] == plain["tokens"] == 4 * (75 - 1)
    # window starts no longer predict from one token (measured: -41 % on 1 thread, -45 % on 2)
    assert sliding["loss"] < 0.9 * plain["loss"]


def test_a_long_epoch_prints_progress_lines_and_reports_live_points(monkeypatch, capsys):
    """Without a terminal (pytest's stderr is none), a progress line every PROGRESS_EVERY_S within an epoch
    (here every step) instead of tqdm frames, and on_progress gets the running loss at the optimiser step."""
    from newllm.training import trainer

    monkeypatch.setattr(trainer, "PROGRESS_EVERY_S", 0.0)
    points = []
    res = train_lm(lstm(), stream(400), stream(100, seed=2), cfg(epochs=1), lr=0.01, device="cpu",
                   on_progress=lambda m, step: points.append((step, m)))
    out = capsys.readouterr()
    lines = [ln for ln in out.out.splitlines() if ln.startswith("epoch 1/1: step")]
    assert len(lines) == len(points) == res.steps
    assert "tok/s" in lines[-1] and "ETA" in lines[-1] and "\r" not in out.err
    assert [s for s, _ in points] == list(range(1, res.steps + 1))
    assert all(math.isfinite(m["train_loss"]) and m["tokens_per_s"] > 0 for _, m in points)
