"""Prefix-shared forward passes.

Every prompt in a `PromptSet` starts with the same long system prompt; only the last hundred or so tokens differ
(tier tag, request, instruction, prefill). The shared prefix is run once with a KV cache; each batch of prompts
then runs only its own tokens on a fork of that cache. Forks never write into the prefix cache, so it can be reused
for every batch.

Rows in a batch are right-padded: real tokens never attend to pads (the 2-D attention mask hides them) and each row
gets explicit position ids, so a padded row computes what it would compute alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from afprobe.model.precision import float32_readout


@dataclass
class PrefixCache:
    """The KV cache of the shared prefix, computed once and never mutated."""

    input_ids: tuple[int, ...]
    cache: Any  # transformers Cache for batch size 1

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass
class BatchState:
    """A batch of sequences that share a prefix: their KV cache, which cache slots are real, and next positions."""

    cache: Any
    attention_mask: Int[Tensor, "batch slots"]
    next_position: Int[Tensor, " batch"]

    @property
    def batch_size(self) -> int:
        return int(self.attention_mask.shape[0])


def fork_cache(cache: Any) -> Any:
    """A copy of a transformers cache that shares its tensors (cache updates replace tensors, never write into them)."""
    memo: dict[int, Any] = {}
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                memo[id(tensor)] = tensor
    return copy.deepcopy(cache, memo)


@torch.inference_mode()
def compute_prefix_cache(model: Any, prefix_ids: Sequence[int]) -> PrefixCache:
    """Run the shared prefix once and keep its KV cache."""
    if len(prefix_ids) == 0:
        raise ValueError("empty prefix: nothing to cache")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prefix_ids)], device=device)
    output = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return PrefixCache(input_ids=tuple(prefix_ids), cache=output.past_key_values)


def start_batch(prefix: PrefixCache, batch_size: int) -> BatchState:
    """A batch whose every row begins with the prefix (the prefix cache itself is left untouched)."""
    cache = fork_cache(prefix.cache)
    if batch_size > 1:
        cache.batch_repeat_interleave(batch_size)
    device = cache_device(prefix.cache)
    return BatchState(
        cache=cache,
        attention_mask=torch.ones(batch_size, prefix.length, dtype=torch.long, device=device),
        next_position=torch.full((batch_size,), prefix.length, dtype=torch.long, device=device),
    )


def additive_mask(visible: Bool[Tensor, "batch query key"], dtype: torch.dtype) -> Float[Tensor, "batch 1 query key"]:
    """The 4-D attention mask transformers adds to attention scores: 0 where a query sees a key, the dtype's
    minimum where it does not (for forwards whose tokens do not simply each see all earlier ones)."""
    mask = torch.zeros(visible.shape[0], 1, *visible.shape[1:], dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)


def cache_device(cache: Any) -> torch.device:
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.numel():
            return keys.device
    return torch.device("cpu")


def extend_batch_with_grad(
    model: Any,
    state: BatchState,
    rows: Sequence[Sequence[int]],
    keep: Sequence[Sequence[int]],
    *,
    fork: bool = False,
    pad_id: int = 0,
    output_hidden_states: bool = False,
) -> tuple[list[Float[Tensor, "kept vocab"]], BatchState, Any]:
    """Append one row of tokens to each sequence of the batch and return logits at chosen positions
    (`extend_batch` is the same under inference mode).

    rows: the new tokens of each sequence (lengths may differ; at least one token each).
    keep: for each row, the indices (into that row) whose next-token logits to return.
    fork: leave `state` usable afterwards (its cache is forked, not extended in place).
    Returns (per-row logits `[len(keep[i]), vocab]` in float32, the extended state, the raw model output).
    """
    if len(rows) != state.batch_size or len(keep) != state.batch_size:
        raise ValueError(f"expected {state.batch_size} rows, got {len(rows)} rows and {len(keep)} keep lists")
    lengths = [len(row) for row in rows]
    if min(lengths) < 1:
        raise ValueError("every row needs at least one token")
    device = state.attention_mask.device
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    row_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long, device=device)
        row_mask[i, : len(row)] = 1
    position_ids = state.next_position[:, None] + torch.arange(width, device=device)[None, :]
    attention_mask = torch.cat([state.attention_mask, row_mask], dim=1)

    wanted = sorted({index for row_keep in keep for index in row_keep})
    for i, row_keep in enumerate(keep):
        if any(not 0 <= index < lengths[i] for index in row_keep):
            raise ValueError(f"row {i}: keep indices {list(row_keep)} outside its {lengths[i]} tokens")
    cache = fork_cache(state.cache) if fork else state.cache
    with float32_readout(model):
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=torch.tensor(wanted, dtype=torch.long, device=device) if wanted else 1,
            output_hidden_states=output_hidden_states,
        )
    column = {index: j for j, index in enumerate(wanted)}
    logits = [output.logits[i, [column[index] for index in row_keep]].float() for i, row_keep in enumerate(keep)]
    new_state = BatchState(
        cache=output.past_key_values,
        attention_mask=attention_mask,
        next_position=state.next_position + torch.tensor(lengths, device=device),
    )
    return logits, new_state, output


# Scoring, caching and patching never need gradients; training an organism over a prefix cache does.
extend_batch = torch.inference_mode()(extend_batch_with_grad)


@torch.inference_mode()
def full_forward_logits(model: Any, input_ids: Sequence[int], positions: Sequence[int]) -> Float[Tensor, "n vocab"]:
    """The plain way: the whole prompt in one forward, logits at `positions` (what prefix sharing must match)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], device=device)
    with float32_readout(model):
        output = model(
            input_ids=ids,
            use_cache=False,
            logits_to_keep=torch.tensor(list(positions), dtype=torch.long, device=device),
        )
    return output.logits[0].float()
