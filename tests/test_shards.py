"""Caching split over machines: `--shard i/N` parts joined by `afprobe merge` equal the one-machine store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from afprobe.errors import AfprobeError
from afprobe.store.cache_job import CacheConfig, JobPart, run_cache
from afprobe.store.format import StoreError
from afprobe.store.merge import merge_stores
from afprobe.store.reader import ActivationStore

JOB = dict(n=5, shard_size=2, layers="0,1,2", positions="tag,last,suffix")  # 10 prompts in 5 shards


def assert_same_store(a_dir, b_dir):
    a, b = ActivationStore.open(a_dir), ActivationStore.open(b_dir)
    assert [r.to_dict() for r in a.rows] == [r.to_dict() for r in b.rows]
    for kind in ("tag", "last", "suffix"):
        for i in range(len(a)):
            assert torch.equal(a.row_tokens(i, kind), b.row_tokens(i, kind))
    meta_a, meta_b = (json.loads((d / "meta.json").read_text()) for d in (a_dir, b_dir))
    for meta in (meta_a, meta_b):
        meta["config"].pop("out")
    assert meta_a == meta_b
    assert (a_dir / "manifest.csv").read_text() == (b_dir / "manifest.csv").read_text()
    assert (a_dir / "per_query.csv").read_text() == (b_dir / "per_query.csv").read_text()
    gap_a, gap_b = (json.loads((d / "gap.json").read_text()) for d in (a_dir, b_dir))
    for gap in (gap_a, gap_b):
        gap["config"].pop("out", None)
    assert gap_a == gap_b


def test_parts_are_a_round_robin_partition():
    for count in (1, 2, 3, 7):
        owners = [[JobPart(i, count).owns(shard) for i in range(count)] for shard in range(20)]
        assert all(sum(row) == 1 for row in owners)
    assert JobPart.parse("2/4") == JobPart(2, 4)
    for bad in ("4/4", "-1/4", "1", "a/b", "0/0"):
        with pytest.raises(AfprobeError, match="--shard"):
            JobPart.parse(bad)


def test_shard_and_merge_equals_one_run(tiny_llama, tmp_path):
    whole = tmp_path / "whole"
    run_cache(CacheConfig(out=str(whole), **JOB), loaded=tiny_llama)
    parts = []
    for i in range(3):
        part = tmp_path / f"part{i}"
        summary = run_cache(CacheConfig(out=str(part), part=f"{i}/3", **JOB), loaded=tiny_llama)
        assert summary.complete and summary.gap is None
        assert summary.part_shards == len([s for s in range(5) if s % 3 == i])
        parts.append(part)
    with pytest.raises(StoreError, match="part 0/3 of a sharded job.*afprobe merge"):
        ActivationStore.open(parts[0])

    merged = tmp_path / "merged"
    summary = merge_stores(parts, merged, loaded=tiny_llama)
    assert summary.shards_copied == 5 and summary.gap is not None
    assert_same_store(whole, merged)

    # An interrupted merge (a shard never copied) is finished by running it again.
    for suffix in (".json", ".safetensors"):
        (merged / "shards" / f"shard-00003{suffix}").unlink()
    (merged / "manifest.csv").unlink()
    again = merge_stores(parts, merged, loaded=tiny_llama)
    assert again.shards_copied == 1 and again.shards_present == 4
    assert_same_store(whole, merged)


def test_merge_refuses_missing_and_foreign_parts(tiny_llama, tmp_path):
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i in (0, 2):
        run_cache(CacheConfig(out=str(parts[i]), part=f"{i}/3", **JOB), loaded=tiny_llama)
    with pytest.raises(StoreError, match="shards are in none of the parts: 1, 4 \\(they belong to part 1/3\\)"):
        merge_stores([parts[0], parts[2]], tmp_path / "merged", loaded=tiny_llama)
    assert not (tmp_path / "merged").exists(), "nothing may be written before every part has been checked"

    other = tmp_path / "other"
    run_cache(CacheConfig(out=str(other), part="1/3", **{**JOB, "layers": "0,1"}), loaded=tiny_llama)
    with pytest.raises(StoreError, match="another layers.*merge only parts of one job"):
        merge_stores([parts[0], other, parts[2]], tmp_path / "merged", loaded=tiny_llama)

    # A part resumed with another --shard would mix slices in one folder.
    with pytest.raises(StoreError, match="holds part 0/3, this job is part 1/3"):
        run_cache(CacheConfig(out=str(parts[0]), part="1/3", **JOB), loaded=tiny_llama)
    with pytest.raises(StoreError, match="not an activation store"):
        merge_stores([tmp_path / "nowhere"], tmp_path / "merged", loaded=tiny_llama)


def test_cli_shards_and_merge_from_a_model_folder(tiny_llama, tmp_path):
    """The scheduler recipe end to end: parts as separate processes, merged by a process that loads only the
    tokenizer, equal to the single-process store."""
    folder = tmp_path / "model"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "afprobe.cli", "cache", "--model", str(folder), "--n", "4", "--shard-size", "2"]
    base += ["--layers", "0,1,2", "--positions", "tag,last,suffix"]

    def run(args):
        result = subprocess.run(args, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    run([*base, "--out", str(tmp_path / "whole")])
    for i in range(2):
        assert f"part {i}/2 of store" in run([*base, "--out", str(tmp_path / f"p{i}"), "--shard", f"{i}/2"])
    out = run(
        [
            sys.executable,
            "-m",
            "afprobe.cli",
            "merge",
            str(tmp_path / "p0"),
            str(tmp_path / "p1"),
            "--out",
            str(tmp_path / "merged"),
        ]
    )
    assert "4 shards from 2 parts (4 copied)" in out
    assert_same_store(tmp_path / "whole", tmp_path / "merged")
