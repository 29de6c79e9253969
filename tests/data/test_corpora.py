from pathlib import Path

import pytest
from helpers import SHARED_DATA, section

from newllm.data.corpora import DataError, load_splits

WIKITEXT = SHARED_DATA / "wikitext-2"


def test_text_file_is_split_in_contiguous_blocks(tmp_path: Path):
    f = tmp_path / "corpus.txt"
    f.write_text("".join(f"line {i}\n\n" for i in range(100)))  # blank lines are dropped
    s = load_splits(section("dataset", source="text", path=str(f), val_fraction=0.2, test_fraction=0.1), seed=0)
    assert s.train == [f"line {i}" for i in range(70)]
    assert s.val == [f"line {i}" for i in range(70, 90)] and s.test == [f"line {i}" for i in range(90, 100)]


def test_text_explicit_files(tmp_path: Path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"{name} one\n{name} two\n")
    s = load_splits(section("dataset", source="text", train_path=str(tmp_path / "a.txt"),
                                  val_path=str(tmp_path / "b.txt")), seed=0)
    assert (s.train, s.val, s.test) == (["a one", "a two"], ["b one", "b two"], [])


@pytest.mark.skipif(not WIKITEXT.is_dir(), reason=f"{WIKITEXT} is absent (the shared WikiText-2 copy)")
def test_wikitext2_from_a_local_folder():
    s = load_splits(section("dataset", source="wikitext2", wikitext_dir=str(WIKITEXT)), seed=0)
    assert len(s.train) > 20000 and len(s.val) > 2000 and len(s.test) > 2000
    assert s.train[0].startswith("= Valkyria Chronicles III =")
    first_val = next(line.strip() for line in (WIKITEXT / "valid.txt").open() if line.strip())
    assert s.val[0] == first_val and s.val[0] not in s.train  # the official, disjoint validation split


def test_hub_dataset_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE=1 is set"):
        load_splits(section("dataset", source="hf", hf_name="HuggingFaceH4/ultrachat_200k"), seed=0)
