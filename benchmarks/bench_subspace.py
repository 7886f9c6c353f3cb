"""Learned-subspace (DAS) training: cost per step, afprobe against the naive full-prompt forward, in one run.

One training step interchanges a k-dimensional subspace at one layer, at the tokens after the request, for a batch
of receiver/donor pairs, and backpropagates the squared error between the patched and the donor log-odds to the
rotation. Both ways compute the same loss and gradient:

1. afprobe (`afprobe.analysis.subspaces.learn_subspace`): the runs are recorded once from the shared prefix's KV
   cache; a step starts from the receivers' caches cropped at the first patched token and skips the blocks below the
   layer, so it runs (n_layers - layer) blocks over a dozen tokens per interchange, all the batch's interchanges
   packed into one forward (`Patcher.patched_metrics_with_grad`; it also times one forward per interchange);
2. the naive way: the receiver's full prompt (3,000+ tokens) through every block with a hook that swaps the
   subspace component at the layer, the donor's residual read from its own full forward recorded once.

It checks that the two give the same loss and gradient (within float32 rounding) and prints seconds per step and
their ratio.

    python benchmarks/bench_subspace.py --pairs 4 --layer 18 --k 4 --steps 3
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from afprobe.analysis.patching import make_pairs
from afprobe.analysis.subspaces import RotatedSubspace, aligned_tail, frozen, subspace_edit
from afprobe.data.prompts import render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.model.architecture import decoder_layers, register_residual_hook, removing
from afprobe.model.forward import compute_prefix_cache
from afprobe.model.loading import load_model
from afprobe.model.patching import Patcher
from afprobe.model.readout import AnswerTokens


@dataclass
class StepTiming:
    record_seconds: float  # recording the runs once (afprobe)
    naive_record_seconds: float  # the donors' full forwards (naive)
    afprobe: float  # seconds per training step, the interchanges packed into one forward
    one_each: float  # the same from the same caches, one forward per interchange (afprobe before packing)
    naive: float
    loss_gap: float
    grad_gap: float  # relative
    interchanges: int

    @property
    def ratio(self) -> float:
        return self.naive / self.afprobe

    def lines(self) -> list[str]:
        return [
            f"recording the runs once: afprobe {self.record_seconds:.2f} s, naive donor residuals "
            f"{self.naive_record_seconds:.2f} s",
            f"one step over {self.interchanges} interchanges: afprobe {self.afprobe:.3f} s, naive {self.naive:.3f} s, "
            f"ratio {self.ratio:.1f}x",
            f"  (one forward per interchange from the same caches: {self.one_each:.3f} s; packed "
            f"{self.one_each / self.afprobe:.1f}x faster)",
            f"same step: loss differs by {self.loss_gap:.2e}, gradient by {self.grad_gap:.2e} (relative)",
        ]


def step_timing(loaded, n_pairs: int, layer: int, k: int, steps: int, tail: int | None = None) -> StepTiming:
    """One DAS training step over `n_pairs` pairs (both directions), afprobe's prefix-shared patch against the naive
    full-prompt forward, timed over `steps` steps after a warm-up. `tail`: interchange only the last tokens (the
    verdict's positions; default every token after the request)."""
    model = loaded.model
    prompt_set = render_pairs(loaded.tokenizer, load_queries("harmful", n=n_pairs))
    pairs = make_pairs(prompt_set)
    answers = AnswerTokens.from_tokenizer(loaded.tokenizer)
    prefix = compute_prefix_cache(model, prompt_set.prompts[0].input_ids[: prompt_set.shared_prefix_len])
    patcher = Patcher(model, prefix, answers)
    start = time.perf_counter()
    examples = []
    for pair in pairs:
        trained, untrained = (patcher.record(p, for_grad=True) for p in (pair.trained, pair.untrained))
        examples += [
            aligned_tail(untrained, trained, n_tail=tail),
            aligned_tail(trained, untrained, orientation=-1, n_tail=tail),
        ]
    record_seconds = time.perf_counter() - start
    scale = float(torch.tensor([abs(e.gap) for e in examples]).mean())
    subspace = RotatedSubspace(loaded.d_model, k, seed=0)
    blocks = decoder_layers(model)
    device = loaded.device

    donor_metrics = torch.tensor([e.donor.metric for e in examples])

    def afprobe_step() -> tuple[float, torch.Tensor]:
        subspace.zero_grad()
        basis = subspace.basis
        patched = patcher.patched_metrics_with_grad(
            [(e.receiver, e.donor, [subspace_edit(basis, layer, e)]) for e in examples]
        )
        loss = (patched - donor_metrics.to(patched)).div(scale).pow(2).mean()
        loss.backward()
        return float(loss.detach()), subspace.rotation.parametrizations.weight.original.grad.clone()

    def one_each_step() -> tuple[float, torch.Tensor]:
        subspace.zero_grad()
        basis = subspace.basis
        errors = [
            patcher.patched_metric_with_grad(e.receiver, e.donor, [subspace_edit(basis, layer, e)]) - e.donor.metric
            for e in examples
        ]
        loss = torch.stack(errors).div(scale).pow(2).mean()
        loss.backward()
        return float(loss.detach()), subspace.rotation.parametrizations.weight.original.grad.clone()

    # The naive way: the donor's layer residual from its own full forward (prompt and answer start), once per run.
    def full_residual(prompt) -> torch.Tensor:
        kept = {}

        def keep(hidden: torch.Tensor) -> None:
            kept["h"] = hidden[0].clone()

        ids = list(prompt.input_ids) + list(answers.common)
        with torch.no_grad(), removing([register_residual_hook(blocks, layer, keep)]):
            model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1)
        return kept["h"]

    start = time.perf_counter()
    donors = {id(e): full_residual(e.donor.prompt)[-len(e.positions) :] for e in examples}
    naive_record_seconds = time.perf_counter() - start

    def naive_step() -> tuple[float, torch.Tensor]:
        subspace.zero_grad()
        basis = subspace.basis
        errors = []
        for e in examples:
            ids = list(e.receiver.prompt.input_ids) + list(answers.common)
            n = len(e.positions)
            donor_rows = donors[id(e)]

            def swap(hidden: torch.Tensor, n: int = n, donor_rows: torch.Tensor = donor_rows) -> torch.Tensor:
                out = hidden.clone()
                current = out[0, -n:]
                out[0, -n:] = current + ((donor_rows - current) @ basis) @ basis.T
                return out

            with removing([register_residual_hook(blocks, layer, swap)]):
                logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1).logits
            metric = logits[0, -1, answers.accept_rest[0]] - logits[0, -1, answers.reject_rest[0]]
            errors.append(metric - e.donor.metric)
        loss = torch.stack(errors).div(scale).pow(2).mean()
        loss.backward()
        return float(loss.detach()), subspace.rotation.parametrizations.weight.original.grad.clone()

    timings = {}
    with frozen(model):
        results = {}
        for name, step in (("afprobe", afprobe_step), ("one_each", one_each_step), ("naive", naive_step)):
            step()  # warm-up
            start = time.perf_counter()
            for _ in range(steps):
                results[name] = step()
            timings[name] = (time.perf_counter() - start) / steps
    return StepTiming(
        record_seconds=record_seconds,
        naive_record_seconds=naive_record_seconds,
        afprobe=timings["afprobe"],
        one_each=timings["one_each"],
        naive=timings["naive"],
        loss_gap=abs(results["afprobe"][0] - results["naive"][0]),
        grad_gap=float((results["afprobe"][1] - results["naive"][1]).norm() / results["naive"][1].norm()),
        interchanges=len(examples),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=4, help="pairs in a batch (each gives two interchanges)")
    parser.add_argument("--layer", type=int, default=18)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    loaded = load_model(args.model, dtype="float32")
    print(
        f"model {loaded.fingerprint.name} on {loaded.device} ({loaded.dtype}), {args.pairs} pairs, layer {args.layer}, "
        f"k {args.k}, {torch.get_num_threads()} threads"
    )
    for line in step_timing(loaded, args.pairs, args.layer, args.k, args.steps).lines():
        print(line)


if __name__ == "__main__":
    main()
