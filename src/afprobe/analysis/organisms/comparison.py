"""Side-by-side comparison of runs on several models, and the scoring of afprobe's verdicts against the
organisms' planted mechanisms."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from afprobe import __version__
from afprobe.artefacts import experiment_file, result_file
from afprobe.files import atomic_write_json, results_folder


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _primary_log_odds(gap: dict[str, Any] | None) -> dict[str, Any] | None:
    if not gap or not gap.get("gaps"):
        return None
    return next(iter(gap["gaps"].values()))["log_odds"]


def _mediation_shares(patch: dict[str, Any] | None, subspace: str) -> dict[int, dict[str, Any]]:
    """Per mediation layer: the subspace's recovery in each patch direction, their mean, and the random null."""
    shares: dict[int, dict[str, Any]] = {}
    if patch is None or not patch.get("mediation"):
        return shares
    for row in patch["mediation"]["rows"]:
        if row["subspace"] != subspace:
            continue
        entry = shares.setdefault(int(row["layer"]), {"directions": {}})
        entry["directions"][row["direction"]] = {
            "recovery": row["recovery"],
            "ci": row["ci"],
            "random_abs_p95": row.get("random_abs_p95"),
            "beyond_random": bool(row.get("beyond_random")),
        }
    for entry in shares.values():
        rows = list(entry["directions"].values())
        entry["mean"] = float(np.mean([r["recovery"] for r in rows]))
        entry["beyond_random"] = all(r["beyond_random"] for r in rows)
    return shares


def _larger(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """a's share is larger than b's in every patch direction, with intervals that do not overlap (an unbounded
    interval, null in the file, overlaps everything)."""
    common = set(a["directions"]) & set(b["directions"])

    def above(low: float | None, high: float | None) -> bool:
        return low is not None and high is not None and low > high

    return bool(common) and all(above(a["directions"][d]["ci"][0], b["directions"][d]["ci"][1]) for d in common)


def _count_verdict(hits: int, total: int) -> str:
    if total == 0:
        return "not measured"
    if hits == 0:
        return "no"
    return "yes" if 2 * hits >= total else "partly"


def compare_models(folders: dict[str, Path]) -> dict[str, Any]:
    """The organisms side by side, and afprobe's verdicts scored against their planted mechanisms.

    folders: model name -> its results folder (from an experiment with [models]); the names `token` and `context`
    mark the organisms (others, such as `base`, are shown for reference)."""
    models: dict[str, Any] = {}
    for name, folder in folders.items():
        truth = _read_json(experiment_file("ground_truth", folder))
        patch = _read_json(experiment_file("patching", folder))
        steering = _read_json(experiment_file("steering", folder))
        verdict = _read_json(experiment_file("verdict", folder))
        stores = ((_read_json(folder / "config.json") or {}).get("steps") or {}).get("cache") or {}

        main_gap, sa_gap = (
            _read_json(result_file("gap", folder / "stores" / Path(stores[store]["out"]).name))
            if store in stores
            else None
            for store in ("main", "situational-awareness")
        )
        steer_sa = ((steering or {}).get("verdicts") or {}).get("situational_awareness") or {}
        models[name] = {
            "folder": str(folder),
            "adapter": ((main_gap or {}).get("model") or {}).get("adapter"),
            "gap": _primary_log_odds(main_gap),
            "sa_contrast_gap": _primary_log_odds(sa_gap),
            "ground_truth": None
            if truth is None
            else {k: truth[k] for k in ("standard_gap", "held_out_phrasings", "semantic_swap_gap", "reading")},
            "mediation": {
                subspace: _mediation_shares(patch, subspace)
                for subspace in ("situational_awareness", "training_context", "token_embedding", "refusal")
            },
            "steering_sa": steer_sa.get("steering"),
            "ablation_sa": steer_sa.get("ablation"),
            "steering_baseline_gap": (steering or {}).get("baseline_gap"),
            "verdict": None if verdict is None else verdict["verdict"],
        }

    verdicts: dict[str, Any] = {}
    summary: list[str] = [
        f"{name}: verdict {model['verdict']['verdict']} (rules v{model['verdict']['rules_version']})"
        for name, model in models.items()
        if model["verdict"] is not None
    ]
    for name in ("token", "context"):
        reading = ((models.get(name) or {}).get("ground_truth") or {}).get("reading")
        if reading is not None:
            confirmed = reading["origin"].startswith(name)
            verdicts[f"{name}_ground_truth_confirmed"] = confirmed
            summary.append(f"{name} organism, behaviour: {reading['origin']}")
    if "token" in models and "context" in models:
        token, context = models["token"], models["context"]
        for question, subspace, high, low in (
            ("sa_share_larger_in_context", "situational_awareness", context, token),
            ("token_embedding_share_larger_in_token", "token_embedding", token, context),
        ):
            layers = sorted(set(high["mediation"][subspace]) & set(low["mediation"][subspace]))
            per_layer = []
            for layer in layers:
                a, b = high["mediation"][subspace][layer], low["mediation"][subspace][layer]
                per_layer.append(
                    {
                        "layer": layer,
                        "expected_high": a["mean"],
                        "expected_low": b["mean"],
                        "larger": _larger(a, b),
                        "beyond_random": a["beyond_random"],
                        "holds": _larger(a, b) and a["beyond_random"],
                    }
                )
            hits = sum(row["holds"] for row in per_layer)
            verdicts[question] = {"answer": _count_verdict(hits, len(per_layer)), "layers": per_layer}
            shares = ", ".join(
                f"L{r['layer']} {r['expected_high']:+.0%} vs {r['expected_low']:+.0%}{'*' if r['holds'] else ''}"
                for r in per_layer
            )
            summary.append(f"{question}: {verdicts[question]['answer']} ({hits} of {len(per_layer)} layers: {shares})")
        steer_token, steer_context = token["steering_sa"], context["steering_sa"]
        if steer_token and steer_context:
            # Gaps differ between organisms, so the effect is compared as a share of each one's own gap.
            shares = {}
            for label, steer, model in (("context", steer_context, context), ("token", steer_token, token)):
                base = (model.get("steering_baseline_gap") or {}).get("mean")
                shares[label] = steer["largest_gap_change"] / abs(base) if base else float("nan")
            holds = shares["context"] > shares["token"] and steer_context["exceeds_random_null"]
            verdicts["sa_steering_moves_context_more"] = {
                "answer": "yes" if holds else "no",
                "share_of_gap": shares,
                "context": steer_context,
                "token": steer_token,
            }
            summary.append(
                f"sa_steering_moves_context_more: {'yes' if holds else 'no'} (largest gap change at +-"
                f"{steer_context['coefficient']:g} of the typical norm: context "
                f"{steer_context['largest_gap_change']:.3f} nats = {shares['context']:.0%} of its gap, random p95 "
                f"{steer_context['random_null_p95']:.3f}; token "
                f"{steer_token['largest_gap_change']:.3f} = {shares['token']:.0%}, random p95 "
                f"{steer_token['random_null_p95']:.3f})"
            )
    return {"afprobe_version": __version__, "models": models, "verdicts": verdicts, "summary": summary}


def write_comparison(out: str | Path, names: Sequence[str]) -> dict[str, Any]:
    """comparison.json in `out` for the models run into `out/NAME/`; returns what it holds."""
    root = Path(out)
    comparison = compare_models({name: root / name for name in names})
    with results_folder(root):
        atomic_write_json(result_file("comparison", root), comparison)
    return comparison
