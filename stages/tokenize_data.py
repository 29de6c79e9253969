"""DVC stage `tokenize`: train the tokenizer on the train split and write the token-id cache data/tokens/.

(Not named tokenize.py: a script's folder goes first on sys.path and would shadow the stdlib module.)
"""

from pathlib import Path

from newllm.pipeline import run_stage

DATASET, OUT = Path("data/dataset"), Path("data/tokens")


def main(params, run) -> None:
    import numpy as np

    from newllm.data import tokenizers as tk
    from newllm.data.stats import read_splits
    from newllm.data.token_cache import SPLITS, write_cache

    splits = read_splits(DATASET)
    tok = tk.build_tokenizer(params.tokenizer, splits.train)
    streams = {s: tk.encode_lines(tok, getattr(splits, s)) for s in SPLITS}
    if params.tokenizer.max_eval_tokens:  # a prefix of each, so every model is scored on the same tokens
        streams.update({s: streams[s][: params.tokenizer.max_eval_tokens] for s in ("val", "test")})
    unk = tk.unk_id(tok)
    stats: dict[str, float] = {"vocab_size": tok.get_vocab_size()}
    for split, ids in streams.items():
        stats[f"tokens_{split}"] = len(ids)
        stats[f"unk_rate_{split}"] = round(float(np.mean(np.asarray(ids) == unk)), 6) if ids and unk is not None else 0.0
    meta = {"kind": params.tokenizer.kind, "vocab_size": tok.get_vocab_size(), "eos_id": tk.eos_id(tok),
            "unk_id": unk, **{f"tokens_{s}": len(ids) for s, ids in streams.items()}}
    write_cache(OUT, tok, streams, meta)
    run.finish(stats)
    print(f"tokenize: {params.tokenizer.kind} vocab {stats['vocab_size']}, train {stats['tokens_train']} tokens, "
          f"val {stats['tokens_val']} (unknown {stats['unk_rate_val']:.2%})")


if __name__ == "__main__":
    run_stage("tokenize", main)
