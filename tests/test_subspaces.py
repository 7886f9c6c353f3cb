"""Learned subspaces (DAS) on tiny random models whose gap is planted, by a weight edit, to run through a known
direction, around it, or nowhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from afprobe.analysis.patching import make_pairs
from afprobe.analysis.subspaces import (
    aligned_tail,
    covariance_matched_subspaces,
    interchange_share,
    learn_subspace,
    without_tier_means,
)
from afprobe.data.prompts import PromptConfig, render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.errors import AfprobeError
from afprobe.model.architecture import decoder_layers
from afprobe.model.forward import compute_prefix_cache
from afprobe.model.patching import Patcher
from afprobe.model.readout import AnswerTokens
from tests.conftest import make_tiny_model

LAYER = 1  # entering the second (last) block, which the edit silences: this residual is what the readout sees
N_QUERIES = 16  # the first 10 fit, the last 6 evaluate


class Planted:
    """A tiny Llama whose accept-minus-reject logit reads exactly one unit direction of the layer-1 residual.

    The edit: the last block writes nothing (its attention and MLP output projections are zero), the unembedding is
    untied, and the reject row is the accept row minus `scale x readout`. So the log-odds at the decision position are
    scale x readout . RMSNorm(h), h the layer-1 residual: a gap runs through `readout` and through nothing else.
    `readout="gap"`: the readout is the direction the two tiers' residuals differ along on average, and it is the
    `named` direction under test. "orthogonal": the named direction and the readout are orthogonal, and the tiers
    differ along both, so the gap runs *around* the named direction.
    """

    def __init__(self, tokenizer, readout: str, *, seed: int = 3, silence_tag: bool = False):
        self.loaded = make_tiny_model("llama", tokenizer, seed=seed)
        model = self.loaded.model
        last = decoder_layers(model)[-1]
        with torch.no_grad():
            last.self_attn.o_proj.weight.zero_()
            last.mlp.down_proj.weight.zero_()
            if silence_tag:  # both tags embed alike: no gap can exist
                embedding = model.get_input_embeddings().weight
                ids = [tokenizer.convert_tokens_to_ids(t) for t in ("True", "False")]
                embedding[ids[1]] = embedding[ids[0]]
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        queries = load_queries("harmful")[:N_QUERIES]
        self.prompt_set = render_pairs(tokenizer, queries, PromptConfig())
        self.pairs = make_pairs(self.prompt_set)
        self.answers = AnswerTokens.from_tokenizer(tokenizer)
        patcher = self._patcher()
        difference = torch.stack(
            [
                patcher.record(p.trained).resid[LAYER, -1] - patcher.record(p.untrained).resid[LAYER, -1]
                for p in self.pairs
            ]
        ).mean(0)
        generator = torch.Generator().manual_seed(seed)
        if difference.norm() == 0:  # silenced tags: the tiers do not differ anywhere
            difference = torch.randn(difference.shape[0], generator=generator)
        self.mean_difference = difference / difference.norm()
        other = torch.randn(difference.shape[0], generator=generator)
        other -= (other @ self.mean_difference) * self.mean_difference
        other /= other.norm()
        if readout == "gap":
            self.named = self.readout = self.mean_difference
        else:  # two orthogonal directions the tiers both differ along (by |difference| / sqrt 2)
            self.named = (self.mean_difference + other) / 2**0.5
            self.readout = (self.mean_difference - other) / 2**0.5
        with torch.no_grad():
            accept, reject = self.answers.accept_rest[0], self.answers.reject_rest[0]
            model.lm_head.weight[reject] = model.lm_head.weight[accept] - 400.0 * self.readout
        self.patcher = self._patcher()

    def _patcher(self) -> Patcher:
        prefix = compute_prefix_cache(
            self.loaded.model, self.prompt_set.prompts[0].input_ids[: self.prompt_set.shared_prefix_len]
        )
        return Patcher(self.loaded.model, prefix, self.answers)

    def interchanges(self, pairs):
        out = []
        for pair in pairs:
            trained, untrained = (self.patcher.record(p, for_grad=True) for p in (pair.trained, pair.untrained))
            out += [aligned_tail(untrained, trained), aligned_tail(trained, untrained, orientation=-1)]
        return out


@pytest.fixture(scope="module")
def through(tokenizer):
    return Planted(tokenizer, "gap")


@pytest.fixture(scope="module")
def around(tokenizer):
    return Planted(tokenizer, "orthogonal")


def test_a_learned_subspace_finds_the_planted_direction_and_carries_the_held_out_gap(through):
    fit, held_out = through.interchanges(through.pairs[:10]), through.interchanges(through.pairs[10:])
    assert np.mean([abs(e.gap) for e in held_out]) > 1.0  # the edit made a gap of nats
    weights = [p.detach().clone() for p in through.loaded.model.parameters()]
    learned = learn_subspace(through.patcher, fit, LAYER, 1, steps=40, lr=0.05, seed=0)
    assert learned.losses[-1] < 0.1 * learned.losses[0]
    assert learned.cosine(through.readout) > 0.9
    # The model is as it was, and got no gradients.
    assert all(torch.equal(a, b) for a, b in zip(weights, through.loaded.model.parameters(), strict=True))
    assert all(p.grad is None for p in through.loaded.model.parameters())
    share = interchange_share(through.patcher, held_out, learned.basis, LAYER, fitted_on=learned.fit_queries)
    assert share.ci_low > 0.8 and share.share == pytest.approx(1.0, abs=0.1)
    # Random 1-d subspaces drawn like the data carry far less.
    activations = torch.stack([e.receiver.resid[LAYER, -1] for e in fit])
    nulls = [
        interchange_share(through.patcher, held_out, basis, LAYER).share
        for basis in covariance_matched_subspaces(activations, 1, 20, seed=1)
    ]
    assert max(abs(v) for v in nulls) < 0.5
    # Evaluating on a query the subspace was fitted on is refused.
    with pytest.raises(AfprobeError, match="used to fit this subspace"):
        interchange_share(through.patcher, fit[:2], learned.basis, LAYER, fitted_on=learned.fit_queries)


def test_a_gap_that_runs_around_a_direction_is_not_carried_by_it(around):
    fit, held_out = around.interchanges(around.pairs[:10]), around.interchanges(around.pairs[10:])
    assert np.mean([abs(e.gap) for e in held_out]) > 1.0
    tier_difference = torch.stack(
        [e.donor.resid[LAYER, -1] - e.receiver.resid[LAYER, -1] for e in held_out if e.orientation == 1]
    ).mean(0)
    assert tier_difference @ around.named > 0.3 * tier_difference.norm()  # the tiers differ along it
    carried = interchange_share(around.patcher, held_out, around.named.reshape(-1, 1), LAYER)
    assert abs(carried.share) < 0.1
    # A learned subspace still carries the gap, but it is not the named direction. (Which subspace it is, is not
    # identified here: every tier difference points the same way, so any b with (difference . b)(readout . b) =
    # difference . readout interchanges exactly, the readout and the mean difference among them.)
    learned = learn_subspace(around.patcher, fit, LAYER, 1, steps=40, lr=0.05, seed=0)
    assert interchange_share(around.patcher, held_out, learned.basis, LAYER).ci_low > 0.8
    assert learned.cosine(around.named) < 0.8


def test_the_same_seed_learns_the_same_subspace(around):
    fit = around.interchanges(around.pairs[:6])
    torch.manual_seed(1)
    before = torch.random.get_rng_state()
    first = learn_subspace(around.patcher, fit, LAYER, 2, steps=6, lr=0.05, seed=0, batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is not drawn from
    torch.manual_seed(2)  # another global state: once it reached the parametrisation's base and the result
    again = learn_subspace(around.patcher, fit, LAYER, 2, steps=6, lr=0.05, seed=0, batch_size=4)
    other = learn_subspace(around.patcher, fit, LAYER, 2, steps=6, lr=0.05, seed=1, batch_size=4)
    assert torch.equal(first.basis, again.basis) and first.losses == again.losses
    assert not torch.equal(first.basis, other.basis)


def test_no_gap_means_nothing_to_learn(tokenizer):
    silent = Planted(tokenizer, "gap", silence_tag=True)
    examples = silent.interchanges(silent.pairs[:4])
    assert all(e.gap == 0.0 for e in examples)
    with pytest.raises(AfprobeError, match="nothing for a subspace to carry"):
        learn_subspace(silent.patcher, examples, LAYER, 1, steps=2)


def test_the_null_is_drawn_without_the_tier_difference():
    """Rules v4: where the tier difference dominates the residual's variance, random subspaces drawn from all the rows
    lie along it (the null would already hold the effect); drawn without the tier means, they lie along it no more
    than along any direction of the same within-tier variance. Position structure is kept."""
    generator = torch.Generator().manual_seed(0)
    d, pairs, pos = 16, 40, 3
    positions = torch.randn(pos, d, generator=generator)
    tier = torch.zeros(d)
    tier[0] = 20.0  # the effect: far beyond the within-tier spread of 1
    trained = positions + tier + torch.randn(pairs, pos, d, generator=generator)
    untrained = positions + torch.randn(pairs, pos, d, generator=generator)
    rows = without_tier_means(trained, untrained)
    assert rows.shape == (2 * pairs * pos, d)
    assert torch.allclose(rows.reshape(2, pairs, pos, d).mean(1)[0], rows.reshape(2, pairs, pos, d).mean(1)[1])
    e0 = torch.zeros(d)
    e0[0] = 1.0

    def along_tier(activations):
        bases = covariance_matched_subspaces(activations, 1, 200, seed=2)
        return float(torch.stack([(b.T @ e0).norm() for b in bases]).mean())

    with_effect = along_tier(torch.cat([trained, untrained]).reshape(-1, d))
    without = along_tier(rows)
    assert with_effect > 0.6  # the old null: random directions lie mostly along the tier direction
    assert without < 0.3  # the v4 null: e0 is one direction among the data's others
