"""params.yaml -> validated, typed dataclasses; and each stage's params, as dvc.yaml declares them.

params.yaml holds every default (the dataclasses here and in registry.py only say what a key may be).
This module imports nothing heavy (no torch, no MLflow): every stage validates its params before any
compute starts, so a typo fails in a second with a one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from newllm import dag
from newllm.registry import BASELINES, MODELS, TrainConfig
from newllm.schema import ConfigError, build, knob

__all__ = ["ConfigError", "Params", "load_params", "parse_params", "stage_params", "params_hash"]


# ----------------------------------------------------------------------------------------------- sections
@dataclass
class DatasetConfig:
    source: Literal["template", "text", "wikitext2", "hf"] = knob()
    # The template generator's own seed: `-S seed=1` replicates a model on the same data, never new data.
    seed: int = knob(lo=0)
    num_sentences: int = knob(lo=10)  # template only
    val_fraction: float = knob(lo=0.0, hi=0.9, lo_open=True)  # template, single text file, hf without a val split
    test_fraction: float = knob(lo=0.0, hi=0.5)
    path: str | None = knob()  # text: one file, split by line fractions
    train_path: str | None = knob()  # text: explicit split files (val_path required with it)
    val_path: str | None = knob()
    test_path: str | None = knob()
    wikitext_dir: str | None = knob()  # wikitext2: local folder with train.txt/valid.txt/test.txt; None = HF hub/cache
    hf_name: str | None = knob()  # hf: dataset name, e.g. HuggingFaceH4/ultrachat_200k
    hf_config: str | None = knob()
    hf_text_field: str = knob()
    hf_train_split: str = knob()
    hf_val_split: str | None = knob()  # None: carve val (and test) out of the train split by fraction
    max_samples: int = knob(lo=0)  # hf/wikitext2/text: keep only the first N lines/samples of train (0 = all)


@dataclass
class TokenizerConfig:
    kind: Literal["word", "char", "bpe", "gpt2"] = knob()
    vocab_size: int = knob(lo=16)  # bpe: target size; word: cap (most frequent kept)
    min_frequency: int = knob(lo=1)  # word/bpe
    lowercase: bool = knob()  # word/char
    path: str | None = knob()  # gpt2: local folder with the pretrained tokenizer; None = HF cache
    # val and test keep their first N tokens (0 = all): a cheaper evaluation, the same tokens for every model
    max_eval_tokens: int = knob(lo=0)


@dataclass
class Phase1Config:
    mode: Literal["parallel", "sequential"] = knob()
    iterations: int = knob(lo=1)
    steps_per_iteration: int = knob(lo=1)
    lr: float = knob(lo=0.0, lo_open=True)
    grad_clip: float = knob(lo=0.0)  # 0 = off
    dist_reg_weight: float = knob(lo=0.0, hi=1.0)
    # `previous` (default): the target is the previous iteration's contexts, so the cvfp loss is exactly the
    # fixed-point residual that the convergence rate measures (the research's final code). `fixed` keeps
    # iteration 0's sequential contexts as the target (the research's headline 55.9 % ER run).
    target: Literal["fixed", "previous"] = knob()
    convergence_threshold: float = knob(lo=0.0, lo_open=True)
    min_converged: float = knob(lo=0.0, hi=1.0)
    # Early stop (convergence >= min_converged) is allowed only from this iteration on. From iteration 1
    # the Jacobi residual only measures one optimiser step, so an early stop before the weights have moved
    # would leave the ContextBlock untrained; the default runs all `iterations`, as the research's K = 10.
    min_iterations: int = knob(lo=1)
    # Context fed to a stream's first position in the parallel pass: `zero` (what the recurrence gives it,
    # so the fixed point is the exact sequential state sequence) or `wrap` (the research's P[N-1]).
    first_context: Literal["zero", "wrap"] = knob()
    noise: float = knob(lo=0.0)
    # The diversity term -||C - mean C|| grows with the scale of C, so Phase 1 can win it by raising the
    # gain of the block's last LayerNorm instead of spreading the contexts; false keeps that gain at 1.
    train_last_gain: bool = knob()
    streams: int = knob(lo=1)
    max_tokens: int = knob(lo=0)  # 0 = the whole train stream
    # positions per batched pass (over all streams; 0 = all at once): memory is O(chunk), the update the same
    chunk_tokens: int = knob(lo=0)
    er_max_rows: int = knob(lo=2)


@dataclass
class ReportConfig:
    prompts: list[str] = knob()
    max_new_tokens: int = knob(lo=1)
    top_k: int = knob(lo=1)
    temperature: float = knob(lo=0.0, lo_open=True)
    memory_lengths: list[int] = knob(lo=1)
    context_window: int = knob(lo=2)  # context utilisation: test loss by position in windows of this length
    fixed_point_threshold: float = knob(lo=0.0, lo_open=True)
    fixed_point_max_steps: int = knob(lo=1)


@dataclass
class ProtocolConfig:
    """How the comparison is made, for every model at once (printed at the top of the report)."""

    # every baseline is sized to New-LLM's total parameter count (±10 %) by a width search; a baseline
    # without one is reported as unmatched, with no ratio
    match_params: bool = knob()
    # The one learning-rate sweep: every model (New-LLM's Phase 2, each baseline, each control) trains once
    # per value on `seed`, and its lowest val loss picks its lr (dvc.yaml's `*_sweep` cells, `pick_lr`).
    lrs: list[float] = knob(lo=0.0, lo_open=True)
    # More seeds the chosen lr is retrained on (init, dropout and batch order; the data stays): the tables
    # give the mean and std over `seed` and these.
    replicates: list[int] = knob(lo=0)


@dataclass
class TrackingConfig:
    uri: str | None = knob()  # None: $MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db
    experiment: str = knob()
    study: str | None = knob()  # a study's name (newllm study run sets it): every run is tagged newllm.study


@dataclass
class DistributedConfig:
    # processes per training run: >1 runs each training stage (Phase 1, Phase 2, baselines, controls) under
    # `torchrun --standalone --nproc_per_node=N` (torch DDP: gloo on CPU, nccl on CUDA; distributed.py)
    nproc: int = knob(lo=1, hi=1024)


# The `train:` section: every TrainConfig key, for all models (a model section may override any).
TrainDefaults = dataclasses.make_dataclass("TrainDefaults", [
    (f.name, typing.get_type_hints(TrainConfig)[f.name], field(metadata=f.metadata))
    for f in dataclasses.fields(TrainConfig)])


@dataclass
class _Params:
    seed: int = knob(lo=0)
    device: Literal["auto", "cpu", "cuda"] = knob()
    # New-LLM model knobs live at top level so `dvc exp run -S context_dim=512` works as typed.
    context_dim: int = knob(lo=1)
    embed_dim: int = knob(lo=1)
    context_layers: int = knob(lo=1, hi=64)
    token_layers: int = knob(lo=1, hi=64)
    token_plan: Literal["E", "A"] = knob()
    context_norm: bool = knob()
    embedding: Literal["learned", "gpt2"] = knob()
    embedding_path: str | None = knob()  # gpt2 embedding: local model folder; None = HF cache
    tie_head: bool = knob()
    # Every model is evaluated with this many batchified rows, so all predict exactly the same val/test tokens.
    eval_batch_size: int = knob(lo=1)
    baselines: list[Literal[BASELINES]] = knob()  # type: ignore[valid-type]
    dataset: DatasetConfig = knob()
    tokenizer: TokenizerConfig = knob()
    phase1: Phase1Config = knob()
    protocol: ProtocolConfig = knob()
    train: TrainDefaults = knob()  # type: ignore[valid-type]
    report: ReportConfig = knob()
    tracking: TrackingConfig = knob()
    distributed: DistributedConfig = knob()

    def newllm_config(self) -> Any:
        """New-LLM's architecture as one object (NewLLMConfig): what builds its network, for New-LLM, its
        controls and their checkpoints."""
        return NewLLMConfig(**{k: getattr(self, k) for k in NEWLLM_KEYS})


# One section per registered model (phase2, transformer, ...), typed by its registry entry; a control may
# share New-LLM's (the Phase 1 off control trains with phase2's knobs).
SECTIONS: dict[str, Any] = {}
for _spec in MODELS.values():
    SECTIONS.setdefault(_spec.section, _spec)
Params = dataclasses.make_dataclass(
    "Params", [(name, s.config, knob()) for name, s in SECTIONS.items()], bases=(_Params,),
    namespace={"__doc__": "Every key of params.yaml, validated (see registry.py for the model sections)."})

NEWLLM_KEYS = ("context_dim", "embed_dim", "context_layers", "token_layers", "token_plan", "context_norm",
               "embedding", "embedding_path", "tie_head")  # New-LLM's architecture (top-level keys)
# ... as one frozen object, its fields typed as params.yaml's (Params.newllm_config builds it)
NewLLMConfig = dataclasses.make_dataclass(
    "NewLLMConfig", [(f.name, f.type) for f in dataclasses.fields(_Params) if f.name in NEWLLM_KEYS], frozen=True,
    namespace={"__doc__": "New-LLM's architecture: the top-level keys of params.yaml, kept top-level because "
                          "`dvc exp run -S context_dim=512` is how users ablate it."})


# ----------------------------------------------------------------------------------------------- validation
def _check_file(key: str, path: str | None, is_dir: bool = False) -> None:
    if path is None:
        return
    p = Path(path).expanduser()
    if not (p.is_dir() if is_dir else p.is_file()):
        raise ConfigError(f"params.yaml: {key}: {'folder' if is_dir else 'file'} not found: {path}")


def _cross_checks(p: Any) -> None:
    if p.token_plan == "E" and p.context_layers != p.token_layers:
        raise ConfigError(
            f"params.yaml: context_layers ({p.context_layers}) must equal token_layers ({p.token_layers}) "
            "for token_plan E (token layer l reads context layer l); use token_plan A to decouple them")
    if p.embedding == "gpt2":
        if p.embed_dim != 768:
            raise ConfigError(f"params.yaml: embed_dim must be 768 with embedding gpt2, got {p.embed_dim}")
        if p.tokenizer.kind != "gpt2":
            raise ConfigError(
                f"params.yaml: tokenizer.kind must be gpt2 with embedding gpt2, got {p.tokenizer.kind!r}")
    d = p.dataset
    if d.source == "text":
        if (d.path is None) == (d.train_path is None):
            raise ConfigError("params.yaml: dataset.source text needs exactly one of dataset.path "
                              "(one file, split by fraction) or dataset.train_path (+ dataset.val_path)")
        if d.train_path is not None and d.val_path is None:
            raise ConfigError("params.yaml: dataset.val_path is required with dataset.train_path")
    if d.source == "hf" and not d.hf_name:
        raise ConfigError("params.yaml: dataset.hf_name is required with dataset.source hf "
                          "(e.g. HuggingFaceH4/ultrachat_200k)")
    if d.source == "text" and d.train_path is not None and d.test_path is None:
        raise ConfigError("params.yaml: dataset.test_path is required with dataset.train_path (test is the "
                          "report's headline; val only selects)")
    if d.source in ("template", "hf") or (d.source == "text" and d.path is not None):
        if d.test_fraction <= 0:
            raise ConfigError(f"params.yaml: dataset.test_fraction must be > 0 for source {d.source} (test is "
                              f"the report's headline; val only selects), got {d.test_fraction}")
    if d.val_fraction + d.test_fraction >= 1.0:
        raise ConfigError("params.yaml: dataset.val_fraction + dataset.test_fraction must be < 1, got "
                          f"{d.val_fraction} + {d.test_fraction}")
    if d.source == "text":
        for key in ("path", "train_path", "val_path", "test_path"):
            _check_file(f"dataset.{key}", getattr(d, key))
    if d.source == "wikitext2":
        _check_file("dataset.wikitext_dir", d.wikitext_dir, is_dir=True)
        missing = [f for f in ("train.txt", "valid.txt", "test.txt")
                   if d.wikitext_dir and not (Path(d.wikitext_dir).expanduser() / f).is_file()]
        if missing:
            raise ConfigError(f"params.yaml: dataset.wikitext_dir {d.wikitext_dir} has no {', '.join(missing)} "
                              "(WikiText-2's raw layout: train.txt, valid.txt, test.txt)")
    if not p.report.prompts:
        raise ConfigError("params.yaml: report.prompts is empty: the report's samples need at least one prompt")
    if p.tokenizer.kind == "gpt2":
        _check_file("tokenizer.path", p.tokenizer.path, is_dir=True)
    if p.embedding == "gpt2":
        _check_file("embedding_path", p.embedding_path, is_dir=True)
    if not p.baselines:
        raise ConfigError("params.yaml: baselines is empty: the report compares New-LLM with at least one of "
                          + ", ".join(BASELINES))
    if len(set(p.baselines)) != len(p.baselines):
        raise ConfigError(f"params.yaml: baselines has duplicates: {p.baselines}")
    lrs, seeds = p.protocol.lrs, [p.seed, *p.protocol.replicates]
    if not lrs:
        raise ConfigError("params.yaml: protocol.lrs is empty: the sweep needs at least one learning rate")
    if len(set(lrs)) != len(lrs):
        raise ConfigError(f"params.yaml: protocol.lrs has duplicates: {lrs}")
    if not p.protocol.replicates:
        raise ConfigError("params.yaml: protocol.replicates is empty: the tables give mean ± std over seed and at "
                          "least one more seed (e.g. [1, 2])")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"params.yaml: protocol.replicates must not repeat a seed or the top-level seed "
                          f"({p.seed}), got {p.protocol.replicates}")
    n = p.distributed.nproc
    for name in ("train", *SECTIONS):  # DDP: every rank trains on as many streams (the same tokens)
        bs = getattr(getattr(p, name), "batch_size", None)
        if n > 1 and bs is not None and bs % n:
            raise ConfigError(f"params.yaml: {name}.batch_size ({bs}) must be divisible by distributed.nproc "
                              f"({n}): each process trains on batch_size / nproc of the streams")
    if n > 1 and p.phase1.mode != "parallel":
        raise ConfigError(f"params.yaml: phase1.mode {p.phase1.mode!r} is one exact stream: it cannot be split over "
                          f"distributed.nproc ({n}) processes (use mode parallel, or nproc 1)")
    if p.transformer.n_embd % p.transformer.n_head:
        raise ConfigError(f"params.yaml: transformer.n_embd ({p.transformer.n_embd}) must be divisible by "
                          f"transformer.n_head ({p.transformer.n_head})")


def parse_params(raw: Any) -> Any:
    """The validated Params of a params.yaml mapping. A model section inherits the `train:` keys it
    does not set; every other key must be present."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml: the file must be a mapping, got {raw!r}")
    allowed = [f.name for f in dataclasses.fields(Params)]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"params.yaml: unknown key '{unknown[0]}' (allowed: {', '.join(allowed)})")
    base = build(_Params, {k: v for k, v in raw.items() if k not in SECTIONS})  # model sections: below
    defaults = dataclasses.asdict(base.train)
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(_Params)}
    for section, spec in SECTIONS.items():
        if section not in raw:
            raise ConfigError(f"params.yaml: missing section '{section}' (the {spec.display} model)")
        values[section] = build(spec.config, raw[section], f"{section}.",
                                inherited=defaults if issubclass(spec.config, TrainConfig) else None)
    params = Params(**values)
    _cross_checks(params)
    return params


def load_params(path: str | os.PathLike = "params.yaml") -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (run from the project root, where params.yaml is)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    return parse_params(raw)


# ----------------------------------------------------------------------------------------------- views
def to_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'phase1': {'lr': 1}} -> {'phase1.lr': 1}; the keys MLflow logs, as DVC spells them."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stages(params: Any, root: Path = Path(".")) -> dict[str, dag.Stage]:
    """dvc.yaml's stages under these params (`baselines` resolves the foreach), keyed by record."""
    return dag.load_stages(to_dict(params), root)


def stage_params(params: Any, stage: str, root: Path = Path(".")) -> dict[str, Any]:
    """The flat params a stage's result depends on: what it reads (its `params:` in dvc.yaml) and what
    its input files were made with (every upstream stage's). MLflow logs these; params_hash covers them."""
    dvc_stages = stages(params, root)
    keys = dvc_stages[stage].params + dag.upstream_params(dvc_stages, stage)
    # `train.*` is never logged: each model section holds its resolved values (lstm.epochs, not train.epochs)
    flat = {k: v for k, v in flatten(to_dict(params)).items() if not k.startswith("train.")}
    picked = {k: v for k, v in flat.items() if any(k == key or k.startswith(key + ".") for key in keys)}
    return {**picked, **dict(dvc_stages[stage].cell)}  # a cell's own seed or lr wins over the params'



def changed_params(params: Any, baseline: Any) -> dict[str, tuple[Any, Any]]:
    """key -> (value here, value in `baseline`) for every flat key where two Params differ."""
    here, there = flatten(to_dict(params)), flatten(to_dict(baseline))
    return {k: (here.get(k), there.get(k)) for k in sorted(set(here) | set(there)) if here.get(k) != there.get(k)}


def params_hash(params: Any, stage: str, root: Path = Path(".")) -> str:
    blob = json.dumps(stage_params(params, stage, root), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
