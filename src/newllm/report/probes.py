"""Memory and speed of streaming inference versus sequence length (docs/research.md §5, question 2: the O(1) claim).

For each length L, every model is brought to position L - S (the prefix fed in chunks, carrying its state)
and then produces S tokens one at a time, as in generation. We report, at the end of the sequence:

    state_bytes   what is carried from one token to the next at position L: New-LLM's context vector,
                  the LSTM's / CVP's (h, c) / c, the Transformer's KV cache, or -- for full re-attention,
                  which keeps no cache -- the token ids it must re-read
    peak_bytes    the most tensor memory alive at once while producing those tokens: the carried state plus
                  one step's temporaries (the prefix's own chunk temporaries are excluded: they are a choice
                  of the feeding, not a cost of generating at length L). Model weights are excluded (they do
                  not depend on L) and reported once as param_bytes.
    ms_per_token  wall time per generated token: the median over `repeats` separate, untracked passes (after
                  a warm-up) of each pass's median over its S steps; ms_min / ms_max give the passes' range,
                  so one stalled sample on a shared machine shows as spread, not as the figure.

Modes: recurrent models stream with their state; the Transformer runs (a) with its KV cache, (b) with full
re-attention, recomputing the whole prefix at every token (cost ~ L per token, so only `full_steps` steps
at the end of the sequence are measured: one by default, as one such step at L = 16,384 takes seconds on
a CPU, far longer than any scheduler stall, and each of the `repeats` passes still gives its sample).
The trained Transformer has n_positions learned positions and cannot run beyond them as trained: with
`beyond_positions="stop"` such rows carry no numbers; with "extend" (the default) they are measured on a copy whose position table is tiled to L -- the same shapes,
hence the same memory and time, but meaningless outputs -- and the row's `status` says "cost only".

How memory is measured, and why: `LiveTensorBytes`, a TorchDispatchMode, sees every tensor an aten op
returns, counts its storage once (views and in-place results share their input's storage and are not new)
and subtracts it when the storage is freed (a weakref on the storage), tracking the peak. It is exact and
deterministic, works the same on CPU and CUDA, and resolves a 1 KB context vector. The alternatives fail on
CPU: ru_maxrss / RSS includes the ~300 MB Python+torch runtime, allocator caching and page granularity
(a 1 KB state is far below its noise, and a subprocess per point costs seconds of imports); tracemalloc
does not see torch's C++ allocations; torch.profiler's memory events see every allocation but need
version-dependent post-processing. What the tracker does not see: scratch memory internal to one kernel
(e.g. a fused attention kernel's blocks) and memory outside tensors (Python objects). Those are constant or
O(L) at most, so they do not change the picture; the numbers are a lower bound on the process's growth.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from newllm.models.transformer import TransformerLM


# ----------------------------------------------------------------------------------------------- memory
class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage allocated inside the mode and still alive (`live`), and their maximum (`peak`).

    Tensors that existed before entering (weights, inputs) are never counted, even when an op returns a
    view of them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in inputs or storage.nbytes() == 0:
                continue  # a view or an in-place result: no new memory
            inputs.add(storage.data_ptr())  # an op returning two views of one new storage counts it once
            self.live += storage.nbytes()
            weakref.finalize(storage, self._free, storage.nbytes())  # PyTorch keeps storage PyObjects alive
        self.peak = max(self.peak, self.live)
        return out


def tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct storages of every tensor reachable from obj (tensors, sequences, dicts, and
    the attributes of objects such as a transformers Cache), each storage counted once."""
    seen: dict[int, int] = {}

    def walk(o: Any, depth: int) -> None:
        if isinstance(o, Tensor):
            st = o.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif depth > 8 or o is None or isinstance(o, (str, bytes, int, float, bool)):
            return
        elif isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v, depth + 1)
        elif hasattr(o, "__dict__"):
            walk(vars(o), depth + 1)

    walk(obj, 0)
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------- runners
@dataclass
class _Runner:
    """How one model/mode reaches position p (`prefix`, fed `chunk` tokens at a time) and then produces
    one token (`step`)."""

    model: str
    method: str
    prefix: Callable[[Tensor, Any], Any]  # (ids (1, p), state before them or None) -> state after them
    step: Callable[[Tensor, Any, int], Any]  # (ids (1, t + 1) so far, state, t) -> state after token t
    state_of: Callable[[Any, int], int]  # (state, length) -> bytes carried
    steps: int
    chunk: int


def _chunked(fn: Callable[[Tensor, Any], Any], chunk: int) -> Callable[[Tensor, Any], Any]:
    def prefix(ids: Tensor, state: Any = None) -> Any:
        for i in range(0, ids.size(1), chunk):
            state = fn(ids[:, i:i + chunk], state)
        return state
    return prefix


def _recurrent_runner(name: str, model: nn.Module, chunk: int, steps: int) -> _Runner:
    if not getattr(model, "streamable", True):
        raise ValueError(f"{name}: this model cannot stream one token at a time (e.g. CVP with a positional table)")

    def feed(x: Tensor, state: Any) -> Any:
        return model(x, state)[1]  # the logits are produced (generation needs them) and dropped

    return _Runner(name, "stream, state carried", _chunked(feed, chunk),
                   lambda ids, state, t: feed(ids[:, t:t + 1], state), lambda state, _: tensor_bytes(state), steps,
                   chunk)


def _cache_runner(name: str, model: nn.Module, chunk: int, steps: int) -> _Runner:
    """A model that streams through its own `step(x, cache) -> (logits, cache)`: the Transformer's KV
    cache, or a recurrent cache that the model's forward does not carry (Mamba's)."""
    def feed(x: Tensor, cache: Any) -> Any:
        return model.step(x, cache)[1]

    return _Runner(name, getattr(model, "cache_method", "KV cache"), _chunked(feed, chunk),
                   lambda ids, cache, t: feed(ids[:, t:t + 1], cache), lambda cache, _: tensor_bytes(cache), steps,
                   chunk)


def _full_runner(name: str, model: TransformerLM, steps: int) -> _Runner:
    # only the last position's logits are needed to pick the next token; computing all L would add a
    # (L, vocab) tensor that no sensible implementation keeps
    params = inspect.signature(model.gpt.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {"num_logits_to_keep": 1}

    def step(ids: Tensor, _: Any, t: int) -> None:
        model.gpt(input_ids=ids[:, :t + 1], use_cache=False, **keep)

    # no cache: what it carries is the token ids it re-reads at every step (int64)
    return _Runner(name, "full re-attention", lambda ids, state: None, step, lambda _, length: 8 * length, steps,
                   chunk=1)


def _with_positions(model: TransformerLM, n_positions: int) -> TransformerLM:
    """A copy of `model` with its learned position table tiled to n_positions rows: the same shapes and
    cost at any length up to n_positions, but outputs that mean nothing beyond the trained positions."""
    cfg = model.config
    big = TransformerLM(cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, n_positions, dropout=0.0)
    state = dict(model.state_dict())
    wpe = state["gpt.transformer.wpe.weight"]
    state["gpt.transformer.wpe.weight"] = wpe.repeat(-(-n_positions // wpe.size(0)), 1)[:n_positions]
    big.load_state_dict(state)
    return big.to(next(model.parameters()).device).eval()


# ----------------------------------------------------------------------------------------------- probe
def _prefix(r: _Runner, ids: Tensor, length: int, start: int = 0, state: Any = None) -> Any:
    """The state after ids[:, :L - steps] (where `r`'s timed steps start), fed from position `start` on,
    from `state`, the state after ids[:, :start]."""
    end = length - min(r.steps, length)
    with torch.no_grad():
        return r.prefix(ids[:, start:end], state) if end > start else state


def _last_chunk(r: _Runner, length: int) -> int:
    """Where the prefix's last chunk starts. The memory pass feeds every chunk before it outside the
    tracker (whose Python dispatch per op costs seconds over thousands of positions) and the last one
    inside: each chunk replaces the whole carried state, so the tracker still sees all of it allocated."""
    end = length - min(r.steps, length)
    return max(0, (end - 1) // r.chunk * r.chunk)


def _measure(r: _Runner, ids: Tensor, length: int, track: bool, device: torch.device, start: Any = None,
             resume: tuple[int, Any] = (0, None)) -> tuple[int | None, float, int]:
    """(peak_bytes or None, seconds per token, state bytes) over the last `r.steps` positions of ids[:, :L].

    Seconds per token is the median over the steps: a scheduler stall on a shared machine moves one step,
    not the figure. `start`: the prefix's state (`_prefix`), computed once by the caller for its timed
    passes and copied here, as the steps may update it in place (a KV cache). The memory pass gives none
    but `resume`, (p, the state after ids[:, :p]), p at most `_last_chunk`: the rest of its prefix runs
    inside the tracker, which must see the carried state allocated."""
    steps = min(r.steps, length)
    tracker = LiveTensorBytes() if track else nullcontext()
    cuda = device.type == "cuda"
    times = []
    with torch.no_grad(), tracker:
        state = copy.deepcopy(start) if start is not None else _prefix(r, ids, length, *resume)
        if track:
            tracker.reset_peak()  # from here on: the carried state plus each step's temporaries
        for t in range(length - steps, length):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            state = r.step(ids, state, t)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    return (tracker.peak if track else None), seconds, r.state_of(state, length)


def memory_vs_length(models: dict[str, nn.Module], lengths: list[int], vocab_size: int,
                     device: str | torch.device = "cpu", steps: int = 32, full_steps: int = 1,
                     memory_steps: int = 4, chunk: int = 256, seed: int = 0, repeats: int = 3,
                     beyond_positions: Literal["extend", "stop"] = "extend") -> list[dict]:
    """One row per (model, method, length): state_bytes, peak_bytes, ms_per_token, status (see module doc).

    `models` maps a display name to a TransformerLM or a recurrent model (the Transformer gives a KV
    cache row and a full re-attention row). Inputs are random token ids (cost does not depend on them),
    the same for every model. ms/token is averaged over the last `steps` positions (`full_steps` for full
    re-attention); peak memory over the last `memory_steps` (it is the same at every step).
    """
    if beyond_positions not in ("extend", "stop"):
        raise ValueError(f"beyond_positions must be 'extend' or 'stop', got {beyond_positions!r}")
    device = torch.device(device)
    lengths = sorted(set(lengths))
    ids = torch.randint(0, vocab_size, (1, max(lengths)), generator=torch.Generator().manual_seed(seed)).to(device)
    rows: list[dict] = []
    for name, model in models.items():
        model = model.to(device).eval()
        param_bytes = tensor_bytes(list(model.parameters()))
        n_pos = model.config.n_positions if isinstance(model, TransformerLM) else None
        extended = None
        if n_pos is not None and max(lengths) > n_pos and beyond_positions == "extend":
            extended = _with_positions(model, max(lengths))
        for trained, cost_only in _runners(name, model, extended, chunk, steps, full_steps):
            for r in (trained, cost_only):  # warm-up: first calls pay one-off initialisation
                if r is not None:
                    _measure(r, ids, min(4, lengths[0]), track=False, device=device)
            for length in lengths:
                row = {"model": name, "method": trained.method, "length": length, "param_bytes": param_bytes,
                       "state_bytes": None, "peak_bytes": None, "ms_per_token": None, "ms_min": None,
                       "ms_max": None,
                       "timed_steps": min(trained.steps, length), "trained_positions": True, "status": "ok"}
                rows.append(row)
                r = trained
                if n_pos is not None and length > n_pos:
                    row["trained_positions"] = False
                    if cost_only is None:
                        row["status"] = f"beyond trained positions (n_positions={n_pos}): not run"
                        continue
                    r = cost_only
                    row["status"] = (f"cost only: beyond trained positions (n_positions={n_pos}); position "
                                     f"table tiled to {max(lengths)}, outputs meaningless")
                mem_runner = dataclasses.replace(r, steps=min(memory_steps, r.steps))
                # the chunks both passes' prefixes share, fed once, untracked
                head = min(_last_chunk(mem_runner, length), _last_chunk(r, length))
                with torch.no_grad():
                    shared = r.prefix(ids[:, :head], None) if head else None
                peak, _, state_bytes = _measure(mem_runner, ids, length, track=True, device=device,
                                                resume=(head, copy.deepcopy(shared)))
                start = _prefix(r, ids, length, head, shared)  # once: the timed passes differ only in their steps
                ms = sorted(1000 * _measure(r, ids, length, track=False, device=device, start=start)[1]
                            for _ in range(repeats))
                row.update(state_bytes=state_bytes, peak_bytes=peak, ms_per_token=ms[len(ms) // 2],
                           ms_min=ms[0], ms_max=ms[-1])
    return rows


def _runners(name: str, model: nn.Module, extended: TransformerLM | None, chunk: int, steps: int,
             full_steps: int) -> list[tuple[_Runner, _Runner | None]]:
    """(runner on the trained model, runner on its position-extended copy or None) per method."""
    if isinstance(model, TransformerLM):
        return [(_cache_runner(name, model, chunk, steps),
                 _cache_runner(name, extended, chunk, steps) if extended is not None else None),
                (_full_runner(name, model, full_steps),
                 _full_runner(name, extended, full_steps) if extended is not None else None)]
    if hasattr(model, "step"):
        return [(_cache_runner(name, model, chunk, steps), None)]
    # every other model follows the trainer's convention `logits, state = model(x, state)`
    return [(_recurrent_runner(name, model, chunk, steps), None)]


def memory_figure(rows: list[dict]):
    """Two panels, log-log: peak tensor memory vs length and ms/token vs length, one line per model and
    method; cost-only points (a Transformer beyond its trained positions) are hollow on a dashed line."""
    from newllm.report.figures import pyplot

    plt = pyplot()
    fig, (ax_mem, ax_ms) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["peak_bytes"] is not None:
            series.setdefault((row["model"], row["method"]), []).append(row)
    for i, ((model, method), pts) in enumerate(series.items()):
        color = f"C{i}"
        pts = sorted(pts, key=lambda r: r["length"])
        trained = [r for r in pts if r["trained_positions"]]
        # a dashed segment from the last trained point on marks the cost-only measurements
        beyond = trained[-1:] + [r for r in pts if not r["trained_positions"]]
        for ax, key, scale in ((ax_mem, "peak_bytes", 1 / 1024), (ax_ms, "ms_per_token", 1.0)):
            for seg, style in ((trained, "-"), (beyond, "--")):
                if len(seg) > 1:
                    ax.plot([r["length"] for r in seg], [r[key] * scale for r in seg], style, color=color)
            for r in pts:
                ax.plot(r["length"], r[key] * scale, "o", color=color,
                        mfc=color if r["trained_positions"] else "white")
        ax_mem.plot([], [], "-o", color=color, label=f"{model} ({method})")
    if any(not r["trained_positions"] and r["peak_bytes"] is not None for r in rows):
        ax_mem.plot([], [], "o", color="gray", mfc="white", label="cost only (beyond trained positions)")
    ax_mem.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="peak tensor memory (KiB)",
               title="memory while generating at length L")
    ax_ms.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="ms / token",
              title="time per generated token at length L")
    ax_mem.legend(fontsize=7)
    fig.tight_layout()
    return fig
