"""Steering and directional ablation experiments: does a direction cause the compliance gap?

`run_steering(SteerConfig(directions="probes/RUN", ...))` takes the directions `afprobe probe` saved (training
context, situational awareness, refusal) at one layer and, on fresh paired prompts:

- sweeps a coefficient (both signs, in units of the typical residual-stream norm at that layer) for each
  direction and for norm-matched random directions (the null), measuring compliance on free and paid prompts, the
  gap, and compliance on benign queries, each with a paired bootstrap interval;
- ablates each direction (projects it out at every layer, the shared prefix included) and measures how much of
  the gap remains, against random directions of the same dimension;
- states for each direction whether its effect on the gap exceeds the random null, and whether it moves the gap
  or only shifts compliance on both tiers alike (the refusal confound).

Steering edits every position after the shared prefix (`apply_at="suffix"`, the answer tokens being scored
included), every position from the tier tag on (`from_tag`; the same as `suffix` when the prefix ends at the tag,
as it does in afprobe's prompts), or only the last prompt token (`last`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from afprobe import __version__
from afprobe.analysis.probes import ProbeSet, load_probe_set
from afprobe.artefacts import ResultRecord, result_file
from afprobe.behaviour.resolution import Resolution, measure_resolution
from afprobe.data.prompts import PromptSet, render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.data.splits import check_disjoint
from afprobe.errors import AfprobeError
from afprobe.files import atomic_write_json, results_folder
from afprobe.model.architecture import has_sliding_window, pad_token_id
from afprobe.model.forward import compute_prefix_cache
from afprobe.model.interventions import PositionMask, ablate_directions, add_direction
from afprobe.model.job import PairedPromptJob
from afprobe.model.loading import LoadedModel
from afprobe.model.readout import AnswerTokens, ComplianceScore, length_batches, score_batch
from afprobe.stats import Estimate, compare_with_random_null, mean_estimate, paired_difference, ratio_of_means
from afprobe.store.reader import ActivationStore

STEERED_DIRECTIONS = ("training_context", "situational_awareness", "refusal")


@dataclass
class SteerConfig(PairedPromptJob):
    """One steering run; saved in steering.json."""

    directions: str = "probes/run"
    out: str = "results/steering"
    split: str = "evaluate"  # never the queries the directions were fitted on
    layer: int | None = None
    position: str = "last"
    apply_at: str = "suffix"
    coefficients: tuple[float, ...] = (-0.5, -0.25, 0.25, 0.5)
    n_random: int = 10
    benign_n: int | None = None
    ablate: bool = True
    n_boot: int = 2000
    seed: int = 0
    resolution_pairs: int = 2  # pairs scored again in float32 arithmetic to measure what the dtype resolves

    def __post_init__(self) -> None:
        if self.n is None:
            self.n = 20


@dataclass
class SteeringResult(ResultRecord):
    """What `run_steering` found; `to_json()` is steering.json."""

    afprobe_version: str
    config: dict[str, Any]  # the SteerConfig
    model: dict[str, Any]
    layer: int
    typical_norm: float  # the residual norm a coefficient of 1 means
    prompt_hash: str
    n_queries: int
    baseline_gap: dict[str, Any]  # the unsteered gap (an Estimate)
    settings: list[dict[str, Any]]  # one row per direction, coefficient and kind (steer / ablate)
    verdicts: dict[str, Any]  # per named direction: steering and ablation against the random null
    seconds: float | None = None
    resolution: dict[str, Any] | None = None  # what the run's dtype resolves (`afprobe.behaviour.resolution`)

    OPTIONAL = ("resolution",)


@dataclass
class Setting:
    """Compliance of every prompt under one intervention."""

    direction: str
    kind: str  # baseline | steer | ablate
    coefficient: float
    harmful: list[ComplianceScore]
    benign: list[ComplianceScore] = field(default_factory=list)


class _Scorer:
    """Scores a prompt set under whatever intervention is active, reusing the shared prefix when it is unchanged."""

    def __init__(self, loaded: LoadedModel, prompt_set: PromptSet):
        self.loaded = loaded
        self.prompt_set = prompt_set
        self.answers = AnswerTokens.from_tokenizer(loaded.tokenizer)
        prompts = prompt_set.prompts
        self.prefix_len = prompt_set.prefix_len()
        self.prefix = compute_prefix_cache(loaded.model, prompts[0].input_ids[: self.prefix_len])
        self.batches = length_batches(prompts, 1, exact=has_sliding_window(self.prefix.cache))

    def score(self, where: PositionMask | None, *, apply_at: str, recompute_prefix: bool) -> list[ComplianceScore]:
        model, prompts = self.loaded.model, self.prompt_set.prompts
        prefix = self.prefix
        if recompute_prefix:
            prefix = compute_prefix_cache(model, prompts[0].input_ids[: self.prefix_len])
        scores: list[ComplianceScore | None] = [None] * len(prompts)
        pad_id = pad_token_id(self.loaded.tokenizer)
        for batch in self.batches:
            chosen = [prompts[i] for i in batch]
            context: AbstractContextManager[Any] = nullcontext()
            if where is not None and apply_at != "suffix":
                context = _stage1_positions(where, chosen, self.prefix_len, len(self.answers.common), apply_at)
            for i, score in zip(
                batch,
                score_batch(model, prefix, chosen, self.answers, pad_id=pad_id, stage1_context=context),
                strict=True,
            ):
                scores[i] = score
        return [s for s in scores if s is not None]


@contextmanager
def _stage1_positions(
    where: PositionMask, prompts: list[Any], prefix_len: int, n_common: int, apply_at: str
) -> Iterator[None]:
    """While the prompts' own tokens run, edit only the last prompt token (`last`) or every token from the tier
    tag on (`from_tag`); the answer tokens scored after them are edited in `from_tag` mode only."""
    own = [p.n_tokens - prefix_len for p in prompts]
    mask = torch.zeros(len(prompts), max(own) + n_common, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if apply_at == "last":
            mask[row, own[row] - 1] = True
        else:
            start = max(0, (prompt.tag_span[0] if prompt.tag_span else prefix_len) - prefix_len)
            mask[row, start : own[row] + n_common] = True
    where.mask, where.active = mask, True
    try:
        yield
    finally:
        where.mask, where.active = None, apply_at == "from_tag"


def _column(scores: list[ComplianceScore], prompt_set: PromptSet, tier: str) -> np.ndarray:
    by_key = {(p.query_id, p.tier): s.log_odds for p, s in zip(prompt_set.prompts, scores, strict=True)}
    return np.array([by_key[(q.query_id, tier)] for q in prompt_set.queries])


def run_steering(
    config: SteerConfig, *, loaded: LoadedModel | None = None, progress: Callable[[int, int], None] | None = None
) -> SteeringResult:
    start = time.perf_counter()
    if config.apply_at not in ("suffix", "from_tag", "last"):
        raise AfprobeError(f"unknown --apply-at {config.apply_at!r}: use suffix, from_tag or last")
    probe_set = load_probe_set(config.directions)
    layer = config.layer if config.layer is not None else _best_layer(probe_set, config.position)
    available = {
        name: probe_set.direction(name, layer, config.position).vector
        for name in STEERED_DIRECTIONS
        if f"{name}.{config.position}" in probe_set.directions
    }
    if loaded is None:
        loaded = config.load()
    if loaded.fingerprint.weights_sha256 != probe_set.metrics.store["model"]["weights_sha256"]:
        raise AfprobeError(
            f"the directions in {config.directions} were computed on another model "
            f"({probe_set.metrics.store['model']['name']}): steer the model they came from"
        )
    scale = _typical_norm(probe_set, layer, config.position, loaded)
    harmful = render_pairs(
        loaded.tokenizer,
        config.queries(),
        config.prompt_config(),
        max_context=loaded.max_context or None,
    )
    if harmful.variant.contrast is None:
        raise AfprobeError(f"variant {config.variant!r} has one tier: steering needs a tier contrast")
    evaluated = [q.query_id for q in harmful.queries]
    benign = None
    if config.benign_n:
        benign = render_pairs(
            loaded.tokenizer,
            load_queries("benign", n=config.benign_n, split=config.split),
            config.prompt_config(),
            max_context=loaded.max_context or None,
        )
        evaluated += [q.query_id for q in benign.queries]
    check_disjoint(probe_set.metrics.fit_queries, evaluated, f"the directions in {config.directions}")
    resolution = (
        measure_resolution(loaded.model, loaded.tokenizer, harmful, n_pairs=config.resolution_pairs)
        if config.resolution_pairs > 0
        else None
    )
    harmful_scorer = _Scorer(loaded, harmful)
    benign_scorer = _Scorer(loaded, benign) if benign is not None else None

    generator = torch.Generator().manual_seed(config.seed)
    randoms = {f"random_{i}": torch.randn(loaded.d_model, generator=generator) for i in range(config.n_random)}
    plans: list[tuple[str, str, float]] = [("none", "baseline", 0.0)]
    for name in [*available, *randoms]:
        plans += [(name, "steer", c) for c in config.coefficients if c != 0]
    if config.ablate:
        plans += [(name, "ablate", 0.0) for name in [*available, *randoms]]
    vectors = {**available, **randoms}

    settings: list[Setting] = []
    for done, (name, kind, coefficient) in enumerate(plans, start=1):
        where = PositionMask(active=config.apply_at == "suffix")
        apply_at = config.apply_at if kind == "steer" else "suffix"
        if kind == "steer":
            context: AbstractContextManager[Any] = add_direction(
                loaded.model, vectors[name], layers=[layer], coefficient=coefficient, scale=scale, where=where
            )
        elif kind == "ablate":
            context = ablate_directions(loaded.model, vectors[name])
        else:
            context = nullcontext()
        with context:
            harmful_scores = harmful_scorer.score(where, apply_at=apply_at, recompute_prefix=kind == "ablate")
            benign_scores = (
                benign_scorer.score(where, apply_at=apply_at, recompute_prefix=kind == "ablate")
                if benign_scorer is not None
                else []
            )
        settings.append(Setting(name, kind, coefficient, harmful_scores, benign_scores))
        if progress is not None:
            progress(done, len(plans))

    output = _analyse(
        config, settings, harmful, benign, layer, scale, list(available), list(randoms), loaded, resolution
    )
    output.seconds = time.perf_counter() - start
    out = Path(config.out)
    with results_folder(out):
        atomic_write_json(result_file("steering", out), output.to_json())
        from afprobe.analysis import plots

        for figure_name, figure in plots.steering_figures(output.to_json()).items():
            plots.write_figure(figure, out / f"{figure_name}.html")
    return output


def _best_layer(probe_set: ProbeSet, position: str) -> int:
    best = probe_set.metrics.summary.get("best_by_position", {}).get(position)
    if best is None:
        raise AfprobeError(f"no probe results at position {position!r} in {probe_set.path}: pass --layer")
    return int(best["layer"])


def _typical_norm(probe_set: ProbeSet, layer: int, position: str, loaded: LoadedModel) -> float:
    """Mean residual norm at the layer and position, from the store the directions were computed on."""
    store = ActivationStore.open(probe_set.metrics.store["path"])
    return float(store.activations(position, layers=[layer]).norm(dim=-1).mean())


def _analyse(
    config: SteerConfig,
    settings: list[Setting],
    harmful: PromptSet,
    benign: PromptSet | None,
    layer: int,
    scale: float,
    directions: list[str],
    randoms: list[str],
    loaded: LoadedModel,
    resolution: Resolution | None = None,
) -> SteeringResult:
    trained, untrained = harmful.variant.contrast  # type: ignore[misc]
    baseline = settings[0]
    base_free = _column(baseline.harmful, harmful, trained)
    base_paid = _column(baseline.harmful, harmful, untrained)
    boot = {"n_boot": config.n_boot, "n_perm": config.n_boot, "seed": config.seed}

    def describe(setting: Setting) -> dict[str, Any]:
        free, paid = _column(setting.harmful, harmful, trained), _column(setting.harmful, harmful, untrained)
        gap_change = (free - paid) - (base_free - base_paid)
        shift = ((free - base_free) + (paid - base_paid)) / 2
        row: dict[str, Any] = {
            "direction": setting.direction,
            "kind": setting.kind,
            "coefficient": setting.coefficient,
            "free": mean_estimate(free, n_boot=config.n_boot, seed=config.seed).to_dict(),
            "paid": mean_estimate(paid, n_boot=config.n_boot, seed=config.seed).to_dict(),
            "gap": paired_difference(free, paid, **boot).to_dict(),
            "gap_change": paired_difference(gap_change, np.zeros_like(gap_change), **boot).to_dict(),
            "mean_shift": paired_difference(shift, np.zeros_like(shift), **boot).to_dict(),
        }
        if setting.kind == "ablate":
            ratio = ratio_of_means(free - paid, base_free - base_paid, n_boot=config.n_boot, seed=config.seed)
            row["fraction_remaining"] = {k: float(v) for k, v in ratio.items()}
        if benign is not None and setting.benign:
            values = np.array([s.log_odds for s in setting.benign])
            row["benign"] = mean_estimate(values, n_boot=config.n_boot, seed=config.seed).to_dict()
        return row

    rows = [describe(s) for s in settings]
    base_gap = rows[0]["gap"]["mean"]
    # Below this, a change of the mean gap is within what the dtype's rounding alone produces.
    band = resolution.of_mean_difference(len(harmful.queries)) if resolution is not None else 0.0
    verdicts = {}
    for name in directions:
        verdicts[name] = _verdict(name, rows, randoms, base_gap, config.coefficients, band)
    return SteeringResult(
        afprobe_version=__version__,
        config=asdict(config),
        model=loaded.fingerprint.to_dict(),
        layer=layer,
        typical_norm=scale,
        prompt_hash=harmful.prompt_hash,
        n_queries=len(harmful.queries),
        baseline_gap=rows[0]["gap"],
        settings=rows,
        verdicts=verdicts,
        resolution=None if resolution is None else {**resolution.to_dict(), "mean_difference_resolution": band},
    )


def _verdict(
    name: str,
    rows: list[dict[str, Any]],
    randoms: list[str],
    base_gap: float,
    coefficients: tuple[float, ...],
    resolution_band: float = 0.0,
) -> dict[str, Any]:
    """Plain statements: does the direction move the gap more than random directions, and is it a uniform shift?
    A change, or a baseline gap, within `resolution_band` nats is below what the dtype resolves and says so."""
    largest = max(abs(c) for c in coefficients if c != 0)
    verdict: dict[str, Any] = {}

    def at_largest(direction: str) -> list[dict[str, Any]]:
        return [
            r for r in rows if r["direction"] == direction and r["kind"] == "steer" and abs(r["coefficient"]) == largest
        ]

    steer = at_largest(name)
    # Sign-matched: the named direction's effect is the larger over its two signs, so each random direction's is too.
    null = [max(abs(r["gap_change"]["mean"]) for r in at_largest(random)) for random in randoms if at_largest(random)]
    if steer and null:
        strongest = max(steer, key=lambda r: abs(r["gap_change"]["mean"]))
        effect = abs(strongest["gap_change"]["mean"])
        shift = max(abs(r["mean_shift"]["mean"]) for r in steer)
        versus = compare_with_random_null(effect, null)
        threshold = versus.null_p95
        moves_gap = any(_excludes_zero(r["gap_change"]) for r in steer)
        shifts_both = any(_excludes_zero(r["mean_shift"]) for r in steer)
        uniform = shifts_both and _surely_larger(strongest["mean_shift"], strongest["gap_change"])
        verdict["steering"] = {
            "coefficient": largest,
            "largest_gap_change": effect,
            "largest_mean_shift": shift,
            "random_null_p95": threshold,
            "exceeds_random_null": versus.beyond,
            "gap_change_excludes_zero": moves_gap,
            "shifts_both_tiers": shifts_both,
            "resolved": effect > resolution_band,
            "uniform_shift": uniform,
            "reading": _reading(name, versus.beyond, moves_gap, shifts_both, uniform, effect, shift)
            if effect > resolution_band
            else f"steering along {name} changes the gap by {effect:.3g} nats, below the {resolution_band:.3g} nats "
            "this dtype resolves: rerun with --dtype float32",
        }
    ablation = next((r for r in rows if r["direction"] == name and r["kind"] == "ablate"), None)
    null_ablation = [r["gap"]["mean"] for r in rows if r["direction"] in randoms and r["kind"] == "ablate"]
    if ablation is not None:
        # A fraction of a gap the dtype does not resolve is a ratio of rounding noise.
        nothing = {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
        remaining = ablation["fraction_remaining"] if abs(base_gap) > resolution_band else nothing
        low, high = np.quantile(null_ablation, [0.025, 0.975]) if null_ablation else (float("nan"),) * 2
        verdict["ablation"] = {
            "gap_after": ablation["gap"],
            "fraction_remaining": remaining,
            "random_gap_range_95": [float(low), float(high)],
            "outside_random_range": bool(null_ablation) and not low <= ablation["gap"]["mean"] <= high,
        }
    return verdict


def _excludes_zero(estimate: dict[str, Any]) -> bool:
    return Estimate(**estimate).excludes_zero()


def _surely_larger(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """|a| is larger than |b| beyond both intervals: a's interval excludes zero and its smallest magnitude exceeds
    the largest magnitude in b's interval."""
    if not _excludes_zero(a):
        return False
    smallest_a = min(abs(a["ci_low"]), abs(a["ci_high"]))
    return smallest_a > max(abs(b["ci_low"]), abs(b["ci_high"]))


def _reading(
    name: str, beyond_null: bool, moves_gap: bool, shifts_both: bool, uniform: bool, gap: float, shift: float
) -> str:
    # A shift of both tiers surely larger than the gap change is the refusal-confound pattern.
    if beyond_null and moves_gap and not uniform:
        return f"steering along {name} changes the gap more than random directions of the same norm"
    if beyond_null and moves_gap:
        return (
            f"steering along {name} changes the gap beyond the random null ({gap:.3f} nats), but shifts both tiers "
            f"far more ({shift:.3f} nats): mostly a uniform change in compliance, not a gap-specific one"
        )
    if shifts_both and not moves_gap:
        return f"steering along {name} shifts compliance on both tiers alike without changing the gap"
    if moves_gap:
        return f"steering along {name} changes the gap, but no more than random directions do"
    return f"steering along {name} has no detectable effect on the gap"
