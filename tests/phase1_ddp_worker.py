"""Phase 1 over position shards: run by tests/training/test_phase1.py under torchrun (2 gloo processes).
Rank 0 saves the trained weights and the result's metrics to argv[1]; `setup` is the case both sides train."""

import sys
from dataclasses import replace

import torch
from helpers import default_params

from newllm import distributed
from newllm.models.cvfp import NewLLM
from newllm.training.phase1 import train_phase1

# every iteration runs (no early stop); an odd token count, so the ranks' shards differ in length
CFG = replace(default_params().phase1, iterations=4, min_converged=2.0, dist_reg_weight=0.5)


def setup(first_context: str, streams: int, target: str, lr: float) -> tuple[NewLLM, torch.Tensor, torch.Tensor, object]:
    torch.manual_seed(0)
    model = NewLLM(17, 16, 12, 2, 2)
    g = torch.Generator().manual_seed(1)
    ids, val = torch.randint(0, 17, (61,), generator=g), torch.randint(0, 17, (31,), generator=g)
    return model, ids, val, replace(CFG, first_context=first_context, streams=streams, target=target, lr=lr)


def result(model: NewLLM, res) -> dict:
    return {"state": model.state_dict(), "history": res.history, "train_er": res.train_er, "val_er": res.val_er,
            "sequential_cosine": res.sequential_cosine, "train_tokens": res.train_tokens}


if __name__ == "__main__":
    out, first, streams, target, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
    distributed.init("cpu")
    model, ids, val, cfg = setup(first, streams, target, lr)
    res = train_phase1(model, ids, cfg, device="cpu", val_ids=val)
    if distributed.is_main():
        torch.save(result(model, res), out)
