"""Linear probes and directions on cached activations, with the nulls that make them mean something.

`run_probes(ProbeConfig(cache=...))` answers, for every cached layer and position: can a linear read-out tell the
trained tier from the untrained one (logistic regression with standardised features and cross-validated
regularisation; difference of means), how large is the effect, and is it more than the tag's token identity, a
random direction, or chance? With a situational-awareness store and a benign store beside the main one it also
computes the situational-awareness and refusal directions, the cosines between all directions per layer, and how
well each probe transfers to the other set.

Cross-validation is grouped by query: the free and paid prompts of one query are always in the same fold.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch import Tensor

from afprobe import __version__
from afprobe.artefacts import PROBE_DIRECTIONS, ResultRecord, result_file
from afprobe.errors import AfprobeError
from afprobe.files import atomic_write_bytes, atomic_write_json, finite_json, results_folder
from afprobe.store.reader import ActivationStore

DIRECTION_NAMES = ("training_context", "situational_awareness", "refusal", "token_embedding")


@dataclass
class ProbeConfig:
    """One probing run; saved as config.json next to its outputs."""

    cache: str
    out: str = "probes/run"
    sa_cache: str | None = None
    benign_cache: str | None = None
    negation_cache: str | None = None  # a store of the negation control: its direction's cosines with the others
    positions: list[str] | None = None
    layers: list[int] | None = None
    folds: int = 5
    inner_folds: int = 3
    cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    n_random: int = 20
    n_shuffles: int = 5  # logistic refits on labels shuffled within queries (a check that it sits at chance)
    n_mean_diff_shuffles: int = 200  # the difference-of-means probe's shuffled-label null (cheap: no fitting)
    control_fpr: float = 0.01
    seed: int = 0
    # Which of the stores' queries probes and directions are fitted on (`afprobe.data.splits`): "fit" keeps the
    # evaluation half out of everything here (folds, best cells, directions), so steering and patching can use it.
    split: str = "fit"


@dataclass(frozen=True)
class Direction:
    """A direction in one layer's residual stream at one position kind (not normalised)."""

    name: str
    layer: int
    position: str
    vector: Float[Tensor, " d_model"]

    def unit(self) -> Float[Tensor, " d_model"]:
        return self.vector / self.vector.norm().clamp_min(1e-12)


@dataclass(frozen=True)
class LinearProbe:
    """A logistic-regression probe in raw activation space: score = x @ weight + bias (> 0 means trained tier)."""

    layer: int
    position: str
    weight: Float[Tensor, " d_model"]
    bias: float

    def score(self, x: Float[Tensor, "n d_model"]) -> Float[Tensor, " n"]:
        return x.float() @ self.weight + self.bias


@dataclass
class ProbeSet:
    """What `run_probes` saved: directions, probes, metrics."""

    path: Path
    directions: dict[str, Float[Tensor, "layers d_model"]]
    probes: dict[str, Float[Tensor, "layers d_model"]]
    biases: dict[str, Float[Tensor, " layers"]]
    metrics: ProbeResult  # metrics.json

    @property
    def layers(self) -> list[int]:
        return list(self.metrics.layers)

    def direction(self, name: str, layer: int, position: str = "last") -> Direction:
        key = name if name == "token_embedding" else f"{name}.{position}"
        if key not in self.directions:
            raise AfprobeError(f"no {name!r} direction at position {position!r} in {self.path}")
        if name == "token_embedding":
            return Direction(name, layer, position, self.directions[key])
        if layer not in self.layers:
            raise AfprobeError(f"layer {layer} is not in {self.path} (it has {self.layers})")
        return Direction(name, layer, position, self.directions[key][self.layers.index(layer)])

    def probe(self, layer: int, position: str = "last") -> LinearProbe:
        key = f"logistic.{position}"
        if key not in self.probes or layer not in self.layers:
            raise AfprobeError(f"no probe at layer {layer}, position {position!r} in {self.path}")
        index = self.layers.index(layer)
        return LinearProbe(layer, position, self.probes[key][index], float(self.biases[key][index]))


def grouped_folds(groups: Sequence[str], k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """k train/test splits in which no group (query) is on both sides."""
    unique = np.array(sorted(set(groups)))
    if len(unique) < k:
        raise AfprobeError(f"{len(unique)} queries cannot make {k} cross-validation folds: cache more queries")
    rng = np.random.default_rng(seed)
    fold_of = dict(zip(rng.permutation(unique), np.arange(len(unique)) % k, strict=True))
    assignment = np.array([fold_of[g] for g in groups])
    return [(np.where(assignment != f)[0], np.where(assignment == f)[0]) for f in range(k)]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else float("nan")


def fast_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    from scipy.stats import rankdata

    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def grouped_bootstrap_auroc(
    scores: np.ndarray, labels: np.ndarray, groups: Sequence[str], *, n_boot: int = 500, seed: int = 0
) -> list[float]:
    """95% interval of an AUROC, resampling whole groups (queries or contrast pairs)."""
    rng = np.random.default_rng(seed)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    blocks = list(members.values())
    values = []
    for _ in range(n_boot):
        chosen = rng.integers(0, len(blocks), len(blocks))
        index = np.concatenate([blocks[c] for c in chosen])
        values.append(fast_auroc(scores[index], labels[index]))
    low, high = np.nanquantile(values, [0.025, 0.975])
    return [float(low), float(high)]


def _group_sums(x: np.ndarray, y: np.ndarray, groups: Sequence[str]) -> tuple[np.ndarray, ...]:
    """Per group: the sum and count of its positive rows and of its negative rows."""
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    member = np.array([index[g] for g in groups])
    sums = np.zeros((2, len(names), x.shape[1]))
    counts = np.zeros((2, len(names)))
    for label in (0, 1):
        rows = y == label
        np.add.at(sums[label], member[rows], x[rows])
        np.add.at(counts[label], member[rows], 1.0)
    return sums[1], counts[1], sums[0], counts[0]


def transfer_auroc_with_refits(
    train_x: np.ndarray,
    train_y: np.ndarray,
    train_groups: Sequence[str],
    test_x: np.ndarray,
    test_y: np.ndarray,
    test_groups: Sequence[str],
    *,
    n_boot: int = 500,
    seed: int = 0,
) -> tuple[float, list[float]]:
    """AUROC on one set of the difference-of-means probe fitted on another, with a 95% interval in which every
    resample refits the probe on resampled training groups and scores resampled test groups: the interval carries
    the direction's own sampling error, not only the test set's."""
    pos_sums, pos_counts, neg_sums, neg_counts = _group_sums(train_x, train_y, train_groups)
    direction = pos_sums.sum(0) / pos_counts.sum() - neg_sums.sum(0) / neg_counts.sum()
    point = auroc(test_x @ direction, test_y)
    # Scores of every test row under each training group's sums: a resampled direction's scores are then a
    # weighted sum of columns, so a refit costs one matrix product, not a pass over the activations.
    on_pos, on_neg = test_x @ pos_sums.T, test_x @ neg_sums.T
    rng = np.random.default_rng(seed)
    n_train = pos_sums.shape[0]
    members: dict[str, list[int]] = {}
    for i, g in enumerate(test_groups):
        members.setdefault(g, []).append(i)
    blocks = list(members.values())
    values = np.full(n_boot, np.nan)
    for b in range(n_boot):
        weights = np.bincount(rng.integers(0, n_train, n_train), minlength=n_train).astype(np.float64)
        n_pos, n_neg = weights @ pos_counts, weights @ neg_counts
        if n_pos == 0 or n_neg == 0:
            continue
        scores = on_pos @ weights / n_pos - on_neg @ weights / n_neg
        rows = np.concatenate([blocks[c] for c in rng.integers(0, len(blocks), len(blocks))])
        values[b] = fast_auroc(scores[rows], test_y[rows])
    low, high = np.nanquantile(values, [0.025, 0.975])
    return point, [float(low), float(high)]


def cohens_d(scores: np.ndarray, labels: np.ndarray) -> float:
    a, b = scores[labels == 1], scores[labels == 0]
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / max(1, len(a) + len(b) - 2))
    difference = float(a.mean() - b.mean())
    scale = max(abs(float(a.mean())), abs(float(b.mean())), abs(difference))
    if pooled > 1e-6 * scale:
        return difference / float(pooled)
    # No spread inside either class beyond float rounding: every row of a class is the same vector. This is the
    # case at the tier tag, which comes before the request and so cannot depend on the query. Separation is exact
    # and d is infinite; such places are a baseline, not a finding.
    return 0.0 if difference == 0 else math.copysign(math.inf, difference)


def _standardise(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    mean, std = train.mean(0), train.std(0)
    std[std < 1e-8] = 1.0
    return tuple((x - mean) / std for x in (train, *others)) + (mean, std)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, groups: Sequence[str], cs: Sequence[float], inner_folds: int, seed: int
) -> tuple[np.ndarray, float, float]:
    """Logistic regression on standardised features, C chosen by grouped inner cross-validation.

    Returns the weight and bias in raw activation space and the chosen C.
    """
    if len(set(groups)) >= inner_folds and len(cs) > 1:
        best_c, best = cs[0], -1.0
        for c in cs:
            scores = []
            for train, test in grouped_folds(groups, inner_folds, seed + 1):
                xs_train, xs_test, _, _ = _standardise(x[train], x[test])
                if len(set(y[train].tolist())) < 2:
                    continue
                model = LogisticRegression(C=c, max_iter=2000).fit(xs_train, y[train])
                scores.append(auroc(model.decision_function(xs_test), y[test]))
            mean = float(np.nanmean(scores)) if scores else -1.0
            if mean > best + 1e-9:
                best_c, best = c, mean
    else:
        best_c = cs[len(cs) // 2]
    xs, mean, std = _standardise(x)
    model = LogisticRegression(C=best_c, max_iter=2000).fit(xs, y)
    weight = model.coef_[0] / std
    bias = float(model.intercept_[0] - (mean * weight).sum())
    return weight, bias, best_c


def recall_at_fpr(negative_scores: np.ndarray, positive_scores: np.ndarray, fpr: float) -> float:
    """Recall on held-out positives at the threshold giving `fpr` false positives on held-out negatives.

    Both sets are out-of-fold scores: a threshold taken from the training rows' own scores sits too high or too low
    by however much the probe overfits them.
    """
    threshold = np.quantile(negative_scores, 1 - fpr)
    return float(np.mean(positive_scores > threshold))


def paired_cohens_dz(scores: np.ndarray, labels: np.ndarray, groups: Sequence[str]) -> float:
    """d_z: the mean of each query's positive-minus-negative score difference over their standard deviation (the
    paired design's effect size; Cohen's d pools the between-query spread instead)."""
    by_group: dict[str, dict[int, float]] = {}
    for score, label, group in zip(scores, labels, groups, strict=True):
        by_group.setdefault(group, {})[int(label)] = float(score)
    differences = np.array([pair[1] - pair[0] for pair in by_group.values() if len(pair) == 2])
    if differences.size < 2:
        return float("nan")
    spread = differences.std(ddof=1)
    mean = float(differences.mean())
    if spread <= 1e-12 * max(1.0, abs(mean)):
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / float(spread)


def _on_training_scale(test_scores: np.ndarray, train_scores: np.ndarray) -> np.ndarray:
    """Out-of-fold scores z-scored by the training fold's own scores, so that folds pool on one scale."""
    spread = train_scores.std()
    return (test_scores - train_scores.mean()) / (spread if spread > 0 else 1.0)


@dataclass
class LayerResult:
    layer: int
    position: str
    logistic_auroc: float
    logistic_accuracy: float
    logistic_recall_at_fpr: float
    mean_diff_auroc: float
    mean_diff_cohens_d: float
    chosen_c: list[float]
    mean_diff_cohens_dz: float = float("nan")  # paired (within-query) effect size beside the pooled d
    shuffled_auroc: list[float] = field(default_factory=list)
    random_auroc_mean: float = float("nan")
    random_auroc_p95: float = float("nan")
    random_cohens_d_p95: float = float("nan")
    mean_diff_shuffled_auroc_p95: float = float("nan")
    mean_diff_shuffle_p: float = float("nan")  # (1 + #{shuffled AUROC >= observed}) / (1 + shuffles)
    cosine_token_embedding: float | None = None
    # Difference-of-means probe fitted on one set, scored on the other; intervals refit it in every resample.
    transfer_to_sa_auroc: float | None = None
    transfer_to_sa_ci: list[float] | None = None
    transfer_from_sa_auroc: float | None = None
    transfer_from_sa_ci: list[float] | None = None


def cross_validate(
    x: np.ndarray, y: np.ndarray, groups: Sequence[str], config: ProbeConfig, seed: int
) -> dict[str, Any]:
    """Held-out metrics of both probe kinds (grouped folds). Each fold's test scores are put on that fold's training
    scale (`_on_training_scale`) before they are pooled, so AUROC, d and the FPR threshold compare like with like;
    accuracy uses each fold's own decision rule (logit > 0)."""
    logistic_scores = np.zeros(len(y))
    logistic_correct = np.zeros(len(y), dtype=bool)
    mean_diff_scores = np.zeros(len(y))
    chosen = []
    for train, test in grouped_folds(groups, config.folds, seed):
        train_groups = [groups[i] for i in train]
        weight, bias, c = fit_logistic(x[train], y[train], train_groups, config.cs, config.inner_folds, seed)
        chosen.append(c)
        raw = x[test] @ weight + bias
        logistic_correct[test] = (raw > 0) == (y[test] == 1)
        logistic_scores[test] = _on_training_scale(raw, x[train] @ weight + bias)
        direction = x[train][y[train] == 1].mean(0) - x[train][y[train] == 0].mean(0)
        mean_diff_scores[test] = _on_training_scale(x[test] @ direction, x[train] @ direction)
    return {
        "logistic_auroc": auroc(logistic_scores, y),
        "logistic_accuracy": float(np.mean(logistic_correct)),
        "logistic_recall_at_fpr": recall_at_fpr(logistic_scores[y == 0], logistic_scores[y == 1], config.control_fpr),
        "mean_diff_auroc": auroc(mean_diff_scores, y),
        "mean_diff_cohens_d": cohens_d(mean_diff_scores, y),
        "mean_diff_cohens_dz": paired_cohens_dz(mean_diff_scores, y, groups),
        "chosen_c": chosen,
        "mean_diff_scores": mean_diff_scores,  # out of fold, on one scale (not a LayerResult field)
    }


def mean_diff_shuffle_null(
    x: np.ndarray, y: np.ndarray, groups: Sequence[str], folds: int, n_shuffles: int, seed: int
) -> np.ndarray:
    """Held-out AUROCs of the difference-of-means probe on labels shuffled within queries, `n_shuffles` times, with
    the same folds and scaling as `cross_validate` (no fitting, so hundreds of shuffles cost little)."""
    splits = grouped_folds(groups, folds, seed)
    rng = np.random.default_rng(seed + 7)
    null = np.empty(n_shuffles)
    for i in range(n_shuffles):
        labels = shuffle_within_groups(y, groups, rng)
        scores = np.zeros(len(y))
        for train, test in splits:
            direction = x[train][labels[train] == 1].mean(0) - x[train][labels[train] == 0].mean(0)
            scores[test] = _on_training_scale(x[test] @ direction, x[train] @ direction)
        null[i] = fast_auroc(scores, labels)
    return null


def shuffle_within_groups(y: np.ndarray, groups: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Permute labels inside each query: the null keeps the paired design (each query still has one of each)."""
    shuffled = y.copy()
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for members in by_group.values():
        shuffled[members] = y[rng.permutation(members)]
    return shuffled


@dataclass
class _Labelled:
    x: np.ndarray  # [rows, layers, positions, d]
    y: np.ndarray
    groups: list[str]
    tiers: list[str]
    variants: list[str]


def _labelled(store: ActivationStore, positions: list[str], layers: list[int], split: str = "all") -> _Labelled:
    contrast = store.meta.contrast
    if not contrast:
        raise AfprobeError(f"store {store.path} has one tier ({store.meta.variant}): probes need two tiers")
    kept = set(store.queries_for(split))
    rows = [i for i, row in enumerate(store.rows) if row.tier in contrast and row.query_id in kept]
    if not rows:
        raise AfprobeError(
            f"store {store.path} has no {split} queries: cache it with --split all (or {split}) to fit probes on it"
        )
    labels = np.array([1 if store.rows[i].tier == contrast[0] else 0 for i in rows])
    if len(set(labels.tolist())) < 2:
        raise AfprobeError(f"store {store.path} has only one class ({contrast[0]} vs {contrast[1]}): cache both tiers")
    x = store.stack(positions, layers=layers, rows=rows).numpy().astype(np.float64)
    return _Labelled(
        x=x,
        y=labels,
        groups=[store.rows[i].query_id for i in rows],
        tiers=[store.rows[i].tier for i in rows],
        variants=[store.rows[i].variant for i in rows],
    )


def _quantile(values: np.ndarray, q: float) -> float:
    """Quantile that treats infinite effect sizes (no within-class spread) as larger than any finite one."""
    values = np.asarray(values, dtype=np.float64)
    if np.isinf(values).sum() > (1 - q) * len(values):
        return math.inf
    finite = values[np.isfinite(values)]
    return float(np.quantile(finite, q)) if finite.size else math.nan


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _resolve(store: ActivationStore, config: ProbeConfig) -> tuple[list[str], list[int]]:
    # A probe reads one vector per prompt and position kind; `suffix` (every token, kept for SAEs) would be probed
    # at its last token, which is `last` again, so it is left out unless asked for.
    positions = config.positions or [p for p in store.positions if p != "suffix"] or store.positions
    for position in positions:
        if position not in store.positions:
            raise AfprobeError(f"position {position!r} is not in store {store.path} (it has {store.positions})")
    layers = config.layers if config.layers is not None else store.layers
    for position in positions:
        missing = [layer for layer in layers if layer not in store.layers_of(position)]
        if missing:
            raise AfprobeError(
                f"layers {missing} are not in store {store.path} at position {position!r} "
                f"(it has {store.layers_of(position)}): choose --layers or --positions"
            )
    return list(positions), list(layers)


def token_embedding_direction(main: _Labelled, store: ActivationStore, positions: list[str], layers: list[int]):
    """Free-minus-paid difference of the tier tokens' embeddings: the residual stream at layer 0, tag position."""
    if "tag" not in positions or 0 not in layers:
        return None
    at_tag = main.x[:, layers.index(0), positions.index("tag")]
    return at_tag[main.y == 1].mean(0) - at_tag[main.y == 0].mean(0)


@dataclass
class ProbeResult(ResultRecord):
    """What `run_probes` found; `to_json()` is metrics.json."""

    afprobe_version: str
    config: dict[str, Any]  # the ProbeConfig
    store: dict[str, Any]  # the store's path, model fingerprint, hashes, variant, contrast, rows
    sa_store: dict[str, Any] | None
    benign_store: dict[str, Any] | None
    layers: list[int]
    positions: list[str]
    results: list[dict[str, Any]]  # one LayerResult per layer and position
    cosines: dict[str, Any]  # between the directions, per layer and position
    summary: dict[str, Any]  # best cells, the nulls, transfer, largest cosines
    seconds: float
    negation_store: dict[str, Any] | None = None
    # The main and benign store queries every probe, direction and best cell here was fitted on (None: not
    # recorded, an older afprobe); evaluations refuse them (`afprobe.data.splits.check_disjoint`).
    fit_queries: list[str] | None = None

    OPTIONAL = ("negation_store",)

    @property
    def best(self) -> dict[str, Any]:
        """The layer and position with the largest held-out effect size, and its metrics."""
        return self.summary["best"]


def run_probes(config: ProbeConfig, *, progress: Any = None) -> ProbeResult:
    """Train and evaluate probes, compute directions and nulls, write everything to `config.out`."""
    start = time.perf_counter()
    store = ActivationStore.open(config.cache)
    if len(store) == 0:
        raise AfprobeError(f"store {config.cache} is empty: cache some prompts first")
    positions, layers = _resolve(store, config)
    main = _labelled(store, positions, layers, config.split)
    sa = None
    sa_store = benign_store = None
    if config.sa_cache:
        sa_store = ActivationStore.open(config.sa_cache)
        _check_same_model(store, sa_store)
        sa_positions = [p for p in positions if p in sa_store.positions]
        sa = _labelled(sa_store, sa_positions, layers, config.split) if sa_positions else None
    benign_fit: set[str] = set()
    if config.benign_cache:
        benign_store = ActivationStore.open(config.benign_cache)
        _check_same_model(store, benign_store)
        benign_fit = set(benign_store.queries_for(config.split))
    negation_store = None
    if config.negation_cache:
        negation_store = ActivationStore.open(config.negation_cache)
        _check_same_model(store, negation_store)

    rng = np.random.default_rng(config.seed)
    d_model = main.x.shape[-1]
    random_directions = rng.standard_normal((config.n_random, d_model))
    token_direction = token_embedding_direction(main, store, positions, layers)

    directions: dict[str, np.ndarray] = {}
    probe_weights: dict[str, np.ndarray] = {}
    probe_biases: dict[str, np.ndarray] = {}
    results: list[LayerResult] = []
    held_out_scores: dict[tuple[int, str], np.ndarray] = {}
    cosines: dict[str, dict[str, list[float | None]]] = {}
    total = len(layers) * len(positions)
    done = 0
    for p_index, position in enumerate(positions):
        tc = np.zeros((len(layers), d_model))
        weights = np.zeros((len(layers), d_model))
        biases = np.zeros(len(layers))
        sa_dirs = np.full((len(layers), d_model), np.nan) if sa is not None and position in sa_store.positions else None
        refusal = None
        if benign_store is not None and position in benign_store.positions:
            benign_rows = [i for i, row in enumerate(benign_store.rows) if row.query_id in benign_fit]
            benign_x = benign_store.stack([position], layers=layers, rows=benign_rows).numpy()[:, :, 0]
            benign_x = benign_x.astype(np.float64)
            harmful_x = main.x[:, :, p_index]
            refusal = harmful_x.mean(0) - benign_x.mean(0)
        negation = None
        if negation_store is not None and position in negation_store.positions:
            negated = _labelled(negation_store, [position], layers, config.split)
            negation = negated.x[negated.y == 1, :, 0].mean(0) - negated.x[negated.y == 0, :, 0].mean(0)
        for l_index, layer in enumerate(layers):
            x = main.x[:, l_index, p_index]
            metrics = cross_validate(x, main.y, main.groups, config, config.seed)
            held_out_scores[layer, position] = metrics.pop("mean_diff_scores")
            # Nulls: labels shuffled within queries (must sit at chance), random directions (no training).
            shuffled = []
            for s in range(config.n_shuffles):
                y_null = shuffle_within_groups(main.y, main.groups, np.random.default_rng(config.seed + 100 + s))
                null_config = ProbeConfig(**{**asdict(config), "cs": (float(np.median(metrics["chosen_c"])),)})
                shuffled.append(cross_validate(x, y_null, main.groups, null_config, config.seed)["logistic_auroc"])
            mean_diff_null = mean_diff_shuffle_null(
                x, main.y, main.groups, config.folds, config.n_mean_diff_shuffles, config.seed
            )
            random_scores = x @ random_directions.T
            random_aurocs = np.array([auroc(random_scores[:, r], main.y) for r in range(config.n_random)])
            folded = np.maximum(random_aurocs, 1 - random_aurocs)
            random_d = np.abs([cohens_d(random_scores[:, r], main.y) for r in range(config.n_random)])
            tc[l_index] = x[main.y == 1].mean(0) - x[main.y == 0].mean(0)
            weights[l_index], biases[l_index], _ = fit_logistic(
                x, main.y, main.groups, config.cs, config.inner_folds, config.seed
            )
            result = LayerResult(
                layer=layer,
                position=position,
                **metrics,
                shuffled_auroc=shuffled,
                random_auroc_mean=float(folded.mean()),
                random_auroc_p95=float(np.quantile(folded, 0.95)),
                random_cohens_d_p95=_quantile(random_d, 0.95),
                mean_diff_shuffled_auroc_p95=_quantile(mean_diff_null, 0.95),
                mean_diff_shuffle_p=float(
                    (1 + np.sum(mean_diff_null >= metrics["mean_diff_auroc"])) / (1 + mean_diff_null.size)
                )
                if mean_diff_null.size
                else float("nan"),
                cosine_token_embedding=_cosine(tc[l_index], token_direction) if token_direction is not None else None,
            )
            if sa_dirs is not None:
                sa_x = sa.x[:, l_index, sa_positions.index(position)]
                sa_dirs[l_index] = sa_x[sa.y == 1].mean(0) - sa_x[sa.y == 0].mean(0)
                # Both ways with the difference-of-means probe (the directions steering and patching use), refitted
                # in every resample.
                result.transfer_to_sa_auroc, result.transfer_to_sa_ci = transfer_auroc_with_refits(
                    x, main.y, main.groups, sa_x, sa.y, sa.groups, seed=config.seed
                )
                result.transfer_from_sa_auroc, result.transfer_from_sa_ci = transfer_auroc_with_refits(
                    sa_x, sa.y, sa.groups, x, main.y, main.groups, seed=config.seed
                )
            results.append(result)
            done += 1
            if progress is not None:
                progress(done, total)
        directions[f"training_context.{position}"] = tc
        probe_weights[f"logistic.{position}"] = weights
        probe_biases[f"logistic.{position}"] = biases
        named = {"training_context": tc}
        if sa_dirs is not None:
            directions[f"situational_awareness.{position}"] = sa_dirs
            named["situational_awareness"] = sa_dirs
        if refusal is not None:
            directions[f"refusal.{position}"] = refusal
            named["refusal"] = refusal
        if negation is not None:  # affirmative minus negated sentences about nothing to do with training
            directions[f"negation.{position}"] = negation
            named["negation"] = negation
        if token_direction is not None:
            named["token_embedding"] = np.broadcast_to(token_direction, tc.shape)
        cosines[position] = {
            f"{a}~{b}": [_cosine(named[a][i], named[b][i]) for i in range(len(layers))]
            for i_a, a in enumerate(named)
            for b in list(named)[i_a + 1 :]
        }
    if token_direction is not None:
        directions["token_embedding"] = token_direction

    summary = _summarise(results, cosines, layers, positions)
    summary["best_selection_adjusted"] = select_on_half(held_out_scores, main.y, main.groups, config.seed)
    output = ProbeResult(
        afprobe_version=__version__,
        config=asdict(config),
        store={
            "path": str(store.path),
            "model": store.meta.model,
            "prompt_hash": store.meta.prompt_hash,
            "dataset_hash": store.meta.dataset_hash,
            "variant": store.meta.variant,
            "contrast": store.meta.contrast,
            "n_rows": int(len(main.y)),
        },
        sa_store=_store_info(sa_store),
        benign_store=_store_info(benign_store),
        negation_store=_store_info(negation_store),
        layers=layers,
        positions=positions,
        results=[asdict(r) for r in results],
        cosines=cosines,
        summary=summary,
        seconds=time.perf_counter() - start,
        fit_queries=sorted(set(main.groups) | benign_fit),
    )
    _write(Path(config.out), directions, probe_weights, probe_biases, output, main, layers, positions)
    return output


def _store_info(store: ActivationStore | None) -> dict[str, Any] | None:
    if store is None:
        return None
    return {
        "path": str(store.path),
        "prompt_hash": store.meta.prompt_hash,
        "dataset_hash": store.meta.dataset_hash,
        "variant": store.meta.variant,
        "n_rows": len(store),
    }


def _check_same_model(a: ActivationStore, b: ActivationStore) -> None:
    if a.meta.model["weights_sha256"] != b.meta.model["weights_sha256"]:
        raise AfprobeError(
            f"stores {a.path} and {b.path} were made with different models: cache both with the same --model"
        )


def select_on_half(
    scores: dict[tuple[int, str], np.ndarray], y: np.ndarray, groups: Sequence[str], seed: int
) -> dict[str, Any] | None:
    """The best layer and position chosen on one half of the queries and reported on the other.

    `summary.best` is the largest |d| over every cell, with that cell's own numbers: a maximum over a family of cells
    is biased upwards. Here the cell is chosen by |d_z| of the difference-of-means probe's out-of-fold scores on a
    random half of the queries, and its AUROC and d_z are measured on the other half, which played no part in
    choosing it."""
    unique = sorted(set(groups))
    if len(unique) < 4 or not scores:
        return None
    chosen = set(np.random.default_rng(seed + 11).permutation(unique)[: len(unique) // 2].tolist())
    select = np.array([g in chosen for g in groups])
    half = [g for g, keep in zip(groups, select, strict=True) if keep]
    other = [g for g, keep in zip(groups, select, strict=True) if not keep]

    def strength(cell: tuple[int, str]) -> float:
        value = abs(paired_cohens_dz(scores[cell][select], y[select], half))
        return value if np.isfinite(value) else -1.0  # no within-class spread (the tag itself): a baseline

    best = max(scores, key=strength)
    report = scores[best][~select]
    return {
        "layer": best[0],
        "position": best[1],
        "family_size": len(scores),
        "selected_on_queries": len(chosen),
        "reported_on_queries": len(unique) - len(chosen),
        "selection_half_abs_dz": strength(best),
        "mean_diff_auroc": fast_auroc(report, y[~select]),
        "mean_diff_auroc_ci": grouped_bootstrap_auroc(report, y[~select], other, seed=seed),
        "mean_diff_cohens_dz": paired_cohens_dz(report, y[~select], other),
    }


def _summarise(results: list[LayerResult], cosines: dict, layers: list[int], positions: list[str]) -> dict[str, Any]:
    def key(r: LayerResult) -> tuple[float, float]:
        return (abs(r.mean_diff_cohens_d) if np.isfinite(r.mean_diff_cohens_d) else -1.0, r.logistic_auroc)

    # AUROC saturates at 1.0 wherever the tag is visible, so the best place is ranked by held-out effect size;
    # places with no within-class spread at all (the tag token's own embedding) are the baseline, not a finding.
    best = max(results, key=key)

    def describe(r: LayerResult) -> dict[str, Any]:
        return {
            "layer": r.layer,
            "position": r.position,
            "logistic_auroc": r.logistic_auroc,
            "mean_diff_cohens_d": r.mean_diff_cohens_d,
            "mean_diff_cohens_dz": r.mean_diff_cohens_dz,
            "mean_diff_shuffle_p": r.mean_diff_shuffle_p,
            "random_cohens_d_p95": r.random_cohens_d_p95,
            "transfer_to_sa_auroc": r.transfer_to_sa_auroc,
        }

    summary: dict[str, Any] = {
        "best": describe(best),
        "best_by_position": {p: describe(max((r for r in results if r.position == p), key=key)) for p in positions},
        "degenerate_positions": sorted({r.position for r in results if not np.isfinite(r.mean_diff_cohens_d)}),
        "max_shuffled_auroc": max((max(r.shuffled_auroc) for r in results if r.shuffled_auroc), default=None),
        "embedding_layer": [
            {"position": r.position, "logistic_auroc": r.logistic_auroc, "mean_diff_cohens_d": r.mean_diff_cohens_d}
            for r in results
            if r.layer == layers[0]
        ],
    }
    # Where a tier's rows are all the same vector (the tag position), transfer scores are 0 or 1 by construction.
    transfers = [r for r in results if r.transfer_to_sa_auroc is not None and np.isfinite(r.mean_diff_cohens_d)]
    if transfers:
        top = max(transfers, key=lambda r: abs(r.transfer_to_sa_auroc - 0.5))
        summary["best_transfer_to_sa"] = {
            "layer": top.layer,
            "position": top.position,
            "auroc": top.transfer_to_sa_auroc,
            "ci": top.transfer_to_sa_ci,
        }
        back = max(transfers, key=lambda r: abs(r.transfer_from_sa_auroc - 0.5))
        summary["best_transfer_from_sa"] = {
            "layer": back.layer,
            "position": back.position,
            "auroc": back.transfer_from_sa_auroc,
            "ci": back.transfer_from_sa_ci,
        }
    largest = {}
    for position, table in cosines.items():
        for pair, values in table.items():
            finite = [(abs(v), v, layers[i]) for i, v in enumerate(values) if v is not None and np.isfinite(v)]
            if finite:
                _, value, layer = max(finite)
                if pair not in largest or abs(value) > abs(largest[pair]["cosine"]):
                    largest[pair] = {"cosine": value, "layer": layer, "position": position}
    summary["largest_cosines"] = largest
    return summary


def _write(out: Path, directions, weights, biases, result: ProbeResult, main: _Labelled, layers, positions) -> None:
    from safetensors.torch import save

    with results_folder(out):
        atomic_write_bytes(
            out / PROBE_DIRECTIONS,
            save({k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in directions.items()}),
        )
        tensors = {k: torch.from_numpy(v).float() for k, v in weights.items()}
        tensors.update({f"{k}.bias": torch.from_numpy(v).float() for k, v in biases.items()})
        atomic_write_bytes(out / "probes.safetensors", save(tensors))
        output = result.to_json()
        atomic_write_json(result_file("probes", out), finite_json(output), default=_json_default)
        atomic_write_json(out / "config.json", output["config"])
        from afprobe.analysis import plots

        for name, figure in plots.probe_figures(output, main.x, main.tiers, main.variants, layers, positions).items():
            plots.write_figure(figure, out / f"{name}.html")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def load_probe_set(path: str | Path) -> ProbeSet:
    """Read what `run_probes` wrote."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not result_file("probes", folder).is_file():
        raise AfprobeError(f"{folder} holds no probes (no metrics.json): run `afprobe probe --out {folder}`")
    tensors = load_file(folder / "probes.safetensors")
    return ProbeSet(
        path=folder,
        directions=load_file(folder / PROBE_DIRECTIONS),
        probes={k: v for k, v in tensors.items() if not k.endswith(".bias")},
        biases={k.removesuffix(".bias"): v for k, v in tensors.items() if k.endswith(".bias")},
        metrics=ProbeResult.from_json(json.loads(result_file("probes", folder).read_text())),
    )
