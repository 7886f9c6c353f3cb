"""The patching experiment: where is the gap computed, and which subspace carries it?

`run_patching(PatchConfig(...))` renders paired prompts and, for every pair, in both directions (the untrained
tier's activations into the trained tier's run and the reverse):

1. **Residual sweep**: patch the residual stream at each layer and each position after the shared prefix. Positions
   are the grid's *columns*: the tokens from the tier tag up to the request one by one, the request as one column
   (its length varies by query), and the tokens after the request one by one, aligned from the end.
2. **Components**: each attention head's output and each MLP's output, per layer, at the columns where the residual
   sweep recovers most.
3. **Attribution patching**: the gradient estimate of every patch above from one backward pass per pair and
   direction, with its Spearman rank correlation against the exact patches on the same cells.
4. **Mediation**: at chosen layers, patch every position after the prefix but only the component along a subspace:
   the situational-awareness, training-context and refusal directions (from `afprobe probe`), the
   token-embedding difference of the two tags, random directions (the null), the whole residual (must recover 1)
   and the empty subspace (must recover 0).

`pair` swaps any two tiers instead of the variant's contrast, e.g. `free,absent` with the `tag-absent` variant: a
tagged and an untagged prompt, whose differing lengths the position grid pairs from the request on.

Recovery of a cell is the mean patched change of the receiver's decision-position log-odds over the mean gap between
donor and receiver (a ratio of means over queries: per-query ratios explode when a query's own gap is near zero),
with a bootstrap interval over queries.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from afprobe import __version__
from afprobe.analysis.probes import ProbeSet, load_probe_set
from afprobe.analysis.verdict import ALPHA
from afprobe.artefacts import ResultRecord, result_file
from afprobe.behaviour.resolution import Resolution, measure_resolution
from afprobe.data.prompts import PromptSet, RenderedPrompt, cacheable_prefix_len, common_prefix_length, render_pairs
from afprobe.data.splits import check_disjoint
from afprobe.errors import AfprobeError
from afprobe.files import atomic_write_bytes, atomic_write_json, finite_json, results_folder
from afprobe.model.architecture import parse_layers
from afprobe.model.forward import compute_prefix_cache
from afprobe.model.interventions import orthonormal_basis
from afprobe.model.job import PairedPromptJob
from afprobe.model.loading import LoadedModel
from afprobe.model.patching import FeatureEdit, PatchEdit, Patcher, PatchRun
from afprobe.model.readout import AnswerTokens
from afprobe.stats import Estimate, compare_with_random_null, holm, ratio_of_means

MEDIATED_DIRECTIONS = ("situational_awareness", "training_context", "refusal")


# A random feature set's member is drawn from this many live features nearest in mean activation to the one it
# stands in for.
MATCH_NEIGHBOURS = 10


@dataclass
class PatchConfig(PairedPromptJob):
    """One patching run; saved in patch.json."""

    out: str = "results/patch"
    split: str = "evaluate"  # never the queries the directions and feature sets were fitted on
    pair: str | None = None  # "free,absent": the two tiers compared (default: the variant's contrast)
    directions: str | None = None  # a probes folder; without it mediation tests only the token embedding
    direction_position: str = "last"
    layers: str = "all"  # residual layers of the sweep: all, a list "0,6,12" or a range "0-30:3"
    positions: str = "all"  # all | key (tag, first token after it, request, last 4)
    components: bool = True
    component_columns: int = 2
    attribution: bool = True
    mediation_layers: str = "default"  # default (probes' best layer, n/4, n/2, 3n/4), best, or a list "6,12"
    n_random: int = 10
    sae_features: str | None = None  # a folder from `afprobe sae features`: patch and ablate its feature groups
    n_boot: int = 2000
    seed: int = 0
    resolution_pairs: int = 2  # pairs scored again in float32 arithmetic to measure what the dtype resolves

    def __post_init__(self) -> None:
        if self.n is None:
            self.n = 8
        if self.positions not in ("all", "key"):
            raise AfprobeError(f"unknown --positions {self.positions!r}: use all or key")


@dataclass(frozen=True)
class Column:
    """One column of the position grid: a token (`tag`, `pre`, `post`) or the whole request span (`request`).

    positions[i]: the own-token positions patched together in pair i's first prompt; other[i]: the matching
    positions in its second prompt (the same, unless the two prompts differ in length, as tagged and untagged do).
    """

    label: str
    kind: str
    positions: tuple[tuple[int, ...], ...]
    other: tuple[tuple[int, ...], ...]


@dataclass
class Pair:
    query_id: str
    trained: RenderedPrompt  # the first prompt of the comparison (the trained tier, or the tier facing `absent`)
    untrained: RenderedPrompt


def build_columns(pairs: Sequence[Pair], patcher: Patcher, tokenizer: Any) -> list[Column]:
    """The position grid shared by all pairs (see the module docstring).

    Tokens between the first difference and the request are paired one to one: from the first difference on when
    both prompts have the same number of them, otherwise backwards from the request (a tag line present in one
    prompt only has no partner and is not patched position by position). The request and everything after it are
    the same text in both prompts and are paired from the end.
    """
    k = patcher.prefix.length
    a_tokens, b_tokens, firsts, same_length = [], [], [], []
    for pair in pairs:
        a, b = patcher.tokens_of(pair.trained), patcher.tokens_of(pair.untrained)
        first = common_prefix_length([a, b])
        if first == len(a) == len(b):
            raise AfprobeError(f"query {pair.query_id}: the two prompts are identical; nothing to patch")
        a_tokens.append(a)
        b_tokens.append(b)
        firsts.append(first)
        same_length.append(len(a) == len(b))
    a_req = [p.trained.request_span[0] - k for p in pairs]
    b_req = [p.untrained.request_span[0] - k for p in pairs]
    a_end = [p.trained.request_span[1] - k for p in pairs]
    b_end = [p.untrained.request_span[1] - k for p in pairs]
    n_post = min(min(len(a) - e, len(b) - f) for a, b, e, f in zip(a_tokens, b_tokens, a_end, b_end, strict=True))
    forward = all(ra - f == rb - f for ra, rb, f in zip(a_req, b_req, firsts, strict=True))
    n_pre = min(max(0, min(ra, rb) - f) for ra, rb, f in zip(a_req, b_req, firsts, strict=True))
    tag = pairs[0].trained.tag_span
    tag_rel = (tag[0] - k, tag[1] - k) if tag else (-1, -1)

    def label(positions: Sequence[int]) -> str:
        text = repr(tokenizer.decode([a_tokens[0][positions[0]]]))[1:-1]
        return text + " (varies)" if len({a_tokens[i][p] for i, p in enumerate(positions)}) > 1 else text

    columns = []
    for j in range(n_pre):
        a_pos = [f + j if forward else ra - n_pre + j for f, ra in zip(firsts, a_req, strict=True)]
        b_pos = [f + j if forward else rb - n_pre + j for f, rb in zip(firsts, b_req, strict=True)]
        kind = "tag" if tag_rel[0] <= a_pos[0] < tag_rel[1] else "pre"
        columns.append(Column(label(a_pos), kind, tuple((p,) for p in a_pos), tuple((p,) for p in b_pos)))
    a_request, b_request = [], []
    for i in range(len(pairs)):
        a_low = firsts[i] + n_pre if forward else a_req[i]
        b_low = firsts[i] + n_pre if forward else b_req[i]
        a_span = tuple(range(a_low, len(a_tokens[i]) - n_post))
        b_span = tuple(range(b_low, len(b_tokens[i]) - n_post))
        if len(a_span) != len(b_span) or [a_tokens[i][p] for p in a_span] != [b_tokens[i][p] for p in b_span]:
            raise AfprobeError(
                f"query {pairs[i].query_id}: the request tokenizes differently in the two prompts, so their positions "
                "cannot be paired; patching needs prompts that differ only in the tier tag"
            )
        a_request.append(a_span)
        b_request.append(b_span)
    if all(a_request):
        columns.append(Column("[request]", "request", tuple(a_request), tuple(b_request)))
    for j in range(n_post):
        a_pos = [len(a) - n_post + j for a in a_tokens]
        b_pos = [len(b) - n_post + j for b in b_tokens]
        columns.append(Column(label(a_pos), "post", tuple((p,) for p in a_pos), tuple((p,) for p in b_pos)))
    return columns


def key_columns(columns: Sequence[Column]) -> list[int]:
    """The reduced sweep: the tag, the token after it, the request and the last four tokens."""
    tag = [i for i, c in enumerate(columns) if c.kind == "tag"]
    after = [i for i, c in enumerate(columns) if c.kind == "pre"][:1]
    request = [i for i, c in enumerate(columns) if c.kind == "request"]
    post = [i for i, c in enumerate(columns) if c.kind == "post"][-4:]
    return sorted({*tag, *after, *request, *post})


def make_pairs(prompt_set: PromptSet, tiers: tuple[str, str] | None = None) -> list[Pair]:
    """One pair per query: the two tiers compared (default: the variant's contrast, trained tier first)."""
    if tiers is None:
        if prompt_set.variant.contrast is None:
            raise AfprobeError(f"variant {prompt_set.variant.name!r} has one tier: patching needs two tiers to swap")
        tiers = prompt_set.variant.contrast
    for name in tiers:
        prompt_set.variant.tier(name)
    if tiers[0] == tiers[1]:
        raise AfprobeError(f"--pair {tiers[0]},{tiers[1]} compares a tier with itself: name two tiers")
    trained, untrained = tiers
    by_query: dict[str, dict[str, RenderedPrompt]] = {}
    for prompt in prompt_set.prompts:
        by_query.setdefault(prompt.query_id, {})[prompt.tier] = prompt
    return [Pair(q, rendered[trained], rendered[untrained]) for q, rendered in by_query.items()]


def residual_sweep(
    patcher: Patcher,
    receiver: PatchRun,
    donor: PatchRun,
    layers: Sequence[int],
    positions: Sequence[tuple[int, ...]],
    donor_positions: Sequence[tuple[int, ...]] | None = None,
    *,
    tick: Callable[[], None] | None = None,
) -> np.ndarray:
    """`[layers, len(positions)]`: the receiver's metric change when the residual stream at each layer and each
    position set is replaced by the donor's (read at `donor_positions`, default the same positions)."""
    sources = donor_positions if donor_positions is not None else positions
    deltas = np.zeros((len(layers), len(positions)))
    for a, layer in enumerate(layers):
        for b, (where, source) in enumerate(zip(positions, sources, strict=True)):
            edit = PatchEdit("resid", layer, where, donor_positions=source)
            deltas[a, b] = patcher.patched_metric(receiver, donor, [edit]) - receiver.metric
            if tick is not None:
                tick()
    return deltas


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    mask = np.isfinite(a) & np.isfinite(b)
    if mask.sum() < 3 or np.ptp(a[mask]) == 0 or np.ptp(b[mask]) == 0:
        return None
    return float(spearmanr(a[mask], b[mask]).statistic)


def token_embedding_difference(loaded: LoadedModel, pair: Pair) -> torch.Tensor:
    """Input embedding of the trained tier's tag tokens minus the untrained tier's (mean over the tag's tokens)."""
    weight = loaded.model.get_input_embeddings().weight.detach().float().cpu()

    def tag_mean(prompt: RenderedPrompt) -> torch.Tensor:
        if prompt.tag_span is None:
            raise AfprobeError("the prompts have no tier tag, so there is no token-embedding difference")
        start, end = prompt.tag_span
        return weight[list(prompt.input_ids[start:end])].mean(0)

    if pair.untrained.tag_span is None:  # compared with an untagged prompt: the tag's own embedding
        return tag_mean(pair.trained)
    return tag_mean(pair.trained) - tag_mean(pair.untrained)


def _parse_pair(spec: str | None) -> tuple[str, str] | None:
    if spec is None:
        return None
    names = [name.strip() for name in spec.split(",")]
    if len(names) != 2 or not all(names):
        raise AfprobeError(f"cannot read --pair {spec!r}: name two tiers like free,paid or free,absent")
    return names[0], names[1]


def _mediation_layers(config: PatchConfig, probe_set: ProbeSet | None, n_layers: int) -> list[int]:
    spec = config.mediation_layers.strip()
    best = None
    if probe_set is not None:
        row = probe_set.metrics.summary.get("best_by_position", {}).get(config.direction_position)
        best = int(row["layer"]) if row is not None else None
    if spec == "best":
        if best is None:
            raise AfprobeError("--mediation-layers best needs --directions with probe results: give layers instead")
        return [best]
    if spec == "default":
        layers = [n_layers // 4, n_layers // 2, 3 * n_layers // 4] + ([best] if best is not None else [])
        if probe_set is not None:
            layers = [layer for layer in layers if layer in probe_set.layers] or layers
    else:
        try:
            layers = [int(x) for x in spec.split(",")]
        except ValueError as exc:
            raise AfprobeError(f"cannot read mediation layers {spec!r}: use default, best or a list like 6,12") from exc
    bad = [layer for layer in layers if not 0 <= layer <= n_layers]
    if bad or not layers:
        raise AfprobeError(f"mediation layers {bad or spec} out of range 0..{n_layers}")
    return sorted(set(layers))


def _subspaces(
    config: PatchConfig, probe_set: ProbeSet | None, layer: int, embedding: torch.Tensor, d_model: int
) -> dict[str, torch.Tensor | None]:
    """name -> orthonormal basis `[d_model, k]` (None = the whole residual stream)."""
    spaces: dict[str, torch.Tensor | None] = {"full": None, "empty": torch.zeros(d_model, 0)}
    if probe_set is not None and layer in probe_set.layers:
        for name in MEDIATED_DIRECTIONS:
            if f"{name}.{config.direction_position}" in probe_set.directions:
                spaces[name] = orthonormal_basis(probe_set.direction(name, layer, config.direction_position).vector)
    spaces["token_embedding"] = orthonormal_basis(embedding)
    generator = torch.Generator().manual_seed(config.seed + layer)
    for i in range(config.n_random):
        spaces[f"random_{i}"] = orthonormal_basis(torch.randn(d_model, generator=generator))
    return spaces


@dataclass
class FeatureSets:
    """SAE feature sets to patch and ablate: each group of `afprobe sae features`, all its features together, the
    empty set (a check), and for each non-empty set `n_random` random sets of the same size, each feature drawn from
    the live features closest to it in mean activation (a random set of rarely active features would be a null
    that changes nothing)."""

    sae: Any
    layer: int
    position: str  # the position kind the features were found at; they are patched there
    source: str
    names: list[str]
    sets: list[tuple[int, ...]]
    matches: list[int | None]  # for a random set, the index of the set it is the null of


def load_feature_sets(config: PatchConfig, loaded: LoadedModel, evaluated: Sequence[str]) -> FeatureSets | None:
    if config.sae_features is None:
        return None
    from afprobe.analysis.sae import load_sae

    folder = Path(config.sae_features)
    path = result_file("features", folder) if folder.is_dir() else folder
    if not path.is_file():
        raise AfprobeError(f"{config.sae_features} holds no features.json: run `afprobe sae features --out` first")
    result = json.loads(path.read_text())
    if result["model"]["weights_sha256"] != loaded.fingerprint.weights_sha256:
        raise AfprobeError(
            f"the SAE features in {config.sae_features} come from {result['model']['name']}: patch that model"
        )
    check_disjoint(result.get("fit_queries"), evaluated, f"the SAE features in {config.sae_features}")
    sae = load_sae(result["sae"]["path"], sae_id=result["sae"]["sae_id"], device=str(loaded.device))
    names, sets, matches = ["sae_empty"], [()], [None]
    for group, features in result["groups"].items():
        if features:
            names.append(f"sae_{group}")
            sets.append(tuple(features))
            matches.append(None)
    characterised = [row["feature"] for row in result["features"]]
    if len(names) > 2:
        names.append("sae_all_tier_differing")
        sets.append(tuple(characterised))
        matches.append(None)
    pool = np.array(sorted(set(result["alive_features"]) - set(characterised)))
    if pool.size == 0:
        pool = np.array(sorted(set(range(result["n_features"])) - set(characterised)))
    mean = np.asarray(result.get("mean_activation") or np.zeros(result["n_features"]))
    rng = np.random.default_rng(config.seed)
    for index in range(1, len(names) if pool.size else 0):
        for r in range(config.n_random):
            chosen: list[int] = []
            for feature in sets[index]:
                free = pool[~np.isin(pool, chosen)]
                if free.size == 0:
                    break
                nearest = free[np.argsort(np.abs(mean[free] - mean[feature]), kind="stable")[:MATCH_NEIGHBOURS]]
                chosen.append(int(rng.choice(nearest)))
            names.append(f"{names[index]}_random_{r}")
            sets.append(tuple(chosen))
            matches.append(index)
    return FeatureSets(sae, int(result["layer"]), str(result["position"]), str(path), names, sets, matches)


@dataclass
class PatchResult(ResultRecord):
    """What `run_patching` found; `to_json()` is patch.json (the per-query arrays are in patching.safetensors)."""

    OPTIONAL = ("attribution_skipped", "resolution", "gap_resolved")

    afprobe_version: str
    config: dict[str, Any]  # the PatchConfig
    model: dict[str, Any]
    directions_from: str | None  # the probes folder the named directions came from
    prompt_hash: str
    variant: str
    contrast: list[str]  # the two tiers compared
    queries: list[str]
    shared_prefix_len: int
    metric: str
    patch_directions: list[str]  # "untrained->trained", "trained->untrained"
    gap: Estimate  # the first-token gap the shares are fractions of
    no_gap: bool  # its interval includes zero, or it is below the dtype's resolution: shares of it are noise
    columns: list[dict[str, str]]
    layers: list[int]
    sweep_columns: list[int]
    sweep: dict[str, Any]  # per patch direction: recovery per layer and column, top cells
    attribution: dict[str, Any] | None
    components: dict[str, Any] | None
    mediation: dict[str, Any]  # layers and rows (subspaces and SAE feature sets against their random nulls)
    checks: dict[str, dict[str, Any]]  # measured error, tolerance, passed
    summary: list[str]
    timing: dict[str, float]
    attribution_skipped: str | None = None
    resolution: dict[str, Any] | None = None  # what the run's dtype resolves (`afprobe.behaviour.resolution`)
    gap_resolved: bool | None = None  # the gap is larger than that (None: not measured)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PatchResult:
        return super().from_json({**data, "gap": Estimate(**data["gap"])})

    @property
    def checks_passed(self) -> bool:
        return all(row["passed"] for row in self.checks.values())


def patch_effect(patcher: Patcher, receiver: PatchRun, donor: PatchRun, edit: PatchEdit) -> float:
    """The one generic patch: how much `edit` (the donor's activation at its site) moves the receiver's metric.
    Every cell of a sweep, a component, a subspace or a feature set is this with another `PatchEdit`."""
    return patcher.patched_metric(receiver, donor, [edit]) - receiver.metric


@dataclass
class PatchPlan:
    """What a patching run settles before its first patch: the pairs, the position grid, the layers and the
    subspaces, heads and feature sets it patches."""

    config: PatchConfig
    loaded: LoadedModel
    probe_set: ProbeSet | None
    prompt_set: PromptSet
    pairs: list[Pair]
    patcher: Patcher
    prefix_seconds: float
    columns: list[Column]
    sweep_columns: list[int]
    layers: list[int]
    med_layers: list[int]
    spaces: dict[int, dict[str, torch.Tensor | None]]
    component_layers: list[int]
    n_component_columns: int
    directions: list[str]  # "untrained->trained" (patch the trained run into the untrained one), then the reverse
    aligned: bool  # the two prompts of a pair have the same length (attribution pairs them position by position)
    use_attribution: bool
    feature_sets: FeatureSets | None

    @property
    def space_names(self) -> list[str]:
        return list(self.spaces[self.med_layers[0]])

    @property
    def n_layers(self) -> int:
        return self.patcher.n_layers

    def sides(self, column: int, i: int, d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(receiver positions, donor positions) of a column for pair i in direction d."""
        cell = self.columns[column]
        return (cell.positions[i], cell.other[i]) if d == 0 else (cell.other[i], cell.positions[i])

    def every_position(self, i: int, d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Every own position of the grid, receiver and donor side."""
        sides = [self.sides(c, i, d) for c in range(len(self.columns))]
        return tuple(p for side in sides for p in side[0]), tuple(p for side in sides for p in side[1])

    def n_steps(self) -> int:
        n_sets = len(self.feature_sets.sets) if self.feature_sets is not None else 0
        per_pair = len(self.layers) * len(self.sweep_columns) + len(self.med_layers) * len(self.space_names)
        per_pair += 2 + 2 * n_sets + int(self.use_attribution)
        components = len(self.component_layers) * (self.patcher.n_heads + 1) * self.n_component_columns
        return len(self.pairs) * len(self.directions) * (per_pair + components)


@dataclass
class PatchMeasurements:
    """Every patch's raw effect (patched minus clean metric), indexed [direction, pair, ...]: what
    patching.safetensors holds, and what the analysis turns into shares of the gap."""

    receiver_metric: np.ndarray  # [direction, pair]
    donor_metric: np.ndarray
    sweep: np.ndarray  # [direction, pair, layer, sweep column]
    mediation: np.ndarray  # [direction, pair, mediation layer, subspace]
    attribution: dict[str, np.ndarray]
    heads: np.ndarray  # [direction, pair, component layer, chosen column, head]
    mlps: np.ndarray
    sae_patch: np.ndarray  # [direction, pair, feature set]
    sae_ablated: np.ndarray  # [pair, feature set, (trained, untrained)]: each run's metric with the set ablated
    sae_whole: np.ndarray  # [direction, pair]: the whole residual patched where the features are
    chosen: list[int] = field(default_factory=list)  # the columns whose heads and MLPs were patched
    self_patch_error: float = 0.0
    last_layer_error: float = 0.0
    timing: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("sweep", "attribution", "mediation", "sae", "components", "record"), 0.0)
    )

    @classmethod
    def empty(cls, plan: PatchPlan) -> PatchMeasurements:
        n_pairs, n_cols, n_layers, n_heads = len(plan.pairs), len(plan.columns), plan.n_layers, plan.patcher.n_heads
        n_sets = len(plan.feature_sets.sets) if plan.feature_sets is not None else 0
        shape = (len(plan.component_layers), plan.n_component_columns)
        return cls(
            receiver_metric=np.zeros((2, n_pairs)),
            donor_metric=np.zeros((2, n_pairs)),
            sweep=np.full((2, n_pairs, len(plan.layers), len(plan.sweep_columns)), np.nan),
            mediation=np.zeros((2, n_pairs, len(plan.med_layers), len(plan.space_names))),
            attribution={
                "resid": np.zeros((2, n_pairs, n_layers + 1, n_cols)),
                "attn_head": np.zeros((2, n_pairs, n_layers, n_cols, n_heads)),
                "mlp": np.zeros((2, n_pairs, n_layers, n_cols)),
            },
            heads=np.full((2, n_pairs, *shape, n_heads), np.nan),
            mlps=np.full((2, n_pairs, *shape), np.nan),
            sae_patch=np.zeros((2, n_pairs, n_sets)),
            sae_ablated=np.zeros((n_pairs, n_sets, 2)),
            sae_whole=np.zeros((2, n_pairs)),
        )

    @property
    def totals(self) -> np.ndarray:
        """[direction, pair]: donor minus receiver, the whole effect a patch could move."""
        return self.donor_metric - self.receiver_metric

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timing[part] = self.timing.get(part, 0.0) + time.perf_counter() - start


def plan_patching(config: PatchConfig, loaded: LoadedModel, probe_set: ProbeSet | None) -> PatchPlan:
    """Render the pairs, run the shared prefix once, and fix the grid, layers, subspaces and feature sets."""
    prompt_set = render_pairs(
        loaded.tokenizer,
        config.queries(),
        config.prompt_config(),
        max_context=loaded.max_context or None,
    )
    pairs = make_pairs(prompt_set, _parse_pair(config.pair))
    evaluated = [pair.query_id for pair in pairs]
    if probe_set is not None:
        check_disjoint(probe_set.metrics.fit_queries, evaluated, f"the directions in {config.directions}")
    prompts = [prompt for pair in pairs for prompt in (pair.trained, pair.untrained)]
    k = cacheable_prefix_len(prompts)  # the pairs patched may share more than the whole set
    t0 = time.perf_counter()
    prefix = compute_prefix_cache(loaded.model, prompts[0].input_ids[:k])
    prefix_seconds = time.perf_counter() - t0
    patcher = Patcher(loaded.model, prefix, AnswerTokens.from_tokenizer(loaded.tokenizer))
    n_layers = patcher.n_layers
    columns = build_columns(pairs, patcher, loaded.tokenizer)
    layers = parse_layers(config.layers, n_layers)
    med_layers = _mediation_layers(config, probe_set, n_layers)
    embedding = token_embedding_difference(loaded, pairs[0])
    sweep_columns = list(range(len(columns))) if config.positions == "all" else key_columns(columns)
    trained_name, untrained_name = pairs[0].trained.tier, pairs[0].untrained.tier
    aligned = all(len(p.trained.input_ids) == len(p.untrained.input_ids) for p in pairs)
    feature_sets = load_feature_sets(config, loaded, evaluated)
    if feature_sets is not None and not 0 <= feature_sets.layer <= n_layers:
        raise AfprobeError(f"the SAE reads layer {feature_sets.layer}, outside this model's 0..{n_layers}")
    return PatchPlan(
        config=config,
        loaded=loaded,
        probe_set=probe_set,
        prompt_set=prompt_set,
        pairs=pairs,
        patcher=patcher,
        prefix_seconds=prefix_seconds,
        columns=columns,
        sweep_columns=sweep_columns,
        layers=layers,
        med_layers=med_layers,
        spaces={layer: _subspaces(config, probe_set, layer, embedding, loaded.d_model) for layer in med_layers},
        component_layers=[layer for layer in layers if layer < n_layers],
        n_component_columns=min(config.component_columns, len(sweep_columns)) if config.components else 0,
        directions=[f"{untrained_name}->{trained_name}", f"{trained_name}->{untrained_name}"],
        aligned=aligned,
        use_attribution=config.attribution and aligned,
        feature_sets=feature_sets,
    )


def _record_pair(plan: PatchPlan, m: PatchMeasurements, i: int) -> list[tuple[PatchRun, PatchRun]]:
    """(receiver, donor) for each patch direction of pair i."""
    with m.timed("record"):
        trained, untrained = plan.patcher.record(plan.pairs[i].trained), plan.patcher.record(plan.pairs[i].untrained)
    return [(trained, untrained), (untrained, trained)]


def _measure_pair(
    plan: PatchPlan, m: PatchMeasurements, i: int, d: int, receiver: PatchRun, donor: PatchRun, tick: Callable
) -> None:
    """The residual sweep, the checks, the mediation subspaces, the SAE feature sets and attribution for pair i,
    direction d."""
    patcher = plan.patcher
    m.receiver_metric[d, i], m.donor_metric[d, i] = receiver.metric, donor.metric
    every, every_source = plan.every_position(i, d)
    with m.timed("sweep"):
        cells = [plan.sides(c, i, d) for c in plan.sweep_columns]
        m.sweep[d, i] = residual_sweep(
            patcher, receiver, donor, plan.layers, [c[0] for c in cells], [c[1] for c in cells], tick=tick
        )
    # Checks: a run patched with its own activations is unchanged; the last layer at the decision position carries
    # the whole first-token gap.
    own = patcher.patched_metric(receiver, receiver, [PatchEdit("resid", plan.med_layers[0], every)])
    m.self_patch_error = max(m.self_patch_error, abs(own - receiver.metric))
    last_edit = PatchEdit("resid", plan.n_layers, (receiver.decision,), donor_positions=(donor.decision,))
    m.last_layer_error = max(
        m.last_layer_error, abs(patcher.patched_metric(receiver, donor, [last_edit]) - donor.metric)
    )
    tick(2)
    with m.timed("mediation"):
        for a, layer in enumerate(plan.med_layers):
            for s, name in enumerate(plan.space_names):
                edit = PatchEdit("resid", layer, every, basis=plan.spaces[layer][name], donor_positions=every_source)
                m.mediation[d, i, a, s] = patch_effect(patcher, receiver, donor, edit)
                tick()
    if plan.feature_sets is not None:
        with m.timed("sae"):
            _measure_feature_sets(plan, m, i, d, receiver, donor, (every, every_source), tick)
    if plan.use_attribution:
        with m.timed("attribution"):
            estimate = patcher.attribution(receiver, donor)
            for c in range(len(plan.columns)):
                where = list(plan.sides(c, i, d)[0])
                m.attribution["resid"][d, i, :, c] = estimate["resid"][:, where].sum(-1).numpy()
                m.attribution["attn_head"][d, i, :, c] = estimate["attn_head"][:, where].sum(1).numpy()
                m.attribution["mlp"][d, i, :, c] = estimate["mlp"][:, where].sum(-1).numpy()
        tick()


def _measure_feature_sets(
    plan: PatchPlan,
    m: PatchMeasurements,
    i: int,
    d: int,
    receiver: PatchRun,
    donor: PatchRun,
    every: tuple[tuple[int, ...], tuple[int, ...]],
    tick: Callable,
) -> None:
    """Each SAE feature set patched from the donor and ablated from the receiver, beside the whole residual there.
    The features are patched where they were found (the last token, the tag, ...); `suffix` and `request` mean
    every position after the prefix, paired as in the mediation rows."""
    from afprobe.data.prompts import prompt_positions

    sets, patcher = plan.feature_sets, plan.patcher
    assert sets is not None

    def found_at(run: PatchRun) -> tuple[int, ...]:
        return tuple(p - run.offset for p in prompt_positions(run.prompt, sets.position, run.offset))

    where, source = (found_at(receiver), found_at(donor)) if sets.position in ("last", "tag") else every
    whole = PatchEdit("resid", sets.layer, where, donor_positions=source)
    m.sae_whole[d, i] = patch_effect(patcher, receiver, donor, whole)
    for s, features in enumerate(sets.sets):
        edit = PatchEdit("resid", sets.layer, where, donor_positions=source, features=FeatureEdit(sets.sae, features))
        m.sae_patch[d, i, s] = patch_effect(patcher, receiver, donor, edit)
        # Ablation removes the set from both runs of the pair: once per pair, from each run's side.
        ablate = PatchEdit("resid", sets.layer, where, features=FeatureEdit(sets.sae, features, "ablate"))
        m.sae_ablated[i, s, d] = patcher.patched_metric(receiver, receiver, [ablate])
        tick(2)


def _measure_components(
    plan: PatchPlan, m: PatchMeasurements, sweep_recovery: list[dict[str, np.ndarray]], tick: Callable
) -> None:
    """Each head's and MLP's output patched at the columns where the residual sweep recovers most (below the last
    layer, which only reaches the decision position's own logits)."""
    if not plan.n_component_columns:
        return
    patcher = plan.patcher
    below = [a for a, layer in enumerate(plan.layers) if layer < plan.n_layers] or list(range(len(plan.layers)))
    peak = np.nanmax(np.abs(np.nanmean([r["mean"][below] for r in sweep_recovery], axis=0)), axis=0)
    peak = np.nan_to_num(peak, nan=-1.0)
    m.chosen = [plan.sweep_columns[b] for b in np.argsort(-peak, kind="stable")[: plan.n_component_columns]]
    t = time.perf_counter()
    for i in range(len(plan.pairs)):
        for d, (receiver, donor) in enumerate(_record_pair(plan, m, i)):
            for a, layer in enumerate(plan.component_layers):
                for b, c in enumerate(m.chosen):
                    where, source = plan.sides(c, i, d)
                    for h in range(patcher.n_heads):
                        edit = PatchEdit("attn_head", layer, where, head=h, donor_positions=source)
                        m.heads[d, i, a, b, h] = patch_effect(patcher, receiver, donor, edit)
                    edit = PatchEdit("mlp", layer, where, donor_positions=source)
                    m.mlps[d, i, a, b] = patch_effect(patcher, receiver, donor, edit)
                    tick(patcher.n_heads + 1)
    m.timing["components"] = time.perf_counter() - t


def run_patching(
    config: PatchConfig, *, loaded: LoadedModel | None = None, progress: Callable[[int, int], None] | None = None
) -> PatchResult:
    """Run the sweep, components, attribution and mediation; write the results folder; return what patch.json
    holds."""
    started = time.perf_counter()
    probe_set = load_probe_set(config.directions) if config.directions else None
    if loaded is None:
        loaded = config.load()
    if (
        probe_set is not None
        and loaded.fingerprint.weights_sha256 != probe_set.metrics.store["model"]["weights_sha256"]
    ):
        raise AfprobeError(
            f"the directions in {config.directions} were computed on another model "
            f"({probe_set.metrics.store['model']['name']}): patch the model they came from"
        )
    plan = plan_patching(config, loaded, probe_set)
    resolution = (
        measure_resolution(loaded.model, loaded.tokenizer, plan.prompt_set, n_pairs=config.resolution_pairs)
        if config.resolution_pairs > 0
        else None
    )
    m = PatchMeasurements.empty(plan)
    total_steps, done = plan.n_steps(), 0

    def tick(count: int = 1) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total_steps)

    for i in range(len(plan.pairs)):
        for d, (receiver, donor) in enumerate(_record_pair(plan, m, i)):
            _measure_pair(plan, m, i, d, receiver, donor, tick)
    totals = m.totals
    sweep_recovery = [ratio_of_means(m.sweep[d], totals[d], n_boot=config.n_boot, seed=config.seed) for d in range(2)]
    _measure_components(plan, m, sweep_recovery, tick)

    output = _analyse(plan, m, sweep_recovery, resolution)
    if plan.feature_sets is not None:
        _add_feature_rows(output, plan, m)
    output["timing"] = {
        **m.timing,
        "shared_prefix": plan.prefix_seconds,
        "total": time.perf_counter() - started,
        "sweep_cells": int(m.sweep.size),
        "sweep_seconds_per_cell": m.timing["sweep"] / max(1, m.sweep.size),
    }
    if config.attribution and not plan.aligned:
        output["attribution_skipped"] = "the two prompts differ in length, so attribution has no position pairing"
    _write(Path(config.out), output, plan, m)
    return PatchResult.from_json(output)


def _rows(estimate: dict[str, np.ndarray]) -> dict[str, list]:
    return {key: np.round(value, 6).tolist() for key, value in estimate.items()}


def _analyse(
    plan: PatchPlan,
    m: PatchMeasurements,
    sweep_recovery: list[dict[str, np.ndarray]],
    resolution: Resolution | None = None,
) -> dict[str, Any]:
    """patch.json: shares of the gap with intervals, the top cells, components, attribution's agreement with exact
    patching, the mediation table and the checks. A gap below what the dtype resolves gets no shares in the
    summary."""
    from afprobe.stats import paired_difference

    config, prompt_set, pairs, directions = plan.config, plan.prompt_set, plan.pairs, plan.directions
    gap = paired_difference(m.receiver_metric[0], m.donor_metric[0], n_boot=config.n_boot, n_perm=config.n_boot)
    sweep_out = _sweep_section(plan, m, sweep_recovery)
    table, readings = _mediation_table(m.mediation, m.totals, plan.med_layers, plan.space_names, directions, config)
    check_rows = _check_rows(plan, m)

    metric = "first_token_log_odds"
    resolved = None if resolution is None else resolution.resolves(gap.mean, len(pairs), metric=metric)
    no_gap = not gap.excludes_zero() or resolved is False
    summary = [
        f"first-token gap ({directions[0].split('->')[1]} minus {directions[0].split('->')[0]}) at the decision "
        f"position: {gap.mean:+.4f} [{gap.ci_low:+.4f}, {gap.ci_high:+.4f}] nats over {len(pairs)} queries"
    ]
    if resolution is not None:
        summary.append(
            resolution.describe(len(pairs), metric=metric)
            + ("" if resolved else "; the gap is below it, so no share of it is reported: rerun with --dtype float32")
        )
    if not gap.excludes_zero():
        summary.append(
            "recoveries and shares undefined: the gap they would divide by is not distinguishable from zero "
            "(patch.json keeps the raw deltas)"
        )
    for name in directions if not no_gap else []:
        top = sweep_out[name]["top"]
        if top:
            t = top[0]
            summary.append(
                f"{name}: largest single-cell recovery {t['recovery']:+.0%} {_interval_text(*t['ci'])} "
                f"at layer {t['layer']}, token {t['token']!r}"
            )
    summary += readings if not no_gap else []
    failed = [name for name, row in check_rows.items() if not row["passed"]]
    summary.append("checks: " + ("all passed" if not failed else "FAILED " + ", ".join(failed)))

    return {
        "afprobe_version": __version__,
        "config": asdict(config),
        "model": plan.loaded.fingerprint.to_dict(),
        "directions_from": str(plan.probe_set.path) if plan.probe_set is not None else None,
        "prompt_hash": prompt_set.prompt_hash,
        "variant": prompt_set.variant.name,
        "contrast": [pairs[0].trained.tier, pairs[0].untrained.tier],
        "queries": [pair.query_id for pair in pairs],
        "shared_prefix_len": prompt_set.shared_prefix_len,
        "metric": "first-divergent-token log-odds accept minus reject at the decision position (nats)",
        "patch_directions": directions,
        "gap": gap.to_dict(),
        "no_gap": no_gap,
        "resolution": None if resolution is None else resolution.to_dict(),
        "gap_resolved": resolved,
        "columns": [{"label": c.label, "kind": c.kind} for c in plan.columns],
        "layers": plan.layers,
        "sweep_columns": plan.sweep_columns,
        "sweep": sweep_out,
        "attribution": _attribution_section(plan, m),
        "components": _components_section(plan, m),
        "mediation": {"layers": plan.med_layers, "rows": table},
        "checks": check_rows,
        "summary": summary,
    }


def _sweep_section(
    plan: PatchPlan, m: PatchMeasurements, sweep_recovery: list[dict[str, np.ndarray]]
) -> dict[str, Any]:
    """Per patch direction: recovery per layer and column with intervals, and the five largest cells."""
    sweep_out = {}
    for d, name in enumerate(plan.directions):
        est = sweep_recovery[d]
        cells = []
        for a, layer in enumerate(plan.layers):
            for b, c in enumerate(plan.sweep_columns):
                if np.isfinite(est["mean"][a, b]):
                    cells.append((abs(est["mean"][a, b]), layer, c, a, b))
        top = [
            {
                "layer": layer,
                "column": c,
                "token": plan.columns[c].label,
                "recovery": float(est["mean"][a, b]),
                "ci": [float(est["ci_low"][a, b]), float(est["ci_high"][a, b])],
            }
            for _, layer, c, a, b in sorted(cells, reverse=True)[:5]
        ]
        sweep_out[name] = {**_rows(est), "mean_delta": np.round(m.sweep[d].mean(0), 7).tolist(), "top": top}
    return sweep_out


def _attribution_section(plan: PatchPlan, m: PatchMeasurements) -> dict[str, Any] | None:
    """Attribution's estimates as shares of the gap, and their rank correlation with the exact patches."""
    if not plan.use_attribution:
        return None
    attribution, totals, chosen = m.attribution, m.totals, m.chosen
    out: dict[str, Any] = {"spearman": {}}
    for d, name in enumerate(plan.directions):
        exact = m.sweep[d].mean(0)
        approx = attribution["resid"][d].mean(0)[plan.layers][:, plan.sweep_columns]
        row = {"resid": _spearman(exact.ravel(), approx.ravel())}
        if chosen:
            exact_heads = m.heads[d].mean(0)
            approx_heads = attribution["attn_head"][d].mean(0)[plan.component_layers][:, chosen]
            row["attn_head"] = _spearman(exact_heads.ravel(), approx_heads.ravel())
            row["mlp"] = _spearman(
                m.mlps[d].mean(0).ravel(), attribution["mlp"][d].mean(0)[plan.component_layers][:, chosen].ravel()
            )
        out["spearman"][name] = row
        with np.errstate(divide="ignore", invalid="ignore"):
            out.setdefault("recovery", {})[name] = np.round(
                attribution["resid"][d].mean(0) / totals[d].mean(), 6
            ).tolist()
    return out


def _components_section(plan: PatchPlan, m: PatchMeasurements) -> dict[str, Any] | None:
    """Each head's and MLP's share of the gap at the chosen columns, with intervals."""
    if not m.chosen:
        return None
    boot = {"n_boot": plan.config.n_boot, "seed": plan.config.seed}
    out: dict[str, Any] = {
        "layers": plan.component_layers,
        "columns": m.chosen,
        "tokens": [plan.columns[c].label for c in m.chosen],
    }
    for d, name in enumerate(plan.directions):
        out[name] = {
            "attn_head": _rows(ratio_of_means(m.heads[d], m.totals[d], **boot)),
            "mlp": _rows(ratio_of_means(m.mlps[d], m.totals[d], **boot)),
        }
    return out


def _check_rows(plan: PatchPlan, m: PatchMeasurements) -> dict[str, dict[str, Any]]:
    """What must hold whatever the model: measured error, tolerance for the dtype, passed."""
    tolerance = 1e-3 if plan.loaded.dtype == torch.float32 else 5e-2
    mediation, totals, space_names = m.mediation, m.totals, plan.space_names
    full_error = float(np.abs(mediation[:, :, :, space_names.index("full")] - totals[:, :, None]).max())
    empty_change = float(np.abs(mediation[:, :, :, space_names.index("empty")]).max())
    rows: dict[str, dict[str, Any]] = {
        "self_patch_changes_nothing": {"max_abs_change": m.self_patch_error},
        "last_layer_decision_recovers_gap": {"max_abs_error": m.last_layer_error},
        "empty_subspace_changes_nothing": {"max_abs_change": empty_change},
    }
    if plan.aligned:
        # With prompts of different lengths the unpaired tag line stays in the receiver's context, so the full
        # patch need not recover everything there; it is reported in the table, not checked.
        rows["full_subspace_recovers_gap"] = {"max_abs_error": full_error}
    for row in rows.values():
        row["tolerance"] = tolerance
        row["passed"] = bool(next(iter(row.values())) <= tolerance)
    return rows


def _interval_text(low: float, high: float) -> str:
    """A share's interval as text; unbounded when the gap it divides by may have either sign (`ratio_of_means`)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "[unbounded: the gap's sign is uncertain]"
    return f"[{low:+.0%}, {high:+.0%}]"


def _mediation_table(
    mediation: np.ndarray,
    totals: np.ndarray,
    med_layers: list[int],
    space_names: list[str],
    directions: list[str],
    config: PatchConfig,
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per subspace, layer and direction; named subspaces get the random-subspace null beside them."""
    randoms = [s for s, name in enumerate(space_names) if name.startswith("random_")]
    rows, readings = [], []
    for d, direction in enumerate(directions):
        est = ratio_of_means(mediation[d], totals[d], n_boot=config.n_boot, seed=config.seed)
        for a, layer in enumerate(med_layers):
            null = est["mean"][a, randoms] if randoms else np.zeros(0)
            for s, name in enumerate(space_names):
                if name.startswith("random_"):
                    continue
                value = float(est["mean"][a, s])
                low, high = float(est["ci_low"][a, s]), float(est["ci_high"][a, s])
                row: dict[str, Any] = {
                    "subspace": name,
                    "layer": layer,
                    "direction": direction,
                    "dimension": None if name == "full" else (0 if name == "empty" else 1),
                    "recovery": value,
                    "ci": [low, high],
                    "mean_delta": float(mediation[d, :, a, s].mean()),
                }
                if name not in ("full", "empty") and null.size:
                    versus = compare_with_random_null(value, null, (low, high))
                    null_p95, beyond = versus.null_p95, versus.beyond
                    row.update(
                        {
                            "random_mean": float(np.mean(est["mean"][a, randoms])),
                            "random_abs_p95": null_p95,
                            "p_vs_random": versus.p_value,
                            "n_random": versus.n_null,
                            "beyond_random": beyond,
                        }
                    )
                    row["reading"] = (
                        f"{name} at layer {layer} ({direction}): {value:+.0%} {_interval_text(low, high)} of the gap; "
                        f"random 1-d subspaces |recovery| <= {null_p95:.0%} (95th pct): "
                        + (
                            "no more than a random direction"
                            if not beyond
                            else "carries more of the gap than a random direction"
                            if value > 0
                            else "works against the gap more than a random direction (patching it moves the run away "
                            "from the donor)"
                        )
                    )
                rows.append(row)
    readings.extend(_correct_over_rows(rows, "subspace x layer x direction"))
    return rows, readings


def _correct_over_rows(rows: list[dict[str, Any]], kind: str) -> list[str]:
    """Holm over the rows of one table that were compared with a random null (one family of comparisons): a row is
    beyond random only when its adjusted p is below `ALPHA` too. Said in each row's reading; returns those readings."""
    tested = [row for row in rows if row.get("p_vs_random") is not None]
    if not tested:
        return []
    adjusted = holm([row["p_vs_random"] for row in tested])
    family = f"the {len(tested)} {kind} rows of this table"
    for row, p_holm in zip(tested, adjusted.tolist(), strict=True):
        row["p_holm"] = p_holm
        row["corrected_over"] = family
        if row.get("beyond_random") and p_holm >= ALPHA:
            row["beyond_random"] = False
            row["reading"] += "; not beyond random once corrected for the family"
        row["reading"] += (
            f" (p {row['p_vs_random']:.2g} against {row['n_random']} random draws, smallest possible "
            f"{1 / (1 + row['n_random']):.2g}; Holm over {family}: {p_holm:.2g})"
        )
    return [row["reading"] for row in tested]


def _add_feature_rows(output: dict[str, Any], plan: PatchPlan, m: PatchMeasurements) -> None:
    """SAE feature-set rows of the mediation table: patching each set (per direction) and ablating it from both runs
    (the share of the gap removed), each beside random sets of live features of the same size; plus a check that
    the empty set changes nothing."""
    feature_sets, config, directions = plan.feature_sets, plan.config, plan.directions
    assert feature_sets is not None
    sae_patch, sae_ablated, sae_whole, receiver_metric, totals = (
        m.sae_patch,
        m.sae_ablated,
        m.sae_whole,
        m.receiver_metric,
        m.totals,
    )
    boot = {"n_boot": config.n_boot, "seed": config.seed}
    gap = totals[1]  # trained minus untrained, per pair
    # Ablating a set from both runs: how much of the gap goes away.
    removed = gap[:, None] - (sae_ablated[:, :, 0] - sae_ablated[:, :, 1])
    kinds = [(name, ratio_of_means(sae_patch[d], totals[d], **boot), sae_patch[d]) for d, name in enumerate(directions)]
    kinds.append(("ablate from both runs", ratio_of_means(removed, gap, **boot), removed))
    wholes = [ratio_of_means(sae_whole[d], totals[d], **boot) for d in range(2)]
    # Each run's clean metric, [pair, (trained, untrained)]: ablation moves both, the gap is their difference.
    base = receiver_metric.T
    rows, readings = [], []
    for k, (kind, est, raw) in enumerate(kinds):
        whole = wholes[k] if k < 2 else None
        for s, name in enumerate(feature_sets.names):
            if feature_sets.matches[s] is not None or name == "sae_empty":
                continue
            randoms = [r for r, match in enumerate(feature_sets.matches) if match == s]
            value, low, high = float(est["mean"][s]), float(est["ci_low"][s]), float(est["ci_high"][s])
            versus = compare_with_random_null(value, est["mean"][randoms], (low, high))
            null_p95, beyond = versus.null_p95, versus.beyond
            measure = "of the gap removed" if kind.startswith("ablate") else "of the gap carried"
            row = {
                "family": "sae",
                "subspace": name,
                "layer": feature_sets.layer,
                "direction": kind,
                "dimension": len(feature_sets.sets[s]),
                "features": list(feature_sets.sets[s]),
                "recovery": value,
                "ci": [low, high],
                "mean_delta": float(raw[:, s].mean()),
                "random_mean": float(np.mean(est["mean"][randoms])) if randoms else None,
                "random_abs_p95": null_p95,
                "p_vs_random": versus.p_value,
                "n_random": versus.n_null,
                "beyond_random": beyond,
                "position": feature_sets.position,
                "both_tier_shift": float((sae_ablated[:, s, :] - base).mean()) if kind.startswith("ablate") else None,
                "random_both_tier_shift": float((sae_ablated[:, randoms, :] - base[:, None]).mean())
                if kind.startswith("ablate") and randoms
                else None,
                "whole_residual": None
                if whole is None
                else {"recovery": float(whole["mean"]), "ci": [float(whole["ci_low"]), float(whole["ci_high"])]},
            }
            row["reading"] = (
                f"{name} ({row['dimension']} features) at layer {feature_sets.layer} ({feature_sets.position}), "
                f"{kind}: {value:+.0%} "
                f"{_interval_text(low, high)} {measure}; random sets of {row['dimension']}: |effect| <= "
                + (f"{null_p95:.0%} (95th pct): " if null_p95 is not None else "n/a: ")
                + ("more than random features" if beyond else "no more than random features")
                + (
                    f"; the whole residual there: {row['whole_residual']['recovery']:+.0%}"
                    if row["whole_residual"]
                    else f"; both runs moved {row['both_tier_shift']:+.3f} nats on average (random sets: "
                    f"{row['random_both_tier_shift'] or 0:+.3f})"
                )
            )
            rows.append(row)
    _correct_over_rows(rows, "SAE feature-set x direction")
    readings = [row["reading"] for row in rows]
    output["mediation"]["rows"].extend(rows)
    output["mediation"]["sae"] = {"layer": feature_sets.layer, "features_from": feature_sets.source}
    empty = feature_sets.names.index("sae_empty")
    change = max(float(np.abs(sae_patch[:, :, empty]).max()), float(np.abs(removed[:, empty]).max()))
    tolerance = output["checks"]["self_patch_changes_nothing"]["tolerance"]
    output["checks"]["empty_feature_set_changes_nothing"] = {
        "max_abs_change": change,
        "tolerance": tolerance,
        "passed": change <= tolerance,
    }
    summary = output["summary"]
    if not output["no_gap"]:  # as for the subspace rows: no share of a gap that may be zero
        summary[-1:-1] = readings
    failed = [name for name, row in output["checks"].items() if not row["passed"]]
    summary[-1] = "checks: " + ("all passed" if not failed else "FAILED " + ", ".join(failed))


def _write(out: Path, output: dict[str, Any], plan: PatchPlan, m: PatchMeasurements) -> None:
    from safetensors.numpy import save

    arrays = {"sweep_delta": m.sweep, "mediation_delta": m.mediation, "heads_delta": m.heads, "mlp_delta": m.mlps}
    if plan.feature_sets is not None:
        arrays.update(sae_patch_delta=m.sae_patch, sae_ablated_metric=m.sae_ablated, sae_whole_delta=m.sae_whole)
    if plan.use_attribution:
        arrays.update({f"attribution_{name}": value for name, value in m.attribution.items()})
    with results_folder(out):
        atomic_write_bytes(
            out / "patching.safetensors", save({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()})
        )
        atomic_write_json(result_file("patching", out), finite_json(output))
        from afprobe.analysis import plots

        for name, figure in plots.patching_figures(output).items():
            plots.write_figure(figure, out / f"{name}.html")


def format_patch_summary(output: PatchResult) -> str:
    lines = list(output.summary)
    timing = output.timing
    lines.append(
        f"{timing['sweep_cells']} sweep cells in {timing['sweep']:.1f} s ({timing['sweep_seconds_per_cell']:.3f} s "
        f"per cell); total {timing['total']:.1f} s"
    )
    if output.attribution:
        for name, row in output.attribution["spearman"].items():
            parts = ", ".join(f"{site} {value:+.2f}" for site, value in row.items() if value is not None)
            lines.append(f"attribution vs exact patching, Spearman ({name}): {parts}")
    return "\n".join(lines)
