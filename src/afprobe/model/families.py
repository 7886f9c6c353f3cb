"""Tiny randomly initialised models of the model families people study alignment faking on.

They are built from configs (nothing downloaded), share the embedded model's tokenizer, and exist to check afprobe's
machinery on each family's real layout: the conformance matrix in the tests, `afprobe doctor --model random:qwen3`,
the GPU check. Their numbers mean nothing about alignment faking.
"""

from __future__ import annotations

from typing import Any

import torch

from afprobe.errors import ModelLoadError

# family -> the transformers config class it is built from.
FAMILIES: dict[str, str] = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma2": "Gemma2Config",
    "gemma3": "Gemma3TextConfig",
    "olmo2": "Olmo2Config",
    "phi3": "Phi3Config",
}
RANDOM_PREFIX = "random:"
# A sliding window far shorter than afprobe's prompts, so the families that use one really exercise it.
SLIDING_WINDOW = 64


def tiny_config(
    family: str, vocab_size: int, *, hidden_size: int = 64, n_layers: int = 2, max_positions: int = 8192
) -> Any:
    """A small config of `family` (4 layers where the family alternates sliding and global attention)."""
    import transformers

    if family not in FAMILIES:
        raise ModelLoadError(f"unknown model family {family!r}: choose one of {', '.join(FAMILIES)}")
    n_heads = 4
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads // 2,
        max_position_embeddings=max_positions,
    )
    if family in ("gemma2", "gemma3"):
        common.update(
            num_hidden_layers=max(n_layers, 4), head_dim=hidden_size // n_heads, sliding_window=SLIDING_WINDOW
        )
    if family == "qwen3":
        common.update(head_dim=hidden_size // n_heads)
    if family == "mistral":
        common.update(sliding_window=None)  # Mistral 7B v0.2 and later attend to the whole context
    if family == "phi3":
        common.update(pad_token_id=0)
    return getattr(transformers, FAMILIES[family])(**common)


def random_model(
    family: str,
    vocab_size: int,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    n_layers: int = 2,
    max_positions: int = 8192,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A randomly initialised causal LM of `family` (the same weights for the same seed), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, vocab_size, hidden_size=hidden_size, n_layers=n_layers, max_positions=max_positions)
    generator_state = torch.random.get_rng_state()
    try:
        for attention in (attn_implementation, "eager"):
            config._attn_implementation = attention
            torch.manual_seed(seed)
            try:
                return AutoModelForCausalLM.from_config(config).eval()
            except ValueError as exc:
                if not sdpa_unsupported(exc):
                    raise
        raise AssertionError("unreachable: eager attention is always supported")
    finally:
        torch.random.set_rng_state(generator_state)


def sdpa_unsupported(exc: Exception) -> bool:
    """transformers' refusal of SDPA attention for an architecture (Gemma 2's soft-capped attention): load with
    eager attention instead."""
    return "scaled_dot_product_attention" in str(exc)


def parse_random_spec(spec: str) -> str | None:
    """The family of a `random:FAMILY` model spec, None for any other spec."""
    if not spec.startswith(RANDOM_PREFIX):
        return None
    family = spec[len(RANDOM_PREFIX) :]
    if family not in FAMILIES:
        raise ModelLoadError(f"unknown model family in {spec!r}: use random:{' or random:'.join(FAMILIES)}")
    return family
