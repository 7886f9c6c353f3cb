from __future__ import annotations

import pytest
import torch

from afprobe.errors import AfprobeError
from afprobe.model.interventions import PositionMask, ablate_directions, add_direction, orthonormal_basis
from afprobe.model.recording import ResidualRecorder

IDS = torch.tensor([[1, 400, 2000, 35, 9000, 12, 77]])


def hook_count(model) -> int:
    # transformers keeps output-recording hooks of its own once hidden states have been asked for, so tests
    # compare counts before and after rather than expecting none.
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_zero_coefficient_changes_nothing(tiny_model):
    model = tiny_model.model
    hooks = hook_count(model)
    before = logits(model)
    direction = torch.randn(tiny_model.d_model)
    with add_direction(model, direction, layers=list(range(tiny_model.n_layers + 1)), coefficient=0.0):
        during = logits(model)
    assert torch.equal(before, during)
    assert hook_count(model) == hooks


def test_hooks_are_removed_even_after_an_error(tiny_llama):
    model = tiny_llama.model
    hooks = hook_count(model)
    before = logits(model)
    with pytest.raises(RuntimeError, match="boom"), add_direction(model, torch.ones(64), layers=[1], coefficient=5.0):
        assert not torch.equal(logits(model), before)
        raise RuntimeError("boom")
    assert hook_count(model) == hooks
    assert torch.equal(logits(model), before)


def test_ablation_leaves_activations_orthogonal(tiny_model):
    model = tiny_model.model
    hooks = hook_count(model)
    n = tiny_model.n_layers
    directions = torch.randn(2, tiny_model.d_model)
    basis = orthonormal_basis(directions)
    recorder = ResidualRecorder(model, list(range(n + 1)))
    positions = [{"all": list(range(IDS.shape[1]))}]
    with ablate_directions(model, directions), recorder.recording(positions) as record, torch.no_grad():
        model(input_ids=IDS)
    for layer in range(n + 1):
        hidden = record["all"][0][layer]
        assert (hidden @ basis).abs().max() < 1e-4 * hidden.norm(dim=-1).max()
    # Without the ablation the same activations do have a component in that subspace.
    with recorder.recording(positions) as plain, torch.no_grad():
        model(input_ids=IDS)
    assert (plain["all"][0][1] @ basis).abs().max() > 1e-2
    assert hook_count(model) == hooks


def test_empty_subspace_ablation_changes_nothing(tiny_llama):
    before = logits(tiny_llama.model)
    with ablate_directions(tiny_llama.model, torch.zeros(3, 64)):
        assert torch.equal(logits(tiny_llama.model), before)


def test_steering_along_a_planted_direction_moves_the_output(tiny_llama):
    """Adding the unembedding difference of two tokens after the last block raises one token's logit over the other."""
    model = tiny_llama.model
    unembed = model.get_output_embeddings().weight
    a, b = 500, 600
    direction = (unembed[a] - unembed[b]).detach()
    margins = []
    for coefficient in (-20.0, 0.0, 20.0):
        with add_direction(model, direction, layers=[tiny_llama.n_layers], coefficient=coefficient):
            out = logits(model)[0, -1]
        margins.append((out[a] - out[b]).item())
    assert margins[0] < margins[1] < margins[2]


def test_position_mask_limits_the_edit(tiny_llama):
    model = tiny_llama.model
    before = logits(model)
    mask = torch.zeros(1, IDS.shape[1], dtype=torch.bool)
    mask[0, -1] = True
    with add_direction(model, torch.randn(64), layers=[1], coefficient=10.0, where=PositionMask(mask)):
        after = logits(model)
    # Causal attention: only the last position (the one edited) can change.
    assert torch.equal(after[0, :-1], before[0, :-1])
    assert not torch.equal(after[0, -1], before[0, -1])


def test_bad_inputs(tiny_llama):
    hooks = hook_count(tiny_llama.model)
    with (
        pytest.raises(AfprobeError, match="zero"),
        add_direction(tiny_llama.model, torch.zeros(64), layers=[0], coefficient=1.0),
    ):
        pass
    with (
        pytest.raises(AfprobeError, match="out of range"),
        add_direction(tiny_llama.model, torch.ones(64), layers=[9], coefficient=1.0),
    ):
        pass
    assert hook_count(tiny_llama.model) == hooks


def test_interventions_work_through_the_transformer_lens_and_nnsight_backends(tiny_llama):
    from afprobe.model.recording import NNsightBackend, TransformerLensBackend

    ids = [1, 400, 2000, 35, 9000]
    hooks = hook_count(tiny_llama.model)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with add_direction(tiny_llama.model, direction, layers=[1], coefficient=5.0):
        expected = logits(tiny_llama.model, torch.tensor([ids]))[0]
    bridge = TransformerLensBackend(tiny_llama, [0, 1, 2])
    bridge.forward(ids, None)
    own_hooks = hook_count(bridge.bridge)  # TransformerLens adds hooks of its own on its first forward
    with add_direction(bridge.bridge, direction, layers=[1], coefficient=5.0):
        through_bridge, _ = bridge.forward(ids, None)
    nnsight = NNsightBackend(tiny_llama, [0, 1, 2])
    with add_direction(nnsight.wrapped, direction, layers=[1], coefficient=5.0):
        through_nnsight, _ = nnsight.forward(ids, None)
    # The backends wrap copies: the user's modules keep their own forward, and the weights are not duplicated
    # by nnsight's copy.
    assert not any("forward" in module.__dict__ for module in tiny_llama.model.modules())
    assert nnsight.wrapped.model.embed_tokens.weight is tiny_llama.model.model.embed_tokens.weight
    torch.testing.assert_close(through_bridge, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(through_nnsight, expected, atol=1e-4, rtol=0)
    assert hook_count(tiny_llama.model) == hooks and hook_count(bridge.bridge) == own_hooks
