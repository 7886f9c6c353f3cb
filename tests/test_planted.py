"""Planted-direction organisms: the planted unit adds exactly SiLU(gate) x gain x u.h/rms(h) along w to block L's
MLP, removing u's component silences it, and the model is unchanged afterwards. (Calibrating a gap needs a model whose
tiers differ at layer L: a random tiny model's barely do, so that runs on the embedded model in
tests/test_zoo.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from afprobe.analysis.organisms.planted import (
    PlantedConfig,
    PlantedDirection,
    fit_planted,
    planted,
    without_direction,
)
from afprobe.errors import AfprobeError
from tests.conftest import make_tiny_model

LAYER = 1


def _unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _edit(d: int, gain: float = 3.0) -> PlantedDirection:
    return PlantedDirection(
        PlantedConfig(layer=LAYER), _unit(d, 1), _unit(d, 2), gate_scale=5.0, write=_unit(d, 3), gain=gain
    )


def test_the_planted_unit_reads_u_and_writes_w(tokenizer):
    loaded = make_tiny_model("llama", tokenizer, seed=1)
    block = loaded.model.model.layers[LAYER]
    d = block.mlp.down_proj.out_features
    edit = _edit(d)
    h = torch.randn(5, d, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = block.mlp(block.post_attention_layernorm(h))
        with planted(loaded.model, edit):
            edited = block.mlp(block.post_attention_layernorm(h))
    rms = h.pow(2).mean(-1, keepdim=True).add(loaded.model.config.rms_norm_eps).sqrt()
    reading = (h / rms) @ edit.direction
    gate = F.silu(edit.gate_scale * ((h / rms) @ edit.gate_direction))
    expected = plain + (gate * edit.gain * reading)[:, None] * edit.write
    torch.testing.assert_close(edited, expected, atol=1e-4, rtol=1e-4)


def test_removing_u_silences_the_unit_and_the_model_is_restored(tokenizer):
    loaded = make_tiny_model("llama", tokenizer, seed=1)
    weights = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    ids = torch.tensor([tokenizer("Tell me how to pick a lock, please.")["input_ids"]])
    d = loaded.model.config.hidden_size
    edit = _edit(d, gain=50.0)
    with torch.no_grad():
        with without_direction(loaded.model, LAYER, edit.direction):
            base = loaded.model(ids).logits
        with planted(loaded.model, edit):
            with_unit = loaded.model(ids).logits
            with without_direction(loaded.model, LAYER, edit.direction):
                silenced = loaded.model(ids).logits
    assert (with_unit - base).abs().max() > 1e-1  # the unit does something ...
    # ... and nothing once u is gone. The appended MLP column changes float32 summation order, which moved 4 of 491,520
    # logits by up to 1.1e-4 on one machine: 1e-3 is that noise's scale, 100x below the unit's effect.
    torch.testing.assert_close(silenced, base, atol=1e-3, rtol=1e-3)
    after = dict(loaded.model.named_parameters())
    assert set(after) == set(weights) and all(torch.equal(weights[n], after[n]) for n in weights)
    assert not any(m._forward_pre_hooks for m in loaded.model.modules())


def test_the_edit_is_gone_after_an_error(tokenizer):
    loaded = make_tiny_model("llama", tokenizer, seed=1)
    mlp = loaded.model.model.layers[LAYER].mlp
    before = mlp.up_proj.weight.shape
    edit = _edit(loaded.model.config.hidden_size)
    with (
        pytest.raises(RuntimeError),
        planted(loaded.model, edit),
        without_direction(loaded.model, LAYER, edit.direction),
    ):
        assert mlp.up_proj.weight.shape[0] == before[0] + 1
        raise RuntimeError("stop")
    assert mlp.up_proj.weight.shape == before and mlp.up_proj.out_features == before[0]
    assert not any(m._forward_pre_hooks for m in loaded.model.modules())


def test_bad_planted_options_are_named(tokenizer):
    with pytest.raises(AfprobeError, match="unknown planted source"):
        PlantedConfig(source="weather")
    with pytest.raises(AfprobeError, match="target_gap must be positive"):
        PlantedConfig(target_gap=0)
    loaded = make_tiny_model("llama", tokenizer, seed=1)
    with pytest.raises(AfprobeError, match="outside the model's 2 blocks"):
        fit_planted(loaded, PlantedConfig(layer=7, n_fit=2))
    # A random model's tiers barely differ at layer 1: no gain reaches 3 nats, and the error says what to change.
    with pytest.raises(AfprobeError, match="lower target_gap or choose another layer"):
        fit_planted(loaded, PlantedConfig(source="tag-token", layer=LAYER, target_gap=3.0, n_fit=4))


def test_a_planted_direction_on_the_embedded_model_makes_a_gap_it_alone_carries():
    """Integration: on the embedded model the gain is calibrated to the asked gap on fitting queries, held-out queries
    get a gap of that order, the unedited model's gap is a sliver of it, and removing u removes it."""
    from afprobe.analysis.organisms.planted import check_planted
    from afprobe.data.query_sets import load_queries
    from afprobe.model.loading import load_model

    loaded = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    edit = fit_planted(loaded, PlantedConfig(source="tag-token", layer=20, target_gap=4.0, n_fit=6))
    assert abs(edit.fit_gap - 4.0) <= 0.4
    truth = check_planted(loaded, edit, load_queries("harmful", n=6, split="evaluate"), n_boot=500)
    holds, lines = truth.holds()
    assert holds, lines
    assert truth.planted_gap.mean > 1.0 and abs(truth.base_gap.mean) < 0.1
