"""Precision: the compliance readout in float32 whatever dtype the model runs in, and float32 arithmetic on
low-precision weights as the reference a run's dtype is measured against.

Every number afprobe reports is a difference of log-odds read from the logits. In bf16 those logits are quantized
(near 20 nats the spacing of bf16 values is 0.125 nats), and so is the final norm's output they are computed from,
which buries effects of a few hundredths of a nat.

- `float32_readout(model)`: the model's own forward runs as it is up to the last block; then its final norm runs on
  the last block's output cast to float32, and the unembedding multiplies that by its weights cast to float32 (a
  slice of the vocabulary at a time, so no float32 copy of the whole matrix is ever held). Whatever the model does
  after the unembedding (Gemma's logit soft-capping, Cohere's logit scale) then runs on float32 logits, and the
  model's `.logits` come out float32. Every forward that reads compliance runs inside it.
- `float32_compute(model)`: the whole forward in float32 while the weights stay bf16: the embeddings come out
  float32 and each block's weights are cast up just before it runs and back just after (exact both ways), so one
  block's float32 copy exists at a time. This is the reference `afprobe.behaviour.resolution` measures bf16 against
  on a model too large to hold in float32.

Both are hooks, all removed on exit (and every weight back in its dtype): the model is left as it was. For a float32
model both do nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from afprobe.errors import AfprobeError
from afprobe.model.architecture import decoder_layers, final_norm, removing

# A float32 slice of the unembedding at most this large is alive at once (bytes).
UNEMBED_SLICE_BYTES = 1 << 27

# The float32 norm, rounded to the model's dtype, must match the model's own norm output to this fraction of the
# row's largest value (bf16 rounding is 2^-9 of it); a larger gap means the norm found is not the one the model ran.
NORM_MATCH_TOLERANCE = 2.0**-5


_READOUT_ACTIVE: weakref.WeakSet[Any] = weakref.WeakSet()


# Modules being re-run in float32 by `call_in_float32`, whose hooks must let that call through.
_RECOMPUTING: weakref.WeakSet[Any] = weakref.WeakSet()
# Models inside `float32_compute`.
_COMPUTING_FLOAT32: weakref.WeakSet[Any] = weakref.WeakSet()


def hidden_dtype(model: Any) -> torch.dtype:
    """The dtype the model's hidden states (and so its attention scores and masks) have in a forward now: float32
    inside `float32_compute`, else its embeddings' dtype."""
    return torch.float32 if model in _COMPUTING_FLOAT32 else model.get_input_embeddings().weight.dtype


def call_in_float32(module: torch.nn.Module, args: tuple) -> Any:
    """`module(*args)` with its parameters, buffers and floating-point arguments in float32 (the module itself is
    untouched); inside a hook of that module, that hook must return None while the module is in `_RECOMPUTING`."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}  # non-persistent buffers too
    state = {name: value.float() if value.is_floating_point() else value for name, value in tensors.items()}
    inputs = tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
    _RECOMPUTING.add(module)
    try:
        return torch.func.functional_call(module, state, inputs)
    finally:
        _RECOMPUTING.discard(module)


def needs_float32_readout(model: Any) -> bool:
    """Whether the model runs in a dtype other than float32 (its weights or its unembedding), so that its own logits
    would be read at that precision. A float32 model's layout is never looked into."""
    head = model.get_output_embeddings()
    return next(model.parameters()).dtype != torch.float32 or head.weight.dtype != torch.float32


def float32_unembed(
    hidden: Float[Tensor, "... d_model"], weight: Float[Tensor, "vocab d_model"], bias: Tensor | None = None
) -> Float[Tensor, "... vocab"]:
    """`hidden @ weight.T + bias` in float32, casting the weight a slice of the vocabulary at a time."""
    hidden = hidden.float()
    rows = max(1024, UNEMBED_SLICE_BYTES // (4 * weight.shape[1]))
    pieces = [
        torch.nn.functional.linear(hidden, weight[start : start + rows].float())
        for start in range(0, weight.shape[0], rows)
    ]
    logits = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
    return logits if bias is None else logits + bias.float()


@contextmanager
def float32_readout(model: Any) -> Iterator[None]:
    """While inside, the model's final norm and unembedding run in float32 and its logits come out float32.
    Nested uses on one model are one use."""
    if not needs_float32_readout(model) or model in _READOUT_ACTIVE:
        yield
        return
    norm = final_norm(model)
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise AfprobeError(
            f"the float32 readout needs a plain Linear unembedding, not {type(head).__name__}: merge the adapter "
            "or run with --dtype float32"
        )
    normed: list[Tensor] = []

    def norm_hook(module: Any, args: tuple, output: Tensor) -> Tensor | None:
        if module in _RECOMPUTING:
            return None
        exact = call_in_float32(module, args)
        scale = output.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-6)
        mismatch = (exact.detach() - output.detach().float()).abs() > NORM_MATCH_TOLERANCE * scale
        if exact.dtype != torch.float32 or mismatch.any():
            raise AfprobeError(
                f"{type(norm).__name__} recomputed in float32 does not match the model's own final norm: "
                "run this model with --dtype float32"
            )
        return exact

    def head_pre_hook(module: Any, args: tuple) -> tuple:
        normed.append(args[0])
        # The model's own low-precision logits are replaced below, so the unembedding itself multiplies nothing.
        return (args[0].narrow(-2, 0, 0).to(module.weight.dtype),)

    def head_hook(module: Any, args: tuple, output: Tensor) -> Tensor:
        return float32_unembed(normed.pop(), module.weight, module.bias)

    _READOUT_ACTIVE.add(model)
    try:
        with removing([]) as handles:
            handles.append(norm.register_forward_hook(norm_hook))
            handles.append(head.register_forward_pre_hook(head_pre_hook))
            handles.append(head.register_forward_hook(head_hook))
            yield
    finally:
        _READOUT_ACTIVE.discard(model)


@contextmanager
def float32_compute(model: Any) -> Iterator[None]:
    """While inside, the model computes in float32 though its weights stay in their own dtype (see the module)."""
    blocks = decoder_layers(model)
    original = {
        tensor: tensor.dtype
        for block in blocks
        for tensor in (*block.parameters(), *block.buffers())
        if tensor.is_floating_point() and tensor.dtype != torch.float32
    }
    if not original and not needs_float32_readout(model):
        yield
        return

    def cast(block: torch.nn.Module, up: bool) -> None:
        for tensor in (*block.parameters(), *block.buffers()):
            if tensor in original:
                tensor.data = tensor.data.float() if up else tensor.data.to(original[tensor])

    def embed_hook(module: Any, args: tuple, output: Tensor) -> Tensor | None:
        # Recomputed, not cast: a scaled embedding (Gemma's) would otherwise round its product in bf16. Rotary
        # tables and the attention mask follow the hidden state's dtype, so they are built in float32 too.
        return None if module in _RECOMPUTING else call_in_float32(module, args)

    def block_pre_hook(module: Any, args: tuple) -> None:
        cast(module, up=True)

    def block_hook(module: Any, args: tuple, output: Any) -> None:
        cast(module, up=False)

    try:
        with removing([]) as handles, float32_readout(model):
            _COMPUTING_FLOAT32.add(model)
            handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
            for block in blocks:
                handles.append(block.register_forward_pre_hook(block_pre_hook))
                handles.append(block.register_forward_hook(block_hook))
            yield
    finally:
        _COMPUTING_FLOAT32.discard(model)
        for block in blocks:  # a forward that raised inside a block leaves that block cast up
            cast(block, up=False)
