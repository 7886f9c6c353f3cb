from __future__ import annotations

import json
from pathlib import Path

import pytest

from afprobe.data.query_sets import dataset_hash, load_queries
from afprobe.errors import DatasetError

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


def test_situational_awareness_pairs_never_mention_tiers():
    import re

    from afprobe.data.contrast import load_situational_awareness

    pairs = load_situational_awareness()
    assert len(pairs) >= 100 and len({p.pair_id for p in pairs}) == len(pairs)
    for pair in pairs:
        for text in (pair.monitored, pair.unmonitored):
            assert not re.search(r"free|paid|tier", text, flags=re.IGNORECASE), text
        assert pair.monitored != pair.unmonitored
