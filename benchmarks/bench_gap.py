"""Forward-pass compliance scoring: afprobe's prefix sharing against the naive per-prompt way, in one run.

The naive way a user would write: for every prompt, run the whole prompt (3,000+ tokens of system prompt) with the
accept continuation appended, and again with the reject continuation appended. A cheaper naive variant runs the
whole prompt once and reads only the first divergent token. afprobe runs the shared prefix once and only each
prompt's own tokens after it, with both continuations side by side in that one forward; the same with the
continuations in two more forwards of their own (afprobe before 2026-12-03) is timed too.

    python benchmarks/bench_gap.py --pairs 3

Prints seconds per pair for each way, the ratios, and the largest difference in log-odds (correctness check).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from afprobe.data.prompts import render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.model.forward import compute_prefix_cache
from afprobe.model.loading import load_model
from afprobe.model.readout import AnswerTokens, score_batch, score_prompt_full, score_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--naive-pairs", type=int, default=None, help="pairs for the naive ways (default: --pairs)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    loaded = load_model(args.model)
    queries = load_queries("harmful", n=args.pairs)
    prompt_set = render_pairs(loaded.tokenizer, queries, max_context=loaded.max_context)
    prompts = prompt_set.prompts
    n_naive = 2 * (args.naive_pairs or args.pairs)
    print(
        f"model {loaded.fingerprint.name}, {torch.get_num_threads()} threads, device {loaded.device}; "
        f"{len(queries)} pairs, prompts of {prompt_set.max_tokens} tokens, shared prefix {prompt_set.shared_prefix_len}"
    )

    start = time.perf_counter()
    prefix = compute_prefix_cache(loaded.model, prompts[0].input_ids[: prompt_set.shared_prefix_len])
    prefix_seconds = time.perf_counter() - start
    start = time.perf_counter()
    shared = score_prompts(loaded.model, loaded.tokenizer, prompt_set, batch_size=1, prefix=prefix)
    continuation_seconds = time.perf_counter() - start
    afprobe_per_pair = (prefix_seconds + continuation_seconds) / len(queries)

    answers = AnswerTokens.from_tokenizer(loaded.tokenizer)
    start = time.perf_counter()
    apart = [score_batch(loaded.model, prefix, [p], answers, one_forward=False)[0] for p in prompts]
    apart_seconds = time.perf_counter() - start

    start = time.perf_counter()
    naive = [score_prompt_full(loaded.model, loaded.tokenizer, p) for p in prompts[:n_naive]]
    naive_per_pair = (time.perf_counter() - start) / (n_naive / 2)

    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts[:n_naive]:
            ids = torch.tensor([list(prompt.input_ids) + list(answers.common)], device=loaded.device)
            loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    naive_single_per_pair = (time.perf_counter() - start) / (n_naive / 2)

    worst = max(abs(a.log_odds - b.log_odds) for a, b in zip(shared, naive, strict=False))
    worst_apart = max(abs(a.log_odds - b.log_odds) for a, b in zip(shared, apart, strict=True))
    own_tokens = sum(p.n_tokens - prompt_set.shared_prefix_len for p in prompts) / len(prompts)
    print(f"shared prefix once:               {prefix_seconds:8.2f} s")
    print(f"continuations ({own_tokens:.0f} tokens each): {continuation_seconds / len(prompts):8.2f} s per prompt")
    print(f"afprobe (prefix amortised):       {afprobe_per_pair:8.2f} s per pair")
    print(
        f"continuations in their own forwards: {apart_seconds / len(prompts):5.2f} s per prompt "
        f"-> {apart_seconds / continuation_seconds:5.2f}x the one-forward continuations"
    )
    print(
        f"naive, whole continuations:       {naive_per_pair:8.2f} s per pair  "
        f"-> {naive_per_pair / afprobe_per_pair:5.1f}x"
    )
    print(
        f"naive, first token only:          {naive_single_per_pair:8.2f} s per pair  "
        f"-> {naive_single_per_pair / afprobe_per_pair:5.1f}x"
    )
    print(f"max |log-odds difference| vs naive: {worst:.2e}; one forward vs apart: {worst_apart:.2e}")


if __name__ == "__main__":
    main()
