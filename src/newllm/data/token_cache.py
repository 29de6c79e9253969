"""The token-id cache under data/tokens/: the only thing training stages read.

    tokenizer.json   the HF tokenizer
    meta.json        kind, vocab size, special ids, token counts
    {train,val,test}.npy   int32 token streams
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from newllm.errors import PipelineError

SPLITS = ("train", "val", "test")


class TokenCacheError(PipelineError):
    """The cache is missing or damaged: rerun the tokenize stage."""


@dataclass
class TokenCache:
    root: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.root / "tokenizer.json"))


def check_ids(split: str, ids: np.ndarray, vocab_size: int, where: str) -> None:
    """Every id of a stream is a vocabulary row: a cache that breaks this would fail every training stage."""
    if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= vocab_size)):
        top = int(ids.max()) if ids.size else None
        raise TokenCacheError(f"{where}: {split} has ids outside the vocabulary (max id {top}, vocab {vocab_size})")


def write_cache(root: Path, tokenizer, streams: dict[str, list[int]], meta: dict) -> None:
    """Check every stream's ids, then write into a sibling temp folder and swap it in, so a crash never
    leaves half a cache and a bad one is never written (DVC would cache it)."""
    arrays = {split: np.asarray(streams.get(split, []), dtype=np.int32) for split in SPLITS}
    for split, ids in arrays.items():
        check_ids(split, ids, meta["vocab_size"], f"tokenizer {meta.get('kind', '')}".strip())
    root = Path(root)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save(str(tmp / "tokenizer.json"))
    for split, ids in arrays.items():
        np.save(tmp / f"{split}.npy", ids)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


def load_cache(root: str | Path = "data/tokens") -> TokenCache:
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise TokenCacheError(f"no token cache at {root} (missing meta.json): run `dvc repro tokenize`")
    try:
        meta = json.loads(meta_path.read_text())
        arrays = {s: np.load(root / f"{s}.npy", allow_pickle=False) for s in SPLITS}
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise TokenCacheError(f"damaged token cache at {root} ({e}): rerun `dvc repro -f tokenize`") from None
    for split, arr in arrays.items():
        check_ids(f"{split}.npy", arr, meta["vocab_size"], f"damaged token cache at {root}")
    if arrays["train"].size < 2 or arrays["val"].size < 2:
        raise TokenCacheError(f"token cache at {root} has an empty train or val split")
    return TokenCache(root, meta, **arrays)


def check_sizes(params: Any, section: str) -> None:
    """Data-size limits of params.yaml `section` (a next-token trainer's) and eval_batch_size against the
    token cache, checked before any compute or MLflow run (batchify needs >= 2 tokens a row)."""
    cache, cfg, eval_batch_size = load_cache(), getattr(params, section), params.eval_batch_size
    train = min(len(cache.train), cfg.max_tokens or len(cache.train))
    if train // cfg.batch_size < 2:
        raise PipelineError(f"params.yaml: {section}.batch_size ({cfg.batch_size}) is too large for the "
                            f"{train:,} train tokens (needs >= 2 tokens a row)")
    for split in ("val", "test"):
        n = len(getattr(cache, split))
        if (split == "val" or n) and n // eval_batch_size < 2:
            raise PipelineError(f"params.yaml: eval_batch_size ({eval_batch_size}) is too large for the "
                                f"{n:,} {split} tokens (needs >= 2 tokens a row)")
