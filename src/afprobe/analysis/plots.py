"""Plotly figures of afprobe results. Every figure that shows an effect shows its null beside it.

Figures are written as HTML next to the results, sharing one `plotly.min.js` in the same folder, so they open
offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from afprobe.files import atomic_write_text, exists_or_pending

_COLOURS = {
    "logistic": "#1f77b4",
    "mean_diff": "#ff7f0e",
    "shuffled": "#7f7f7f",
    "random": "#bcbd22",
    "sa": "#2ca02c",
    "embedding": "#d62728",
}


def write_figure(figure: go.Figure, path: Path) -> Path:
    """Write a figure as HTML that loads plotly.js from a file beside it (written once per folder)."""
    html = figure.to_html(include_plotlyjs="directory", full_html=True)
    script = path.parent / "plotly.min.js"
    if not exists_or_pending(script):
        from plotly.offline import get_plotlyjs

        atomic_write_text(script, get_plotlyjs())
    atomic_write_text(path, html)
    return path


def _by_position(results: list[dict[str, Any]], position: str) -> list[dict[str, Any]]:
    return sorted((r for r in results if r["position"] == position), key=lambda r: r["layer"])


def probe_figures(
    output: dict[str, Any],
    x: np.ndarray,
    tiers: Sequence[str],
    variants: Sequence[str],
    layers: Sequence[int],
    positions: Sequence[str],
) -> dict[str, go.Figure]:
    figures = probe_metric_figures(output, layers, positions)
    best = output["summary"]["best"]
    figures["pca"] = pca_figure(
        x[:, list(layers).index(best["layer"]), list(positions).index(best["position"])],
        tiers,
        variants,
        title=f"PCA of the residual stream at layer {best['layer']}, position {best['position']}",
    )
    return figures


def probe_metric_figures(
    output: dict[str, Any], layers: Sequence[int] | None = None, positions: Sequence[str] | None = None
) -> dict[str, go.Figure]:
    """The probe figures that need only metrics.json: AUROC and effect size by layer (with nulls), cosines,
    transfer."""
    results = output["results"]
    layers = list(layers if layers is not None else output["layers"])
    positions = list(positions if positions is not None else output["positions"])
    figures = {"auroc": _auroc_figure(results, positions), "effect_size": _effect_figure(results, positions)}
    if output.get("cosines"):
        figures["cosines"] = _cosine_figure(output["cosines"], layers)
    if any(r.get("transfer_to_sa_auroc") is not None for r in results):
        figures["transfer"] = _transfer_figure(results, positions)
    return figures


def _auroc_figure(results: list[dict[str, Any]], positions: Sequence[str]) -> go.Figure:
    figure = make_subplots(
        rows=1, cols=len(positions), subplot_titles=[f"position: {p}" for p in positions], shared_yaxes=True
    )
    for col, position in enumerate(positions, start=1):
        rows = _by_position(results, position)
        layers = [r["layer"] for r in rows]
        show = col == 1
        figure.add_trace(
            go.Scatter(
                x=layers,
                y=[r["logistic_auroc"] for r in rows],
                name="logistic regression",
                line={"color": _COLOURS["logistic"]},
                showlegend=show,
                legendgroup="l",
            ),
            row=1,
            col=col,
        )
        figure.add_trace(
            go.Scatter(
                x=layers,
                y=[r["mean_diff_auroc"] for r in rows],
                name="difference of means",
                line={"color": _COLOURS["mean_diff"]},
                showlegend=show,
                legendgroup="m",
            ),
            row=1,
            col=col,
        )
        figure.add_trace(
            go.Scatter(
                x=layers,
                y=[max(r["shuffled_auroc"]) for r in rows],
                name="null: shuffled labels (max)",
                line={"color": _COLOURS["shuffled"], "dash": "dot"},
                showlegend=show,
                legendgroup="s",
            ),
            row=1,
            col=col,
        )
        figure.add_trace(
            go.Scatter(
                x=layers,
                y=[r["random_auroc_p95"] for r in rows],
                name="null: random directions (95th pct)",
                line={"color": _COLOURS["random"], "dash": "dash"},
                showlegend=show,
                legendgroup="r",
            ),
            row=1,
            col=col,
        )
        figure.update_xaxes(title_text="layer (residual stream entering it)", row=1, col=col)
    figure.update_yaxes(title_text="held-out AUROC (grouped by query)", range=[0.3, 1.02], row=1, col=1)
    figure.update_layout(title="Free vs paid: probe AUROC per layer, with nulls", height=450)
    return figure


def _effect_figure(results: list[dict[str, Any]], positions: Sequence[str]) -> go.Figure:
    figure = make_subplots(rows=1, cols=len(positions), subplot_titles=[f"position: {p}" for p in positions])
    for col, position in enumerate(positions, start=1):
        rows = _by_position(results, position)
        layers = [r["layer"] for r in rows]
        figure.add_trace(
            go.Scatter(
                x=layers,
                y=[r["mean_diff_cohens_d"] for r in rows],
                name="difference of means",
                line={"color": _COLOURS["mean_diff"]},
                showlegend=col == 1,
            ),
            row=1,
            col=col,
        )
        figure.add_trace(
            go.Scatter(
                x=layers,
                y=[r["random_cohens_d_p95"] for r in rows],
                name="null: random directions |d| (95th pct)",
                line={"color": _COLOURS["random"], "dash": "dash"},
                showlegend=col == 1,
            ),
            row=1,
            col=col,
        )
        figure.update_xaxes(title_text="layer", row=1, col=col)
    figure.update_yaxes(title_text="held-out Cohen's d of the projection", row=1, col=1)
    figure.update_layout(title="Effect size of the free-minus-paid direction", height=450)
    return figure


def _cosine_figure(cosines: dict[str, dict[str, list[float | None]]], layers: Sequence[int]) -> go.Figure:
    positions = list(cosines)
    figure = make_subplots(
        rows=len(positions), cols=1, subplot_titles=[f"position: {p}" for p in positions], vertical_spacing=0.12
    )
    for row, position in enumerate(positions, start=1):
        table = cosines[position]
        names = list(table)
        z = np.array([[np.nan if v is None else v for v in table[name]] for name in names])
        figure.add_trace(
            go.Heatmap(
                z=z,
                x=list(layers),
                y=[n.replace("~", " vs ") for n in names],
                zmin=-1,
                zmax=1,
                colorscale="RdBu",
                reversescale=True,
                showscale=row == 1,
                hovertemplate="layer %{x}<br>%{y}<br>cosine %{z:.3f}<extra></extra>",
            ),
            row=row,
            col=1,
        )
    figure.update_layout(title="Cosine similarity between directions, per layer", height=300 * len(positions))
    return figure


def _transfer_figure(results: list[dict[str, Any]], positions: Sequence[str]) -> go.Figure:
    figure = make_subplots(
        rows=1, cols=len(positions), subplot_titles=[f"position: {p}" for p in positions], shared_yaxes=True
    )
    for col, position in enumerate(positions, start=1):
        rows = [r for r in _by_position(results, position) if r.get("transfer_to_sa_auroc") is not None]
        layers = [r["layer"] for r in rows]
        figure.add_trace(
            go.Scatter(
                x=layers,
                y=[r["transfer_to_sa_auroc"] for r in rows],
                error_y=_interval(rows, "transfer_to_sa"),
                name="free/paid probe on the situational-awareness set",
                line={"color": _COLOURS["logistic"]},
                showlegend=col == 1,
            ),
            row=1,
            col=col,
        )
        figure.add_trace(
            go.Scatter(
                x=layers,
                y=[r["transfer_from_sa_auroc"] for r in rows],
                error_y=_interval(rows, "transfer_from_sa"),
                name="situational-awareness probe on free/paid",
                line={"color": _COLOURS["sa"]},
                showlegend=col == 1,
            ),
            row=1,
            col=col,
        )
        figure.add_hline(y=0.5, line={"color": _COLOURS["shuffled"], "dash": "dot"}, row=1, col=col)
        figure.update_xaxes(title_text="layer", row=1, col=col)
    figure.update_yaxes(title_text="AUROC (0.5 = chance)", range=[0, 1.02], row=1, col=1)
    figure.update_layout(title="Transfer between the tier tag and stated training contexts", height=450)
    return figure


def _interval(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Error bars from a stored [low, high] interval."""
    value, interval = [r[f"{key}_auroc"] for r in rows], [r.get(f"{key}_ci") or [np.nan, np.nan] for r in rows]
    return {
        "type": "data",
        "symmetric": False,
        "array": [hi - v for v, (_, hi) in zip(value, interval, strict=True)],
        "arrayminus": [v - lo for v, (lo, _) in zip(value, interval, strict=True)],
    }


def pca_figure(x: np.ndarray, tiers: Sequence[str], variants: Sequence[str], title: str) -> go.Figure:
    centred = x - x.mean(0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:2].T
    explained = singular[:2] ** 2 / max(1e-12, (singular**2).sum())
    figure = go.Figure()
    symbols = {
        v: s for v, s in zip(sorted(set(variants)), ["circle", "diamond", "square", "x", "cross"] * 4, strict=False)
    }
    for tier in sorted(set(tiers)):
        for variant in sorted(set(variants)):
            mask = np.array([t == tier and v == variant for t, v in zip(tiers, variants, strict=True)])
            if mask.any():
                figure.add_trace(
                    go.Scatter(
                        x=projected[mask, 0],
                        y=projected[mask, 1],
                        mode="markers",
                        name=f"{tier} ({variant})",
                        marker={"symbol": symbols[variant]},
                    )
                )
    figure.update_layout(
        title=title,
        xaxis_title=f"PC1 ({explained[0]:.0%} of variance)",
        yaxis_title=f"PC2 ({explained[1]:.0%} of variance)",
        height=500,
    )
    return figure


def steering_figures(output: dict[str, Any]) -> dict[str, go.Figure]:
    figures = {"dose_response": _dose_response(output)}
    if any(r["kind"] == "ablate" for r in output["settings"]):
        figures["ablation"] = _ablation_bars(output)
    return figures


def _dose_response(output: dict[str, Any]) -> go.Figure:
    rows = output["settings"]
    baseline = rows[0]
    named = sorted({r["direction"] for r in rows if r["kind"] == "steer" and not r["direction"].startswith("random")})
    has_benign = "benign" in baseline
    panels = ["gap (free - paid log-odds)", "mean shift of both tiers"] + (["benign compliance"] if has_benign else [])
    figure = make_subplots(rows=1, cols=len(panels), subplot_titles=panels)
    palette = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]

    def series(name: str, key: str) -> tuple[list[float], list[float], list[float], list[float]]:
        points = sorted(
            [r for r in rows if r["direction"] == name and r["kind"] == "steer"] + [baseline],
            key=lambda r: r["coefficient"],
        )
        if key == "mean_shift":
            values = [r[key] if r is not baseline else {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0} for r in points]
        else:
            values = [r[key] for r in points]
        return (
            [r["coefficient"] for r in points],
            [v["mean"] for v in values],
            [v["ci_high"] - v["mean"] for v in values],
            [v["mean"] - v["ci_low"] for v in values],
        )

    keys = ["gap", "mean_shift"] + (["benign"] if has_benign else [])
    randoms = sorted({r["direction"] for r in rows if r["direction"].startswith("random")})
    for col, key in enumerate(keys, start=1):
        if randoms:
            curves = np.array([series(name, key)[1] for name in randoms])
            x = series(randoms[0], key)[0]
            figure.add_trace(
                go.Scatter(
                    x=x + x[::-1],
                    y=list(curves.max(0)) + list(curves.min(0))[::-1],
                    fill="toself",
                    fillcolor="rgba(127,127,127,0.2)",
                    line={"width": 0},
                    name=f"null: {len(randoms)} random directions (range)",
                    showlegend=col == 1,
                    legendgroup="random",
                ),
                row=1,
                col=col,
            )
        for i, name in enumerate(named):
            x, y, up, down = series(name, key)
            figure.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    name=name,
                    line={"color": palette[i % len(palette)]},
                    error_y={"type": "data", "symmetric": False, "array": up, "arrayminus": down},
                    showlegend=col == 1,
                    legendgroup=name,
                ),
                row=1,
                col=col,
            )
        figure.update_xaxes(title_text="coefficient (x typical residual norm)", row=1, col=col)
    figure.update_layout(
        title=f"Steering at layer {output['layer']}: dose-response with a random-direction null", height=450
    )
    return figure


def _ablation_bars(output: dict[str, Any]) -> go.Figure:
    rows = [r for r in output["settings"] if r["kind"] == "ablate"]
    named = [r for r in rows if not r["direction"].startswith("random")]
    randoms = [r["gap"]["mean"] for r in rows if r["direction"].startswith("random")]
    baseline = output["baseline_gap"]
    figure = go.Figure()
    figure.add_trace(
        go.Bar(
            x=["baseline"] + [r["direction"] for r in named],
            y=[baseline["mean"]] + [r["gap"]["mean"] for r in named],
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [baseline["ci_high"] - baseline["mean"]]
                + [r["gap"]["ci_high"] - r["gap"]["mean"] for r in named],
                "arrayminus": [baseline["mean"] - baseline["ci_low"]]
                + [r["gap"]["mean"] - r["gap"]["ci_low"] for r in named],
            },
            name="gap after ablation (95% CI)",
        )
    )
    if randoms:
        low, high = np.quantile(randoms, [0.025, 0.975])
        figure.add_hrect(
            y0=low,
            y1=high,
            fillcolor="rgba(127,127,127,0.25)",
            line_width=0,
            annotation_text="random directions (95% range)",
        )
    figure.update_layout(
        title="Gap after projecting each direction out of every layer",
        yaxis_title="gap (free - paid log-odds)",
        height=450,
    )
    return figure


def patching_figures(output: dict[str, Any]) -> dict[str, go.Figure]:
    """Heatmaps of the residual sweep (hover shows the token), components, attribution vs exact, mediation bars."""
    figures = {"patch_resid": _sweep_heatmaps(output), "mediation": _mediation_bars(output)}
    if any(r.get("family") == "sae" for r in output["mediation"]["rows"]):
        figures["sae_mediation"] = _sae_mediation_bars(output)
    if output.get("components"):
        figures["patch_components"] = _component_heatmaps(output)
    if output.get("attribution"):
        figures["attribution"] = _attribution_scatter(output)
    return figures


def _sweep_heatmaps(output: dict[str, Any]) -> go.Figure:
    directions = output["patch_directions"]
    columns = [output["columns"][c] for c in output["sweep_columns"]]
    x = [f"{i}: {c['label']}" for i, c in zip(output["sweep_columns"], columns, strict=True)]
    figure = make_subplots(rows=len(directions), cols=1, subplot_titles=directions, vertical_spacing=0.12)
    for row, name in enumerate(directions, start=1):
        block = output["sweep"][name]
        mean = np.array(block["mean"], dtype=float)
        custom = np.dstack(
            [
                np.array(block["ci_low"], dtype=float),
                np.array(block["ci_high"], dtype=float),
                np.tile([c["kind"] for c in columns], (mean.shape[0], 1)),
            ]
        )
        figure.add_trace(
            go.Heatmap(
                z=mean,
                x=x,
                y=output["layers"],
                customdata=custom,
                colorscale="RdBu",
                zmid=0,
                coloraxis="coloraxis",
                hovertemplate="layer %{y}<br>token %{x} (%{customdata[2]})<br>recovery %{z:.1%}"
                " [%{customdata[0]:.1%}, %{customdata[1]:.1%}]<extra></extra>",
            ),
            row=row,
            col=1,
        )
        figure.update_yaxes(title_text="layer", row=row, col=1)
    gap = output["gap"]
    figure.update_layout(
        title=f"Residual-stream patching: fraction of the gap recovered (gap {gap['mean']:+.4f} "
        f"[{gap['ci_low']:+.4f}, {gap['ci_high']:+.4f}] nats, {len(output['queries'])} queries)",
        coloraxis={"colorscale": "RdBu", "cmid": 0, "colorbar": {"title": "recovery"}},
        height=380 * len(directions),
    )
    return figure


def _component_heatmaps(output: dict[str, Any]) -> go.Figure:
    components = output["components"]
    directions = output["patch_directions"]
    tokens = components["tokens"]
    titles = [f"{d}, token {t!r}" for d in directions for t in tokens]
    figure = make_subplots(rows=len(directions), cols=len(tokens), subplot_titles=titles, horizontal_spacing=0.06)
    for row, name in enumerate(directions, start=1):
        heads = np.array(components[name]["attn_head"]["mean"], dtype=float)  # [layer, column, head]
        mlp = np.array(components[name]["mlp"]["mean"], dtype=float)  # [layer, column]
        for col in range(len(tokens)):
            z = np.concatenate([heads[:, col, :], mlp[:, col, None]], axis=1)
            labels = [f"H{h}" for h in range(heads.shape[2])] + ["MLP"]
            figure.add_trace(
                go.Heatmap(
                    z=z,
                    x=labels,
                    y=components["layers"],
                    coloraxis="coloraxis",
                    hovertemplate="layer %{y} %{x}<br>recovery %{z:.1%}<extra></extra>",
                ),
                row=row,
                col=col + 1,
            )
    figure.update_layout(
        title="Attention heads and MLPs patched one at a time at the positions that matter",
        coloraxis={"colorscale": "RdBu", "cmid": 0, "colorbar": {"title": "recovery"}},
        height=380 * len(directions),
    )
    return figure


def _attribution_scatter(output: dict[str, Any]) -> go.Figure:
    directions = output["patch_directions"]
    spearman = output["attribution"]["spearman"]
    titles = [
        f"{d}: Spearman {spearman[d]['resid']:+.2f}" if spearman[d]["resid"] is not None else d for d in directions
    ]
    figure = make_subplots(rows=1, cols=len(directions), subplot_titles=titles)
    columns = output["sweep_columns"]
    for col, name in enumerate(directions, start=1):
        exact = np.array(output["sweep"][name]["mean"], dtype=float)
        approx = np.array(output["attribution"]["recovery"][name], dtype=float)[output["layers"]][:, columns]
        text = [f"layer {layer}, token {output['columns'][c]['label']}" for layer in output["layers"] for c in columns]
        figure.add_trace(
            go.Scatter(
                x=exact.ravel(),
                y=approx.ravel(),
                mode="markers",
                text=text,
                marker={"size": 5, "color": _COLOURS["logistic"]},
                hovertemplate="%{text}<br>exact %{x:.1%}<br>attribution %{y:.1%}<extra></extra>",
                showlegend=False,
            ),
            row=1,
            col=col,
        )
        finite = np.isfinite(exact) & np.isfinite(approx)
        if finite.any():
            low = float(min(exact[finite].min(), approx[finite].min()))
            high = float(max(exact[finite].max(), approx[finite].max()))
            figure.add_trace(
                go.Scatter(
                    x=[low, high],
                    y=[low, high],
                    mode="lines",
                    line={"dash": "dot", "color": "#7f7f7f"},
                    showlegend=False,
                    hoverinfo="skip",
                ),
                row=1,
                col=col,
            )
        figure.update_xaxes(title_text="exact patching recovery", row=1, col=col)
        figure.update_yaxes(title_text="attribution estimate", row=1, col=col)
    figure.update_layout(title="Attribution patching against exact patching (each point: a layer and position)")
    return figure


def _mediation_bars(output: dict[str, Any]) -> go.Figure:
    directions = output["patch_directions"]
    rows = [r for r in output["mediation"]["rows"] if r.get("family") != "sae"]
    layers = output["mediation"]["layers"]
    figure = make_subplots(rows=1, cols=len(directions), subplot_titles=directions, shared_yaxes=True)
    names = list(dict.fromkeys(r["subspace"] for r in rows))
    palette = {
        "full": "#7f7f7f",
        "empty": "#c7c7c7",
        "situational_awareness": _COLOURS["sa"],
        "training_context": _COLOURS["logistic"],
        "refusal": _COLOURS["mean_diff"],
        "token_embedding": _COLOURS["embedding"],
    }
    for col, direction in enumerate(directions, start=1):
        for name in names:
            chosen = [r for r in rows if r["direction"] == direction and r["subspace"] == name]
            y = [r["recovery"] if r["recovery"] is not None else float("nan") for r in chosen]
            upper = [(r["ci"][1] or 0) - (r["recovery"] or 0) for r in chosen]
            lower = [(r["recovery"] or 0) - (r["ci"][0] or 0) for r in chosen]
            figure.add_trace(
                go.Bar(
                    x=[f"layer {r['layer']}" for r in chosen],
                    y=y,
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    marker_color=palette.get(name, "#9467bd"),
                    error_y={"type": "data", "array": upper, "arrayminus": lower},
                ),
                row=1,
                col=col,
            )
        nulls = {
            r["layer"]: r["random_abs_p95"]
            for r in rows
            if r["direction"] == direction and r.get("random_abs_p95") is not None
        }
        if nulls:
            x = [f"layer {layer}" for layer in layers if layer in nulls]
            band = [nulls[layer] for layer in layers if layer in nulls]
            for sign in (1, -1):
                figure.add_trace(
                    go.Scatter(
                        x=x,
                        y=[sign * v for v in band],
                        mode="lines+markers",
                        line={"dash": "dash", "color": _COLOURS["random"]},
                        name="random 1-d subspaces, 95th pct |recovery|",
                        legendgroup="random",
                        showlegend=col == 1 and sign == 1,
                    ),
                    row=1,
                    col=col,
                )
    figure.update_yaxes(title_text="fraction of the gap carried", tickformat=".0%", row=1, col=1)
    figure.update_layout(
        barmode="group",
        title="Mediation: patching only a subspace at every position after the shared prefix "
        "(full must be 100%, empty 0%)",
    )
    return figure


def _sae_mediation_bars(output: dict[str, Any]) -> go.Figure:
    """Each SAE feature set's share of the gap (patched per direction, or ablated from both runs) beside the 95th
    percentile of random feature sets of the same size."""
    rows = [r for r in output["mediation"]["rows"] if r.get("family") == "sae"]
    kinds = list(dict.fromkeys(r["direction"] for r in rows))
    figure = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds, shared_yaxes=True)
    for col, kind in enumerate(kinds, start=1):
        chosen = [r for r in rows if r["direction"] == kind]
        labels = [f"{r['subspace'].removeprefix('sae_').replace('_', ' ')} ({r['dimension']})" for r in chosen]
        figure.add_trace(
            go.Bar(
                x=labels,
                y=[r["recovery"] if r["recovery"] is not None else float("nan") for r in chosen],
                marker_color=_COLOURS["sa"],
                name="feature set",
                showlegend=col == 1,
                error_y={
                    "type": "data",
                    "array": [(r["ci"][1] or 0) - (r["recovery"] or 0) for r in chosen],
                    "arrayminus": [(r["recovery"] or 0) - (r["ci"][0] or 0) for r in chosen],
                },
            ),
            row=1,
            col=col,
        )
        for sign in (1, -1):
            figure.add_trace(
                go.Scatter(
                    x=labels,
                    y=[sign * r["random_abs_p95"] if r["random_abs_p95"] is not None else None for r in chosen],
                    mode="markers",
                    marker={"symbol": "line-ew-open", "size": 30, "color": _COLOURS["random"]},
                    name="random sets of the same size, 95th pct |effect|",
                    showlegend=col == 1 and sign == 1,
                ),
                row=1,
                col=col,
            )
    figure.update_yaxes(title_text="fraction of the gap", tickformat=".0%", row=1, col=1)
    layer = output["mediation"].get("sae", {}).get("layer")
    figure.update_layout(title=f"SAE feature sets at layer {layer}: patched, and ablated from both runs")
    return figure


def feature_group_figure(output: dict[str, Any]) -> go.Figure:
    """Each tier-differing SAE feature's tier difference beside its responses (SA contrast, tag-only, harmful vs
    harmless), with 95% intervals; the x label names the feature's group."""
    rows = output["features"]
    first, second = output["tiers"]
    labels = [f"f{r['feature']} ({r['group'].replace('_', ' ')})" for r in rows]
    series = [("tier", f"{first} - {second}", _COLOURS["logistic"])]
    names = {"situational_awareness": _COLOURS["sa"], "tag_only": "#9467bd", "refusal": _COLOURS["embedding"]}
    figure = go.Figure()

    def bars(name: str, values: list[tuple[float, list[float]] | None], colour: str) -> None:
        y = [v[0] if v else float("nan") for v in values]
        figure.add_trace(
            go.Bar(
                x=labels,
                y=y,
                name=name,
                marker_color=colour,
                error_y={
                    "type": "data",
                    "array": [v[1][1] - v[0] if v else 0 for v in values],
                    "arrayminus": [v[0] - v[1][0] if v else 0 for v in values],
                },
            )
        )

    for _, label, colour in series:
        bars(label, [(r["mean_difference"], r["ci"]) for r in rows], colour)
    for name, colour in names.items():
        if name in output["responses"]:
            response = output["responses"][name]
            values = [(r["responses"][name]["mean"], r["responses"][name]["ci"]) for r in rows]
            bars(f"{name.replace('_', ' ')}: {response['contrast']}", values, colour)
    figure.update_layout(
        barmode="group",
        title=f"SAE features differing between {first} and {second} (layer {output['layer']}, {output['position']}): "
        "tier difference and responses, 95% intervals",
        yaxis_title="feature activation difference",
    )
    return figure


def verdict_figure(output: dict[str, Any]) -> go.Figure:
    """verdict.json: the held-out share of the gap each learned subspace carries (sufficiency) and the share its
    orthogonal complement carries (around it), with intervals, beside the random subspaces' 95th percentile."""
    rows = output["subspaces"]
    seeds = [f" s{row['fit_seed']}" if row.get("fit_seed") else "" for row in rows]
    labels = [f"{row['name']} @ {row['layer']}{seed}" for row, seed in zip(rows, seeds, strict=True)]
    figure = go.Figure()
    for key, name in (("share", "through the subspace"), ("direct", "around it (complement)")):
        values = [row[key]["value"] for row in rows]
        figure.add_bar(
            x=labels,
            y=values,
            name=name,
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [max(0.0, row[key]["high"] - row[key]["value"]) for row in rows],
                "arrayminus": [max(0.0, row[key]["value"] - row[key]["low"]) for row in rows],
            },
        )
    for layer, null in output["null"].items():
        figure.add_hline(
            y=null["quantiles"]["0.95"],
            line_dash="dot",
            annotation_text=f"random k={null['k']} subspaces, 95th pct (layer {layer})",
        )
    figure.update_layout(
        barmode="group",
        title=f"verdict: {output['verdict']['verdict']}: share of the held-out gap",
        yaxis_title="share of the gap (1 = all of it)",
        height=420,
    )
    return figure


def zoo_figure(zoo: dict[str, Any]) -> go.Figure:
    """zoo.json: the confusion matrix (kinds x verdicts, organisms whose ground truth held) as a heatmap."""
    from afprobe.analysis.verdict import VERDICTS

    kinds = list(zoo["matrix"])
    counts = [[zoo["matrix"][kind].get(verdict, 0) for verdict in VERDICTS] for kind in kinds]
    figure = go.Figure(
        go.Heatmap(
            z=counts,
            x=list(VERDICTS),
            y=kinds,
            text=counts,
            texttemplate="%{text}",
            colorscale="Blues",
            showscale=False,
        )
    )
    figure.update_layout(
        title=f"organism zoo: verdicts by kind (rules v{zoo['rules_version']})",
        xaxis_title="verdict",
        yaxis_title="kind",
        height=120 + 60 * max(1, len(kinds)),
    )
    return figure
