"""bf16 against float32 on the embedded model: the gap, its per-prompt error, the readout's quantization, seconds.

Three ways over the same paired prompts, in one run:
  float32                 the reference
  bf16, float32 readout   what afprobe does in bf16 (`afprobe.model.precision.float32_readout`)
  bf16, bf16 logits       the naive way: log-odds read from the model's own bf16 logits
and, for the bf16 run, the resolution afprobe measures (`afprobe.behaviour.resolution`) next to the error it
estimates (bf16 minus the float32 model, per prompt).

    python benchmarks/bench_precision.py [--n 12] [--model default] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np

from afprobe.behaviour.gap import GapConfig, run_gap
from afprobe.model import precision
from afprobe.model.loading import load_model


def per_prompt(result, field: str) -> np.ndarray:
    return np.array([row[field] for row in result.per_query])


def free_minus_paid(result, field: str) -> np.ndarray:
    rows = {(row["query_id"], row["tier"]): row[field] for row in result.per_query}
    queries = list(dict.fromkeys(row["query_id"] for row in result.per_query))
    return np.array([rows[(q, "free")] - rows[(q, "paid")] for q in queries])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution-pairs", type=int, default=2)
    args = parser.parse_args()

    runs = {}
    fp32 = load_model(args.model, device=args.device, dtype="float32")
    runs["float32"] = run_gap(GapConfig(n=args.n, n_boot=2000, resolution_pairs=0), loaded=fp32)
    del fp32
    bf16 = load_model(args.model, device=args.device, dtype="bfloat16")
    runs["bf16, float32 readout"] = run_gap(
        GapConfig(n=args.n, n_boot=2000, resolution_pairs=args.resolution_pairs), loaded=bf16
    )
    # The naive way: no float32 readout, so log-odds come from the model's bf16 logits.
    with mock.patch.object(precision, "needs_float32_readout", lambda model: False):
        runs["bf16, bf16 logits"] = run_gap(GapConfig(n=args.n, n_boot=2000, resolution_pairs=0), loaded=bf16)

    reference = runs["float32"]
    print(f"{args.model} on {args.device}, {args.n} pairs\n")
    print(f"{'way':<24}{'gap, nats (95% CI)':>30}{'s/prompt':>10}{'x float32':>11}{'rms error/prompt':>18}")
    for name, result in runs.items():
        gap = result.gaps["free-paid"]["log_odds"]
        error = per_prompt(result, "log_odds") - per_prompt(reference, "log_odds")
        seconds = result.timing["per_prompt"]
        print(
            f"{name:<24}{f'{gap.mean:+.3f} [{gap.ci_low:+.3f}, {gap.ci_high:+.3f}]':>30}{seconds:>10.3f}"
            f"{seconds / reference.timing['per_prompt']:>10.2f}x{np.sqrt(np.mean(error**2)):>18.3f}"
        )
    print("\nfirst-divergent-token log-odds, free minus paid, per query:")
    for name, result in runs.items():
        print(f"  {name:<24}" + " ".join(f"{v:+.3f}" for v in free_minus_paid(result, "first_token_log_odds")))

    resolution = runs["bf16, float32 readout"].resolution
    if resolution is not None:
        error = per_prompt(runs["bf16, float32 readout"], "log_odds") - per_prompt(reference, "log_odds")
        print(
            f"\nmeasured resolution: per-prompt noise {resolution.per_prompt_noise:.3f} nats on "
            f"{resolution.n_prompts} prompts in {resolution.seconds:.1f} s; the bf16 error over all "
            f"{len(error)} prompts: {np.sqrt(np.mean(error**2)):.3f} nats"
        )
        print(f"  {resolution.describe(args.n)}")
        print(
            f"  float32 gap {reference.gaps['free-paid']['log_odds'].mean:+.3f}: resolved in bf16 at n={args.n}? "
            f"{resolution.resolves(reference.gaps['free-paid']['log_odds'].mean, args.n)}"
        )


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - start:.0f} s)")
