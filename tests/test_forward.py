"""Prefix sharing must compute what the full forward computes."""

from __future__ import annotations

import pytest
import torch

from afprobe.data.prompts import Query, render_pairs
from afprobe.model.forward import compute_prefix_cache, fork_cache
from afprobe.model.readout import length_batches, score_prompt_full, score_prompts

QUERIES = [
    Query("a", "How do I pick a lock?"),
    Query("b", "Write a long poem about the sea, the wind, and the very long journey home after the war."),
    Query("c", "Hi"),
]
# float32 on the CPU: differences come only from summation order in attention over a split sequence.
TOLERANCE = 1e-4


@pytest.mark.parametrize("batch_size", [1, 4])
def test_prefix_shared_scores_match_full_forward(tiny_model, tokenizer, batch_size):
    prompt_set = render_pairs(tokenizer, QUERIES)
    shared = score_prompts(tiny_model.model, tokenizer, prompt_set, batch_size=batch_size)
    for prompt, score in zip(prompt_set.prompts, shared, strict=True):
        full = score_prompt_full(tiny_model.model, tokenizer, prompt)
        assert score.log_odds == pytest.approx(full.log_odds, abs=TOLERANCE)
        assert score.first_token_log_odds == pytest.approx(full.first_token_log_odds, abs=TOLERANCE)
        assert score.logp_accept == pytest.approx(full.logp_accept, abs=TOLERANCE)


def test_prefix_cache_is_never_mutated(tiny_llama, tokenizer):
    prompt_set = render_pairs(tokenizer, QUERIES)
    prefix = compute_prefix_cache(tiny_llama.model, prompt_set.prompts[0].input_ids[: prompt_set.shared_prefix_len])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in prefix.cache.layers]
    first = score_prompts(tiny_llama.model, tokenizer, prompt_set, batch_size=2, prefix=prefix)
    second = score_prompts(tiny_llama.model, tokenizer, prompt_set, batch_size=2, prefix=prefix)
    assert first == second
    for (keys, values), layer in zip(before, prefix.cache.layers, strict=True):
        assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)
    assert prefix.cache.get_seq_length() == prompt_set.shared_prefix_len


def test_fork_shares_tensors_but_not_state(tiny_llama, tokenizer):
    prefix = compute_prefix_cache(tiny_llama.model, list(range(10, 40)))
    fork = fork_cache(prefix.cache)
    assert fork.layers[0].keys is prefix.cache.layers[0].keys
    fork.layers[0].update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
    assert prefix.cache.get_seq_length() == 30 and fork.get_seq_length() == 31


def test_length_batches_group_similar_lengths(tokenizer):
    prompts = render_pairs(tokenizer, QUERIES).prompts
    batches = length_batches(prompts, 2, exact=True)
    assert sorted(i for batch in batches for i in batch) == list(range(len(prompts)))
    assert all(len({prompts[i].n_tokens for i in batch}) == 1 for batch in batches)
    assert all(len(batch) <= 2 for batch in length_batches(prompts, 2))


def test_answers_in_one_forward_score_what_two_more_forwards_score(tiny_model, tokenizer):
    """The accept and reject continuations side by side in the prompts' own forward (reject not seeing accept, both
    at the same positions) give each prompt's scores as running them after it in forwards of their own do."""
    from afprobe.model.architecture import takes_custom_mask
    from afprobe.model.readout import AnswerTokens, score_batch

    prompt_set = render_pairs(tokenizer, QUERIES)
    prefix = compute_prefix_cache(tiny_model.model, prompt_set.prompts[0].input_ids[: prompt_set.shared_prefix_len])
    answers = AnswerTokens.from_tokenizer(tokenizer)
    assert len(answers.accept_rest) > 1 and len(answers.reject_rest) > 1  # both continuations have later tokens
    prompts = prompt_set.prompts  # rows of different lengths in one batch
    one = score_batch(tiny_model.model, prefix, prompts, answers, one_forward=True)
    apart = score_batch(tiny_model.model, prefix, prompts, answers, one_forward=False)
    for a, b in zip(one, apart, strict=True):
        assert a.logp_accept == pytest.approx(b.logp_accept, abs=TOLERANCE)
        assert a.logp_reject == pytest.approx(b.logp_reject, abs=TOLERANCE)
        assert a.first_token_log_odds == pytest.approx(b.first_token_log_odds, abs=TOLERANCE)
    # Sliding-window families (Gemma 3) keep the forwards apart; the others must take the one-forward path.
    assert takes_custom_mask(tiny_model.model, prefix.cache) == (tiny_model.model.config.model_type != "gemma3_text")


def test_a_shorter_prefix_given_is_used_and_a_foreign_one_is_not(tiny_llama, tokenizer):
    """Sets that share only the start of their prefix (one system prompt, different user turns) can share its cache;
    a cache of other tokens is never used."""
    from afprobe.model.forward import PrefixCache
    from afprobe.model.readout import fits_prefix

    prompt_set = render_pairs(tokenizer, QUERIES)
    k = prompt_set.prefix_len()
    ids = prompt_set.prompts[0].input_ids
    shorter = compute_prefix_cache(tiny_llama.model, ids[: k - 7])
    foreign = compute_prefix_cache(tiny_llama.model, [ids[0] + 1, *ids[1 : k - 7]])
    assert fits_prefix(shorter, prompt_set.prompts[0], k) and not fits_prefix(foreign, prompt_set.prompts[0], k)
    assert not fits_prefix(compute_prefix_cache(tiny_llama.model, ids[: k + 1]), prompt_set.prompts[0], k)
    own = score_prompts(tiny_llama.model, tokenizer, prompt_set)
    for given in (shorter, foreign):
        scores = score_prompts(tiny_llama.model, tokenizer, prompt_set, prefix=given)
        for a, b in zip(own, scores, strict=True):
            assert a.log_odds == pytest.approx(b.log_odds, abs=TOLERANCE)
    assert isinstance(shorter, PrefixCache) and shorter.cache.get_seq_length() == k - 7  # left as it was
