"""Residual-stream patching sweep: afprobe against the naive TransformerLens loop, in one run.

Both ways patch the residual stream of the free-tier run with the paid-tier run's (and the reverse) at every layer
and every position after the shared prefix, and read the first-divergent-token log-odds at the decision position:

1. afprobe (`afprobe.analysis.patching.residual_sweep`): the shared prefix's KV cache computed once; each patch runs
   only the tokens from the patched position on, from the receiver's cache cropped there, and skips the blocks below
   the patched layer (their output is the receiver's recorded residual stream);
2. the naive loop a user writes with TransformerLens: `run_with_cache` on the donor's full prompt once, then for
   every cell `run_with_hooks` on the receiver's full prompt (3,000+ tokens) with a hook that overwrites the cell.

The naive loop costs the same for every cell, so it is timed on `--naive-cells` cells spread over the grid, its
results are compared with afprobe's on exactly those cells, and its full-sweep time is per-cell time x cells (plus
its one cached donor run per prompt). afprobe's time is the real sweep.

    python benchmarks/bench_patch.py --pairs 8                                  # the full sweep (GPU, or patience)
    python benchmarks/bench_patch.py --pairs 2 --layers 0-30:3 --naive-cells 12 # ~20 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from afprobe.analysis.patching import build_columns, key_columns, make_pairs, residual_sweep
from afprobe.data.prompts import render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.model.architecture import parse_layers
from afprobe.model.forward import compute_prefix_cache
from afprobe.model.loading import load_model
from afprobe.model.patching import Patcher
from afprobe.model.readout import AnswerTokens
from afprobe.model.recording import TransformerLensBackend
from afprobe.store.format import hook_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--positions", default="all", choices=["all", "key"])
    parser.add_argument("--naive-cells", type=int, default=16, help="cells the naive loop is timed and checked on")
    args = parser.parse_args()

    loaded = load_model(args.model)
    prompt_set = render_pairs(loaded.tokenizer, load_queries("harmful", n=args.pairs))
    pairs = make_pairs(prompt_set)
    answers = AnswerTokens.from_tokenizer(loaded.tokenizer)
    print(
        f"model {loaded.fingerprint.name} on {loaded.device} ({loaded.dtype}), {len(pairs)} pairs, prompts of "
        f"{prompt_set.max_tokens} tokens, shared prefix {prompt_set.shared_prefix_len} tokens, "
        f"{torch.get_num_threads()} threads"
    )

    # -- afprobe ----------------------------------------------------------------------------------------------------
    start = time.perf_counter()
    k = prompt_set.shared_prefix_len
    prefix = compute_prefix_cache(loaded.model, prompt_set.prompts[0].input_ids[:k])
    patcher = Patcher(loaded.model, prefix, answers)
    columns = build_columns(pairs, patcher, loaded.tokenizer)
    chosen = list(range(len(columns))) if args.positions == "all" else key_columns(columns)
    layers = parse_layers(args.layers, patcher.n_layers)
    fast = np.zeros((len(pairs), 2, len(layers), len(chosen)))
    for i, pair in enumerate(pairs):
        free, paid = patcher.record(pair.trained), patcher.record(pair.untrained)
        for d, (receiver, donor) in enumerate(((free, paid), (paid, free))):
            where = [columns[c].positions[i] for c in chosen]
            fast[i, d] = residual_sweep(patcher, receiver, donor, layers, where)
        print(f"  afprobe: pair {i + 1}/{len(pairs)} done at {time.perf_counter() - start:.0f} s", flush=True)
    afprobe_seconds = time.perf_counter() - start
    n_cells = fast.size
    print(
        f"afprobe: {n_cells} cells ({len(layers)} layers x {len(chosen)} positions x 2 directions x {len(pairs)} "
        f"pairs) in {afprobe_seconds:.1f} s = {afprobe_seconds / n_cells:.3f} s per cell (prefix and runs included)"
    )

    # -- the naive TransformerLens loop, on a spread sample of the same cells -----------------------------------
    backend = TransformerLensBackend(loaded, layers)
    bridge = backend.bridge
    n_layers = patcher.n_layers
    grid = [
        (i, d, a, b)
        for i in range(len(pairs))
        for d in range(2)
        for a in range(len(layers))
        for b in range(len(chosen))
    ]
    sample = [grid[j] for j in np.linspace(0, len(grid) - 1, min(args.naive_cells, len(grid))).round().astype(int)]
    accept, reject = answers.accept_rest[0], answers.reject_rest[0]

    def full_ids(prompt) -> torch.Tensor:
        return torch.tensor([list(prompt.input_ids) + list(answers.common)], device=loaded.device)

    donor_cache_seconds, cell_seconds, differences = [], [], []
    cached: dict[tuple[int, int], tuple[float, dict]] = {}
    names = {hook_name(layer, n_layers) for layer in layers}
    with torch.inference_mode():
        for i, d, a, b in sample:
            pair = pairs[i]
            receiver, donor = (pair.trained, pair.untrained) if d == 0 else (pair.untrained, pair.trained)
            if (i, d) not in cached:
                t = time.perf_counter()
                _, donor_cache = bridge.run_with_cache(full_ids(donor), names_filter=lambda name: name in names)
                donor_cache_seconds.append(time.perf_counter() - t)
                logits = bridge(full_ids(receiver))[0, -1]
                cached[(i, d)] = (float(logits[accept] - logits[reject]), donor_cache)
            clean, donor_cache = cached[(i, d)]
            name = hook_name(layers[a], n_layers)
            positions = [k + p for p in columns[chosen[b]].positions[i]]
            source = donor_cache[name][0, positions]

            def overwrite(activation, hook, positions=positions, source=source):
                activation = activation.clone()
                activation[0, positions] = source
                return activation

            t = time.perf_counter()
            logits = bridge.run_with_hooks(full_ids(receiver), fwd_hooks=[(name, overwrite)])[0, -1]
            cell_seconds.append(time.perf_counter() - t)
            differences.append(abs((float(logits[accept] - logits[reject]) - clean) - fast[i, d, a, b]))

    per_cell = float(np.mean(cell_seconds))
    naive_total = per_cell * n_cells + float(np.mean(donor_cache_seconds)) * 2 * len(pairs)
    print(
        f"naive TransformerLens loop: {per_cell:.3f} s per cell over {len(sample)} sampled cells "
        f"(+{np.mean(donor_cache_seconds):.1f} s per cached donor run) -> {naive_total:.0f} s for the same sweep"
    )
    print(f"same results: max |afprobe - naive| patch effect on the sampled cells {max(differences):.2e} nats")
    print(f"speed-up of the full sweep: {naive_total / afprobe_seconds:.1f}x")


if __name__ == "__main__":
    main()
