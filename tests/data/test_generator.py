from helpers import section

from newllm.data import generator
from newllm.data.corpora import load_splits
from newllm.data.stats import split_stats


def test_word_lists_have_the_sizes_of_the_research():
    sizes = [len(x) for x in (generator.SUBJECTS, generator.PRESENT_VERBS, generator.PAST_VERBS,
                               generator.OBJECTS, generator.LOCATIONS, generator.TIMES, generator.CLAUSES)]
    assert sizes == [30, 33, 33, 22, 16, 20, 10]


def test_type_counts_and_length_ranges():
    sentences = generator.generate(500, seed=0)
    counts = {k: sum(s.kind == k for s in sentences) for k in generator.TYPE_COUNTS}
    assert counts == generator.TYPE_COUNTS
    lengths = {k: [len(s.text.split()) for s in sentences if s.kind == k] for k in counts}
    assert 6 <= min(lengths["simple"]) and max(lengths["simple"]) <= 8
    assert max(lengths["simple"]) < min(lengths["complex"])
    assert min(lengths["all"]) >= 13 and max(max(v) for v in lengths.values()) <= 20


def test_stats_land_near_the_research_file():
    stats = split_stats(load_splits(section("dataset"), seed=0))
    assert (stats["train_lines"], stats["val_lines"], stats["test_lines"]) == (350, 75, 75)
    assert abs(stats["tokens"] - 4986) < 150
    assert abs(stats["distinct_words"] - 252) <= 10
    assert 9.5 <= stats["mean_words_per_line"] <= 10.5


def test_deterministic_from_seed_and_splits_disjoint():
    a, b, c = (load_splits(section("dataset", val_fraction=0.2, test_fraction=0.1), seed=s) for s in (7, 7, 8))
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert a.train != c.train
    assert not set(a.train) & set(a.val) and not set(a.train) & set(a.test) and not set(a.val) & set(a.test)
    assert (len(a.train), len(a.val), len(a.test)) == (350, 100, 50)


def test_scaled_counts_sum_exactly():
    assert sum(generator.type_counts(61).values()) == 61
