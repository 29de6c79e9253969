"""Reproduce PyTorch's public word_language_model example (LSTM on WikiText-2) through OUR trainer and
OUR LSTM model: a check that the generic trainer, the shared evaluation and the LSTM baseline behave like
the well-known reference, so their numbers can be trusted next to New-LLM's.

The example's recipe (its `main.py` defaults, LSTM, untied): word-level tokens, each line split on
whitespace plus `<eos>`, one vocabulary over train + valid + test; 2 layers × 200 units, embedding 200,
dropout 0.2; plain SGD at lr 20, divided by 4 whenever validation loss does not improve; gradient clip
0.25; BPTT 35; batch 20 (evaluation batch 10); here 6 epochs.

    python benchmarks/lstm_wikitext.py                        # the full recipe
    python benchmarks/lstm_wikitext.py --epochs 1 --max-tokens 300000 --device cpu   # a quick check

Not a test: it prints validation/test perplexity and the time per epoch, and asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from newllm.models.factory import count_params
from newllm.models.lstm import LSTMLM
from newllm.registry import LSTMConfig
from newllm.training.trainer import evaluate, resolve_device, train_lm

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def read_corpus(folder: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """The example's `data.Corpus`: ids assigned in order of first appearance over train, valid, test."""
    vocab: dict[str, int] = {}
    splits = {}
    for split in ("train", "valid", "test"):
        ids = []
        with open(folder / f"{split}.txt", encoding="utf8") as f:
            for line in f:
                for word in line.split() + ["<eos>"]:
                    ids.append(vocab.setdefault(word, len(vocab)))
        splits[split] = torch.tensor(ids, dtype=torch.long)
    return vocab, splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/valid/test.txt")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=0, help="train on this prefix only (0 = all)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=1111)  # the example's default seed
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    LR = 20.0  # the recipe's SGD lr
    cfg = LSTMConfig(optimizer="sgd", weight_decay=0.0, batch_size=20, seq_len=35, epochs=args.epochs,
                     grad_clip=0.25, scheduler="plateau", plateau_factor=0.25, patience=0, min_delta=0.0,
                     max_tokens=args.max_tokens, embed_dim=200, hidden_dim=200, num_layers=2, dropout=0.2,
                     tie_weights=False)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    vocab, data = read_corpus(args.data)
    print(f"WikiText-2 from {args.data}: vocab {len(vocab):,}; tokens train {len(data['train']):,} "
          f"valid {len(data['valid']):,} test {len(data['test']):,} (read in {time.perf_counter() - t0:.1f}s)")

    torch.manual_seed(args.seed)
    model = LSTMLM.from_config(cfg, len(vocab))
    n_train = min(len(data["train"]), args.max_tokens or len(data["train"]))
    print(f"LSTM 2x200, {count_params(model)[1]:,} params; device {device}; {args.epochs} epoch(s) on "
          f"{n_train:,} train tokens; SGD lr {LR}, clip {cfg.grad_clip}, bptt {cfg.seq_len}, "
          f"batch {cfg.batch_size}")

    def on_epoch(epoch: int, m: dict[str, float]) -> None:
        print(f"| end of epoch {epoch:3d} | time: {m['epoch_time_s']:7.1f}s | lr {m['lr']:7.4g} | "
              f"train loss {m['train_loss']:5.2f} | valid loss {m['val_loss']:5.2f} | "
              f"valid ppl {m['val_ppl']:8.2f} | {m['tokens_per_s']:,.0f} tok/s", flush=True)

    res = train_lm(model, data["train"], data["valid"], cfg, lr=LR, device=device, seed=args.seed, eval_batch_size=10,
                   on_epoch=on_epoch, progress=not args.no_progress)
    test = evaluate(model, data["test"], cfg.seq_len, 10, device=device)
    print("=" * 89)
    print(f"| best epoch {res.best_epoch} | valid ppl {res.best_val_ppl:8.2f} | test loss {test['loss']:5.2f} | "
          f"test ppl {test['ppl']:8.2f} | test acc {test['accuracy']:.4f} | wall {res.wall_time_s:.0f}s")
    print("=" * 89)


if __name__ == "__main__":
    main()
