"""params.yaml -> validated, typed dataclasses.

This module imports nothing heavy (no torch, no MLflow): every stage validates its params before any
compute starts, so a typo fails in a second with a one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from newllm.errors import PipelineError


class ConfigError(PipelineError):
    """A bad params.yaml: the message names the key and what is allowed."""


def _f(default: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Any:
    """A dataclass field with an allowed range (checked by `_validate`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"lo": lo, "hi": hi, "lo_open": lo_open})
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open})


# ----------------------------------------------------------------------------------------------- sections
@dataclass
class DatasetConfig:
    source: Literal["template", "text", "wikitext2", "hf"] = "template"
    # The template generator's own seed: `-S seed=1` replicates a model on the same data, never new data.
    seed: int = _f(0, lo=0)
    num_sentences: int = _f(500, lo=10)  # template only
    val_fraction: float = _f(0.2, lo=0.0, hi=0.9, lo_open=True)  # template, single text file, hf without a val split
    test_fraction: float = _f(0.0, lo=0.0, hi=0.5)
    path: str | None = None  # text: one file, split by line fractions
    train_path: str | None = None  # text: explicit split files (val_path required with it)
    val_path: str | None = None
    test_path: str | None = None
    wikitext_dir: str | None = None  # wikitext2: local folder with train.txt/valid.txt/test.txt; None = HF hub/cache
    hf_name: str | None = None  # hf: dataset name, e.g. HuggingFaceH4/ultrachat_200k
    hf_config: str | None = None
    hf_text_field: str = "text"
    hf_train_split: str = "train"
    hf_val_split: str | None = None  # None: carve val (and test) out of the train split by fraction
    max_samples: int = _f(0, lo=0)  # hf/wikitext2/text: keep only the first N lines/samples of train (0 = all)


@dataclass
class TokenizerConfig:
    kind: Literal["word", "char", "bpe", "gpt2"] = "word"
    vocab_size: int = _f(8000, lo=16)  # bpe: target size; word: cap (most frequent kept)
    min_frequency: int = _f(1, lo=1)  # word/bpe
    lowercase: bool = True  # word/char
    path: str | None = None  # gpt2: local folder with the pretrained tokenizer; None = HF cache


@dataclass
class Phase1Config:
    mode: Literal["parallel", "sequential"] = "parallel"
    iterations: int = _f(10, lo=1)
    steps_per_iteration: int = _f(1, lo=1)
    lr: float = _f(0.002, lo=0.0, lo_open=True)
    grad_clip: float = _f(1.0, lo=0.0)  # 0 = off
    dist_reg_weight: float = _f(0.9, lo=0.0, hi=1.0)
    # `previous` (default): the target is the previous iteration's contexts, so the cvfp loss is exactly the
    # fixed-point residual that the convergence rate measures (the research's final code). `fixed` keeps
    # iteration 0's sequential contexts as the target (the research's headline 55.9 % ER run).
    target: Literal["fixed", "previous"] = "previous"
    convergence_threshold: float = _f(0.1, lo=0.0, lo_open=True)
    min_converged: float = _f(0.95, lo=0.0, hi=1.0)
    # Early stop (convergence >= min_converged) is allowed only from this iteration on. From iteration 1
    # the Jacobi residual only measures one optimiser step, so an early stop before the weights have moved
    # would leave the ContextBlock untrained; the default runs all `iterations`, as the research's K = 10.
    min_iterations: int = _f(10, lo=1)
    # Context fed to a stream's first position in the parallel pass: `zero` (what the recurrence gives it,
    # so the fixed point is the exact sequential state sequence) or `wrap` (the research's P[N-1]).
    first_context: Literal["zero", "wrap"] = "zero"
    noise: float = _f(0.0, lo=0.0)
    streams: int = _f(1, lo=1)
    max_tokens: int = _f(0, lo=0)  # 0 = the whole train stream
    er_max_rows: int = _f(10000, lo=2)


@dataclass
class TrainConfig:
    """Knobs of the one generic LM trainer (Phase 2 and every baseline)."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = _f(0.002, lo=0.0, lo_open=True)
    weight_decay: float = _f(0.0, lo=0.0)
    batch_size: int = _f(16, lo=1)
    seq_len: int = _f(32, lo=2)
    epochs: int = _f(10, lo=1)
    grad_clip: float = _f(1.0, lo=0.0)  # 0 = off
    scheduler: Literal["constant", "cosine", "plateau"] = "constant"
    plateau_factor: float = _f(0.25, lo=0.0, hi=1.0, lo_open=True)  # plateau: lr *= factor when val stalls
    patience: int = _f(3, lo=0)  # early stopping; 0 = off
    min_delta: float = _f(0.0, lo=0.0)
    max_tokens: int = _f(0, lo=0)  # train on a prefix of the train stream (0 = all)


@dataclass
class Phase2Config(TrainConfig):
    # Contexts are cached by one exact pass over this many contiguous chunks of each split, run as a batch
    # (1 = the plain recurrence over the whole stream; more = faster on long corpora, reset at chunk starts).
    streams: int = _f(1, lo=1)


@dataclass
class TransformerConfig(TrainConfig):
    n_layer: int = _f(2, lo=1)
    n_head: int = _f(4, lo=1)
    n_embd: int = _f(128, lo=1)  # used as is when match_params is false
    dropout: float = _f(0.1, lo=0.0, hi=1.0)
    match_params: bool = True  # choose n_embd so total params are within ±10 % of New-LLM's
    lr: float = _f(0.001, lo=0.0, lo_open=True)


@dataclass
class LSTMConfig(TrainConfig):
    embed_dim: int = _f(200, lo=1)
    hidden_dim: int = _f(200, lo=1)
    num_layers: int = _f(2, lo=1)
    dropout: float = _f(0.2, lo=0.0, hi=1.0)
    tie_weights: bool = False
    lr: float = _f(0.002, lo=0.0, lo_open=True)


@dataclass
class CVPConfig(TrainConfig):
    embed_dim: int = _f(128, lo=1)
    context_dim: int = _f(256, lo=1)
    hidden_dim: int = _f(256, lo=1)
    num_layers: int = _f(2, lo=1)
    dropout: float = _f(0.1, lo=0.0, hi=1.0)
    context_norm: bool = True
    gating: bool = False
    context_clip: float = _f(0.0, lo=0.0)  # 0 = off, else clamp(c, -clip, clip)
    positional: bool = False  # learned position table over seq_len (the first versions had one)
    lr: float = _f(0.001, lo=0.0, lo_open=True)


@dataclass
class ReportConfig:
    prompts: list[str] = _f(["the scientist", "a curious child discovers"])
    max_new_tokens: int = _f(20, lo=1)
    top_k: int = _f(10, lo=1)
    temperature: float = _f(1.0, lo=0.0, lo_open=True)
    memory_lengths: list[int] = _f([256, 1024, 4096, 16384])
    fixed_point_threshold: float = _f(1e-4, lo=0.0, lo_open=True)
    fixed_point_max_steps: int = _f(50, lo=1)


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db
    experiment: str = "newllm"


BASELINES = ("transformer", "lstm", "cvp")


@dataclass
class Params:
    seed: int = _f(0, lo=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # New-LLM model knobs live at top level so `dvc exp run -S context_dim=512` works as typed.
    context_dim: int = _f(256, lo=1)
    embed_dim: int = _f(128, lo=1)
    context_layers: int = _f(2, lo=1, hi=64)
    token_layers: int = _f(2, lo=1, hi=64)
    token_plan: Literal["E", "A"] = "E"
    context_norm: bool = True
    embedding: Literal["learned", "gpt2"] = "learned"
    embedding_path: str | None = None  # gpt2 embedding: local model folder; None = HF cache
    tie_head: bool = False
    # Every model is evaluated with this many batchified rows, so all predict exactly the same val/test tokens.
    eval_batch_size: int = _f(10, lo=1)
    baselines: list[Literal["transformer", "lstm", "cvp"]] = _f(["transformer", "lstm", "cvp"])
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    lstm: LSTMConfig = field(default_factory=LSTMConfig)
    cvp: CVPConfig = field(default_factory=CVPConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# The params each stage reads (dotted keys or whole sections). dvc.yaml declares the same lists (a test
# keeps them equal); `params_hash` is computed over exactly these, so two runs with equal hashes are the
# same computation.
MODEL_KEYS = ["context_dim", "embed_dim", "context_layers", "token_layers", "token_plan", "context_norm",
              "embedding", "embedding_path", "tie_head"]
CONTEXT_KEYS = ["context_dim", "embed_dim", "context_layers", "context_norm", "embedding", "embedding_path"]
STAGE_PARAMS: dict[str, list[str]] = {
    "generate_dataset": ["dataset"],
    "tokenize": ["tokenizer"],
    "phase1_cvfp": ["seed", "device", *CONTEXT_KEYS, "phase1"],
    "phase2_train": ["seed", "device", *MODEL_KEYS, "eval_batch_size", "phase2"],
    "param_budget": [*MODEL_KEYS, "transformer.match_params"],
    # The Transformer's width follows New-LLM's size through data/budget/transformer.json; its hash and
    # logged params include the model keys because its result depends on them.
    "transformer": ["seed", "device", "eval_batch_size", "transformer", *MODEL_KEYS],
    "lstm": ["seed", "device", "eval_batch_size", "lstm"],
    "cvp": ["seed", "device", "eval_batch_size", "cvp"],
    # The report rebuilds every trained model from its checkpoint, so it reads their params too.
    "report": ["seed", "report", "baselines", *MODEL_KEYS, "transformer", "lstm", "cvp", "dataset.source",
               "tokenizer.kind"],
}


# What a stage's result also depends on through its input files. DVC tracks those files; the run's
# identity (params_hash, logged params) must include them too, or runs on different data would look alike.
_DATA = ["dataset", "tokenizer"]
UPSTREAM_PARAMS: dict[str, list[str]] = {
    "tokenize": ["dataset"],
    "phase1_cvfp": _DATA,
    "phase2_train": [*_DATA, "phase1"],
    "param_budget": ["tokenizer"],
    "transformer": _DATA,
    "lstm": _DATA,
    "cvp": _DATA,
    "report": [*_DATA, "phase1", "phase2", "eval_batch_size"],
}


# ----------------------------------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float etc.)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"params.yaml: {key} must be {_type_name(tp)}, got {value!r}")
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        try:
            return _coerce(key, value, inner)
        except ConfigError:
            raise bad from None
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string; DVC's YAML 1.2 writer does not
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open", False)
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None or isinstance(v, (str, bool)):
            continue
        if lo is not None and (v < lo or (lo_open and v == lo)):
            rng = f"> {lo}" if lo_open else f">= {lo}"
            rng += f" and <= {hi}" if hi is not None else ""
            raise ConfigError(f"params.yaml: {key} must be {rng}, got {v!r}")
        if hi is not None and v > hi:
            raise ConfigError(f"params.yaml: {key} must be <= {hi}, got {v!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml: {prefix.rstrip('.') or 'the file'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"params.yaml: unknown key '{prefix}{unknown[0]}' (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], key + ".")
        else:
            kwargs[name] = _coerce(key, raw[name], tp)
            _check_range(key, kwargs[name], f.metadata)
    return cls(**kwargs)


def _check_file(key: str, path: str | None, is_dir: bool = False) -> None:
    if path is None:
        return
    p = Path(path).expanduser()
    ok = p.is_dir() if is_dir else p.is_file()
    if not ok:
        kind = "folder" if is_dir else "file"
        raise ConfigError(f"params.yaml: {key}: {kind} not found: {path}")


def _cross_checks(p: Params) -> None:
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
    if p.tie_head and p.embedding == "gpt2" and p.embed_dim != 768:
        raise ConfigError("params.yaml: tie_head needs embed_dim 768 with embedding gpt2")
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
    if d.val_fraction + d.test_fraction >= 1.0:
        raise ConfigError("params.yaml: dataset.val_fraction + dataset.test_fraction must be < 1, got "
                          f"{d.val_fraction} + {d.test_fraction}")
    if d.source == "text":
        for key in ("path", "train_path", "val_path", "test_path"):
            _check_file(f"dataset.{key}", getattr(d, key))
    if d.source == "wikitext2":
        _check_file("dataset.wikitext_dir", d.wikitext_dir, is_dir=True)
    if p.tokenizer.kind == "gpt2":
        _check_file("tokenizer.path", p.tokenizer.path, is_dir=True)
    if p.embedding == "gpt2":
        _check_file("embedding_path", p.embedding_path, is_dir=True)
    if len(set(p.baselines)) != len(p.baselines):
        raise ConfigError(f"params.yaml: baselines has duplicates: {p.baselines}")
    if p.transformer.n_embd % p.transformer.n_head:
        raise ConfigError(f"params.yaml: transformer.n_embd ({p.transformer.n_embd}) must be divisible by "
                          f"transformer.n_head ({p.transformer.n_head})")


def parse_params(raw: Any) -> Params:
    params = _build(Params, raw, "")
    _cross_checks(params)
    return params


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    return parse_params(raw)


# ----------------------------------------------------------------------------------------------- views
def to_dict(params: Params) -> dict[str, Any]:
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


def stage_params(params: Params, stage: str) -> dict[str, Any]:
    """The flat params a stage's result depends on: what it reads (its `params:` in dvc.yaml) and what
    its input files were made with (UPSTREAM_PARAMS). MLflow logs these; params_hash covers them."""
    flat = flatten(to_dict(params))
    keys = STAGE_PARAMS[stage] + UPSTREAM_PARAMS.get(stage, [])
    return {k: v for k, v in flat.items() if any(k == key or k.startswith(key + ".") for key in keys)}


def params_hash(params: Params, stage: str) -> str:
    blob = json.dumps(stage_params(params, stage), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
