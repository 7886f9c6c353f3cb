"""Planted-direction organisms: the planted unit adds exactly SiLU(gate) x gain x u.h/rms(h) along w to block L's
output, reading block L's input (the stream afprobe patches at layer L, after any patch), removing u's component
silences it, and the model is unchanged afterwards. (Calibrating a gap needs a model whose tiers differ at layer L: a
random tiny model's barely do, so that runs on the embedded model below and in tests/test_zoo.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from afprobe.analysis.organisms.planted import PlantedConfig, PlantedDirection, fit_planted, planted
from afprobe.errors import AfprobeError
from afprobe.model.architecture import residual_hooks, untuple
from tests.conftest import make_tiny_model

LAYER = 1


def _unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _edit(d: int, gain: float = 3.0) -> PlantedDirection:
    return PlantedDirection(
        PlantedConfig(layer=LAYER), _unit(d, 1), _unit(d, 2), gate_scale=5.0, write=_unit(d, 3), gain=gain
    )


def _expected_unit(edit: PlantedDirection, h: torch.Tensor, eps: float) -> torch.Tensor:
    x = h / h.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    return (F.silu(edit.gate_scale * (x @ edit.gate_direction)) * edit.gain * (x @ edit.direction))[..., None] * (
        edit.write
    )


def _block_io(model, ids, *, hooks=None):
    """Block LAYER's input (after every pre-hook) and output in one forward of `ids`, with residual hooks while it
    runs; registered after the planted unit's hook, so the output includes the unit."""
    seen = {}

    def keep(module, args, kwargs, output):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).clone()
        seen["out"] = untuple(output).clone()

    handle = model.model.layers[LAYER].register_forward_hook(keep, with_kwargs=True)
    try:
        with residual_hooks(model, hooks or {}), torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return seen["in"], seen["out"]


def test_the_planted_unit_reads_the_block_input_and_writes_w(tokenizer):
    loaded = make_tiny_model("llama", tokenizer, seed=1)
    model = loaded.model
    ids = torch.tensor([tokenizer("Tell me how to pick a lock, please.")["input_ids"]])
    edit = _edit(model.config.hidden_size)
    _, plain = _block_io(model, ids)
    with planted(model, edit):
        given, edited = _block_io(model, ids)
    expected = plain + _expected_unit(edit, given, model.config.rms_norm_eps)
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-5)
    assert (edited - plain).abs().max() > 1e-2


def test_the_planted_unit_reads_the_stream_as_patched_at_its_layer(tokenizer):
    """The verdict patches residual layer L with a pre-hook on block L: the unit must read the patched stream, so
    that setting u's component there is exactly what the unit sees."""
    loaded = make_tiny_model("llama", tokenizer, seed=1)
    model = loaded.model
    ids = torch.tensor([tokenizer("Tell me how to pick a lock, please.")["input_ids"]])
    edit = _edit(model.config.hidden_size)
    shift = 4.0 * edit.direction
    patch = {LAYER: lambda h: h + shift}
    clean_in, _ = _block_io(model, ids)
    _, plain_patched_out = _block_io(model, ids, hooks=patch)
    with planted(model, edit):
        patched_in, patched_out = _block_io(model, ids, hooks=patch)
    torch.testing.assert_close(patched_in, clean_in + shift)
    eps = model.config.rms_norm_eps
    unit = _expected_unit(edit, patched_in, eps)
    torch.testing.assert_close(patched_out, plain_patched_out + unit, atol=1e-5, rtol=1e-5)
    assert (unit - _expected_unit(edit, clean_in, eps)).abs().max() > 1e-1  # the patch reached the unit


def test_removing_u_silences_the_unit_and_the_model_is_restored(tokenizer):
    loaded = make_tiny_model("llama", tokenizer, seed=1)
    weights = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    ids = torch.tensor([tokenizer("Tell me how to pick a lock, please.")["input_ids"]])
    edit = _edit(loaded.model.config.hidden_size, gain=50.0)
    with torch.no_grad():
        base = loaded.model(ids).logits
        with planted(loaded.model, edit):
            with_unit = loaded.model(ids).logits
        with planted(loaded.model, edit, remove_direction=True):
            silenced = loaded.model(ids).logits
    assert (with_unit - base).abs().max() > 1e-1  # the unit does something ...
    # ... and nothing once u is gone. Float32 rounding leaves a projected reading of ~1e-7 |h|, which gain 50 turns
    # into logit changes up to 1.5e-4 here: 1e-3 is that noise's scale, 100x below the unit's effect.
    torch.testing.assert_close(silenced, base, atol=1e-3, rtol=1e-3)
    after = dict(loaded.model.named_parameters())
    assert set(after) == set(weights) and all(torch.equal(weights[n], after[n]) for n in weights)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.model.modules())


def test_the_edit_is_gone_after_an_error(tokenizer):
    loaded = make_tiny_model("llama", tokenizer, seed=1)
    block = loaded.model.model.layers[LAYER]
    edit = _edit(loaded.model.config.hidden_size)
    with pytest.raises(RuntimeError), planted(loaded.model, edit):
        assert block._forward_hooks
        raise RuntimeError("stop")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.model.modules())


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
