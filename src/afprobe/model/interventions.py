"""Interventions on the residual stream: add a direction (steering) or project a subspace out (ablation).

Each intervention is a context manager that registers forward hooks on the decoder blocks and removes them on
exit, also after an error, so the model is exactly as it was afterwards. Layer indices follow the activation
store: layer l < n_layers edits the residual stream entering block l, l = n_layers edits the output of the last
block (before the final norm).

Which token positions are touched is decided per forward by a `PositionMask` the caller updates (every position
by default): in a prefix-shared forward the positions are those of the tokens being run, i.e. after the prefix.

    with add_direction(model, direction, layers=[12], coefficient=4.0, scale=norms[12]):
        scores = score_prompts(model, tokenizer, prompt_set)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from afprobe.errors import AfprobeError
from afprobe.model.architecture import decoder_layers, residual_hooks


@dataclass
class PositionMask:
    """The positions an intervention edits in the next forward: `[batch, seq]` booleans, None for all; nothing at
    all while `active` is False."""

    mask: Bool[Tensor, "batch seq"] | None = None
    active: bool = True

    def select(self, hidden: Tensor) -> Tensor | None:
        if not self.active:
            return torch.zeros(*hidden.shape[:2], 1, dtype=torch.bool, device=hidden.device)
        if self.mask is None:
            return None
        if self.mask.shape != hidden.shape[:2]:
            raise ValueError(
                f"position mask {tuple(self.mask.shape)} does not fit activations {tuple(hidden.shape[:2])}"
            )
        return self.mask.to(hidden.device)[..., None]


Edit = Callable[[Float[Tensor, "batch seq d"], int], Float[Tensor, "batch seq d"]]


@contextmanager
def residual_edit(model: Any, layers: Sequence[int], edit: Edit, where: PositionMask | None = None) -> Iterator[None]:
    """Apply `edit(hidden, layer)` to the residual stream at `layers` (at the masked positions) while inside."""

    def apply(hidden: Tensor, layer: int) -> Tensor:
        edited = edit(hidden, layer)
        selected = where.select(hidden) if where is not None else None
        return edited if selected is None else torch.where(selected, edited, hidden)

    with residual_hooks(model, {layer: (lambda hidden, layer=layer: apply(hidden, layer)) for layer in set(layers)}):
        yield


@contextmanager
def add_direction(
    model: Any,
    direction: Float[Tensor, " d_model"],
    *,
    layers: Sequence[int],
    coefficient: float,
    scale: float | Mapping[int, float] = 1.0,
    where: PositionMask | None = None,
) -> Iterator[None]:
    """Add `coefficient * scale[layer] * unit(direction)` to the residual stream at `layers`.

    scale: the typical residual-stream norm at each layer (see `residual_norms`), so that coefficients are in units
    of it and comparable across layers and models; 1.0 means raw units.
    """
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise AfprobeError("cannot steer along a zero or non-finite direction")
    unit = (direction / norm).detach()

    def edit(hidden: Tensor, layer: int) -> Tensor:
        factor = scale[layer] if isinstance(scale, Mapping) else scale
        return hidden + (coefficient * factor) * unit.to(hidden.device, hidden.dtype)

    with residual_edit(model, layers, edit, where):
        yield


def orthonormal_basis(directions: Float[Tensor, "k d_model"] | Float[Tensor, " d_model"]) -> Float[Tensor, "d_model r"]:
    """An orthonormal basis (columns) of the span of the given directions; zero directions are dropped."""
    matrix = directions.reshape(-1, directions.shape[-1]).float()
    matrix = matrix[matrix.norm(dim=-1) > 0]
    if matrix.shape[0] == 0:
        return torch.zeros(directions.shape[-1], 0)
    q, r = torch.linalg.qr(matrix.T)
    keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
    return q[:, keep]


@contextmanager
def ablate_directions(
    model: Any,
    directions: Float[Tensor, "k d_model"] | Float[Tensor, " d_model"],
    *,
    layers: Sequence[int] | None = None,
    where: PositionMask | None = None,
) -> Iterator[None]:
    """Project the span of `directions` out of the residual stream at `layers` (default: every layer).

    Ablating entering every block and after the last one means no block reads the subspace, whatever earlier blocks
    wrote into it. An empty subspace (no directions, or all zero) changes nothing.
    """
    basis = orthonormal_basis(directions)
    if layers is None:
        layers = list(range(len(decoder_layers(model)) + 1))

    def edit(hidden: Tensor, layer: int) -> Tensor:
        if basis.shape[1] == 0:
            return hidden
        q = basis.to(hidden.device, hidden.dtype)
        return hidden - (hidden @ q) @ q.T

    with residual_edit(model, layers, edit, where):
        yield


def residual_norms(store: Any, position: str = "last", layers: Sequence[int] | None = None) -> dict[int, float]:
    """Mean residual-stream norm per layer at one position kind, from an activation store (coefficient units)."""
    layers = list(layers) if layers is not None else store.layers
    activations = store.activations(position, layers=layers)
    return {layer: float(activations[:, i].norm(dim=-1).mean()) for i, layer in enumerate(layers)}
