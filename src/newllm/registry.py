"""The models of the pipeline: one table that the params, the stages, the factory, the report, the
ablation table and `newllm generate` all read.

Adding a baseline is one module `models/<name>.py` (an nn.Module with `from_config(cfg, vocab_size)`),
one `ModelSpec` below (with the dataclass of its params section), one `<name>:` section in params.yaml
and its name in params.yaml's `baselines` list (dvc.yaml's `baseline` stage runs `foreach: ${baselines}`).

A section's dataclass only validates (params.yaml holds every default), so this file holds no number a
run could depend on: a stage's results depend on params.yaml and on the modules that compute, which is
why the stages' DVC deps list those modules and not this table (adding a model reruns nothing else).
Torch-free, like config.py: params are validated before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from newllm.schema import knob


# ----------------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """What the one generic LM trainer reads (New-LLM's Phase 2 and every baseline), but the learning rate:
    that is a cell of the protocol's sweep (`protocol.lrs`), the same values for every model, chosen on val.
    The `train:` section holds every key for all models at once; a model section may override any of them
    (`-S +lstm.epochs=40`)."""

    optimizer: Literal["adam", "adamw", "sgd"] = knob()
    weight_decay: float = knob(lo=0.0)
    batch_size: int = knob(lo=1)
    seq_len: int = knob(lo=2)
    epochs: int = knob(lo=1)
    grad_clip: float = knob(lo=0.0)  # 0 = off
    scheduler: Literal["constant", "cosine", "plateau"] = knob()
    plateau_factor: float = knob(lo=0.0, hi=1.0, lo_open=True)  # plateau: lr *= factor when val stalls
    patience: int = knob(lo=0)  # early stopping; 0 = off
    min_delta: float = knob(lo=0.0)
    max_tokens: int = knob(lo=0)  # train on a prefix of the train stream (0 = all)


# ----------------------------------------------------------------------------------------------- sections
@dataclass
class Phase2Config(TrainConfig):
    # Contexts are cached by one exact pass over this many contiguous chunks of each split, run as a batch
    # (1 = the plain recurrence over the whole stream; more = faster on long corpora, reset at chunk starts).
    streams: int = knob(lo=1)


@dataclass
class EndToEndConfig(TrainConfig):
    """The end-to-end control: New-LLM's network (top-level params), trained like the LSTM."""


@dataclass
class TransformerConfig(TrainConfig):
    n_layer: int = knob(lo=1)
    n_head: int = knob(lo=1)
    n_embd: int = knob(lo=1)  # used as is when protocol.match_params is false
    dropout: float = knob(lo=0.0, hi=1.0)


@dataclass
class LSTMConfig(TrainConfig):
    embed_dim: int = knob(lo=1)  # embed_dim and hidden_dim: as is when protocol.match_params is false
    hidden_dim: int = knob(lo=1)
    num_layers: int = knob(lo=1)
    dropout: float = knob(lo=0.0, hi=1.0)
    tie_weights: bool = knob()


@dataclass
class CVPConfig(TrainConfig):
    embed_dim: int = knob(lo=1)  # the three widths: as is when protocol.match_params is false
    context_dim: int = knob(lo=1)
    hidden_dim: int = knob(lo=1)
    num_layers: int = knob(lo=1)
    dropout: float = knob(lo=0.0, hi=1.0)
    context_norm: bool = knob()
    gating: bool = knob()
    context_clip: float = knob(lo=0.0)  # 0 = off, else clamp(c, -clip, clip)
    positional: bool = knob()  # learned position table over seq_len (the first versions had one)


@dataclass
class MinGRUConfig(TrainConfig):
    dim: int = knob(lo=1)  # the residual width: as is when protocol.match_params is false
    num_layers: int = knob(lo=1)
    expansion: float = knob(lo=0.0, lo_open=True)  # the minGRU's hidden width, as a multiple of dim
    dropout: float = knob(lo=0.0, hi=1.0)


@dataclass
class MambaConfig(TrainConfig):
    dim: int = knob(lo=1)  # the residual width: as is when protocol.match_params is false
    num_layers: int = knob(lo=1)
    state_size: int = knob(lo=1)  # the SSM state per channel (N)
    expand: int = knob(lo=1)  # the mixer's inner width, as a multiple of dim
    conv_kernel: int = knob(lo=1)


# ----------------------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class ModelSpec:
    name: str  # `newllm generate --model`, the `baselines` item
    display: str  # its name in the report
    config: type  # the dataclass of its params section
    model_class: str  # in newllm.models.<module>: from_config(cfg, vocab_size) -> nn.Module
    # lm: one stage, the generic trainer on the token stream, state carried across windows (truncated BPTT);
    # cvfp: Phase 1 (fixed-point training of the ContextBlock) then Phase 2 (the generic trainer on the
    # frozen block's cached contexts); phase2: Phase 2 alone, on the block left at its initialisation
    trains: Literal["lm", "cvfp", "phase2"] = "lm"
    # what it is in the comparison: the model under study, a baseline (params.yaml's `baselines` lists
    # which run), or a control of New-LLM that removes one mechanism (always run, always reported)
    role: Literal["newllm", "baseline", "control"] = "baseline"
    arch: Literal["section", "newllm"] = "section"  # where its architecture knobs are: its section or New-LLM's
    section: str = ""  # params section; default: name
    record: str = ""  # its metrics/plots/checkpoint/MLflow stage name; default: name
    module: str = ""  # newllm.models.<module>; default: name
    memory_probe: bool = True  # the report measures its memory and ms/token against sequence length
    reference: bool = False  # the baseline the report's headline compares New-LLM with (one model at most)
    # its memory of the past is a fixed-size state (an RNN, an SSM), not a cache that grows with the context:
    # the report's second sentence compares New-LLM with the best of these
    fixed_state: bool = True

    def __post_init__(self) -> None:
        for attr in ("section", "record", "module"):
            if not getattr(self, attr):
                object.__setattr__(self, attr, self.name)
        # dvc.yaml's `baseline` foreach names a baseline's section, files and module by the item alone
        if self.role == "baseline" and {self.section, self.record, self.module} != {self.name}:
            raise ValueError(f"baseline {self.name!r}: section, record and module must all be its name")


MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("newllm", "New-LLM", Phase2Config, "NewLLM", trains="cvfp", role="newllm", arch="newllm",
              section="phase2", record="phase2_train", module="cvfp"),
    # Controls: New-LLM with one mechanism removed, to show what that mechanism is worth.
    ModelSpec("newllm_phase1_off", "New-LLM, Phase 1 off", Phase2Config, "NewLLM", trains="phase2",
              role="control", arch="newllm", section="phase2", record="phase1_off", module="cvfp",
              memory_probe=False),  # the same state as New-LLM's: the probe would repeat its row
    ModelSpec("newllm_end_to_end", "New-LLM, end-to-end", EndToEndConfig, "NewLLM", role="control",
              arch="newllm", section="end_to_end", record="end_to_end", module="cvfp", memory_probe=False),
    ModelSpec("transformer", "Transformer", TransformerConfig, "TransformerLM", reference=True, fixed_state=False),
    ModelSpec("lstm", "LSTM", LSTMConfig, "LSTMLM"),
    ModelSpec("cvp", "CVP", CVPConfig, "CVPLM", memory_probe=False),
    ModelSpec("mingru", "minGRU", MinGRUConfig, "MinGRULM"),  # a fixed-state RNN trained by a parallel scan
    ModelSpec("mamba", "Mamba", MambaConfig, "MambaLM"),  # a selective state-space model (HF's)
)}

BASELINES = tuple(name for name, s in MODELS.items() if s.role == "baseline")  # what `baselines` may list
CONTROLS = tuple(name for name, s in MODELS.items() if s.role == "control")


if sum(s.reference for s in MODELS.values()) > 1:
    raise ValueError(f"registry.py: more than one reference model: "
                     f"{', '.join(n for n, s in MODELS.items() if s.reference)}")
REFERENCE = next((s for s in MODELS.values() if s.reference), None)  # what the headline compares with


def by_record(record: str) -> ModelSpec:
    """The model whose stage writes reports/metrics/<record>.json."""
    for spec in MODELS.values():
        if spec.record == record:
            return spec
    raise KeyError(record)


def compared(baselines: list[str]) -> list[ModelSpec]:
    """The models a run compares, in report order: New-LLM, params.yaml's `baselines`, the controls."""
    return [MODELS["newllm"], *(MODELS[b] for b in baselines), *(MODELS[c] for c in CONTROLS)]
