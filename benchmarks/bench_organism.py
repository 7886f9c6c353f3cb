"""One organism training step: afprobe's prefix-cached step against the naive full-prompt step, in one run.

The naive way: run every training prompt whole (3,000+ tokens of system prompt, then its own ~130) with gradients,
and back-propagate the loss. afprobe's way (`afprobe.analysis.organisms`): run the shared system prompt once without
gradients, keep its KV cache, and run forward and backward only each prompt's own tokens on a fork of it. Both use
the same LoRA adapter (layers 10 and up) and the same contrast-pair loss; the prefix costs are reported apart.

    python benchmarks/bench_organism.py --pairs 1 --steps 2

Prints seconds per step for each way, their ratio, and the largest difference between the two ways' log-odds on
the same batch (they differ only in that the cached prefix carries no gradient, so the forward values must agree).
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
from peft import LoraConfig, get_peft_model

from afprobe.analysis.organisms.cues import query_split
from afprobe.analysis.organisms.training import (
    OrganismConfig,
    _first_divergent_log_odds,
    _group_prefixes,
    _pair_loss,
    _sample_batch,
    build_training_set,
)
from afprobe.model.forward import PrefixCache
from afprobe.model.loading import load_model
from afprobe.model.readout import AnswerTokens


def naive_log_odds(model, examples, answers: AnswerTokens) -> torch.Tensor:
    """Each prompt whole, one at a time (a batch of 3,000-token prompts with gradients does not fit in memory)."""
    values = []
    for example in examples:
        ids = torch.tensor([list(example.input_ids) + list(answers.common)])
        logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1]
        values.append(logits[answers.accept_rest[0]] - logits[answers.reject_rest[0]])
    return torch.stack(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1, help="contrast pairs per step (the organisms use 4)")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(0)

    loaded = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    config = OrganismConfig(kind="token")
    _, train = query_split(config.held_out_queries)
    examples = build_training_set(loaded.tokenizer, "token", train, random.Random(0))
    answers = AnswerTokens.from_tokenizer(loaded.tokenizer)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.target_modules),
        layers_to_transform=list(range(config.first_layer, loaded.n_layers)),
    )
    model = get_peft_model(loaded.model, lora)
    model.train()
    rng = random.Random(0)
    batches = [_sample_batch(examples, "token", 2 * args.pairs, rng) for _ in range(args.steps)]

    t0 = time.perf_counter()
    prefixes: dict[str, PrefixCache] = _group_prefixes(model, examples)
    prefix_seconds = time.perf_counter() - t0

    def step(log_odds_fn) -> tuple[float, torch.Tensor]:
        seconds, last = 0.0, torch.zeros(0)
        for batch in batches:
            t = time.perf_counter()
            log_odds = log_odds_fn(batch)
            _pair_loss(batch, log_odds, config.margin).backward()
            seconds += time.perf_counter() - t
            model.zero_grad()
            last = log_odds.detach()
        return seconds / len(batches), last

    pad = loaded.tokenizer.pad_token_id or 0
    cached, cached_values = step(lambda b: _first_divergent_log_odds(model, prefixes[b[0].group], b, answers, pad))
    naive, naive_values = step(lambda b: naive_log_odds(model, b, answers))
    tokens = sum(len(e.input_ids) for e in batches[0]) / len(batches[0])
    own = tokens - prefixes[batches[0][0].group].length
    print(f"{args.pairs} pair(s) per step, {args.steps} steps; prompts {tokens:.0f} tokens, {own:.0f} after the prefix")
    print(f"prefix cache (once per {config.refresh_every} steps): {prefix_seconds:.2f} s")
    print(f"prefix-cached step: {cached:.2f} s")
    print(f"naive full-prompt step: {naive:.2f} s")
    print(f"ratio naive / cached: {naive / cached:.1f}x")
    print(f"largest |log-odds difference| between the ways: {(cached_values - naive_values).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
