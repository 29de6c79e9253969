"""Dataset files and their statistics (whitespace words: independent of the tokenizer chosen later)."""

from __future__ import annotations

import shutil
from pathlib import Path

from newllm.data.corpora import DataError, Splits

SPLIT_FILES = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}


def write_splits(root: Path, splits: Splits) -> None:
    """All three files appear together or not at all (written to a temp folder, then swapped in)."""
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, filename in SPLIT_FILES.items():
        lines = getattr(splits, name)
        (tmp / filename).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


def read_splits(root: Path) -> Splits:
    missing = [str(root / f) for f in SPLIT_FILES.values() if not (root / f).is_file()]
    if missing:
        raise DataError(f"dataset files missing: {', '.join(missing)}; run `dvc repro generate_dataset`")
    return Splits(*((root / f).read_text(encoding="utf-8").splitlines() for f in SPLIT_FILES.values()))


def split_stats(splits: Splits) -> dict[str, float]:
    stats: dict[str, float] = {}
    words_all: set[str] = set()
    total = 0
    for name in SPLIT_FILES:
        lines = getattr(splits, name)
        words = [w for line in lines for w in line.split()]
        stats[f"{name}_lines"] = len(lines)
        stats[f"{name}_tokens"] = len(words)
        words_all.update(words)
        total += len(words)
    n_lines = sum(stats[f"{n}_lines"] for n in SPLIT_FILES)
    stats["lines"] = n_lines
    stats["tokens"] = total
    stats["distinct_words"] = len(words_all)
    stats["mean_words_per_line"] = round(total / max(n_lines, 1), 4)
    stats.update(splits.stats)
    return stats
