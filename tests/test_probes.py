from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from afprobe.analysis.probes import ProbeConfig, grouped_folds, load_probe_set, run_probes, shuffle_within_groups
from afprobe.errors import AfprobeError
from afprobe.files import finite_json
from afprobe.store.cache_job import CacheConfig, run_cache
from afprobe.store.writer import create_store

LAYERS = [0, 1, 2, 3]
PLANTED_LAYER = 2


def planted_store(path, n_queries=60, d=32, strength=2.5, seed=0, tiers=("free", "paid")):
    """Noise everywhere; at one layer, free rows are shifted along a fixed unit direction."""
    generator = torch.Generator().manual_seed(seed)
    query_ids = [f"q{i:03d}" for i in range(n_queries) for _ in tiers]
    row_tiers = [t for _ in range(n_queries) for t in tiers]
    x = torch.randn(len(query_ids), len(LAYERS), d, generator=generator)
    direction = torch.randn(d, generator=generator)
    direction /= direction.norm()
    free = torch.tensor([t == "free" for t in row_tiers])
    x[free, LAYERS.index(PLANTED_LAYER)] += strength * direction
    store = create_store(path, {"last": x}, layers=LAYERS, query_ids=query_ids, tiers=row_tiers)
    return store, direction


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    _, direction = planted_store(root / "store")
    output = run_probes(ProbeConfig(cache=str(root / "store"), out=str(root / "probes"), n_random=10, n_shuffles=3))
    return root, output, direction


def test_planted_direction_is_found_at_its_layer(planted):
    root, output, _ = planted
    saved = json.loads((root / "probes" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(finite_json(output.to_json())))  # the typed result is the file
    by_layer = {r["layer"]: r for r in output.results}
    assert output.summary["best"]["layer"] == PLANTED_LAYER
    adjusted = output.summary["best_selection_adjusted"]  # chosen on half the queries, measured on the others
    assert adjusted["layer"] == PLANTED_LAYER and adjusted["family_size"] == len(LAYERS)
    assert adjusted["selected_on_queries"] + adjusted["reported_on_queries"] == 30  # the fitting half of 60
    assert len(output.fit_queries) == 30
    assert adjusted["mean_diff_auroc"] > 0.85 and adjusted["mean_diff_cohens_dz"] > 1
    assert by_layer[PLANTED_LAYER]["logistic_auroc"] > 0.85
    assert by_layer[PLANTED_LAYER]["mean_diff_auroc"] > 0.85
    assert by_layer[PLANTED_LAYER]["mean_diff_cohens_d"] > by_layer[PLANTED_LAYER]["random_cohens_d_p95"]
    for layer in (0, 1, 3):
        assert by_layer[layer]["logistic_auroc"] < 0.7
        assert by_layer[layer]["mean_diff_cohens_d"] < 0.6


def test_shuffled_labels_sit_at_chance(planted):
    _, output, _ = planted
    shuffled = [a for r in output.results for a in r["shuffled_auroc"]]
    assert 0.4 < float(np.mean(shuffled)) < 0.6
    assert max(shuffled) < 0.75
    by_layer = {r["layer"]: r for r in output.results}
    # 200 shuffles of the difference-of-means probe: the planted layer beats every one, the others sit inside.
    assert by_layer[PLANTED_LAYER]["mean_diff_shuffle_p"] == pytest.approx(1 / 201)
    assert all(0.5 < r["mean_diff_shuffled_auroc_p95"] < 0.7 for r in output.results)
    assert all(by_layer[layer]["mean_diff_shuffle_p"] > 0.01 for layer in (0, 1, 3))


def test_saved_probes_round_trip(planted):
    root, output, direction = planted
    probe_set = load_probe_set(root / "probes")
    found = probe_set.direction("training_context", PLANTED_LAYER, "last")
    assert torch.nn.functional.cosine_similarity(found.unit(), direction, dim=0) > 0.8
    probe = probe_set.probe(PLANTED_LAYER, "last")
    assert torch.nn.functional.cosine_similarity(probe.weight, direction, dim=0) > 0.7
    assert probe_set.metrics.summary["best"] == output.summary["best"]
    for name in ("auroc", "effect_size", "pca"):
        html = (root / "probes" / f"{name}.html").read_text()
        assert "plotly" in html and "shuffled labels" in html or name != "auroc"
    assert (root / "probes" / "plotly.min.js").stat().st_size > 1_000_000
    with pytest.raises(AfprobeError, match="layer 7 is not in"):
        probe_set.direction("training_context", 7, "last")


def test_grouped_folds_never_leak_a_query():
    groups = [f"q{i // 2}" for i in range(50)]
    folds = grouped_folds(groups, 5, seed=3)
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(50))
    for train, test in folds:
        assert not {groups[i] for i in train} & {groups[i] for i in test}
    with pytest.raises(AfprobeError, match="cannot make 5"):
        grouped_folds(["a", "a", "b"], 5)


def test_shuffle_keeps_one_of_each_per_query():
    groups = [f"q{i // 2}" for i in range(20)]
    y = np.array([1, 0] * 10)
    shuffled = shuffle_within_groups(y, groups, np.random.default_rng(0))
    assert all(shuffled[i] + shuffled[i + 1] == 1 for i in range(0, 20, 2))
    assert not np.array_equal(shuffled, y)


def test_bad_inputs(tmp_path):
    planted_store(tmp_path / "ok", n_queries=10)
    with pytest.raises(AfprobeError, match="layers \\[9\\] are not in store"):
        run_probes(ProbeConfig(cache=str(tmp_path / "ok"), layers=[9], out=str(tmp_path / "o")))
    with pytest.raises(AfprobeError, match="position 'tag' is not in store"):
        run_probes(ProbeConfig(cache=str(tmp_path / "ok"), positions=["tag"], out=str(tmp_path / "o")))
    ids = [f"q{i}" for i in range(10)]
    create_store(tmp_path / "one", {"last": torch.randn(10, 4, 8)}, layers=LAYERS, query_ids=ids, tiers=["free"] * 10)
    with pytest.raises(AfprobeError, match="only one class"):
        run_probes(ProbeConfig(cache=str(tmp_path / "one"), out=str(tmp_path / "o")))
    create_store(tmp_path / "empty", {"last": torch.zeros(0, 4, 8)}, layers=LAYERS, query_ids=[], tiers=[])
    with pytest.raises(AfprobeError, match="is empty"):
        run_probes(ProbeConfig(cache=str(tmp_path / "empty"), out=str(tmp_path / "o")))
    with pytest.raises(AfprobeError, match="no meta.json"):
        run_probes(ProbeConfig(cache=str(tmp_path / "missing"), out=str(tmp_path / "o")))


def test_probes_with_contrast_stores_on_a_tiny_model(tiny_llama, tmp_path):
    common = dict(layers="0,1,2", positions="tag,last")
    run_cache(CacheConfig(out=str(tmp_path / "main"), n=6, **common), loaded=tiny_llama)
    sa = dict(dataset="situational-awareness-v2", n=6)
    run_cache(CacheConfig(out=str(tmp_path / "sa"), **sa, **common), loaded=tiny_llama)
    run_cache(CacheConfig(out=str(tmp_path / "benign"), dataset="benign", n=6, **common), loaded=tiny_llama)
    negation = dict(dataset="negation-control", n=6)
    run_cache(CacheConfig(out=str(tmp_path / "negation"), **negation, **common), loaded=tiny_llama)
    output = run_probes(
        ProbeConfig(
            cache=str(tmp_path / "main"),
            sa_cache=str(tmp_path / "sa"),
            benign_cache=str(tmp_path / "benign"),
            negation_cache=str(tmp_path / "negation"),
            out=str(tmp_path / "probes"),
            n_random=5,
            n_shuffles=2,
            folds=3,
        )
    )
    assert {r["layer"] for r in output.results} == {0, 1, 2}
    assert all(r["transfer_to_sa_auroc"] is not None for r in output.results)
    assert set(output.cosines["tag"]) >= {
        "training_context~situational_awareness",
        "training_context~refusal",
        "training_context~token_embedding",
        "situational_awareness~negation",
    }
    assert output.negation_store["path"] == str(tmp_path / "negation")
    # At layer 0 the tag position holds only the tag token's embedding: the direction IS the embedding difference.
    layer0 = next(r for r in output.results if r["layer"] == 0 and r["position"] == "tag")
    assert layer0["cosine_token_embedding"] == pytest.approx(1.0, abs=1e-6)
    assert layer0["logistic_auroc"] == 1.0
    probe_set = load_probe_set(tmp_path / "probes")
    assert probe_set.direction("refusal", 1, "last").vector.shape == (64,)
    assert probe_set.direction("situational_awareness", 2, "tag").vector.shape == (64,)
    assert probe_set.direction("negation", 1, "last").vector.shape == (64,)
    assert (tmp_path / "probes" / "transfer.html").is_file() and (tmp_path / "probes" / "cosines.html").is_file()


def test_paired_dz_sees_a_consistent_within_query_shift_that_pooled_d_hides():
    from afprobe.analysis.probes import cohens_d, paired_cohens_dz

    rng = np.random.default_rng(0)
    query_level = rng.normal(0.0, 10.0, 40)  # large differences between queries
    shift = 1.0 + rng.normal(0.0, 0.1, 40)  # the same small shift inside every query
    scores = np.concatenate([query_level + shift, query_level])
    labels = np.array([1] * 40 + [0] * 40)
    groups = [f"q{i}" for i in range(40)] * 2
    assert abs(cohens_d(scores, labels)) < 0.3
    assert paired_cohens_dz(scores, labels, groups) > 5


def test_recall_at_fpr_takes_its_threshold_from_the_negatives_it_is_given():
    from afprobe.analysis.probes import recall_at_fpr

    negatives = np.arange(100, dtype=float)  # the 99th percentile is 98.01
    positives = np.array([50.0, 98.5, 99.5, 120.0])
    assert recall_at_fpr(negatives, positives, 0.01) == 0.75


def test_the_selection_adjusted_best_cell_is_not_inflated_by_the_maximum():
    from afprobe.analysis.probes import paired_cohens_dz, select_on_half

    rng = np.random.default_rng(5)
    groups = [f"q{i}" for i in range(40)] * 2
    y = np.array([1] * 40 + [0] * 40)
    scores = {(layer, "last"): rng.normal(size=80) for layer in range(60)}  # no signal anywhere
    naive = max(abs(paired_cohens_dz(s, y, groups)) for s in scores.values())
    adjusted = select_on_half(scores, y, groups, seed=0)
    assert adjusted["family_size"] == 60
    assert adjusted["selection_half_abs_dz"] > naive  # the maximum on 20 queries is larger still
    assert abs(adjusted["mean_diff_cohens_dz"]) < naive and abs(adjusted["mean_diff_auroc"] - 0.5) < 0.2


def _paired_rows(rng: np.random.Generator, n_groups: int, shift: np.ndarray, prefix: str):
    base = rng.normal(size=(n_groups, shift.size))
    x = np.concatenate([base + shift + rng.normal(0, 0.3, base.shape), base + rng.normal(0, 0.3, base.shape)])
    y = np.array([1] * n_groups + [0] * n_groups)
    return x, y, [f"{prefix}{i}" for i in range(n_groups)] * 2


def test_transfer_interval_carries_the_training_direction_uncertainty():
    from afprobe.analysis.probes import grouped_bootstrap_auroc, transfer_auroc_with_refits

    rng = np.random.default_rng(3)
    signal = np.zeros(20)
    signal[0] = 3.0
    test_x, test_y, test_groups = _paired_rows(rng, 30, signal, "t")
    # Training labels carry nothing: the fitted direction is noise, so what it scores on the test set is luck.
    noise_x, noise_y, noise_groups = _paired_rows(rng, 8, np.zeros(20), "n")
    point, refit = transfer_auroc_with_refits(noise_x, noise_y, noise_groups, test_x, test_y, test_groups, seed=0)
    direction = noise_x[noise_y == 1].mean(0) - noise_x[noise_y == 0].mean(0)
    fixed = grouped_bootstrap_auroc(test_x @ direction, test_y, test_groups, seed=0)
    assert refit[0] < 0.5 < refit[1]  # chance is inside the interval that refits
    assert refit[1] - refit[0] > 2 * (fixed[1] - fixed[0])  # the fixed-direction interval hides that
    # With the signal in training too, transfer is near perfect and the interval says so.
    train_x, train_y, train_groups = _paired_rows(rng, 30, signal, "s")
    point, refit = transfer_auroc_with_refits(train_x, train_y, train_groups, test_x, test_y, test_groups, seed=0)
    assert point > 0.95 and refit[0] > 0.9
