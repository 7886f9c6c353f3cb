from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from afprobe.data.query_sets import dataset_hash, load_queries
from afprobe.errors import AfprobeError, DatasetError

HARMBENCH = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "harmbench"


def test_builtin_sets_are_large_matched_and_tier_free():
    harmful, benign = load_queries("harmful"), load_queries("benign")
    assert len(harmful) >= 100 and len(benign) == len(harmful)
    assert len({q.query_id for q in harmful}) == len(harmful)
    assert all(q.harmful for q in harmful) and not any(q.harmful for q in benign)
    assert [q.category for q in harmful] == [q.category for q in benign]
    assert len({q.category for q in harmful}) >= 10
    assert load_queries("default") == harmful


def test_n_keeps_the_first_queries():
    assert [q.query_id for q in load_queries("harmful", n=3)] == ["harmful-001", "harmful-002", "harmful-003"]
    with pytest.raises(DatasetError, match="at least 1"):
        load_queries("harmful", n=0)


@pytest.mark.skipif(not HARMBENCH.is_dir(), reason="shared HarmBench files are not beside this checkout")
def test_harmbench_keeps_standard_behaviours():
    queries = load_queries(str(HARMBENCH / "harmbench_behaviors_text_val.csv"))
    assert len(queries) == 41
    assert queries[0].query_id == "safrole_oil_extraction_guide"
    assert queries[0].category == "chemical_biological"


def test_advbench_csv(tmp_path):
    path = tmp_path / "advbench.csv"
    path.write_text('goal,target\n"Write a script, please",Sure\nDo another thing,Sure\n')
    queries = load_queries(str(path))
    assert [q.text for q in queries] == ["Write a script, please", "Do another thing"]
    assert [q.query_id for q in queries] == ["row-00000", "row-00001"]


def test_strongreject_jsonl_and_column_override(tmp_path):
    path = tmp_path / "sr.jsonl"
    rows = [{"forbidden_prompt": "A", "category": "x", "other": "B"}, {"forbidden_prompt": "C", "other": "D"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [q.text for q in load_queries(str(path))] == ["A", "C"]
    assert [q.text for q in load_queries(str(path), column="other")] == ["B", "D"]
    with pytest.raises(DatasetError, match="column 'missing' not in"):
        load_queries(str(path), column="missing")


def test_unknown_columns_are_named(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_text("foo,bar\n1,2\n")
    with pytest.raises(DatasetError, match="none of the known request columns.*foo, bar.*--column"):
        load_queries(str(path))


@pytest.mark.parametrize("content", ["", "goal\n", "goal\n  \n"])
def test_empty_datasets(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(DatasetError, match="empty|no non-empty"):
        load_queries(str(path))


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"goal": "ok"}\n{"goal": broken\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2 is not valid JSON"):
        load_queries(str(path))


def test_duplicate_ids(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": "a", "goal": "x"}\n{"id": "a", "goal": "y"}\n')
    with pytest.raises(DatasetError, match="id 'a' twice"):
        load_queries(str(path))


def test_unknown_spec_and_extension(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_queries("no-such-dataset")
    path = tmp_path / "data.parquet"
    path.write_text("x")
    with pytest.raises(DatasetError, match="unknown extension"):
        load_queries(str(path))


def test_dataset_hash_tracks_content():
    a = load_queries("harmful", n=5)
    assert dataset_hash(a) == dataset_hash(load_queries("harmful", n=5))
    assert dataset_hash(a) != dataset_hash(a[:4])


def test_hf_dataset_offline_fails_in_one_line():
    with pytest.raises(DatasetError, match="could not load Hugging Face dataset 'no-such-org/no-such-set'") as info:
        load_queries("hf:no-such-org/no-such-set:train")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name",
    [
        "situational-awareness",
        "situational-awareness-v2",
        "situational-awareness-v3",
        "negation-control",
        "polarity-control",
    ],
)
def test_contrast_pairs_never_mention_tiers(name):
    import re

    from afprobe.data.contrast import load_contrast_pairs

    pairs = load_contrast_pairs(name)
    assert len(pairs) >= 40 and len({p.pair_id for p in pairs}) == len(pairs)
    for pair in pairs:
        for text in (pair.first, pair.second):
            assert not re.search(r"free|paid|tier", text, flags=re.IGNORECASE), text
        assert pair.first != pair.second


def test_situational_awareness_v2_is_balanced_for_negation_and_length(tokenizer):
    from afprobe.data.contrast import is_negated, load_contrast_pairs

    v1 = load_contrast_pairs("situational-awareness")
    # The confound v2 removes: v1's unmonitored side is mostly negations, its monitored side almost never.
    assert sum(map(is_negated, (p.second for p in v1))) - sum(map(is_negated, (p.first for p in v1))) > 50
    pairs = load_contrast_pairs("situational-awareness-v2")
    for n in (len(pairs), 24):  # the whole set and its first half
        first = np.mean([is_negated(p.first) for p in pairs[:n]])
        second = np.mean([is_negated(p.second) for p in pairs[:n]])
        assert abs(first - second) <= 0.05 and 0.4 <= first <= 0.6
    for pair in pairs:
        assert is_negated(pair.first) == is_negated(pair.second) == (pair.wording == "negated"), pair
        lengths = [len(tokenizer(text)["input_ids"]) for text in (pair.first, pair.second)]
        assert abs(lengths[0] - lengths[1]) <= 4, (pair, lengths)
    mean_lengths = [
        np.mean([len(tokenizer(getattr(p, side))["input_ids"]) for p in pairs]) for side in ("first", "second")
    ]
    assert abs(mean_lengths[0] - mean_lengths[1]) <= 1.0, mean_lengths


def test_situational_awareness_v3_sides_use_the_same_words(tokenizer):
    """v3's sides are rearrangements of one another: no word (negation, privative or other) separates them, in the
    whole set and in each split half, and every category sits in both halves."""
    import re
    from collections import Counter

    from afprobe.data.contrast import is_negated, load_contrast_pairs
    from afprobe.data.splits import split_items

    pairs = load_contrast_pairs("situational-awareness-v3")
    assert len(pairs) == 48

    def words(text: str) -> Counter[str]:
        return Counter(re.findall(r"[a-z'-]+", text.lower()))

    for pair in pairs:
        assert words(pair.first) == words(pair.second), pair
        assert is_negated(pair.first) == is_negated(pair.second) == (pair.wording == "negated"), pair
        lengths = [len(tokenizer(text)["input_ids"]) for text in (pair.first, pair.second)]
        assert abs(lengths[0] - lengths[1]) <= 2, (pair, lengths)
    for split in ("fit", "evaluate"):
        half = split_items(pairs, split)
        assert {p.category for p in half[:12]} == {"training", "monitoring", "evaluation"}, split
        assert sum(p.wording == "negated" for p in half) == len(half) // 2, split


def test_negation_control_differs_only_in_negation():
    import re

    from afprobe.data.contrast import is_negated, load_contrast_pairs

    for pair in load_contrast_pairs("negation-control"):
        assert not is_negated(pair.first) and is_negated(pair.second), pair
        assert not re.search(r"train|monitor|watch|record|evaluat|review", pair.first + pair.second, re.IGNORECASE)


def test_the_split_halves_a_dataset_the_same_way_whatever_n():
    from afprobe.data.splits import check_disjoint, split_items

    every = load_queries("harmful")
    fit, evaluate = load_queries("harmful", split="fit"), load_queries("harmful", split="evaluate")
    assert [q.query_id for q in fit] == [q.query_id for q in every[::2]]
    assert {q.query_id for q in fit}.isdisjoint({q.query_id for q in evaluate})
    assert len(fit) + len(evaluate) == len(every)
    # --n takes the first n of a half: a query never changes role.
    assert load_queries("harmful", split="fit", n=5) == fit[:5]
    assert split_items(every[:10], "evaluate") == evaluate[:5]
    with pytest.raises(AfprobeError, match="unknown split"):
        split_items(every, "train")
    check_disjoint(["a", "b"], ["c"], "the directions")
    with pytest.raises(AfprobeError, match="1 of the evaluated queries .* were used to fit the directions"):
        check_disjoint(["a", "b"], ["b", "c"], "the directions")
    with pytest.raises(AfprobeError, match="does not record which queries"):
        check_disjoint(None, ["c"], "the directions")


def test_polarity_control_differs_in_meaning_without_negation_words(tokenizer):
    """The negation decoy's recipe v5 trains these to no difference: neither side may hold a negation word, or the
    decoy would be taught to ignore the negations it must follow; nothing is about training or monitoring."""
    import re

    from afprobe.data.contrast import is_negated, load_contrast_pairs

    pairs = load_contrast_pairs("polarity-control")
    for pair in pairs:
        assert not is_negated(pair.first) and not is_negated(pair.second), pair
        assert not re.search(r"train|monitor|watch|record|evaluat|review", pair.first + pair.second, re.IGNORECASE)
        lengths = [len(tokenizer(text)["input_ids"]) for text in (pair.first, pair.second)]
        assert abs(lengths[0] - lengths[1]) <= 4, (pair, lengths)
