"""How much memory a prefix-shared job needs, and the batch size that fits.

The prefix-shared forward (`afprobe.model.forward`) keeps the shared prefix's KV cache for the whole job; each batch
forks it, repeats it once per row, extends it with the rows' own tokens (stage 1), then extends a fork of that by
the answer tokens (stage 2) while the stage-1 cache is still alive. At its peak a batch of B rows therefore holds
two KV caches of B x (prefix + own + answer) tokens besides the prefix cache, plus the activations of one layer's
forward (the MLP's hidden layer dominates). Where the answers run in the rows' own forward
(`afprobe.model.readout`), one such cache is alive at a time, plus the 4-D mask (a boolean and a float32 per query
and key). The prefix's own forward peaks at the prefix cache plus the activations
of a `prefix`-token forward. Weights are counted as loaded.

`estimate_memory` turns a model config and the job's token counts into those bytes; `fit_batch_size` picks the
largest batch that fits the memory the devices have free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from afprobe.errors import AfprobeError

GIB = float(1 << 30)


# Leave this share of free memory unused: allocator fragmentation, CUDA context, tensors we do not model.
HEADROOM = 0.85


MAX_GPU_BATCH = 64


class OutOfMemoryPlan(AfprobeError):
    """Even one prompt at a time does not fit."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a prefix-shared job needs on its devices (all devices together)."""

    weights: int
    prefix_cache: int  # KV cache of the shared prefix, alive for the whole job
    prefix_forward: int  # activations while the prefix itself runs
    per_row: int  # what each prompt in a batch adds at the batch's peak
    batch_size: int
    prefix_tokens: int
    row_tokens: int  # own + answer tokens of the longest prompt
    free: int | None = None  # bytes free on the tightest device when the batch size was chosen (weights loaded)

    @property
    def batch(self) -> int:
        return self.per_row * self.batch_size

    @property
    def job(self) -> int:
        """The prefix cache and the larger of the prefix's forward and a batch: what comes on top of the weights."""
        return self.prefix_cache + max(self.prefix_forward, self.batch)

    @property
    def peak(self) -> int:
        return self.weights + self.job

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "batch": self.batch, "job": self.job, "peak": self.peak}

    def describe(self) -> str:
        text = (
            f"memory estimate: weights {self.weights / GIB:.2f} GiB + prefix cache {self.prefix_cache / GIB:.2f} GiB "
            f"({self.prefix_tokens:,} tokens) + batch of {self.batch_size} {self.batch / GIB:.2f} GiB "
            f"= peak {self.peak / GIB:.2f} GiB"
        )
        if self.free is not None:
            text += f" ({self.free / GIB:.1f} GiB free besides the weights)"
        return text


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder that memory depends on."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    sliding_window: int | None
    sliding_layers: int  # how many layers use the sliding window

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
        layer_types = getattr(text, "layer_types", None) or []
        window = getattr(text, "sliding_window", None)
        sliding = sum(1 for kind in layer_types if kind == "sliding_attention") if window else 0
        return cls(
            n_layers=int(text.num_hidden_layers),
            d_model=int(text.hidden_size),
            d_mlp=int(getattr(text, "intermediate_size", 4 * text.hidden_size)),
            n_heads=n_heads,
            n_kv_heads=int(getattr(text, "num_key_value_heads", None) or n_heads),
            head_dim=int(head_dim),
            vocab_size=int(text.vocab_size),
            sliding_window=int(window) if window else None,
            sliding_layers=sliding,
        )

    def kv_bytes(self, tokens: int, dtype_bytes: int) -> int:
        """Keys and values of `tokens` tokens in every layer (a sliding layer keeps the last window - 1 tokens, as
        transformers' DynamicSlidingWindowLayer does)."""
        per_layer_token = 2 * self.n_kv_heads * self.head_dim * dtype_bytes
        full = (self.n_layers - self.sliding_layers) * tokens
        windowed = self.sliding_layers * min(tokens, (self.sliding_window or tokens + 1) - 1)
        return per_layer_token * (full + windowed)

    def forward_bytes(self, tokens: int, dtype_bytes: int) -> int:
        """Activations alive during one layer of a forward over `tokens` tokens: the MLP's gate, up and product
        (`3 * d_mlp`) and a few residual-width tensors (`4 * d_model`). Layers run one after another, so one
        layer's worth is the peak; SDPA attention does not materialise the score matrix."""
        return tokens * (3 * self.d_mlp + 4 * self.d_model) * dtype_bytes


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_memory(
    shape: ModelShape,
    *,
    dtype: torch.dtype,
    weights_bytes: int,
    prefix_tokens: int,
    own_tokens: int,
    answer_tokens: int,
    batch_size: int,
    kept_logits: int = 4,
    answers_in_one_forward: bool = False,
) -> MemoryEstimate:
    """The memory of a prefix-shared job (see the module docstring for what is counted).

    own_tokens: the longest prompt's tokens after the prefix; answer_tokens: the longest scored continuation;
    kept_logits: next-token distributions kept per row (float32 over the vocabulary).
    """
    size = dtype_bytes(dtype)
    row_tokens = own_tokens + answer_tokens
    row_cache = shape.kv_bytes(prefix_tokens + row_tokens, size)
    if answers_in_one_forward:
        mask = row_tokens * (prefix_tokens + row_tokens) * 5
        per_row = row_cache + mask + shape.forward_bytes(row_tokens, size) + 2 * answer_tokens * shape.vocab_size * 4
    else:
        per_row = 2 * row_cache + shape.forward_bytes(row_tokens, size) + kept_logits * shape.vocab_size * 4
    return MemoryEstimate(
        weights=weights_bytes,
        prefix_cache=shape.kv_bytes(prefix_tokens, size),
        prefix_forward=shape.forward_bytes(prefix_tokens, size),
        per_row=per_row,
        batch_size=batch_size,
        prefix_tokens=prefix_tokens,
        row_tokens=row_tokens,
    )


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now (for the CPU: what the OS reports available)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def model_devices(model: Any) -> list[torch.device]:
    return sorted({p.device for p in model.parameters()}, key=str)


def fit_batch_size(
    estimate: MemoryEstimate,
    available: int,
    *,
    requested: int | None,
    default: int,
    share: float = 1.0,
) -> int:
    """The batch size to run: `requested` if given, else the largest batch up to `default` that fits.

    available: free bytes after the weights are loaded; share: the fraction of the job's memory that lands on the
    device `available` describes (layers split over GPUs split their caches the same way).
    Raises `OutOfMemoryPlan` when not even one row fits, naming what to change.
    """
    budget = available * HEADROOM
    fixed = estimate.prefix_cache * share
    if fixed + max(estimate.prefix_forward, estimate.per_row) * share > budget:
        raise OutOfMemoryPlan(
            f"the shared prefix ({estimate.prefix_tokens:,} tokens) needs "
            f"{(fixed + max(estimate.prefix_forward, estimate.per_row) * share) / GIB:.1f} GiB but only "
            f"{available / GIB:.1f} GiB are free: use --dtype bfloat16, a larger GPU, several GPUs "
            "(--device-map auto), or a shorter system prompt"
        )
    if requested is not None:
        return requested
    fits = int((budget - fixed) // max(1.0, estimate.per_row * share))
    return max(1, min(default, fits))


def batch_plan(
    model: Any,
    *,
    prefix_tokens: int,
    own_tokens: int,
    answer_tokens: int,
    requested: int | None,
    default: int,
    answers_in_one_forward: bool = False,
) -> tuple[MemoryEstimate, int]:
    """The estimate for a loaded model and the batch size that fits its devices' free memory.

    With layers split over several GPUs each device holds its layers' share of every cache; the batch is the
    largest that fits on the tightest device.
    """
    shape = ModelShape.from_config(model.config)
    dtype = next(model.parameters()).dtype
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    probe = estimate_memory(
        shape,
        dtype=dtype,
        weights_bytes=weights,
        prefix_tokens=prefix_tokens,
        own_tokens=own_tokens,
        answer_tokens=answer_tokens,
        batch_size=1,
        answers_in_one_forward=answers_in_one_forward,
    )
    devices = model_devices(model)
    shares = _layer_shares(model, devices)
    free = {device: free_memory(device) for device in devices}
    batch = min(
        fit_batch_size(probe, free[device], requested=requested, default=default, share=shares[device])
        for device in devices
    )
    return replace(probe, batch_size=batch, free=min(free.values())), batch


def _layer_shares(model: Any, devices: Sequence[torch.device]) -> dict[torch.device, float]:
    if len(devices) == 1:
        return {devices[0]: 1.0}
    from afprobe.model.architecture import decoder_layers

    counts = dict.fromkeys(devices, 0)
    for block in decoder_layers(model):
        counts[next(block.parameters()).device] += 1
    total = sum(counts.values()) or 1
    # The tightest case for a device without layers is the embedding's activations: give it a small floor.
    return {device: max(count / total, 1.0 / total) for device, count in counts.items()}
