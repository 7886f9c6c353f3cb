"""Shared fixtures: the embedded model's tokenizer and tiny randomly initialised Llama, Gemma3 and Qwen2 models."""

from __future__ import annotations

import os

# Tests never reach a model hub; fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from afprobe.model.families import random_model
from afprobe.model.loading import LoadedModel, _dequantized_folder, embedded_gguf_path, wrap_model

FAMILIES = ("llama", "gemma3", "qwen2")


@pytest.fixture(scope="session")
def embedded_folder():
    """The embedded model dequantized to safetensors (in the user cache, so later runs take a second)."""
    return _dequantized_folder(embedded_gguf_path())


@pytest.fixture(scope="session")
def tokenizer(embedded_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(embedded_folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def make_tiny_model(family: str, tokenizer, *, seed: int = 0, max_positions: int = 8192) -> LoadedModel:
    """A 2-layer (4 for the Gemmas) random model of `family`, hidden size 64 (`afprobe.model.families`)."""
    model = random_model(family, len(tokenizer), seed=seed, max_positions=max_positions)
    return wrap_model(model, tokenizer, name=f"tiny-{family}")


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model(request, tokenizer) -> LoadedModel:
    return make_tiny_model(request.param, tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer) -> LoadedModel:
    return make_tiny_model("llama", tokenizer)


def make_probes(loaded: LoadedModel, root, *, situational_awareness: bool = False):
    """Small stores (layers 0-2, tag and last; 8 queries, 4 of them fitting) and the probes folder `root/probes`
    trained on them."""
    from afprobe.analysis.probes import ProbeConfig, run_probes
    from afprobe.store.cache_job import CacheConfig, run_cache

    common = dict(layers="0,1,2", positions="tag,last", n=8)
    run_cache(CacheConfig(out=str(root / "main"), **common), loaded=loaded)
    run_cache(CacheConfig(out=str(root / "benign"), dataset="benign", **common), loaded=loaded)
    if situational_awareness:
        run_cache(CacheConfig(out=str(root / "sa"), dataset="situational-awareness", **common), loaded=loaded)
    run_probes(
        ProbeConfig(
            cache=str(root / "main"),
            sa_cache=str(root / "sa") if situational_awareness else None,
            benign_cache=str(root / "benign"),
            out=str(root / "probes"),
            folds=3,
            n_random=3,
            n_shuffles=1,
        )
    )
    return root
