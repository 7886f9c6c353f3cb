"""The memory estimate printed before a run, and the batch size chosen from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afprobe.model.forward import compute_prefix_cache
from afprobe.model.memory import GIB, HEADROOM, ModelShape, OutOfMemoryPlan, estimate_memory, fit_batch_size

ROOT = Path(__file__).resolve().parents[1]


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_kv_estimate_is_the_prefix_cache_size(tiny_model):
    """Exact for every family, Gemma3's sliding-window layers included."""
    shape = ModelShape.from_config(tiny_model.model.config)
    for tokens in (10, 200):
        prefix = compute_prefix_cache(tiny_model.model, list(range(5, 5 + tokens)))
        assert shape.kv_bytes(tokens, 4) == cache_bytes(prefix.cache), tokens


def small_estimate(batch_size: int = 1):
    shape = ModelShape(
        n_layers=4, d_model=64, d_mlp=128, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=1000,
        sliding_window=None, sliding_layers=0,
    )  # fmt: skip
    return estimate_memory(
        shape, dtype=torch.float32, weights_bytes=10**6, prefix_tokens=3000, own_tokens=120, answer_tokens=6,
        batch_size=batch_size,
    )  # fmt: skip


def test_batch_size_fits_the_free_memory():
    one = small_estimate()
    assert small_estimate(5).batch == 5 * one.per_row and one.peak == one.weights + one.job
    available = 64 * 2**20
    batch = fit_batch_size(one, available, requested=None, default=64)
    assert 1 <= batch < 64
    assert one.prefix_cache + batch * one.per_row <= HEADROOM * available
    assert one.prefix_cache + (batch + 1) * one.per_row > HEADROOM * available
    assert fit_batch_size(one, 10 * GIB, requested=None, default=64) == 64
    assert fit_batch_size(one, available, requested=3, default=64) == 3
    # A device that holds half the layers holds half of each cache.
    assert fit_batch_size(one, available, requested=None, default=64, share=0.5) >= 2 * batch
    with pytest.raises(OutOfMemoryPlan, match="shared prefix \\(3,000 tokens\\) needs .* --dtype bfloat16"):
        fit_batch_size(one, one.prefix_cache, requested=None, default=64)


@pytest.mark.embedded
def test_estimate_within_20_percent_of_measured_peak(tmp_path):
    """Embedded model on the CPU, batches of 1 and 4: prefix cache + batch, estimated vs the measured peak."""
    out = tmp_path / "memory.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--batch-sizes", "1,4", "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for row in json.loads(out.read_text()):
        assert row["measured_job"] > 100 * 2**20  # the 3,000-token prefix cache alone is ~130 MiB
        assert 0.8 <= row["ratio"] <= 1.2, row
