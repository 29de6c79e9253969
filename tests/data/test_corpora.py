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


# ----------------------------------------------------------------------------------------------- bad text
def _text(tmp_path: Path, data: bytes) -> object:
    f = tmp_path / "corpus.txt"
    f.write_bytes(data)
    return section("dataset", source="text", path=str(f), val_fraction=0.2, test_fraction=0.0)


@pytest.mark.parametrize("data, message", [
    (b"good line\n" * 20 + b"caf\xe9 au lait\n", r"corpus.txt: invalid UTF-8 at byte 203 \(0xe9"),  # latin-1
    (Path("/bin/ls").read_bytes() if Path("/bin/ls").is_file() else b"\x7fELF\0\0", r"corpus.txt: binary content"),
    (b"abc\x01\x02\x03\x04 def\n" * 30, r"corpus.txt: .*% of its characters are control characters"),
    (b"", r"dataset.path .*corpus.txt: no non-empty lines"),
    (b"one\ntwo\n", r"dataset.path .*corpus.txt: only 2 non-empty lines, too few to split"),
], ids=["latin-1", "binary", "control-chars", "empty", "too-few-lines"])
def test_bad_text_is_refused_naming_the_file(tmp_path: Path, data: bytes, message: str):
    from newllm.data.corpora import check_files

    cfg = _text(tmp_path, data)
    with pytest.raises(DataError, match=message):
        check_files(cfg)  # the stage's precheck, before its MLflow run opens
    with pytest.raises(DataError, match=message):
        load_splits(cfg, seed=0)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")
def test_the_real_corpora_pass_the_checks():
    from newllm.data.corpora import check_files, count_lines

    for f in SHARED_DATA.rglob("*.txt"):
        assert count_lines(f, "corpus") > 0
    check_files(section("dataset", source="wikitext2", wikitext_dir=str(WIKITEXT)))


def test_invalid_utf8_offset_is_exact_across_read_blocks(tmp_path: Path, monkeypatch):
    from newllm.data import corpora

    monkeypatch.setattr(corpora, "BLOCK", 3)  # "é" straddles a block boundary and is fine; the cut "€" is not
    with pytest.raises(DataError, match=r"invalid UTF-8 at byte 6 \(0xe2827a"):
        corpora.read_lines(_text(tmp_path, b"ab\xc3\xa9cd\xe2\x82zz\n").path)


def test_very_long_lines_are_split_at_whitespace_while_streaming(tmp_path: Path, monkeypatch, capsys):
    from newllm.data import corpora

    monkeypatch.setattr(corpora, "BLOCK", 7)
    monkeypatch.setattr(corpora, "MAX_LINE", 10)
    lines = corpora.read_lines(_text(tmp_path, ("w " * 40 + "\nshort\n" + "x" * 25).encode()).path)
    assert max(map(len, lines)) <= 10 and "short" in lines
    assert "".join(lines).replace(" ", "") == "w" * 40 + "short" + "x" * 25  # nothing lost or doubled
    assert "line(s) longer than 10 characters split at whitespace" in capsys.readouterr().err


def test_a_byte_order_mark_is_dropped_by_every_reader(tmp_path: Path, capsys):
    """A Windows editor's file (UTF-8 BOM, CRLF lines), through each reader: no line starts with U+FEFF,
    so the vocabulary has `the` once and no `\\ufeffthe`; the mark's offset still counts in error offsets."""
    from newllm.data import tokenizers as tk
    from newllm.data.corpora import check_files, read_lines

    bom = b"\xef\xbb\xbf"
    body = b"".join(b"the line %d\r\n" % i for i in range(20))
    (tmp_path / "one.txt").write_bytes(bom + body)
    folder = tmp_path / "wt2"
    folder.mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):
        (folder / name).write_bytes(bom + body)
    configs = {
        "path": section("dataset", source="text", path=str(tmp_path / "one.txt"), val_fraction=0.2, test_fraction=0.1),
        "files": section("dataset", source="text", train_path=str(tmp_path / "one.txt"),
                         val_path=str(tmp_path / "one.txt"), test_path=str(tmp_path / "one.txt")),
        "wikitext2": section("dataset", source="wikitext2", wikitext_dir=str(folder)),
    }
    for kind, cfg in configs.items():
        check_files(cfg)
        s = load_splits(cfg, seed=0)
        assert s.train[0] == "the line 0" and not any("\ufeff" in x or "\r" in x for x in s.train + s.val), kind
        vocab = tk.build_tokenizer(section("tokenizer", kind="word"), s.train).get_vocab()
        assert "the" in vocab and not any("\ufeff" in t for t in vocab), (kind, sorted(vocab)[:5])
        assert "byte-order mark (EF BB BF): dropped" in capsys.readouterr().err, kind
    with pytest.raises(DataError, match=r"invalid UTF-8 at byte 7 "):  # the mark is bytes 0-2 of the file
        read_lines(_text(tmp_path, bom + b"abcd\xff\n").path)
