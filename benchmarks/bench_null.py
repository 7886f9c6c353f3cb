"""The verdict's random-subspace null: one patched forward per subspace against packed forwards, in one run.

The null patches each of `--n-random` covariance-matched random subspaces at one layer, at the last `--tail` tokens,
into every held-out interchange (both directions of each pair): 100 subspaces x 16 interchanges x 2 layers is 3,200
of the verdict's 4,368 patched forwards on the zoo's options. Three ways, same subspaces, same interchanges:

1. naive: the receiver's whole prompt (3,000+ tokens) through every block, a hook swapping the subspace component
   (the donor's residual from its own full forward, recorded once);
2. one forward each (`Patcher.patched_metric`, what the verdict did before packing): from the receiver's cache
   cropped at the first patched token, skipping the blocks below the layer;
3. packed (`Patcher.patched_metrics`, what the verdict does): up to `--pack` copies of the receiver's tail in one
   forward over the same cropped cache, each attending to the prefix, the receiver's earlier tokens and itself only.

It checks that the three agree (float32 summation order only) and prints seconds per interchange and the ratios.

    python benchmarks/bench_null.py --pairs 4 --layer 20 --k 4 --tail 4 --n-random 100 --pack 32
"""

from __future__ import annotations

import argparse
import time

import torch

from afprobe.analysis.patching import make_pairs
from afprobe.analysis.subspaces import aligned_tail, covariance_matched_subspaces
from afprobe.data.prompts import render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.model.architecture import decoder_layers, register_residual_hook, removing
from afprobe.model.forward import compute_prefix_cache
from afprobe.model.loading import load_model
from afprobe.model.patching import PatchEdit, Patcher
from afprobe.model.readout import AnswerTokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=4, help="pairs (each gives two interchanges)")
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--tail", type=int, default=4)
    parser.add_argument("--n-random", type=int, default=100)
    parser.add_argument("--pack", type=int, default=32)
    parser.add_argument("--naive-subspaces", type=int, default=5, help="subspaces timed the naive way (slow)")
    args = parser.parse_args()

    loaded = load_model(args.model, dtype="float32")
    model, layer = loaded.model, args.layer
    print(
        f"model {loaded.fingerprint.name} on {loaded.device} ({loaded.dtype}), {args.pairs} pairs, layer {layer}, "
        f"k {args.k}, tail {args.tail}, {args.n_random} random subspaces, pack {args.pack}, "
        f"{torch.get_num_threads()} threads"
    )
    prompt_set = render_pairs(loaded.tokenizer, load_queries("harmful", n=args.pairs))
    answers = AnswerTokens.from_tokenizer(loaded.tokenizer)
    prefix = compute_prefix_cache(model, prompt_set.prompts[0].input_ids[: prompt_set.shared_prefix_len])
    patcher = Patcher(model, prefix, answers)
    examples = []
    for pair in make_pairs(prompt_set):
        trained, untrained = patcher.record(pair.trained), patcher.record(pair.untrained)
        examples += [
            aligned_tail(untrained, trained, n_tail=args.tail),
            aligned_tail(trained, untrained, orientation=-1, n_tail=args.tail),
        ]
    rows = torch.cat([e.receiver.resid[layer, list(e.positions)] for e in examples])
    bases = covariance_matched_subspaces(rows, args.k, args.n_random, seed=0)
    print(f"prefix {prefix.length} tokens; {len(examples)} interchanges; {len(bases)} subspaces")

    def edits(e, basis):
        return [PatchEdit("resid", layer, e.positions, basis=basis, donor_positions=e.donor_positions)]

    start = time.perf_counter()
    one_each = [[patcher.patched_metric(e.receiver, e.donor, edits(e, b)) for b in bases] for e in examples]
    one_each_s = (time.perf_counter() - start) / len(examples)

    patcher.patched_metrics([(examples[0].receiver, examples[0].donor, edits(examples[0], bases[0]))])  # warm-up
    start = time.perf_counter()
    packed = [
        patcher.patched_metrics([(e.receiver, e.donor, edits(e, b)) for b in bases], pack=args.pack) for e in examples
    ]
    packed_s = (time.perf_counter() - start) / len(examples)

    blocks = decoder_layers(model)

    def full_residual(prompt) -> torch.Tensor:
        kept = {}

        def keep(hidden: torch.Tensor) -> None:
            kept["h"] = hidden[0].clone()

        ids = list(prompt.input_ids) + list(answers.common)
        with torch.inference_mode(), removing([register_residual_hook(blocks, layer, keep)]):
            model(input_ids=torch.tensor([ids], device=loaded.device), use_cache=False, logits_to_keep=1)
        return kept["h"]

    def naive(e, basis, donor_rows) -> float:
        ids = list(e.receiver.prompt.input_ids) + list(answers.common)
        at = [len(ids) - len(e.receiver.tokens) + p for p in e.positions]

        def swap(hidden: torch.Tensor) -> torch.Tensor:
            out = hidden.clone()
            current = out[0, at]
            out[0, at] = current + ((donor_rows - current) @ basis) @ basis.T
            return out

        with torch.inference_mode(), removing([register_residual_hook(blocks, layer, swap)]):
            logits = model(input_ids=torch.tensor([ids], device=loaded.device), use_cache=False, logits_to_keep=1)
        last = logits.logits[0, -1]
        return float(last[answers.accept_rest[0]] - last[answers.reject_rest[0]])

    n_naive = min(args.naive_subspaces, len(bases))
    start = time.perf_counter()
    naive_metrics = []
    for e in examples:
        donor_full = full_residual(e.donor.prompt)
        donor_rows = donor_full[[len(donor_full) - len(e.donor.tokens) + p for p in e.donor_positions]]
        naive_metrics.append([naive(e, b, donor_rows) for b in bases[:n_naive]])
    naive_s = (time.perf_counter() - start) / len(examples) * len(bases) / n_naive

    flat = torch.tensor(one_each)
    packed_gap = float((torch.tensor(packed) - flat).abs().max())
    naive_gap = float((torch.tensor(naive_metrics) - flat[:, :n_naive]).abs().max())
    spread = float((flat - torch.tensor([[e.receiver.metric] for e in examples])).abs().max())
    print(f"per interchange, all {len(bases)} subspaces:")
    print(f"  naive full forward  {naive_s:8.2f} s  (timed on {n_naive} subspaces, scaled)")
    print(f"  one forward each    {one_each_s:8.2f} s  ({naive_s / one_each_s:.1f}x faster than naive)")
    print(
        f"  packed by {args.pack:<3}       {packed_s:8.2f} s  ({one_each_s / packed_s:.1f}x faster than one forward "
        f"each, {naive_s / packed_s:.1f}x than naive)"
    )
    print(
        f"largest difference in the log-odds: packed vs one each {packed_gap:.2e}, naive vs one each {naive_gap:.2e} "
        f"(largest patch effect {spread:.2f} nats)"
    )


if __name__ == "__main__":
    main()
