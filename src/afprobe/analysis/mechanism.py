"""The mechanism test behind the verdict: learn the subspaces, measure them on held-out pairs, apply the rules.

`run_verdict(VerdictConfig(...))` does, on one model:

1. **Fit** (the fitting half of the queries, and the fitting half of each contrast set's pairs): at each declared
   layer, learn a k-dimensional subspace by interchange-intervention training (`afprobe.analysis.subspaces`) on four
   kinds of donor/receiver pairs: free vs paid (`tier`, the ceiling), monitored vs unmonitored stated contexts
   (`situational_awareness`, the negation-balanced set under the tier prompts' system prompt), the tag-only variant's
   two tags, whose system prompt says nothing about them (`tag_token`), and affirmative vs negated everyday facts
   (`negation`, the control).
2. **Evaluate** (the evaluation half, never seen by step 1; checked): for each subspace, on free/paid pairs patched
   at the last `tail` tokens in both directions: the share of the gap its interchange carries (sufficiency), the
   share its orthogonal complement carries (the direct effect: what runs around it), and the share when its value
   comes from another query of the donor's tier (resample: does it carry the tier, or the query?). Beside them
   `n_random` random subspaces of the same dimension drawn from the activations' covariance at that layer without
   the tier difference (the null, on the same pairs), the whole residual at the same positions (what any subspace
   there can carry), and, for the two candidates, the **cross-prompt interchange**: the subspace's value taken from
   a stated-context prompt (or a tag-only prompt) of the same request, patched into default-prompt receivers, and
   the **contrast** between the two sides of that prompt in the same receivers (rule 3c).
3. **Decide** with `afprobe.analysis.verdict.decide` (rules fixed before scoring; Holm over the candidates x layers).

`verdict.json` holds the config, the verdict with its evidence lines, every number behind them, the fitting and
evaluation query ids and the timing; `subspaces.safetensors` the learned bases (`{name}.{layer}`, `[d_model, k]`;
`{name}.{layer}.seed{s}` for fitting seeds after the first).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from afprobe import __version__
from afprobe.analysis.patching import make_pairs
from afprobe.analysis.subspaces import (
    Interchange,
    LearnedSubspace,
    aligned_tail,
    covariance_matched_subspaces,
    learn_subspace,
    per_query_sums,
    without_tier_means,
)
from afprobe.analysis.verdict import (
    ALPHA,
    CANDIDATES,
    RULES_VERSION,
    Interval,
    SubspaceEvidence,
    VerdictEvidence,
    VerdictResult,
    decide,
    format_verdict,
    gap_to_explain,
)
from afprobe.artefacts import ResultRecord, result_file
from afprobe.behaviour.resolution import measure_resolution
from afprobe.data.contrast import ContrastPair, load_contrast_pairs, render_contrast_set
from afprobe.data.prompts import PromptConfig, PromptSet, Query, render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.data.splits import SPLIT_RULE, check_disjoint, split_items
from afprobe.errors import AfprobeError
from afprobe.files import atomic_write_bytes, atomic_write_json, finite_json, results_folder
from afprobe.model.architecture import parse_layers
from afprobe.model.job import PairedPromptJob
from afprobe.model.loading import LoadedModel
from afprobe.model.patching import PatchEdit, Patcher, PatchRun, patcher_for
from afprobe.stats import Estimate, holm, mean_estimate, ratio_of_means

SUBSPACE_NAMES = ("tier", "situational_awareness", "tag_token", "negation")


@dataclass
class VerdictConfig(PairedPromptJob):
    """One verdict run; saved in verdict.json. `n` evaluation queries (default 12), `n_fit` fitting queries and pairs
    of each contrast set (default: `n`)."""

    out: str = "results/verdict"
    split: str = "evaluate"  # the queries evaluated; subspaces are fitted on the other half
    n_fit: int | None = None
    layers: str = "default"  # default: n_layers/2 and 2 n_layers/3; or a list "15,20"
    k: int = 4  # dimension of every learned subspace (and of the random ones)
    tail: int = 4  # positions interchanged: the last `tail` tokens, aligned from the end (answer start, `<`)
    steps: int = 60  # training steps per subspace
    lr: float = 0.02
    train_batch: int = 4  # interchanges per training step
    n_random: int = 100  # covariance-matched random subspaces per layer (the null)
    situational_awareness: str = "situational-awareness-v2"  # the stated-context contrast set
    negation: str = "negation-control"
    tag_variant: str = "tag-only"  # the variant whose system prompt does not explain the tag
    n_boot: int = 2000
    seed: int = 0
    fit_seeds: int = 1  # learn every subspace under this many seeds; rule 5 asks them to agree
    resolution_pairs: int = 1

    def __post_init__(self) -> None:
        if self.n is None:
            self.n = 12
        if self.fit_seeds < 1:
            raise AfprobeError(f"--fit-seeds must be at least 1, got {self.fit_seeds}")
        if self.split != "evaluate":
            raise AfprobeError("a verdict evaluates on --split evaluate (its subspaces are fitted on the other half)")
        if self.k < 1:
            raise AfprobeError(f"--k must be at least 1, got {self.k}")
        if self.tail < 1:
            raise AfprobeError(f"--tail must be at least 1, got {self.tail}")
        if self.n_random < 1:
            raise AfprobeError("--n-random must be at least 1: the verdict needs its null")

    @property
    def fit_count(self) -> int:
        return self.n_fit if self.n_fit is not None else int(self.n or 12)

    def fit_queries(self) -> list[Query]:
        return load_queries(self.dataset, column=self.column, n=self.fit_count, split="fit")


@dataclass
class VerdictRun(ResultRecord):
    """What verdict.json holds."""

    afprobe_version: str
    config: dict[str, Any]
    model: dict[str, Any]
    verdict: dict[str, Any]  # `VerdictResult.to_dict()`
    gap: dict[str, Any]  # free minus paid decision-position log-odds on the evaluation pairs
    gap_resolved: bool
    resolution: dict[str, Any] | None
    family: str
    subspaces: list[dict[str, Any]]  # one row per subspace and layer: the evidence and the diagnostics
    whole_residual: dict[str, Any]  # layer -> share carried by the whole residual at the tail positions
    null: dict[str, Any]  # layer -> the random subspaces' shares (summary) and how they were drawn
    tag_path: dict[str, Any]  # per layer L: the donor's tag residual at L // 2, alone, and how much goes through L
    split: dict[str, Any]
    timing: dict[str, float]

    @property
    def result(self) -> VerdictResult:
        return VerdictResult(**self.verdict)


@dataclass
class _Runs:
    """Recorded (trained, untrained) runs, one pair per query or contrast pair, and the interchanges between them."""

    pairs: list[tuple[PatchRun, PatchRun]]
    tail: int
    interchanges: list[Interchange] = field(init=False)

    def __post_init__(self) -> None:
        self.interchanges = []
        for trained, untrained in self.pairs:
            self.interchanges += [
                aligned_tail(untrained, trained, orientation=1, n_tail=self.tail),
                aligned_tail(trained, untrained, orientation=-1, n_tail=self.tail),
            ]


def _record_pairs(
    patcher: Patcher, prompt_set: PromptSet, *, for_grad: bool, tick: Callable[[int], None]
) -> list[tuple[PatchRun, PatchRun]]:
    out = []
    for pair in make_pairs(prompt_set):
        out.append((patcher.record(pair.trained, for_grad=for_grad), patcher.record(pair.untrained, for_grad=for_grad)))
        tick(2)
    return out


def _donor_only(run: PatchRun) -> PatchRun:
    """A run kept only to give its residual stream: its KV cache and component outputs are dropped (memory)."""
    run.own_kv = None
    # New empty tensors, not slices: a slice would keep the whole storage alive.
    run.head_inputs = run.head_inputs.new_empty((0, *run.head_inputs.shape[1:]))
    run.mlp_out = run.mlp_out.new_empty((0, *run.mlp_out.shape[1:]))
    return run


def complement(basis: Float[Tensor, "d_model k"]) -> Float[Tensor, "d_model rest"]:
    """An orthonormal basis of everything orthogonal to `basis`."""
    q, _ = torch.linalg.qr(basis.double(), mode="complete")
    return q[:, basis.shape[1] :].float()


def _oriented(patcher: Patcher, examples: Sequence[Interchange], basis: Tensor | None, layer: int) -> np.ndarray:
    """Each interchange's oriented change when `basis`'s component (None: the whole residual) at its positions is
    taken from its donor."""
    return _oriented_edits(patcher, examples, lambda e: [_basis_edit(e, basis, layer)])


def _basis_edit(e: Interchange, basis: Tensor | None, layer: int) -> PatchEdit:
    return PatchEdit("resid", layer, e.positions, basis=basis, donor_positions=e.donor_positions)


def _oriented_edits(
    patcher: Patcher, examples: Sequence[Interchange], edits: Callable[[Interchange], list[PatchEdit]]
) -> np.ndarray:
    patched = np.array(patcher.patched_metrics([(e.receiver, e.donor, edits(e)) for e in examples]))
    return (patched - np.array([e.receiver.metric for e in examples])) * np.array([e.orientation for e in examples])


def tag_edit(interchange: Interchange, layer: int = 0) -> PatchEdit | None:
    """The donor's residual at its tier tag's positions in place of the receiver's, at `layer` (0: the tag's tokens
    themselves, the whole tier difference of a pair whose prompts differ only in the tag). None when the tags differ
    in length (no position-wise swap)."""
    receiver, donor = interchange.receiver, interchange.donor
    mine, theirs = receiver.prompt.tag_span, donor.prompt.tag_span
    if mine is None or theirs is None or mine[1] - mine[0] != theirs[1] - theirs[0]:
        return None
    return PatchEdit(
        "resid",
        layer,
        tuple(range(mine[0] - receiver.offset, mine[1] - receiver.offset)),
        donor_positions=tuple(range(theirs[0] - donor.offset, theirs[1] - donor.offset)),
    )


def _interval(estimate: dict[str, np.ndarray]) -> Interval:
    return Interval(float(estimate["mean"]), float(estimate["ci_low"]), float(estimate["ci_high"]))


def _share(examples: Sequence[Interchange], deltas: np.ndarray, gaps: np.ndarray, config: VerdictConfig) -> Interval:
    return _interval(ratio_of_means(*per_query_sums(examples, deltas, gaps), n_boot=config.n_boot, seed=config.seed))


def _resampled(runs: _Runs, tail: int) -> list[Interchange]:
    """Each evaluation interchange with its donor replaced by the same tier's run of the next query."""
    n = len(runs.pairs)
    out = []
    for i, (trained, untrained) in enumerate(runs.pairs):
        other_trained, other_untrained = runs.pairs[(i + 1) % n]
        out += [
            aligned_tail(untrained, other_trained, orientation=1, n_tail=tail),
            aligned_tail(trained, other_untrained, orientation=-1, n_tail=tail),
        ]
    return out


def _cross_prompt(evaluated: _Runs, donors: list[tuple[PatchRun, PatchRun]], tail: int) -> list[Interchange]:
    """Default-prompt receivers of each evaluation query, donors of another prompt kind with the same request: the
    trained-like donor (monitored; the free tag) into the untrained receiver, and the reverse (the first two of each
    query's four), then the same donors into the other receivers. Oriented (+1 trained-like donor, -1 untrained-like)
    and summed over a query's four, the changes are twice the contrast: how far the two donors move the same receiver
    apart, whichever tier it is (rules v4)."""
    out = []
    for (trained, untrained), (donor_trained, donor_untrained) in zip(evaluated.pairs, donors, strict=True):
        out += [
            aligned_tail(untrained, donor_trained, orientation=1, n_tail=tail),
            aligned_tail(trained, donor_untrained, orientation=-1, n_tail=tail),
            aligned_tail(trained, donor_trained, orientation=1, n_tail=tail),
            aligned_tail(untrained, donor_untrained, orientation=-1, n_tail=tail),
        ]
    return out


def _layers(spec: str, n_layers: int) -> list[int]:
    if spec.strip() == "default":
        return sorted({n_layers // 2, (2 * n_layers) // 3})
    layers = parse_layers(spec, n_layers)
    if not layers:
        raise AfprobeError(f"no layers in {spec!r}: give a list like 15,20")
    return layers


@dataclass
class _Measured:
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per subspace and layer
    whole: dict[str, Any] = field(default_factory=dict)  # layer -> the whole residual's share of the gap
    null: dict[str, Any] = field(default_factory=dict)  # layer -> the random subspaces' shares
    tag_alone: dict[str, Any] = field(default_factory=dict)  # layer -> the donor's tag at layer // 2 alone: share
    tag_path: dict[str, Any] = field(default_factory=dict)  # layer -> share of the tag's effect through the positions


@dataclass
class _Prompts:
    """Every prompt set a verdict records, rendered once."""

    fit_queries: list[Query]
    evaluated_queries: list[Query]
    tier_fit: PromptSet
    tier_eval: PromptSet
    sa_fit: PromptSet
    negation_fit: PromptSet
    sa_cross: PromptSet  # held-out stated-context sentences, each with one evaluation query's request
    tag_fit: PromptSet
    tag_cross: PromptSet
    sa_cross_pairs: list[str]

    @property
    def evaluated_ids(self) -> list[str]:
        return [q.query_id for q in self.evaluated_queries]


def _render(config: VerdictConfig, loaded: LoadedModel) -> _Prompts:
    tokenizer, max_context = loaded.tokenizer, loaded.max_context or None
    evaluated_queries, fit_queries = config.queries(), config.fit_queries()
    if len(evaluated_queries) < 2 or len(fit_queries) < 2:
        raise AfprobeError("a verdict needs at least 2 fitting and 2 evaluation queries: raise --n")
    check_disjoint([q.query_id for q in fit_queries], [q.query_id for q in evaluated_queries], "the verdict's fit")
    prompts = config.prompt_config()
    tier_eval = render_pairs(tokenizer, evaluated_queries, prompts, max_context=max_context)
    if tier_eval.variant.contrast is None:
        raise AfprobeError(f"variant {tier_eval.variant.name!r} has one tier: a verdict needs two tiers to compare")
    sa_pairs = load_contrast_pairs(config.situational_awareness)
    sa_eval_pairs = sa_cross_pairs(split_items(sa_pairs, "evaluate"), len(evaluated_queries))
    negation_fit_pairs = split_items(load_contrast_pairs(config.negation), "fit")[: config.fit_count]
    tag_prompts = PromptConfig(**{**asdict(prompts), "variant": config.tag_variant})
    return _Prompts(
        fit_queries=fit_queries,
        evaluated_queries=evaluated_queries,
        tier_fit=render_pairs(tokenizer, fit_queries, prompts, max_context=max_context),
        tier_eval=tier_eval,
        sa_fit=render_contrast_set(
            tokenizer,
            config.situational_awareness,
            split_items(sa_pairs, "fit")[: config.fit_count],
            fit_queries,
            max_context=max_context,
        ),
        negation_fit=render_contrast_set(
            tokenizer, config.negation, negation_fit_pairs, fit_queries, max_context=max_context
        ),
        sa_cross=render_contrast_set(
            tokenizer, config.situational_awareness, sa_eval_pairs, evaluated_queries, max_context=max_context
        ),
        tag_fit=render_pairs(tokenizer, fit_queries, tag_prompts, max_context=max_context),
        tag_cross=render_pairs(tokenizer, evaluated_queries, tag_prompts, max_context=max_context),
        sa_cross_pairs=sorted({p.pair_id for p in sa_eval_pairs}),
    )


def _null_summary(shares: np.ndarray, k: int, rows: int, layer: int, tail: int) -> dict[str, Any]:
    finite = shares[np.isfinite(shares)]
    return {
        "n": int(shares.size),
        "k": k,
        "drawn_from": f"the covariance of {rows} fitting-run residuals at layer {layer}, last {tail} positions, "
        "each tier's mean at each position replaced by both tiers' mean (rules v4)",
        "mean": float(finite.mean()) if finite.size else None,
        "quantiles": {str(q): float(np.quantile(finite, q)) if finite.size else None for q in (0.5, 0.9, 0.95, 0.99)},
        "max": float(finite.max()) if finite.size else None,
    }


def run_verdict(
    config: VerdictConfig, *, loaded: LoadedModel | None = None, progress: Callable[[int, int], None] | None = None
) -> VerdictRun:
    """Fit, evaluate and decide (module docstring); write verdict.json and subspaces.safetensors into `config.out`.
    When the evaluation pairs show no gap to explain (rule 1), nothing is fitted: the verdict says so."""
    started = time.perf_counter()
    timing: dict[str, float] = {}
    if loaded is None:
        loaded = config.load()
    prompts = _render(config, loaded)
    t = time.perf_counter()
    patcher = patcher_for(
        loaded, [prompts.tier_fit, prompts.tier_eval, prompts.sa_fit, prompts.negation_fit, prompts.sa_cross]
    )
    layers = _layers(config.layers, patcher.n_layers)
    timing["prefix"] = time.perf_counter() - t
    n_fit, n_eval = len(prompts.fit_queries), len(prompts.evaluated_queries)
    n_records = 2 * (4 * n_fit + 3 * n_eval)
    seeds = config.fit_seeds
    n_patches = 2 * n_eval * len(layers) * (config.n_random + 3 + seeds * (4 * 4 + 2 * 2))
    total, done = n_records + len(layers) * 4 * config.steps * seeds + n_patches, 0

    def tick(count: int = 1) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(min(done, total), total)

    resolution = (
        measure_resolution(loaded.model, loaded.tokenizer, prompts.tier_eval, n_pairs=config.resolution_pairs)
        if config.resolution_pairs > 0
        else None
    )
    # The gap on the evaluation pairs first: rule 1 needs nothing else.
    t = time.perf_counter()
    evaluated = _Runs(_record_pairs(patcher, prompts.tier_eval, for_grad=False, tick=tick), config.tail)
    gap = mean_estimate(
        np.array([trained.metric - untrained.metric for trained, untrained in evaluated.pairs]),
        n_boot=config.n_boot,
        seed=config.seed,
    )
    gap_resolved = resolution is None or resolution.resolves(abs(gap.mean), gap.n)
    timing["record_evaluation"] = time.perf_counter() - t

    learned: dict[tuple[str, int, int], LearnedSubspace] = {}  # (name, layer, fitting seed)
    measured = _Measured()
    fit_ids: dict[str, list[str]] = {}
    if gap_to_explain(gap, gap_resolved)[0]:
        t = time.perf_counter()
        tag_patcher = patcher_for(loaded, [prompts.tag_fit, prompts.tag_cross])  # the tag-only system prompt
        covariance_rows = _fit(config, prompts, patcher, tag_patcher, layers, learned, fit_ids, tick)
        timing["fit"] = time.perf_counter() - t
        t = time.perf_counter()
        measured = _evaluate(
            config, prompts, patcher, evaluated, layers, learned, fit_ids, covariance_rows, tag_patcher, tick
        )
        timing["evaluate"] = time.perf_counter() - t
    else:
        tick(total - done)  # rule 1 has decided: the work counted for fitting and evaluating is not needed

    # The family: the candidates' comparisons with the null, Holm-adjusted together (within each fitting seed: each
    # seed's verdict is its own decision, and rule 5 asks all of them to agree).
    rows = measured.rows
    for seed in range(config.fit_seeds):
        family_rows = [row for row in rows if row["name"] in CANDIDATES and row["fit_seed"] == seed]
        for row, adjusted in zip(family_rows, holm([row["p_random"] for row in family_rows]), strict=True):
            row["p_holm"] = float(adjusted)
    family = (
        f"{len(CANDIDATES) * len(layers)} comparisons with {config.n_random} covariance-matched random subspaces "
        f"({', '.join(CANDIDATES)} x layers {', '.join(map(str, layers))}"
        + (f", within each of {config.fit_seeds} fitting seeds" if config.fit_seeds > 1 else "")
        + f"); alpha {ALPHA}"
    )
    evidence = VerdictEvidence(
        gap,
        gap_resolved,
        tuple(_evidence(row) for row in rows),
        family,
        whole={int(layer): Interval(**share) for layer, share in measured.whole.items()},
    )
    result = decide(evidence)
    timing["total"] = time.perf_counter() - started
    run = VerdictRun(
        afprobe_version=__version__,
        config=asdict(config),
        model=loaded.fingerprint.to_dict(),
        verdict=result.to_dict(),
        gap=gap.to_dict(),
        gap_resolved=gap_resolved,
        resolution=None if resolution is None else resolution.to_dict(),
        family=family,
        subspaces=rows,
        whole_residual=measured.whole,
        null=measured.null,
        tag_path={"alone": measured.tag_alone, "through_positions": measured.tag_path},
        split={
            "rule": SPLIT_RULE,
            "fit_queries": [q.query_id for q in prompts.fit_queries],
            "evaluated_queries": prompts.evaluated_ids,
            "contrast_fit_pairs": {name: ids for name, ids in fit_ids.items() if name != "tier"},
            "cross_prompt_pairs": prompts.sa_cross_pairs,
        },
        timing=timing,
    )
    _write(Path(config.out), run, learned)
    return run


def _fit(
    config: VerdictConfig,
    prompts: _Prompts,
    patcher: Patcher,
    tag_patcher: Patcher,
    layers: list[int],
    learned: dict[tuple[str, int, int], LearnedSubspace],
    fit_ids: dict[str, list[str]],
    tick: Callable[[int], None],
) -> dict[int, Tensor]:
    """Learn every subspace at every layer, one kind of pairs at a time (each run holds its whole prompt's KV cache,
    so a kind's runs are freed before the next is recorded). Returns the null's covariance rows per layer."""
    fit_sets = {
        "tier": (patcher, prompts.tier_fit),
        "situational_awareness": (patcher, prompts.sa_fit),
        "tag_token": (tag_patcher, prompts.tag_fit),
        "negation": (patcher, prompts.negation_fit),
    }
    covariance_rows: dict[int, Tensor] = {}
    for name, (fit_patcher, prompt_set) in fit_sets.items():
        runs = _Runs(_record_pairs(fit_patcher, prompt_set, for_grad=True, tick=tick), config.tail)
        if name == "tier":
            for layer in layers:  # the null's covariance: the fitting runs at the interchanged positions
                trained, untrained = (
                    torch.stack([pair[side].resid[layer, -config.tail :] for pair in runs.pairs]).float()
                    for side in (0, 1)
                )
                covariance_rows[layer] = without_tier_means(trained, untrained)
        for layer in layers:
            for fit_seed in range(config.fit_seeds):
                try:
                    learned[name, layer, fit_seed] = learn_subspace(
                        fit_patcher,
                        runs.interchanges,
                        layer,
                        config.k,
                        steps=config.steps,
                        lr=config.lr,
                        batch_size=config.train_batch,
                        seed=config.seed + 100 * SUBSPACE_NAMES.index(name) + layer + 10_007 * fit_seed,
                        progress=lambda step, loss: tick(),
                    )
                except AfprobeError as exc:
                    if "nothing for a subspace to carry" not in str(exc):
                        raise
        # Contrast pairs are named by their pair ids; their requests are the fitting queries'.
        fit_ids[name] = sorted({e.query_id for e in runs.interchanges})
        del runs
    return covariance_rows


def _evaluate(
    config: VerdictConfig,
    prompts: _Prompts,
    patcher: Patcher,
    evaluated: _Runs,
    layers: list[int],
    learned: dict[tuple[str, int, int], LearnedSubspace],
    fit_ids: dict[str, list[str]],
    covariance_rows: dict[int, Tensor],
    tag_patcher: Patcher,
    tick: Callable[[int], None],
) -> _Measured:
    """Every learned subspace on the held-out pairs, beside the null, the whole residual, the cross-prompt donors and
    the path from the tag: one row per subspace and layer."""
    measured = _Measured()
    rows, whole, null_summary = measured.rows, measured.whole, measured.null
    examples = evaluated.interchanges
    gaps = np.array([e.gap * e.orientation for e in examples])
    # Path from the tag: the donor's tag-position residual at layer L // 2 (on its way to the decision), alone, and
    # with a site at layer L held at its clean value. (Swapping the tag at the input turns the receiver into the donor,
    # and holding a site then is just the reverse interchange, so the tag is taken part way up.)
    swaps: dict[int, dict[int, PatchEdit]] = {}
    tag_alone: dict[int, np.ndarray] = {}
    for layer in layers:
        edits = {id(e): tag_edit(e, layer // 2) for e in examples}
        if all(edit is not None for edit in edits.values()):
            swaps[layer] = {key: edit for key, edit in edits.items() if edit is not None}
            tag_alone[layer] = _oriented_edits(patcher, examples, lambda e, layer=layer: [swaps[layer][id(e)]])
            tick(len(examples))
            measured.tag_alone[str(layer)] = {
                "tag_layer": layer // 2,
                **asdict(_share(examples, tag_alone[layer], gaps, config)),
            }

    def through(layer: int, basis: Tensor | None) -> dict[str, Any] | None:
        """The share of the tag's effect (its residual at layer // 2) that goes through `basis` (None: the whole
        residual) at the interchanged positions of `layer`: what holding it at the receiver's clean value removes."""
        if layer not in swaps:
            return None
        held = _oriented_edits(
            patcher,
            examples,
            lambda e: [swaps[layer][id(e)], PatchEdit("resid", layer, e.positions, basis=basis, hold=True)],
        )
        tick(len(examples))
        return asdict(_share(examples, tag_alone[layer] - held, tag_alone[layer], config))

    resampled = _resampled(evaluated, config.tail)
    cross = {
        name: _cross_prompt(
            evaluated,
            [
                (_donor_only(a), _donor_only(b))
                for a, b in _record_pairs(donor_patcher, donors, for_grad=False, tick=tick)
            ],
            config.tail,
        )
        for name, donor_patcher, donors in (
            ("situational_awareness", patcher, prompts.sa_cross),
            ("tag_token", tag_patcher, prompts.tag_cross),
        )
    }
    fitted_requests = [q.query_id for q in prompts.fit_queries]
    per_query_deltas: dict[tuple[str, int, int], np.ndarray] = {}
    for layer in layers:
        whole_deltas = _oriented(patcher, examples, None, layer)
        tick(len(examples))
        whole[str(layer)] = asdict(_share(examples, whole_deltas, gaps, config))
        measured.tag_path[str(layer)] = through(layer, None)
        null_bases = covariance_matched_subspaces(
            covariance_rows[layer], config.k, config.n_random, seed=config.seed + 1000 + layer
        )
        null_deltas = np.zeros((len(null_bases), len(examples)))  # [subspace, interchange]
        for j, e in enumerate(examples):
            metrics = patcher.patched_metrics([(e.receiver, e.donor, [_basis_edit(e, b, layer)]) for b in null_bases])
            null_deltas[:, j] = (np.array(metrics) - e.receiver.metric) * e.orientation
            tick(len(null_bases))
        null_array = null_deltas.sum(1) / gaps.sum() if gaps.sum() != 0 else np.full(len(null_bases), np.nan)
        null_summary[str(layer)] = _null_summary(
            null_array, config.k, covariance_rows[layer].shape[0], layer, config.tail
        )
        for fit_seed in range(config.fit_seeds):
            for name in SUBSPACE_NAMES:
                subspace = learned.get((name, layer, fit_seed))
                if subspace is None:
                    continue
                check_disjoint(
                    fit_ids[name] + (fitted_requests if name != "tier" else []),
                    prompts.evaluated_ids,
                    f"the {name} subspace",
                )
                row = {
                    "name": name,
                    "layer": layer,
                    "fit_seed": fit_seed,
                    **_subspace_row(
                        config, patcher, examples, gaps, subspace, null_array, resampled, cross.get(name), through
                    ),
                    "overlap_with_tier": _overlap(subspace.basis, learned.get(("tier", layer, fit_seed))),
                }
                per_query_deltas[name, layer, fit_seed] = row.pop("deltas")
                tick(3 * len(examples) + (len(cross[name]) if name in cross else 0))
                rows.append(row)
            negation = per_query_deltas.get(("negation", layer, fit_seed))
            sa = per_query_deltas.get(("situational_awareness", layer, fit_seed))
            if negation is not None and sa is not None:
                for row in rows:
                    if (row["name"], row["layer"], row["fit_seed"]) == ("situational_awareness", layer, fit_seed):
                        row["above_negation"] = asdict(_share(examples, sa - negation, gaps, config))
    return measured


def _subspace_row(
    config: VerdictConfig,
    patcher: Patcher,
    examples: Sequence[Interchange],
    gaps: np.ndarray,
    subspace: LearnedSubspace,
    null_array: np.ndarray,
    resampled: Sequence[Interchange],
    cross: Sequence[Interchange] | None,
    through: Callable[[int, Tensor | None], dict[str, Any] | None],
) -> dict[str, Any]:
    """One learned subspace on the held-out pairs: its share, what runs around it, the other-query donor, its rank
    against the null, the cross-prompt donors and the tag's path through it (`deltas`: its per-interchange effects)."""
    basis, layer = subspace.basis, subspace.layer
    deltas = _oriented(patcher, examples, basis, layer)
    share = _share(examples, deltas, gaps, config)
    row: dict[str, Any] = {
        "k": config.k,
        "share": asdict(share),
        # One-sided rank p against the random subspaces on the same pairs (its floor: 1 / (n_random + 1)).
        "p_random": (1 + int(np.sum(null_array >= share.value))) / (1 + null_array.size),
        "direct": asdict(_share(examples, _oriented(patcher, examples, complement(basis), layer), gaps, config)),
        "resampled": asdict(_share(examples, _oriented(patcher, resampled, basis, layer), gaps, config)),
        "first_loss": subspace.losses[0] if subspace.losses else None,
        "final_loss": subspace.losses[-1] if subspace.losses else None,
        "train_seconds": subspace.seconds,
        "tag_through": through(layer, basis),
        "deltas": deltas,
    }
    if cross is not None:
        cross_deltas = _oriented(patcher, cross, basis, layer)
        one_sided = [i for i in range(len(cross)) if i % 4 < 2]  # each donor into the other tier's receiver
        sided = [cross[i] for i in one_sided]
        nats = mean_estimate(
            per_query_sums(sided, cross_deltas[one_sided])[0] / 2, n_boot=config.n_boot, seed=config.seed
        )
        row["cross_prompt"] = asdict(Interval(nats.mean, nats.ci_low, nats.ci_high))
        row["cross_prompt_share"] = asdict(_share(sided, cross_deltas[one_sided], gaps, config))
        # Rule 3c (v4): the two donors' difference in the same receivers, as a share of the tier gap (a query's four
        # oriented changes sum to twice it, its two tier interchanges to twice its gap).
        contrast, tier_gaps = per_query_sums(cross, cross_deltas)[0], per_query_sums(examples, gaps)[0]
        row["cross_prompt_contrast"] = asdict(
            _interval(ratio_of_means(contrast, tier_gaps, n_boot=config.n_boot, seed=config.seed))
        )
    return row


def sa_cross_pairs(pairs: Sequence[ContrastPair], n: int) -> list[ContrastPair]:
    """The held-out contrast pairs that give the cross-prompt donors, one per evaluation query (cycling; a pair used
    again gets its own id, `id.1`, so that each donor stays with its own request)."""
    return [
        pairs[i % len(pairs)]
        if i < len(pairs)
        else replace(pairs[i % len(pairs)], pair_id=f"{pairs[i % len(pairs)].pair_id}.{i // len(pairs)}")
        for i in range(n)
    ]


def _overlap(basis: Tensor, other: LearnedSubspace | None) -> float | None:
    """How much two k-dimensional subspaces overlap: the root mean squared cosine of their principal angles (1: the
    same subspace, about sqrt(k / d_model) for unrelated ones)."""
    if other is None:
        return None
    singular = torch.linalg.svdvals(basis.double().T @ other.basis.double())
    return float(singular.pow(2).mean().sqrt())


def redecide(record: dict[str, Any]) -> VerdictResult:
    """The current rules applied to the evidence a verdict.json stored, whichever rules version wrote it."""
    gap = Estimate(**record["gap"])
    if not record["subspaces"] and gap_to_explain(gap, record["gap_resolved"])[0]:
        raise AfprobeError(
            f"this verdict (rules v{record['verdict']['rules_version']}) stopped at rule 1, and the current rules "
            "need the subspaces it did not learn: run the verdict again"
        )
    missing = [
        f"{row['name']} at layer {row['layer']}"
        for row in record["subspaces"]
        if row["name"] in CANDIDATES and "cross_prompt_contrast" not in row
    ]
    if missing and gap_to_explain(gap, record["gap_resolved"])[0]:
        raise AfprobeError(
            f"this verdict (rules v{record['verdict']['rules_version']}) did not measure the cross-prompt contrast "
            f"rules v{RULES_VERSION} read ({missing[0]}): run the verdict again"
        )
    evidence = VerdictEvidence(
        gap,
        record["gap_resolved"],
        tuple(_evidence(row) for row in record["subspaces"]),
        record.get("family", ""),
        whole={int(layer): Interval(**share) for layer, share in record.get("whole_residual", {}).items()},
    )
    return decide(evidence)


def _maybe(row: dict[str, Any], key: str) -> Interval | None:
    value = row.get(key)
    return None if value is None else Interval(**value)


def _evidence(row: dict[str, Any]) -> SubspaceEvidence:
    removed = None
    if row.get("direct") is not None:  # what the complement does not carry
        direct = row["direct"]
        removed = Interval(1 - direct["value"], 1 - direct["high"], 1 - direct["low"])
    return SubspaceEvidence(
        name=row["name"],
        layer=row["layer"],
        k=row["k"],
        share=Interval(**row["share"]),
        p_holm=row.get("p_holm"),
        removed=removed,
        cross_prompt=_maybe(row, "cross_prompt"),
        cross_prompt_contrast=_maybe(row, "cross_prompt_contrast"),
        above_negation=_maybe(row, "above_negation"),
        around=_maybe(row, "direct"),
        fit_seed=row.get("fit_seed", 0),
    )


def _write(out: Path, run: VerdictRun, learned: dict[tuple[str, int, int], LearnedSubspace]) -> None:
    from safetensors.torch import save

    with results_folder(out):
        tensors = {
            f"{name}.{layer}" + (f".seed{seed}" if seed else ""): s.basis.contiguous()
            for (name, layer, seed), s in learned.items()
        }
        atomic_write_bytes(out / "subspaces.safetensors", save(tensors))
        atomic_write_json(result_file("verdict", out), finite_json(run.to_json()))


def load_verdict(folder: str | Path) -> VerdictRun:
    path = result_file("verdict", folder)
    if not path.is_file():
        raise AfprobeError(f"no verdict in {folder}: run `afprobe verdict --out {folder}` first")
    import json

    return VerdictRun.from_json(json.loads(path.read_text()))


def format_verdict_run(run: VerdictRun) -> str:
    lines = [format_verdict(run.result)]
    for row in run.subspaces:
        seed = f" seed {row['fit_seed']}" if row.get("fit_seed") else ""
        text = (
            f"  {row['name']} layer {row['layer']}{seed} (k {row['k']}): share {Interval(**row['share']).text()}, "
            f"around it {Interval(**row['direct']).text()}, p vs random {row['p_random']:.3f}"
        )
        if row.get("cross_prompt") is not None:
            text += f", cross-prompt {Interval(**row['cross_prompt']).text(percent=False)} nats"
        if row.get("cross_prompt_contrast") is not None:
            text += f", cross-prompt contrast {Interval(**row['cross_prompt_contrast']).text()}"
        if row.get("tag_through") is not None:
            text += f", of the tag's effect {Interval(**row['tag_through']).text()} through it"
        lines.append(text)
    for layer, share in run.whole_residual.items():
        alone = run.tag_path["alone"].get(layer)
        path = run.tag_path["through_positions"].get(layer)
        lines.append(
            f"  whole residual at layer {layer}: share {Interval(**share).text()}"
            + (
                ""
                if alone is None or path is None
                else f"; the tag position's residual at layer {alone['tag_layer']} carries "
                f"{Interval(alone['value'], alone['low'], alone['high']).text()} of the gap, and holding these "
                f"positions removes {Interval(**path).text()} of that"
            )
        )
    lines.append(f"  time {run.timing['total']:.0f} s")
    return "\n".join(lines)
