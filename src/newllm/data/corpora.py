"""Text sources -> disjoint train/val/test lists of lines.

Validation and test text are always disjoint from training text: the template generator makes unique
sentences before splitting, and files are split into contiguous blocks (never interleaved lines), so no
passage of val/test is seen in training. (The research's own validation was the tail of its training
stream; docs/research.md §3 calls that a leak.)
"""

from __future__ import annotations

import codecs
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from newllm.config import DatasetConfig
from newllm.data import generator
from newllm.errors import PipelineError


class DataError(PipelineError):
    """A dataset cannot be produced from what is available (missing file, offline hub)."""


@dataclass
class Splits:
    train: list[str]
    val: list[str]
    test: list[str]
    stats: dict[str, float] = field(default_factory=dict)  # source-specific extras (template type counts)


def _clean(lines: list[str]) -> list[str]:
    return [s for s in (line.strip() for line in lines) if s]


def _split_sizes(n: int, val_fraction: float, test_fraction: float, source: str) -> tuple[int, int]:
    """(train, val) line counts of a block split of n lines (test takes the rest)."""
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    n_train = n - n_val - n_test
    if n_train < 1 or n_val < 1:
        raise DataError(f"{source}: only {n} non-empty lines, too few to split into train and val "
                        f"(val_fraction {val_fraction} of them must round to at least 1)")
    return n_train, n_val


def _split_block(lines: list[str], val_fraction: float, test_fraction: float, source: str = "the dataset") -> Splits:
    n_train, n_val = _split_sizes(len(lines), val_fraction, test_fraction, source)
    return Splits(lines[:n_train], lines[n_train:n_train + n_val], lines[n_train + n_val:])


BLOCK = 1 << 20  # bytes read at a time: memory stays bounded by the block and MAX_LINE, not the file
MAX_LINE = 100_000  # characters: a longer line is split at whitespace, not held whole
MAX_CONTROL_SHARE = 0.01  # more control characters than this (tab, newline aside) is not text
_TEXT_CONTROLS = set("\t\n\r\x0b\x0c")


def _controls(text: str) -> int:
    return sum(1 for ch in text if (ch < " " or ch == "\x7f") and ch not in _TEXT_CONTROLS)


def _cut(line: str) -> tuple[str, str]:
    """A line over MAX_LINE -> (its head up to the last whitespace within MAX_LINE, the rest)."""
    at = max(line.rfind(" ", 0, MAX_LINE), line.rfind("\t", 0, MAX_LINE))
    at = at if at > 0 else MAX_LINE
    return line[:at], line[at:]


def _stream(path: str | os.PathLike, notice: bool, bom_notice: bool | None = None) -> Iterator[str]:
    """The stripped non-empty lines of a UTF-8 text file, read block by block (see read_lines); `notice`
    says which lines were split, `bom_notice` (default: the same) that a leading byte-order mark was dropped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"file not found: {p}")
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pending, offset, chars, controls, split = "", 0, 0, 0, 0
    with p.open("rb") as f:
        if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8:  # utf-8-sig (Windows editors): a mark, not text
            offset = len(codecs.BOM_UTF8)
            if notice if bom_notice is None else bom_notice:
                print(f"dataset: {p}: starts with a UTF-8 byte-order mark (EF BB BF): dropped", file=sys.stderr)
        f.seek(offset)
        while True:
            block = f.read(BLOCK)
            nul = block.find(b"\0")
            if nul >= 0:
                raise DataError(f"{p}: binary content (a NUL byte at byte {offset + nul:,}), not a text file")
            carried = decoder.getstate()[0]  # a multi-byte sequence cut by the previous block's end
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise DataError(f"{p}: invalid UTF-8 at byte {offset - len(carried) + e.start:,} "
                                f"(0x{e.object[e.start:e.start + 4].hex()}); re-encode it as UTF-8") from None
            offset += len(block)
            chars += len(text)
            controls += _controls(text)
            parts = (pending + text).splitlines(keepends=True)
            pending = parts.pop() if parts and block and not parts[-1].endswith(("\n", "\r")) else ""
            short = []
            for part in parts:  # every line over MAX_LINE, whole in this block or not
                while len(part) > MAX_LINE:
                    head, part = _cut(part)
                    short.append(head)
                    split += 1
                short.append(part)
            while len(pending) > MAX_LINE:  # an unfinished line is cut as it streams in
                head, pending = _cut(pending)
                short.append(head)
                split += 1
            yield from _clean(short)
            if not block:
                break
    if chars and controls / chars > MAX_CONTROL_SHARE:
        raise DataError(f"{p}: {controls / chars:.1%} of its characters are control characters: binary content, "
                        "not a text file")
    if split and notice:
        print(f"dataset: {p}: {split} line(s) longer than {MAX_LINE:,} characters split at whitespace",
              file=sys.stderr)


def read_lines(path: str | os.PathLike) -> list[str]:
    """A UTF-8 text file -> its stripped non-empty lines, read block by block. Refused with the file's name:
    invalid UTF-8 (with the byte offset of the first bad sequence), NUL bytes or over 1 % control
    characters (binary content). Lines over MAX_LINE characters are split at whitespace, said in one line."""
    return list(_stream(path, notice=True))


def count_lines(path: str | os.PathLike, what: str, bom_notice: bool = False) -> int:
    """read_lines' checks and its line count, holding no line (check_files); none is an error."""
    n = sum(1 for _ in _stream(path, notice=False, bom_notice=bom_notice))
    if not n:
        raise DataError(f"{what} {Path(path).expanduser()}: no non-empty lines")
    return n


def _read(path: str | os.PathLike, what: str) -> list[str]:
    lines = read_lines(path)
    if not lines:
        raise DataError(f"{what} {Path(path).expanduser()}: no non-empty lines")
    return lines


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _load_hf(name: str, config: str | None, split: str, how_to: str):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the HF stack raises many kinds (ConnectionError, FileNotFoundError, ...)
        where = "HF_HUB_OFFLINE=1 is set and it is not in the local HF cache" if _offline() else str(e)
        raise DataError(f"cannot load the Hugging Face dataset {name!r} ({config}, split {split}): "
                        f"{where}. {how_to}") from None


def _hf_lines(ds, text_field: str, name: str) -> list[str]:
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no field {text_field!r} (fields: {', '.join(ds.column_names)}); "
                        "set dataset.hf_text_field")
    lines = []
    for value in ds[text_field]:
        if isinstance(value, list):  # chat datasets (UltraChat): a list of {"role", "content"} turns
            value = " ".join(v.get("content", "") if isinstance(v, dict) else str(v) for v in value)
        lines.extend(str(value).splitlines())
    return _clean(lines)


def _cap(lines: list[str], max_samples: int) -> list[str]:
    return lines[:max_samples] if max_samples else lines


def check_files(cfg: DatasetConfig) -> None:
    """Refuse bad text files (read_lines' checks, too few lines) before any compute or MLflow run; each file
    is streamed once and no line is kept."""
    if cfg.source == "text" and cfg.path:
        n = count_lines(cfg.path, "dataset.path")
        _split_sizes(min(n, cfg.max_samples or n), cfg.val_fraction, cfg.test_fraction,
                     f"dataset.path {Path(cfg.path).expanduser()}")
    elif cfg.source == "text":
        for key in ("train_path", "val_path", "test_path"):
            if getattr(cfg, key):
                count_lines(getattr(cfg, key), f"dataset.{key}")
    if cfg.source == "wikitext2" and cfg.wikitext_dir:
        for name in ("train.txt", "valid.txt", "test.txt"):
            # the BOM's notice here: the datasets library reads these files later (utf-8-sig), and says nothing
            count_lines(Path(cfg.wikitext_dir).expanduser() / name, "dataset.wikitext_dir", bom_notice=True)


def load_splits(cfg: DatasetConfig, seed: int) -> Splits:
    if cfg.source == "template":
        sentences = generator.generate(cfg.num_sentences, seed)
        texts = [s.text for s in sentences]
        splits = _split_block(texts, cfg.val_fraction, cfg.test_fraction)
        kinds: dict[str, float] = {}
        for s in sentences:
            kinds[f"type_{s.kind}"] = kinds.get(f"type_{s.kind}", 0) + 1
        splits.stats = kinds
        return splits

    if cfg.source == "text":
        if cfg.path:
            return _split_block(_cap(_read(cfg.path, "dataset.path"), cfg.max_samples), cfg.val_fraction,
                                cfg.test_fraction, f"dataset.path {Path(cfg.path).expanduser()}")
        test = _read(cfg.test_path, "dataset.test_path") if cfg.test_path else []
        return Splits(_cap(_read(cfg.train_path, "dataset.train_path"), cfg.max_samples),
                      _read(cfg.val_path, "dataset.val_path"), test)

    if cfg.source == "wikitext2":
        how_to = ("Point dataset.wikitext_dir at a folder holding train.txt, valid.txt and test.txt "
                  "(the layout of WikiText-2's raw release).")
        if cfg.wikitext_dir:
            root = Path(cfg.wikitext_dir).expanduser()
            files = {"train": root / "train.txt", "validation": root / "valid.txt", "test": root / "test.txt"}
            missing = [str(p) for p in files.values() if not p.is_file()]
            if missing:
                raise DataError(f"dataset.wikitext_dir: missing {', '.join(missing)}. {how_to}")
            import datasets

            # utf-8-sig: a leading byte-order mark is dropped, as read_lines drops it (check_files says so)
            ds = datasets.load_dataset("text", data_files={k: str(v) for k, v in files.items()},
                                       encoding="utf-8-sig")
        else:
            ds = {s: _load_hf("Salesforce/wikitext", "wikitext-2-v1", s, how_to)
                  for s in ("train", "validation", "test")}
        return Splits(_cap(_hf_lines(ds["train"], "text", "wikitext2"), cfg.max_samples),
                      _hf_lines(ds["validation"], "text", "wikitext2"), _hf_lines(ds["test"], "text", "wikitext2"))

    if cfg.source == "hf":
        how_to = "Download it once while online (it is then cached), or export it to text and use dataset.source text."
        ds = _load_hf(cfg.hf_name, cfg.hf_config, cfg.hf_train_split, how_to)
        if cfg.max_samples:  # samples, not lines: "the first 50 UltraChat samples" as in the research
            ds = ds.select(range(min(cfg.max_samples, len(ds))))
        train = _hf_lines(ds, cfg.hf_text_field, cfg.hf_name)
        if cfg.hf_val_split is None:
            return _split_block(train, cfg.val_fraction, cfg.test_fraction)
        val = _hf_lines(_load_hf(cfg.hf_name, cfg.hf_config, cfg.hf_val_split, how_to),
                        cfg.hf_text_field, cfg.hf_name)
        return Splits(train, val, [])

    raise DataError(f"unknown dataset.source {cfg.source!r}")

