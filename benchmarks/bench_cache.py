"""Activation caching: `afprobe cache` against the naive TransformerLens and nnsight ways, in one run.

Three ways over the same paired prompts (afprobe's default system prompt, 3,000+ tokens, embedded model):

1. `afprobe cache` (prefix computed once, each prompt's own tokens on a fork of its KV cache, hooks record the
   residual stream at the tag and last positions, compliance scored in the same forward);
2. the naive TransformerLens way: `TransformerBridge.run_with_cache` on each full prompt, keeping only the
   residual stream (`names_filter`), then slicing the positions;
3. the naive nnsight way: one trace per full prompt saving every layer's input.

The naive ways cost the same for every pair, so they are timed on `--naive-pairs` pairs and reported per pair.
Peak memory of `afprobe cache` is measured in child processes at `--pairs` and `--large-pairs` pairs.

    python benchmarks/bench_cache.py --pairs 32 --large-pairs 128 --naive-pairs 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from afprobe.data.prompts import prompt_positions, render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.model.loading import load_model
from afprobe.store.cache_job import CacheConfig, run_cache
from afprobe.store.reader import ActivationStore

_CHILD = """
import json, sys, time
from afprobe.store.cache_job import CacheConfig, run_cache
config = CacheConfig(**json.loads(sys.argv[1]))
start = time.perf_counter()
summary = run_cache(config)
# VmHWM is this process's own peak resident memory (getrusage's maxrss carries the parent's peak across exec).
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": time.perf_counter() - start, "prefix_seconds": summary.prefix_seconds,
                  "peak_rss_mb": peak_kb / 1024}))
"""


def cache_in_child(config: CacheConfig) -> dict[str, float]:
    """Run `afprobe cache` in a fresh process so its peak memory is its own."""
    from dataclasses import asdict

    result = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(asdict(config))], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def matmul_gflops(m: int, k: int, n: int, repeats: int = 20) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--large-pairs", type=int, default=128)
    parser.add_argument("--naive-pairs", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true", help="skip the child-process memory runs")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = Path(tempfile.mkdtemp(prefix="afprobe-bench-"))

    loaded = load_model(args.model)
    n_layers = loaded.n_layers
    queries = load_queries("harmful", n=max(args.pairs, args.naive_pairs))
    prompt_set = render_pairs(loaded.tokenizer, queries, max_context=loaded.max_context)
    prompts = prompt_set.prompts
    own_tokens = sum(p.n_tokens - prompt_set.shared_prefix_len for p in prompts) / len(prompts)
    print(
        f"model {loaded.fingerprint.name} ({n_layers} layers, d_model {loaded.d_model}), {torch.get_num_threads()} "
        f"threads; prompts of {prompt_set.max_tokens} tokens, shared prefix {prompt_set.shared_prefix_len}, "
        f"{own_tokens:.0f} own tokens per prompt"
    )

    # 1. afprobe cache, in this process (for the activations) -------------------------------------------------------
    config = CacheConfig(out=str(workdir / "afprobe"), n=args.pairs, layers="all", positions="tag,last")
    start = time.perf_counter()
    summary = run_cache(config, loaded=loaded)
    afprobe_seconds = time.perf_counter() - start
    afprobe_per_pair = afprobe_seconds / args.pairs
    continuation_per_prompt = (afprobe_seconds - summary.prefix_seconds) / (2 * args.pairs)
    store = ActivationStore.open(workdir / "afprobe")

    # 2. naive TransformerLens ---------------------------------------------------------------------------------------
    import copy

    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        loaded.fingerprint.name, hf_model=copy.deepcopy(loaded.model), tokenizer=loaded.tokenizer, device="cpu"
    )
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]
    wanted = set(names)
    n_naive = 2 * args.naive_pairs
    worst_tl = 0.0
    start = time.perf_counter()
    for i, prompt in enumerate(prompts[:n_naive]):
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(torch.tensor([prompt.input_ids]), names_filter=lambda n: n in wanted)
        index = prompt_positions(prompt, "last", prompt_set.shared_prefix_len)
        naive = torch.stack([cache[name][0, index] for name in names], dim=1)
        worst_tl = max(worst_tl, (naive.float() - store.row_tokens(i, "last")).abs().max().item())
        del cache
    tl_per_pair = (time.perf_counter() - start) / args.naive_pairs
    del bridge

    # 3. naive nnsight -----------------------------------------------------------------------------------------------
    from afprobe.model.recording import NNsightBackend

    backend = NNsightBackend(loaded, list(range(n_layers + 1)))
    worst_nn = 0.0
    start = time.perf_counter()
    for i, prompt in enumerate(prompts[:n_naive]):
        _, acts = backend.forward(prompt.input_ids, {"last": [prompt.final_index]})
        worst_nn = max(worst_nn, (acts["last"] - store.row_tokens(i, "last")).abs().max().item())
    nn_per_pair = (time.perf_counter() - start) / args.naive_pairs

    # The machine's floor for the continuation part: its FLOPs (weight matmuls, and attention of each own token to
    # the whole prefix) at the matmul rate measured here.
    n_params = sum(p.numel() for name, p in loaded.model.named_parameters() if "embed" not in name)
    config_ = loaded.model.config
    head_dim = getattr(config_, "head_dim", None) or loaded.d_model // config_.num_attention_heads
    keys = prompt_set.max_tokens
    attention_flops = 4 * n_layers * config_.num_attention_heads * head_dim * own_tokens * keys
    flops = 2 * n_params * own_tokens + attention_flops
    rate = matmul_gflops(int(own_tokens), loaded.d_model, 3 * loaded.d_model)
    floor = flops / (rate * 1e9)

    print(f"\n{'way':<34}{'s per pair':>12}{'ratio':>10}")
    print(f"{'afprobe cache':<34}{afprobe_per_pair:>12.2f}{1.0:>10.1f}")
    print(f"{'naive TransformerLens run_with_cache':<34}{tl_per_pair:>12.2f}{tl_per_pair / afprobe_per_pair:>10.1f}")
    print(f"{'naive nnsight trace':<34}{nn_per_pair:>12.2f}{nn_per_pair / afprobe_per_pair:>10.1f}")
    print(f"\nmax |activation difference| vs afprobe: TransformerLens {worst_tl:.1e}, nnsight {worst_nn:.1e}")
    print(
        f"\nafprobe at {args.pairs} pairs: shared prefix {summary.prefix_seconds:.1f} s once "
        f"({summary.prefix_seconds / afprobe_seconds:.0%} of the run), continuations {continuation_per_prompt:.2f} s "
        f"per prompt ({own_tokens:.0f} tokens, forward + answer scoring + writing)"
    )
    print(
        f"machine floor for those tokens: {flops / 1e9:.0f} GFLOP (weights {2 * n_params * own_tokens / 1e9:.0f}, "
        f"attention to the prefix {attention_flops / 1e9:.0f}) at {rate:.0f} GFLOP/s matmul = {floor:.2f} s per "
        f"prompt; the continuation takes {continuation_per_prompt / floor:.1f}x that floor"
    )

    if not args.skip_memory:
        small = cache_in_child(CacheConfig(out=str(workdir / "small"), n=args.pairs, positions="tag,last"))
        large = cache_in_child(CacheConfig(out=str(workdir / "large"), n=args.large_pairs, positions="tag,last"))
        growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
        print(
            f"\npeak memory of `afprobe cache`: {small['peak_rss_mb']:.0f} MB at {args.pairs} pairs, "
            f"{large['peak_rss_mb']:.0f} MB at {args.large_pairs} pairs ({growth:+.1%}); "
            f"{large['seconds'] / args.large_pairs:.2f} s per pair at {args.large_pairs} pairs"
        )
    print(f"\n(this process peaked at {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
