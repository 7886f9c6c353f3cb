"""Architecture facts every part of afprobe reads the same way.

- Decoder blocks: `decoder_layers` (one table of layouts), `decoder_layers_path` for wrappers such as nnsight's
  envoys, `text_config` for multimodal configs.
- Residual-stream sites: index `l < n_layers` is the input of block `l`, index `n_layers` the output of the last
  block. `residual_hooks` is the one place that hooks them (caching, interventions and patching all use it); the
  hidden state is read with `hidden_state_of` / `untuple`, whatever the block's calling convention.
- The final norm (`final_norm`), which the float32 readout (`afprobe.model.precision`) re-applies.
- Layer specs (`parse_layers`), TransformerLens hook names, cache kinds, the pad id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from afprobe.errors import AfprobeError, ModelLoadError

# Where each supported layout keeps its decoder blocks (Llama, Qwen, Gemma, Mistral, OLMo, Phi / Gemma 3 multimodal /
# GPT-2 / GPT-NeoX / OPT).
DECODER_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
)


def _walk(root: Any, path: str) -> Any:
    module = root
    for attribute in path.split("."):
        module = getattr(module, attribute, None)
        if module is None:
            return None
    return module


# Where the same layouts keep the norm applied to the last block's output before the unembedding.
FINAL_NORM_PATHS = (
    "model.norm",
    "model.language_model.norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",
)


def decoder_layers_path(model: Any) -> str:
    """The attribute path of the decoder blocks (`model.layers` for Llama), for wrappers that mirror the tree."""
    for path in DECODER_LAYER_PATHS:
        if isinstance(_walk(model, path), torch.nn.ModuleList):
            return path
    raise ModelLoadError(f"cannot find the decoder layers of {type(model).__name__}: afprobe supports decoder-only LMs")


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder blocks of a causal LM, in order."""
    return list(_walk(model, decoder_layers_path(model)))


def final_norm(model: Any) -> torch.nn.Module:
    """The norm between the last block and the unembedding (of the base model, under a PEFT wrapper)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    for path in FINAL_NORM_PATHS:
        module = _walk(model, path)
        if isinstance(module, torch.nn.Module):
            return module
    raise ModelLoadError(
        f"cannot find the final norm of {type(model).__name__} (looked at {', '.join(FINAL_NORM_PATHS)}): "
        "run it with --dtype float32"
    )


def text_config(model: Any) -> Any:
    """The language model's config (the text part of a multimodal config)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def pad_token_id(tokenizer: Any) -> int:
    """The id that fills short rows of a batch (masked, so never attended to): pad, else end-of-sequence, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def untuple(output: Any) -> Tensor:
    """The hidden state of a block's output, whether the block returns a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


def hidden_state_of(args: tuple, kwargs: dict[str, Any]) -> Tensor:
    """The hidden state a block is called with, positionally or as `hidden_states=`."""
    return args[0] if args else kwargs["hidden_states"]


# Called with the residual stream `[batch, seq, d_model]` at one site; returns a replacement, or None to leave it.
ResidualHook = Callable[[Float[Tensor, "batch seq d_model"]], Tensor | None]


def register_residual_hook(blocks: Sequence[torch.nn.Module], layer: int, hook: ResidualHook) -> Any:
    """Hook residual index `layer` (a pre-hook on block `layer`, or a post-hook on the last block for
    `layer == len(blocks)`); returns the handle."""
    n_layers = len(blocks)
    if not 0 <= layer <= n_layers:
        raise AfprobeError(f"layer {layer} out of range: this model's residual stream has layers 0..{n_layers}")
    if layer < n_layers:

        def pre_hook(module, args, kwargs):
            replacement = hook(hidden_state_of(args, kwargs))
            if replacement is None:
                return None
            if args:
                return (replacement, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replacement}

        return blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(module, args, output):
        replacement = hook(untuple(output))
        if replacement is None:
            return None
        return (replacement, *output[1:]) if isinstance(output, tuple) else replacement

    return blocks[-1].register_forward_hook(post_hook)


@contextmanager
def removing(handles: list[Any]) -> Iterator[list[Any]]:
    """Yield a list to append hook handles to; every one is removed on exit, whatever happens inside."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def residual_hooks(model: Any, hooks: Mapping[int, ResidualHook]) -> Iterator[None]:
    """Residual-stream hooks at the given layers while inside; all removed on exit, so the model is left as it was."""
    blocks = decoder_layers(model)
    n_layers = len(blocks)
    bad = [layer for layer in hooks if not 0 <= layer <= n_layers]
    if bad:
        raise AfprobeError(f"layers {bad} out of range: this model's residual stream has layers 0..{n_layers}")
    with removing([]) as handles:
        for layer in sorted(hooks):
            handles.append(register_residual_hook(blocks, layer, hooks[layer]))
        yield


def has_sliding_window(cache: Any) -> bool:
    return any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", []))


# Model types whose attention applies a 4-D additive mask exactly as given (each is a tiny family in
# `afprobe.model.families`, where the tests compare such forwards with plain ones).
CUSTOM_MASK_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3"})


def takes_custom_mask(model: Any, cache: Any = None) -> bool:
    """Whether a forward may use a 4-D mask of its own: a family in `CUSTOM_MASK_MODEL_TYPES` without sliding-window
    layers (whose cache drops what is out of the window), judged from the config, and from `cache` when given."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "model_type", None) not in CUSTOM_MASK_MODEL_TYPES:
        return False
    layer_types = getattr(text, "layer_types", None)
    if getattr(text, "sliding_window", None) and not (layer_types and set(layer_types) == {"full_attention"}):
        return False
    return cache is None or not has_sliding_window(cache)


def parse_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """`all`, a comma list (`0,10,20`), ranges (`0-10`, `0-30:6` every 6th), negative indices (`-1` = after the last
    block)."""
    if not isinstance(spec, str):
        items = [int(x) for x in spec]
    elif spec.strip() == "all":
        return list(range(n_layers + 1))
    else:
        items = []
        for part in spec.split(","):
            part = part.strip()
            try:
                part, _, step = part.partition(":")
                if "-" in part[1:]:
                    low, high = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                    items.extend(range(int(low), int(high) + 1, int(step or 1)))
                else:
                    items.append(int(part))
            except ValueError as exc:
                raise AfprobeError(f"cannot read layer {part!r}: use all, 0,5,10, 0-10, 0-30:6 or -1") from exc
    resolved = sorted({item + n_layers + 1 if item < 0 else item for item in items})
    bad = [item for item in resolved if not 0 <= item <= n_layers]
    if bad or not resolved:
        raise AfprobeError(
            f"layer {bad or spec} out of range: this model's residual stream has layers 0..{n_layers} "
            f"({n_layers} = after the last block)"
        )
    return resolved


def hook_name(layer: int, n_layers: int) -> str:
    """The TransformerLens hook name of residual-stream index `layer`."""
    return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"
