"""The report's analyses of the trained models: loss curves, context use, samples. Each returns numbers
or a figure; build.py puts them in the document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from newllm.config import Params
from newllm.errors import PipelineError
from newllm.report.figures import pyplot
from newllm.report.tables import NEWLLM, display, read_curve


def loss_curves_figure(root: Path, declared: dict, cells: dict[str, str]):
    """Val loss per epoch of every model (`cells`: model record -> the run drawn) on one figure (train
    dashed, same colour)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (stage, cell) in enumerate(cells.items()):
        curve = read_curve(root, declared[cell])
        if not curve:
            continue
        colour = f"C{i}"
        epochs = [row["step"] for row in curve]
        ax.plot(epochs, [row["val_loss"] for row in curve], "-o", color=colour, label=f"{display(stage)} val")
        ax.plot(epochs, [row["train_loss"] for row in curve], "--", color=colour, alpha=0.7,
                label=f"{display(stage)} train")
    ax.set(xlabel="epoch", ylabel="cross-entropy (nats/token)", title="Loss per epoch (val solid, train dashed)")
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    return fig


def samples(params: Params, models: dict[str, Any], tokenizer, eos_id: int) -> list[list[str]]:
    from newllm.generation import decode_stream, encode_prompt, stream_tokens

    cfg = params.report
    rows = []
    for prompt in cfg.prompts:
        prompt_ids = encode_prompt(tokenizer, prompt, eos_id)
        for name, model in models.items():
            for mode, kwargs in (("greedy", {"greedy": True}),
                                 (f"top-{cfg.top_k}", {"top_k": cfg.top_k, "temperature": cfg.temperature})):
                ids = stream_tokens(model, prompt_ids, cfg.max_new_tokens, seed=params.seed, **kwargs)
                pieces = decode_stream(tokenizer, ids, prompt_ids=prompt_ids, eos_id=eos_id)
                text = "".join(pieces).replace("\n", " ⏎ ")  # end of a line, shown inline
                rows.append([prompt, name, mode, text.strip()])
    return rows


def metric_key(record: str) -> str:
    """A model's prefix in the report's metrics: `newllm` for New-LLM's Phase 2 record, else its record."""
    return "newllm" if record == NEWLLM else record


def context_use(loaded: dict[str, Any], cache: Any, window: int) -> dict[str, dict[str, float]]:
    """{model key: {p: mean test loss of the predictions that have seen p .. 2p - 1 tokens}}, p = 1, 2, 4, ..."""
    import torch

    from newllm.training.position_loss import log_bins, position_losses

    test = torch.from_numpy(cache.test.astype("int64"))
    if test.numel() < window + 2:
        raise PipelineError(f"params.yaml: report.context_window ({window}) needs more than {window + 1} test "
                            f"tokens; the test split has {test.numel():,}")
    out = {}
    for s, model in loaded.items():  # a stateful model takes the whole window at once; the Transformer its n_positions
        curve, _ = position_losses(model, test, window, max_context=getattr(model, "seq_len", window))
        out[metric_key(s)] = {str(p): round(v, 5) for p, v in log_bins(curve).items()}
    return out




def truncation(loaded: dict[str, Any], cache: Any, window: int) -> dict[str, dict[str, float]]:
    """{model key: {d: mean test loss when the prediction sees only the last d tokens}}, d = 1, 2, 4, .., window."""
    import torch

    from newllm.training.position_loss import truncation_losses

    test = torch.from_numpy(cache.test.astype("int64"))
    return {metric_key(s): {str(d): round(v, 5) for d, v in
                            truncation_losses(model, test, window, max_context=getattr(model, "seq_len", window)).items()}
            for s, model in loaded.items()}
