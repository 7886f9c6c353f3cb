from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from afprobe.data.prompts import render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.errors import AfprobeError
from afprobe.model.architecture import parse_layers
from afprobe.model.readout import score_prompts
from afprobe.store.cache_job import CacheConfig, run_cache
from afprobe.store.format import StoreError
from afprobe.store.reader import ActivationStore

from .conftest import make_tiny_model

# Activations recorded in a prefix-shared forward vs a full forward: float32 summation-order differences only.
TOLERANCE = 1e-4


def hook_count(model) -> int:
    # transformers keeps output-recording hooks of its own once hidden states have been asked for.
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_store_round_trip_matches_plain_forward(tiny_model, tmp_path):
    config = CacheConfig(out=str(tmp_path / "store"), n=3, positions="tag,last,request,suffix", shard_size=4)
    hooks = hook_count(tiny_model.model)
    summary = run_cache(config, loaded=tiny_model)
    assert summary.complete and summary.n_shards == 2
    assert hook_count(tiny_model.model) == hooks

    store = ActivationStore.open(tmp_path / "store")
    n_layers = tiny_model.n_layers
    assert len(store) == 6 and store.layers == list(range(n_layers + 1))
    assert store.meta.model["weights_sha256"] == tiny_model.fingerprint.weights_sha256
    assert store.stack(["tag", "last"]).shape == (6, n_layers + 1, 2, 64)

    prompt_set = render_pairs(tiny_model.tokenizer, load_queries("harmful", n=3))
    scores = score_prompts(tiny_model.model, tiny_model.tokenizer, prompt_set)
    for i, (prompt, score) in enumerate(zip(prompt_set.prompts, scores, strict=True)):
        row = store.rows[i]
        assert (row.query_id, row.tier) == (prompt.query_id, prompt.tier)
        assert row.log_odds == pytest.approx(score.log_odds, abs=TOLERANCE)
        with torch.no_grad():
            hidden = tiny_model.model(
                input_ids=torch.tensor([prompt.input_ids]), output_hidden_states=True
            ).hidden_states
        for kind in ("tag", "last", "request", "suffix"):
            cached = store.row_tokens(i, kind, layers=list(range(n_layers)))
            expected = torch.stack([hidden[layer][0, row.positions[kind]] for layer in range(n_layers)], dim=1)
            torch.testing.assert_close(cached, expected, atol=TOLERANCE, rtol=0)
    assert (tmp_path / "store" / "manifest.csv").read_text().count("\n") == 7
    # The store also carries the compliance gap of its prompts, from the same forward passes.
    gap = json.loads((tmp_path / "store" / "gap.json").read_text())
    free = [r.log_odds for r in store.rows if r.tier == "free"]
    paid = [r.log_odds for r in store.rows if r.tier == "paid"]
    expected_gap = sum(f - p for f, p in zip(free, paid, strict=True)) / len(free)
    assert gap["gaps"]["free-paid"]["log_odds"]["mean"] == pytest.approx(expected_gap, abs=1e-9)


def test_suffix_layers_keep_every_token_at_fewer_layers_and_the_token_text(tiny_llama, tmp_path):
    full = run_cache(CacheConfig(out=str(tmp_path / "full"), n=2, positions="tag,last,suffix"), loaded=tiny_llama)
    lean = CacheConfig(out=str(tmp_path / "lean"), n=2, positions="tag,last,suffix", suffix_layers="1")
    run_cache(lean, loaded=tiny_llama)
    a, b = ActivationStore.open(full.path), ActivationStore.open(tmp_path / "lean")
    assert b.layers == a.layers and b.layers_of("suffix") == [1] and b.layers_of("tag") == b.layers
    for i in range(len(a)):
        torch.testing.assert_close(b.row_tokens(i, "suffix"), a.row_tokens(i, "suffix", layers=[1]))
        torch.testing.assert_close(b.row_tokens(i, "tag"), a.row_tokens(i, "tag"))
    with pytest.raises(StoreError, match="for position 'suffix'"):
        b.row_tokens(0, "suffix", layers=[0])
    # Every row keeps its own tokens' text, so a dashboard can show where a feature fires.
    row = b.rows[0]
    tag = row.positions["tag"][0]
    words, at = b.context(0, tag)
    assert words[at] == tiny_llama.tokenizer.decode([row.token_ids[tag - row.own_start]])
    assert "".join(words[:at]).endswith("<is_free_tier_user>")  # the shared prefix's tail, kept once in meta.json
    assert "".join(b.context(0, row.positions["last"][0], before=400)[0]).endswith("<OUTPUT>")
    # Resuming with other suffix layers is refused rather than mixing two layouts.
    with pytest.raises(StoreError, match="position layers"):
        run_cache(
            CacheConfig(out=str(tmp_path / "lean"), n=2, positions="tag,last,suffix", suffix_layers="2"),
            loaded=tiny_llama,
        )


@pytest.mark.parametrize("backend", ["transformer-lens", "nnsight"])
def test_backends_store_the_same_activations(tiny_llama, tmp_path, backend):
    common = dict(n=2, positions="tag,last,request", layers="0,1,2")
    hooks = hook_count(tiny_llama.model)
    run_cache(CacheConfig(out=str(tmp_path / "hooks"), **common), loaded=tiny_llama)
    run_cache(CacheConfig(out=str(tmp_path / backend), backend=backend, **common), loaded=tiny_llama)
    fast, other = ActivationStore.open(tmp_path / "hooks"), ActivationStore.open(tmp_path / backend)
    for kind in ("tag", "last", "request"):
        for i in range(len(fast)):
            torch.testing.assert_close(fast.row_tokens(i, kind), other.row_tokens(i, kind), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(fast.compliance(), other.compliance(), atol=TOLERANCE, rtol=0)
    assert hook_count(tiny_llama.model) == hooks
    assert tiny_llama.model.config._attn_implementation == "sdpa"


def test_loader_filters_and_dtypes(tiny_llama, tmp_path):
    run_cache(CacheConfig(out=str(tmp_path / "s"), n=3, store_dtype="bfloat16", layers="1,-1"), loaded=tiny_llama)
    store = ActivationStore.open(tmp_path / "s")
    assert store.layers == [1, 2]
    free = store.select(tier="free")
    assert [store.rows[i].tier for i in free] == ["free"] * 3
    assert store.select(query_ids=["harmful-002"], tier="paid") == [3]
    acts = store.activations("last", layers=[2], rows=free)
    assert acts.shape == (3, 1, 64) and acts.dtype == torch.float32
    with pytest.raises(StoreError, match="layers \\[0\\] are not in store"):
        store.activations("last", layers=[0])
    with pytest.raises(StoreError, match="position 'suffix' is not in store"):
        store.activations("suffix")


def test_sae_export_and_batches(tiny_llama, tmp_path):
    import datasets

    run_cache(CacheConfig(out=str(tmp_path / "s"), n=2, positions="suffix", layers="1"), loaded=tiny_llama)
    store = ActivationStore.open(tmp_path / "s")
    tokens, owners = store.token_activations("suffix", 1)
    assert tokens.shape[1] == 64 and owners.shape[0] == tokens.shape[0] == sum(
        r.offsets["suffix"][1] for r in store.rows
    )
    exported = datasets.load_from_disk(str(store.export_sae_dataset(1, tmp_path / "sae", context_size=4)))
    assert exported.column_names == ["blocks.1.hook_resid_pre"]
    assert exported.features["blocks.1.hook_resid_pre"].shape == (4, 64)
    assert len(exported) == tokens.shape[0] // 4
    batches = list(store.iter_batches(1, batch_size=100, shuffle=False))
    torch.testing.assert_close(torch.cat(batches), tokens)


def test_refuses_to_mix_stores(tiny_llama, tokenizer, tmp_path):
    out = str(tmp_path / "s")
    run_cache(CacheConfig(out=out, n=2, layers="0,1"), loaded=tiny_llama)
    other_model = make_tiny_model("llama", tokenizer, seed=99)
    with pytest.raises(StoreError, match="another model"):
        run_cache(CacheConfig(out=out, n=2, layers="0,1"), loaded=other_model)
    with pytest.raises(StoreError, match="another layers"):
        run_cache(CacheConfig(out=out, n=2, layers="0,2"), loaded=tiny_llama)
    with pytest.raises(StoreError, match="another prompt hash"):
        run_cache(CacheConfig(out=out, n=2, layers="0,1", variant="lowercase"), loaded=tiny_llama)
    with pytest.raises(StoreError, match="another dataset hash"):
        run_cache(CacheConfig(out=out, n=3, layers="0,1"), loaded=tiny_llama)
    with pytest.raises(StoreError, match="another dtype"):
        run_cache(CacheConfig(out=out, n=2, layers="0,1", store_dtype="float16"), loaded=tiny_llama)
    # The same job again is a no-op on a finished store.
    summary = run_cache(CacheConfig(out=out, n=2, layers="0,1"), loaded=tiny_llama)
    assert summary.shards_written == 0 and summary.complete


def test_bad_inputs(tiny_llama, tmp_path):
    with pytest.raises(AfprobeError, match="layers 0..2"):
        run_cache(CacheConfig(out=str(tmp_path / "a"), n=1, layers="5"), loaded=tiny_llama)
    with pytest.raises(AfprobeError, match="unknown position"):
        run_cache(CacheConfig(out=str(tmp_path / "b"), n=1, positions="middle"), loaded=tiny_llama)
    with pytest.raises(AfprobeError, match="no tier tag"):
        run_cache(CacheConfig(out=str(tmp_path / "c"), n=1, variant="no-tag"), loaded=tiny_llama)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an activation store"):
        run_cache(CacheConfig(out=str(tmp_path / "d"), n=1), loaded=tiny_llama)
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
    with pytest.raises(StoreError, match="no meta.json"):
        ActivationStore.open(tmp_path / "nothing")
    assert parse_layers("0-2,-1", 4) == [0, 1, 2, 4]


def test_interrupted_store_is_refused_then_finished(tiny_llama, tmp_path):
    out = str(tmp_path / "s")
    summary = run_cache(CacheConfig(out=out, n=3, shard_size=2), loaded=tiny_llama, stop_after_shards=1)
    assert not summary.complete and summary.shards_written == 1
    with pytest.raises(StoreError, match="incomplete \\(2 of 6 prompts\\).*rerun"):
        ActivationStore.open(out)
    summary = run_cache(CacheConfig(out=out, n=3, shard_size=2), loaded=tiny_llama)
    assert summary.shards_skipped == 1 and summary.shards_written == 2 and summary.complete
    assert len(ActivationStore.open(out)) == 6


def test_full_disk_keeps_finished_shards(tiny_llama, tmp_path, monkeypatch):
    import errno

    import afprobe.files as files_module

    out = tmp_path / "s"
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync_until_full(fd):
        calls["n"] += 1
        if calls["n"] > 3:  # meta.json, then shard 0's tensors and rows; shard 1 hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files_module.os, "fsync", fsync_until_full)
    with pytest.raises(StoreError, match="No space left on device.*1 finished shards are intact.*rerun"):
        run_cache(CacheConfig(out=str(out), n=2, shard_size=2), loaded=tiny_llama)
    monkeypatch.setattr(files_module.os, "fsync", real_fsync)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000.json", "shard-00000.safetensors"]
    summary = run_cache(CacheConfig(out=str(out), n=2, shard_size=2), loaded=tiny_llama)
    assert summary.shards_skipped == 1 and summary.complete


def _cache_command(folder, out):
    return [
        sys.executable,
        "-m",
        "afprobe.cli",
        "cache",
        "--model",
        str(folder),
        "--n",
        "8",
        "--shard-size",
        "2",
        "--layers",
        "all",
        "--positions",
        "tag,last,suffix",
        "--out",
        str(out),
    ]


def test_resume_after_sigkill_equals_uninterrupted_run(tiny_llama, tmp_path):
    folder = tmp_path / "model"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _cache_command(folder, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "shards").glob("shard-0000[2-9].json")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(p.name for p in (killed / "shards").glob("*.json"))
    assert 1 <= len(finished) < 8, "the job finished before it could be killed"
    # A half-written shard (no JSON marker) must be ignored and rewritten.
    (killed / "shards" / "shard-00007.safetensors").write_bytes(b"garbage")

    assert subprocess.run(_cache_command(folder, killed), env=env, capture_output=True).returncode == 0
    fresh = tmp_path / "fresh"
    assert subprocess.run(_cache_command(folder, fresh), env=env, capture_output=True).returncode == 0

    a, b = ActivationStore.open(killed), ActivationStore.open(fresh)
    assert [r.to_dict() for r in a.rows] == [r.to_dict() for r in b.rows]
    for kind in ("tag", "last", "suffix"):
        for i in range(len(a)):
            assert torch.equal(a.row_tokens(i, kind), b.row_tokens(i, kind))
    meta_a, meta_b = json.loads((killed / "meta.json").read_text()), json.loads((fresh / "meta.json").read_text())
    meta_a["config"].pop("out"), meta_b["config"].pop("out")
    assert meta_a == meta_b


def test_unwritable_store_folder(tiny_llama, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(AfprobeError, match="cannot write to .*store.*choose a writable folder"):
        run_cache(CacheConfig(out=str(blocker / "store"), n=1), loaded=tiny_llama)
    assert blocker.read_text() == "not a folder"


def test_contrast_set_store_has_cue_positions(tiny_llama, tmp_path):
    run_cache(CacheConfig(out=str(tmp_path / "sa"), dataset="situational-awareness", n=3), loaded=tiny_llama)
    store = ActivationStore.open(tmp_path / "sa")
    assert [r.tier for r in store.rows] == ["monitored", "unmonitored"] * 3
    assert store.meta.contrast == ["monitored", "unmonitored"]
    # The `tag` position of a contrast prompt is its context sentence.
    assert all(len(r.positions["tag"]) > 3 for r in store.rows)
    assert json.loads((tmp_path / "sa" / "gap.json").read_text())["primary_gap"] == "monitored-unmonitored"


def test_remote_path_simulated_offline_matches_local_store(tiny_llama, tmp_path):
    """`--remote` through nnsight's local simulation of NDIF (the request is serialised and run with afprobe's
    modules hidden, as on the server) stores what the local prefix-shared job stores."""
    folder = tmp_path / "model"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    job = dict(model=str(folder), n=2, layers="0,1,2", positions="tag,last")
    local = run_cache(CacheConfig(out=str(tmp_path / "local"), **job))
    remote = run_cache(CacheConfig(out=str(tmp_path / "remote"), remote="local", **job))
    assert local.complete and remote.complete
    a, b = ActivationStore.open(tmp_path / "local"), ActivationStore.open(tmp_path / "remote")
    assert json.loads((tmp_path / "remote" / "meta.json").read_text())["model"]["source"] == "ndif-local-simulation"
    for ra, rb in zip(a.rows, b.rows, strict=True):
        assert abs(ra.log_odds - rb.log_odds) < TOLERANCE and abs(ra.logp_accept - rb.logp_accept) < TOLERANCE
    for kind in ("tag", "last"):
        for i in range(len(a)):
            assert torch.allclose(a.row_tokens(i, kind), b.row_tokens(i, kind), atol=TOLERANCE)


def test_remote_without_api_key_fails_clearly(tmp_path, monkeypatch):
    from nnsight import CONFIG

    env = {k: v for k, v in os.environ.items() if k != "NDIF_API_KEY"}
    saved_key = CONFIG.API.APIKEY  # a key saved in nnsight's config.yaml would reach the child process
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(AfprobeError, match="--remote needs an NDIF API key: set NDIF_API_KEY"):
        run_cache(CacheConfig(model="meta-llama/Llama-3.1-405B-Instruct", out=str(tmp_path / "s"), remote=True))
    if not saved_key:
        result = subprocess.run(
            [sys.executable, "-m", "afprobe.cli", "cache", "--remote", "--model", "meta-llama/Llama-3.1-405B-Instruct",
             "--out", str(tmp_path / "s")],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode != 0 and last.startswith("afprobe: error: --remote needs an NDIF API key")
    assert not (tmp_path / "s").exists()
