"""The data layout every model trains and is evaluated on: B contiguous streams (`batchify`), windows of
`seq_len` positions read from all B at once, and a model's carried state between windows (see trainer.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import Tensor


def batchify(data: Tensor, batch_size: int) -> Tensor:
    """(N, ...) -> (B, N // B, ...): B contiguous streams, the tail that does not fill a row dropped.

    Row b holds tokens [b * n, (b + 1) * n), so reading the columns left to right walks every stream in
    order. Works unchanged for per-position extras (N, ...) aligned with the token stream: they are cut
    at the same places. Returns a view when `data` is contiguous.
    """
    n = data.size(0) // batch_size
    if n < 2:
        raise ValueError(f"batchify: {data.size(0)} positions are too few for batch_size {batch_size} "
                         "(each stream needs at least 2 tokens: one input and one target)")
    return data[: n * batch_size].reshape(batch_size, n, *data.shape[1:])


def batchify_extras(extras: Mapping[str, Tensor] | None, batch_size: int) -> dict[str, Tensor]:
    return {k: batchify(v, batch_size) for k, v in (extras or {}).items()}


def windows(n: int, seq_len: int) -> Iterator[tuple[int, int]]:
    """(start, length) of each window over a (B, n) batch: x = [i, i+T), y = [i+1, i+1+T).

    The last window is shorter when (n - 1) is not a multiple of seq_len; every position but the first
    of each stream is predicted exactly once.
    """
    for i in range(0, n - 1, seq_len):
        yield i, min(seq_len, n - 1 - i)


def sliding_windows(n: int, window: int) -> Iterator[tuple[int, int, int]]:
    """(start, length, scored) of windows over a (B, n) batch for a model that sees only its input window:
    stride window // 2, and only the last `scored` targets of each are counted, so every position but the
    first is predicted exactly once (as with `windows`) and each sees up to window - 1 tokens of context
    (at least window // 2 past the first window) instead of none at a window start."""
    stride, done = max(1, window // 2), 0  # done: targets scored so far (target j is position j + 1)
    start = 0
    while done < n - 1:
        length = min(window, n - 1 - start)
        yield start, length, start + length - done
        done = start + length
        start += stride


def map_state(state: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """`fn` applied to every tensor of a model state (None, a tensor, or tuples/lists/dicts of them)."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, (tuple, list)):
        return type(state)(map_state(s, fn) for s in state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    raise TypeError(f"cannot handle a model state of type {type(state).__name__}")


def detach_state(state: Any) -> Any:
    """Cut the graph at the window boundary (truncated BPTT), whatever the state's nesting."""
    return map_state(state, Tensor.detach)
