"""The verdict step's time on 50 pairs of the embedded model with the shipped token organism's adapter, and a
learned-subspace training step against the naive full-prompt forward, in one run.

The verdict (`afprobe.analysis.mechanism.run_verdict`) records every prompt once from its system prompt's cached
prefix, learns four subspaces by interchange-intervention training, and evaluates each on held-out pairs beside 100
covariance-matched random subspaces; every patched run starts from the receiver's cache cropped at the first
interchanged token and skips the blocks below the layer, many runs packed into one forward. Half the pairs fit, half
evaluate (the verdict's split). The step comparison (`bench_subspace.step_timing`) runs one training step at the same
layer, dimension and positions both ways, checks that loss and gradient agree, and prints the ratio.

    python benchmarks/bench_verdict.py --pairs 50 --layers 20 --steps 60 --n-random 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_subspace import step_timing  # noqa: E402

from afprobe.analysis.mechanism import VerdictConfig, format_verdict_run, run_verdict  # noqa: E402
from afprobe.model.loading import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--adapter",
        default="organism:token",
        help="PEFT adapter merged into the model (default: the shipped token organism, whose gap takes the verdict "
        "through every rule; 'none' for the bare model, whose gap rule 1 stops at)",
    )
    parser.add_argument("--pairs", type=int, default=50, help="free/paid pairs in all: half fit, half evaluate")
    parser.add_argument("--layers", default="20")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--tail", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--n-random", type=int, default=100)
    parser.add_argument("--step-pairs", type=int, default=2, help="pairs in the timed training step (x2 directions)")
    args = parser.parse_args()

    adapter = None if args.adapter == "none" else args.adapter
    loaded = load_model(args.model, adapter=adapter, dtype="float32")
    half = args.pairs // 2
    print(
        f"model {loaded.fingerprint.name} (adapter {adapter}) on {loaded.device} ({loaded.dtype}), "
        f"{torch.get_num_threads()} threads; "
        f"verdict on {half} fitting + {half} evaluation pairs, layers {args.layers}, k {args.k}, last {args.tail} "
        f"positions, {args.steps} steps per subspace, {args.n_random} random subspaces"
    )
    with tempfile.TemporaryDirectory() as out:
        config = VerdictConfig(
            n=half, n_fit=half, layers=args.layers, k=args.k, tail=args.tail, steps=args.steps,
            n_random=args.n_random, out=out,
        )  # fmt: skip
        start = time.perf_counter()
        run = run_verdict(config, loaded=loaded)
        total = time.perf_counter() - start
    print(format_verdict_run(run))
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in run.timing.items())
    print(f"verdict step: {total:.0f} s in all ({parts})")
    for line in step_timing(loaded, args.step_pairs, int(args.layers.split(",")[0]), args.k, 2, tail=args.tail).lines():
        print(line)


if __name__ == "__main__":
    main()
