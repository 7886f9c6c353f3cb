"""Which SAE features differ between the tiers, what they respond to, and what they look like.

`run_feature_analysis(FeatureConfig(sae=..., cache=..., layer=L, out=DIR))`:

1. Tier-differing features: each feature's activation at `position` (default the decision position) is compared
   between the two tiers of the same query (paired t-test, Benjamini-Hochberg over all features, bootstrap interval).
2. Responses of each such feature, the same way, on the other stores given:
   - `situational_awareness`: monitored minus unmonitored on the situational-awareness contrast set;
   - `tag_only`: free minus paid under the `tag-only` variant, whose system prompt never explains the tag: a
     difference that survives there is a reaction to the tag's tokens, not to their meaning;
   - `refusal`: harmful minus harmless requests (both tiers, unpaired: Welch's t-test).
   Each response's p-values are corrected over the features tested (Benjamini-Hochberg).
3. A group per feature, from responses that are significant and point the way the tier difference does:
   `token` (the tag alone gives at least half the tier difference) before `situational_awareness` before
   `refusal`; otherwise `other`. Every flag is kept, so a feature that is both shows both.
4. A dashboard: each listed feature's top-activating tokens over every store given, in context, the token
   highlighted (`feature_dashboard.html`), and the responses as bars with intervals (`feature_groups.html`).

`features.json` holds all of it and the config; `afprobe patch --sae-features DIR` reads it to patch and ablate
each group against random feature sets of the same size.
"""

from __future__ import annotations

import html
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from afprobe import __version__
from afprobe.analysis.sae import load_sae
from afprobe.artefacts import ResultRecord, result_file
from afprobe.errors import AfprobeError
from afprobe.files import atomic_write_json, atomic_write_text, finite_json, results_folder
from afprobe.stats import benjamini_hochberg
from afprobe.store.reader import ActivationStore

GROUPS = ("token", "situational_awareness", "refusal", "other")


# A feature is a token feature when the tag alone (no explanation) gives at least this share of its tier difference.
TOKEN_SHARE = 0.5


@dataclass
class FeatureConfig:
    """One feature analysis; saved in features.json."""

    sae: str
    cache: str
    layer: int
    out: str
    sae_id: str | None = None
    position: str = "last"
    sa_cache: str | None = None
    tag_only_cache: str | None = None
    benign_cache: str | None = None
    alpha: float = 0.05
    max_features: int = 64  # tier-differing features characterised (largest |difference| first)
    top: int = 20  # features in the dashboard
    contexts: int = 8  # top-activating contexts per dashboard feature
    n_boot: int = 2000
    seed: int = 0
    device: str = "cpu"
    split: str = "fit"  # the stores' queries features are chosen on (`afprobe.data.splits`); patching evaluates others


@torch.no_grad()
def encode(sae: Any, x: Float[Tensor, "n d_model"], batch_size: int = 4096) -> Float[Tensor, "n d_sae"]:
    """SAE feature activations (float32, CPU)."""
    parts = [
        sae.encode(x[start : start + batch_size].to(sae.device, sae.dtype)).float().cpu()
        for start in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, sae.cfg.d_sae)


def paired_rows(
    store: ActivationStore, tiers: tuple[str, str] | None = None, split: str = "all"
) -> tuple[list[int], list[int], tuple]:
    """Rows of the first and second tier for every query that has both (of the queries `split` keeps)."""
    contrast = tuple(tiers or store.meta.contrast or ())
    if len(contrast) != 2:
        raise AfprobeError(f"store {store.path} has no tier contrast: pass tiers=(first, second)")
    kept = set(store.queries_for(split))
    by_query = {store.rows[i].query_id: i for i in store.select(tier=contrast[1])}
    pairs = [
        (i, by_query[store.rows[i].query_id])
        for i in store.select(tier=contrast[0])
        if store.rows[i].query_id in by_query and store.rows[i].query_id in kept
    ]
    if len(pairs) < 2:
        raise AfprobeError(f"store {store.path} has {len(pairs)} paired queries at tiers {contrast}: need at least 2")
    return [a for a, _ in pairs], [b for _, b in pairs], contrast


def feature_activations(
    sae: Any, store: ActivationStore, layer: int, position: str, rows: list[int]
) -> Float[Tensor, "rows d_sae"]:
    if layer not in store.layers_of(position):
        raise AfprobeError(
            f"store {store.path} has no layer {layer} at position {position!r} (it has {store.layers_of(position)})"
        )
    return encode(sae, store.activations(position, layers=[layer], rows=rows)[:, 0])


def difference_stats(
    diff: Float[Tensor, "n features"], *, paired: bool = True, second: Tensor | None = None, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """Per feature: mean difference, bootstrap 95% interval and a two-sided t-test p-value.

    paired: `diff` holds per-query differences. Unpaired: `diff` holds the first group's values and `second` the
    other group's (Welch's t-test; each group resampled on its own).
    """
    from scipy.stats import ttest_1samp, ttest_ind

    generator = torch.Generator().manual_seed(seed)

    def boot_means(values: Tensor) -> Tensor:
        n = values.shape[0]
        counts = torch.zeros(n_boot, n, dtype=torch.float64)
        counts.scatter_add_(
            1, torch.randint(0, n, (n_boot, n), generator=generator), torch.ones(n_boot, n, dtype=torch.float64)
        )
        return counts @ values.double() / n

    # Features that barely differ make scipy warn about precision; constant differences are handled below.
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if paired:
            mean = diff.double().mean(0)
            boot = boot_means(diff)
            p = ttest_1samp(diff.double().numpy(), 0.0, axis=0).pvalue
            spread = diff.double().std(0).numpy()
        else:
            assert second is not None
            mean = diff.double().mean(0) - second.double().mean(0)
            boot = boot_means(diff) - boot_means(second)
            p = ttest_ind(diff.double().numpy(), second.double().numpy(), axis=0, equal_var=False).pvalue
            spread = diff.double().std(0).numpy() + second.double().std(0).numpy()
    # A constant difference: certain when it is not zero, nothing when it is.
    constant = spread == 0
    p = np.where(constant, np.where(mean.numpy() == 0, 1.0, 0.0), np.nan_to_num(p, nan=1.0))
    low, high = torch.quantile(boot.float(), torch.tensor([0.025, 0.975]), dim=0)
    return {"mean": mean.numpy(), "low": low.double().numpy(), "high": high.double().numpy(), "p": p}


def tier_feature_differences(
    sae: Any,
    store: ActivationStore,
    layer: int,
    *,
    position: str = "last",
    tiers: tuple[str, str] | None = None,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    top: int = 20,
    split: str = "all",
) -> dict[str, Any]:
    """SAE features whose activation differs between the two tiers of the same query.

    Per feature: the mean paired difference (first tier minus second) with a bootstrap interval over queries, a
    two-sided paired t-test p-value, and Benjamini-Hochberg q-values over all features (a permutation p-value's
    floor of 1/(n_perm + 1) would never pass a correction over thousands of features). Returns the features with
    q <= alpha, largest |difference| first (at most `top`), and how many there were.
    """
    first, second, contrast = paired_rows(store, tiers, split)
    f_a = feature_activations(sae, store, layer, position, first)
    f_b = feature_activations(sae, store, layer, position, second)
    stats = difference_stats(f_a - f_b, n_boot=n_boot, seed=seed)
    q = benjamini_hochberg(torch.from_numpy(stats["p"])).numpy()
    significant = [int(f) for f in np.nonzero(q <= alpha)[0]]
    significant.sort(key=lambda f: -abs(stats["mean"][f]))
    return {
        "layer": layer,
        "position": position,
        "tiers": list(contrast),
        "n_queries": len(first),
        "n_features": int(f_a.shape[1]),
        "alpha": alpha,
        "n_significant": len(significant),
        "significant": significant,
        "features": [
            {
                "feature": f,
                "mean_difference": float(stats["mean"][f]),
                "ci": [float(stats["low"][f]), float(stats["high"][f])],
                "p_value": float(stats["p"][f]),
                "q_value": float(q[f]),
                "mean_first": float(f_a[:, f].mean()),
                "mean_second": float(f_b[:, f].mean()),
            }
            for f in significant[:top]
        ],
        "correction": "Benjamini-Hochberg over all features; p from paired t-tests over queries",
        "alive_features": [int(f) for f in torch.nonzero((torch.cat([f_a, f_b]) != 0).any(0)).flatten()],
        "mean_activation": [round(float(v), 6) for v in torch.cat([f_a, f_b]).mean(0)],
    }


def _response(
    stats: dict[str, np.ndarray], features: list[int], alpha: float, contrast: str, store: str, n: int
) -> dict[str, Any]:
    p = torch.from_numpy(stats["p"][features])
    q = benjamini_hochberg(p).numpy() if features else np.zeros(0)
    return {
        "contrast": contrast,
        "store": store,
        "n": n,
        "per_feature": {
            f: {
                "mean": float(stats["mean"][f]),
                "ci": [float(stats["low"][f]), float(stats["high"][f])],
                "p_value": float(stats["p"][f]),
                "q_value": float(q[j]),
                "significant": bool(q[j] <= alpha),
            }
            for j, f in enumerate(features)
        },
    }


def assign_group(tier_difference: float, responses: dict[str, dict[str, Any] | None]) -> tuple[str, list[str]]:
    """The feature's group and every flag it earned (see the module docstring for the rule)."""

    def agrees(name: str) -> bool:
        row = responses.get(name)
        return bool(row and row["significant"] and np.sign(row["mean"]) == np.sign(tier_difference))

    flags = []
    tag_only = responses.get("tag_only")
    if agrees("tag_only") and tag_only is not None and abs(tag_only["mean"]) >= TOKEN_SHARE * abs(tier_difference):
        flags.append("token")
    if agrees("situational_awareness"):
        flags.append("situational_awareness")
    refusal = responses.get("refusal")
    if refusal and refusal["significant"]:
        flags.append("refusal")
    group = next((g for g in GROUPS if g in flags), "other")
    return group, flags


@dataclass
class FeatureResult(ResultRecord):
    """What `run_feature_analysis` found; `to_json()` is features.json."""

    afprobe_version: str
    config: dict[str, Any]  # the FeatureConfig
    sae: dict[str, Any]  # path, sae_id, d_in, d_sae
    model: dict[str, Any]
    layer: int
    position: str
    tiers: list[str]
    n_queries: int
    n_features: int
    alive_features: list[int]
    mean_activation: list[float]
    alpha: float
    n_significant: int
    features: list[dict[str, Any]]  # the tier-differing features, each with its responses, group and flags
    groups: dict[str, list[int]]
    responses: dict[str, Any]
    missing_responses: list[str]
    dashboard: list[dict[str, Any]]
    method: str
    summary: list[str]
    seconds: float
    fit_queries: list[str] | None = None  # the setting store's queries the features were chosen on


def run_feature_analysis(
    config: FeatureConfig, *, sae: Any | None = None, progress: Any | None = None
) -> FeatureResult:
    """Find, characterise, group and show the tier-differing features; write the results folder."""
    started = time.perf_counter()
    if sae is None:
        sae = load_sae(config.sae, sae_id=config.sae_id, device=config.device)
    store = ActivationStore.open(config.cache)
    sha = store.meta.model["weights_sha256"]
    others = {
        name: ActivationStore.open(path)
        for name, path in (
            ("situational_awareness", config.sa_cache),
            ("tag_only", config.tag_only_cache),
            ("benign", config.benign_cache),
        )
        if path is not None
    }
    for name, other in others.items():
        if other.meta.model["weights_sha256"] != sha:
            raise AfprobeError(
                f"the {name} store {other.path} comes from {other.meta.model['name']}, the setting store from "
                f"{store.meta.model['name']}: give stores of one model"
            )
    if sae.cfg.d_in != store.d_model:
        raise AfprobeError(f"the SAE reads {sae.cfg.d_in}-d activations, the store holds {store.d_model}-d")

    tier = tier_feature_differences(
        sae,
        store,
        config.layer,
        position=config.position,
        alpha=config.alpha,
        n_boot=config.n_boot,
        seed=config.seed,
        top=config.max_features,
        split=config.split,
    )
    features = [row["feature"] for row in tier["features"]]

    def paired_response(other: ActivationStore, seed: int, label: str) -> dict[str, Any]:
        a, b, contrast = paired_rows(other, split=config.split)
        diff = feature_activations(sae, other, config.layer, config.position, a) - feature_activations(
            sae, other, config.layer, config.position, b
        )
        stats = difference_stats(diff, n_boot=config.n_boot, seed=seed)
        name = f"{contrast[0]} - {contrast[1]}{label}"
        return _response(stats, features, config.alpha, name, str(other.path), len(a))

    responses: dict[str, dict[str, Any]] = {}
    if "situational_awareness" in others:
        responses["situational_awareness"] = paired_response(others["situational_awareness"], config.seed + 1, "")
    if "tag_only" in others:
        tag_only = others["tag_only"]
        if tag_only.meta.variant != "tag-only":
            raise AfprobeError(
                f"{tag_only.path} was cached with variant {tag_only.meta.variant!r}: cache the tag-only "
                "variant (`afprobe cache --variant tag-only`)"
            )
        responses["tag_only"] = paired_response(tag_only, config.seed + 2, " (tag-only)")
    if "benign" in others:
        benign = others["benign"]
        fit, benign_fit = set(store.queries_for(config.split)), set(benign.queries_for(config.split))
        harmful_rows = [i for i, row in enumerate(store.rows) if row.harmful and row.query_id in fit]
        benign_rows = [i for i, row in enumerate(benign.rows) if not row.harmful and row.query_id in benign_fit]
        if len(harmful_rows) < 2 or len(benign_rows) < 2:
            raise AfprobeError(
                f"need harmful rows in {store.path} and harmless rows in {benign.path} (have {len(harmful_rows)} "
                f"and {len(benign_rows)}): cache --dataset benign for --benign-cache"
            )
        stats = difference_stats(
            feature_activations(sae, store, config.layer, config.position, harmful_rows),
            paired=False,
            second=feature_activations(sae, benign, config.layer, config.position, benign_rows),
            n_boot=config.n_boot,
            seed=config.seed + 3,
        )
        responses["refusal"] = _response(
            stats, features, config.alpha, "harmful - harmless", str(benign.path), len(harmful_rows)
        )

    rows = []
    for row in tier["features"]:
        f = row["feature"]
        per = {name: response["per_feature"][f] for name, response in responses.items()}
        group, flags = assign_group(row["mean_difference"], per)
        rows.append({**row, "group": group, "flags": flags, "responses": per})
    groups = {g: [r["feature"] for r in rows if r["group"] == g] for g in GROUPS}
    stores = {"setting": store, **others}
    dashboard = top_contexts(sae, stores, config.layer, features[: config.top], config.contexts, progress=progress)
    output = {
        "afprobe_version": __version__,
        "config": asdict(config),
        "sae": {"path": config.sae, "sae_id": config.sae_id, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae},
        "model": store.meta.model,
        "layer": config.layer,
        "position": config.position,
        "tiers": tier["tiers"],
        "n_queries": tier["n_queries"],
        "n_features": tier["n_features"],
        "alive_features": tier["alive_features"],
        "mean_activation": tier["mean_activation"],
        "alpha": config.alpha,
        "n_significant": tier["n_significant"],
        "features": rows,
        "groups": groups,
        "responses": {name: {k: v for k, v in r.items() if k != "per_feature"} for name, r in responses.items()},
        "missing_responses": [n for n in ("situational_awareness", "tag_only", "refusal") if n not in responses],
        "dashboard": dashboard,
        "method": (
            "tier difference: paired t-test per feature over queries, Benjamini-Hochberg over all features; responses: "
            "paired (SA contrast, tag-only) or Welch (harmful vs harmless) t-tests, Benjamini-Hochberg over the "
            f"features tested; 95% bootstrap intervals over queries. Groups: token (tag-only difference significant, "
            f"same sign, >= {TOKEN_SHARE:.0%} of the tier difference) > situational_awareness (SA contrast "
            "significant, same sign) > refusal (harmful vs harmless significant) > other"
        ),
    }
    output["summary"] = feature_summary(output)
    output["seconds"] = time.perf_counter() - started
    output["fit_queries"] = sorted(store.queries_for(config.split))
    _write(Path(config.out), output)
    return FeatureResult.from_json(output)


@torch.no_grad()
def top_contexts(
    sae: Any,
    stores: dict[str, ActivationStore],
    layer: int,
    features: list[int],
    n_contexts: int,
    *,
    progress: Any | None = None,
) -> dict[int, list[dict[str, Any]]]:
    """For each feature, the `n_contexts` distinct contexts where it fires hardest over every cached token of the
    stores (the `suffix` kind when a store has it at `layer`, else each kind it has), with the text around them.

    Tokens before a query's own text (the tag, the shared prompt) repeat in every prompt: identical contexts are
    listed once, with how many times they occur (`repeats`)."""
    if not features:
        return {}
    index = torch.tensor(features)
    sources = []
    for name, store in stores.items():
        kinds = ["suffix"] if "suffix" in store.positions and layer in store.layers_of("suffix") else store.positions
        sources.extend((name, store, kind) for kind in kinds if layer in store.layers_of(kind))
    values, where = [], []
    for done, (name, store, kind) in enumerate(sources):
        tokens, owners = store.token_activations(kind, layer)
        absolute = [p for row in range(len(store)) for p in store.rows[row].positions[kind]]
        values.append(encode(sae, tokens)[:, index])
        where.extend((name, int(owner), position) for owner, position in zip(owners.tolist(), absolute, strict=True))
        if progress is not None:
            progress(done + 1, len(sources))
    acts = torch.cat(values)  # [every token, features]
    result: dict[int, list[dict[str, Any]]] = {}
    for j, feature in enumerate(features):
        entries: list[dict[str, Any]] = []
        seen: dict[tuple, dict[str, Any]] = {}
        for token in torch.argsort(acts[:, j], descending=True).tolist():
            value = float(acts[token, j])
            if value <= 0:
                break
            name, row, position = where[token]
            store = stores[name]
            context = store.context(row, position)
            key = (tuple(context[0]), context[1]) if context else (name, row, position)
            if key in seen:
                seen[key]["repeats"] += 1
                continue
            if len(entries) == n_contexts:
                # Only repeats of the listed contexts are still counted; stop once no more can follow.
                if value < entries[-1]["activation"] - 1e-6:
                    break
                continue
            info = store.rows[row]
            entry = {
                "activation": value,
                "store": name,
                "row": row,
                "query_id": info.query_id,
                "tier": info.tier,
                "position": position,
                "tokens": context[0] if context else None,
                "at": context[1] if context else None,
                "repeats": 1,
            }
            seen[key] = entry
            entries.append(entry)
        result[feature] = entries
    return result


def feature_summary(output: dict[str, Any]) -> list[str]:
    first, second = output["tiers"]
    lines = [
        f"{output['n_significant']} of {output['n_features']} SAE features differ between {first} and {second} "
        f"at FDR {output['alpha']} (layer {output['layer']}, {output['position']}, {output['n_queries']} queries)"
    ]
    counts = ", ".join(f"{g} {len(v)}" for g, v in output["groups"].items())
    lines.append(f"groups of the {len(output['features'])} characterised: {counts}")
    if output["missing_responses"]:
        lines.append(
            "not measured (no store given): " + ", ".join(output["missing_responses"]) + " - those groups stay empty"
        )
    if not output["features"]:
        lines.append("no feature differs between the tiers after correction: nothing to group (a result, not a bug)")
    return lines


def _write(out: Path, output: dict[str, Any]) -> None:
    with results_folder(out):
        atomic_write_json(result_file("features", out), finite_json(output))
        atomic_write_text(out / "feature_dashboard.html", dashboard_html(output))
        from afprobe.analysis import plots

        plots.write_figure(plots.feature_group_figure(output), out / "feature_groups.html")


def dashboard_html(output: dict[str, Any]) -> str:
    """One self-contained page: per feature its tier difference, responses, group and top-activating contexts."""
    first, second = output["tiers"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>afprobe SAE features</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "section{border-top:1px solid #ccc;padding:0.6em 0}"
        ".ctx{font-family:monospace;white-space:pre-wrap;background:#f7f7f7;padding:3px 6px;margin:2px 0}"
        "mark{background:#ffb000;font-weight:bold}.meta{color:#666;font-size:0.85em}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{padding:2px 8px;text-align:right}</style></head><body>",
        f"<h1>SAE features that differ between {html.escape(first)} and {html.escape(second)}</h1>",
        "<p>" + "<br>".join(html.escape(line) for line in output["summary"]) + "</p>",
        f"<p class='meta'>{html.escape(output['method'])}</p>",
    ]
    by_feature = {row["feature"]: row for row in output["features"]}
    for feature, contexts in output["dashboard"].items():
        row = by_feature[int(feature)]
        parts.append(f"<section id='f{feature}'><h2>feature {feature}: {html.escape(row['group'])}</h2>")
        cells = [
            ("tier difference", row["mean_difference"], row["ci"], row["q_value"]),
            *[(name.replace("_", " "), r["mean"], r["ci"], r["q_value"]) for name, r in row["responses"].items()],
        ]
        parts.append("<table><tr><th></th><th>mean</th><th>95% CI</th><th>q</th></tr>")
        for label, mean, ci, q_value in cells:
            parts.append(
                f"<tr><td>{html.escape(label)}</td><td>{mean:+.4f}</td><td>[{ci[0]:+.4f}, {ci[1]:+.4f}]</td>"
                f"<td>{q_value:.2g}</td></tr>"
            )
        parts.append("</table>")
        if not contexts:
            parts.append("<p class='meta'>never active on the cached tokens</p>")
        for entry in contexts:
            repeats = f" &middot; {entry['repeats']} identical contexts" if entry.get("repeats", 1) > 1 else ""
            meta = (
                f"{entry['activation']:.3f}{repeats} &middot; {html.escape(entry['store'])} &middot; "
                f"{html.escape(entry['query_id'])} &middot; {html.escape(entry['tier'])} &middot; "
                f"token {entry['position']}"
            )
            if entry["tokens"] is None:
                text = "(this store was cached before token text was kept: re-cache to see the context)"
            else:
                words = [html.escape(t) for t in entry["tokens"]]
                words[entry["at"]] = f"<mark>{words[entry['at']]}</mark>"
                text = "".join(words)
            parts.append(f"<div class='meta'>{meta}</div><div class='ctx'>{text}</div>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
