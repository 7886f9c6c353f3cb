"""One self-contained HTML report of everything a run folder holds.

`write_report(run_dir)` looks under `run_dir` for the files afprobe's jobs write (`gap.json` with its
`per_query.csv`, a probes folder's `metrics.json`, `steering.json`, `patch.json`, an SAE's `afprobe_sae.json`, an SAE
analysis' `features.json`) and writes `run_dir/report.html`: each analysis found gets a section with its figures
(plotly, with plotly.js embedded once, so the file opens offline), its key numbers with intervals, and the config and
model fingerprint that produced it. Analyses that were not run have no section.

The page checks itself: a small script records uncaught errors and `console.error` calls and, once loaded, counts
the figures that rendered; it shows the count at the bottom and sets `data-figures`, `data-rendered` and
`data-errors` on `<body>`, which is what the browser test reads.
"""

from __future__ import annotations

import csv
import html
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from afprobe import __version__
from afprobe.artefacts import ARTEFACTS, PER_QUERY_CSV, PROBE_DIRECTIONS
from afprobe.errors import AfprobeError
from afprobe.files import CHECKSUMS, atomic_write_text, seal_folder

SECTION_TITLES = {artefact.kind: artefact.title for artefact in ARTEFACTS}

_SELF_CHECK = """
window.afprobeErrors = [];
window.addEventListener('error', function (e) { window.afprobeErrors.push(String(e.message)); });
(function () {
  var original = console.error;
  console.error = function () {
    window.afprobeErrors.push(Array.prototype.map.call(arguments, String).join(' '));
    return original.apply(console, arguments);
  };
})();
window.addEventListener('load', function () {
  setTimeout(function () {
    var figures = document.querySelectorAll('.afprobe-figure');
    var rendered = 0;
    figures.forEach(function (f) { if (f.querySelector('.main-svg')) { rendered += 1; } });
    document.body.dataset.figures = figures.length;
    document.body.dataset.rendered = rendered;
    document.body.dataset.errors = JSON.stringify(window.afprobeErrors);
    document.getElementById('afprobe-status').textContent =
      rendered + ' of ' + figures.length + ' figures rendered; ' + window.afprobeErrors.length + ' script errors';
  }, 0);
});
"""

_STYLE = """
body{font-family:system-ui,-apple-system,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222}
h1{margin-bottom:0.2em} h2{border-top:2px solid #ddd;padding-top:0.8em;margin-top:1.6em}
nav a{margin-right:1em} .meta{color:#666;font-size:0.9em}
table{border-collapse:collapse;font-size:0.9em;margin:0.6em 0} td,th{padding:3px 9px;border-bottom:1px solid #eee;
text-align:right} td:first-child,th:first-child{text-align:left}
pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:0.8em} .reading{margin:0.2em 0}
.ctx{font-family:monospace;white-space:pre-wrap;background:#f7f7f7;padding:2px 6px;margin:2px 0}
mark{background:#ffb000;font-weight:bold} #afprobe-status{color:#666;font-size:0.85em;margin-top:2em}
"""


def find_artefacts(run_dir: str | Path) -> dict[str, list[Path]]:
    """Every afprobe result file under `run_dir`, by kind (sorted paths)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise AfprobeError(f"{run_dir} is not a folder: give the folder a run wrote its results to")
    found: dict[str, list[Path]] = {}
    for artefact in ARTEFACTS:
        kind = artefact.kind
        for path in sorted(root.rglob(artefact.file)):
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue  # .venv, .git: not results
            if kind == "probes" and not (path.parent / PROBE_DIRECTIONS).exists():  # another tool's metrics.json
                continue
            found.setdefault(kind, []).append(path)
    return found


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AfprobeError(f"cannot read {path} ({exc}): rerun the job that writes it") from exc


def _ci(estimate: dict[str, Any], fmt: str = "+.4f") -> str:
    return f"{estimate['mean']:{fmt}} [{estimate['ci_low']:{fmt}}, {estimate['ci_high']:{fmt}}]"


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _details(title: str, value: Any) -> str:
    return (
        f"<details><summary>{html.escape(title)}</summary><pre>"
        f"{html.escape(json.dumps(value, indent=2, default=str))}</pre></details>"
    )


class _Figures:
    """Figures as divs; plotly.js goes once into the page's head."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, figure: go.Figure, height: int | None = None) -> str:
        self.count += 1
        if height is not None:
            figure.update_layout(height=height)
        div = figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{self.count}")
        return f"<div class='afprobe-figure'>{div}</div>"


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _gap_section(path: Path, root: Path, figure: _Figures) -> str:
    gap = _load(path)
    parts = [f"<h3>{html.escape(_relative(path.parent, root))}</h3>"]
    model = gap.get("model", {})
    prompts = gap.get("prompts", {})
    facts = [
        str(model.get("name")),
        f"variant {prompts.get('variant')}",
        f"{gap.get('n_queries')} queries",
        f"trained tier: {prompts.get('trained_tier')}",
    ]
    parts.append("<p class='meta'>" + " &middot; ".join(html.escape(f) for f in facts) + "</p>")
    rows = []
    for name, units in gap["gaps"].items():
        rows.append(
            [
                name,
                _ci(units["log_odds"]),
                f"{units['log_odds'].get('p_value', float('nan')):.2g}",
                _ci(units["p_accept"]),
                _ci(units["first_token_log_odds"]),
            ]
        )
    parts.append(
        _table(["contrast", "log-odds (95% CI)", "p", "P(accept) (95% CI)", "first-token log-odds (95% CI)"], rows)
    )
    resolution = gap.get("resolution")
    if resolution and resolution.get("per_prompt_noise"):
        verdict = "resolves" if resolution.get("primary_gap_resolved") else "does NOT resolve"
        parts.append(
            f"<p>{html.escape(str(resolution['dtype']))} run: rounding adds {resolution['per_prompt_noise']:.3g} "
            f"nats to each prompt's log-odds (measured on {resolution['n_prompts']} prompts against float32 "
            f"arithmetic), so a mean over {resolution['n_pairs']} queries is resolved beyond "
            f"&plusmn;{resolution['mean_difference_resolution']:.3g} nats: this run {verdict} the primary gap.</p>"
        )
    per_query = path.parent / PER_QUERY_CSV
    if per_query.is_file():
        parts.append(figure(_per_query_figure(per_query, gap), height=380))
    return "\n".join(parts)


def _per_query_figure(per_query: Path, gap: dict[str, Any]) -> go.Figure:
    """Each query's free-minus-paid log-odds (the primary contrast), with the mean and its interval."""
    with per_query.open() as handle:
        rows = list(csv.DictReader(handle))
    first, second = gap["primary_gap"].split("-", 1)
    by_query: dict[str, dict[str, float]] = {}
    for row in rows:
        by_query.setdefault(row["query_id"], {})[row["tier"]] = float(row["log_odds"])
    pairs = [(q, t[first] - t[second]) for q, t in by_query.items() if first in t and second in t]
    figure = go.Figure()
    if not pairs:
        return figure
    ids, diffs = zip(*pairs, strict=True)
    estimate = gap["gaps"][gap["primary_gap"]]["log_odds"]
    rng = np.random.default_rng(0)
    figure.add_trace(
        go.Scatter(
            x=list(diffs),
            y=list(rng.uniform(-0.3, 0.3, len(diffs))),
            mode="markers",
            text=list(ids),
            hovertemplate="%{text}: %{x:+.4f}<extra></extra>",
            name="queries",
            marker={"opacity": 0.7},
        )
    )
    figure.add_vrect(x0=estimate["ci_low"], x1=estimate["ci_high"], fillcolor="#1f77b4", opacity=0.15, line_width=0)
    figure.add_vline(x=estimate["mean"], line_color="#1f77b4")
    figure.add_vline(x=0, line_dash="dot", line_color="#999")
    figure.update_yaxes(visible=False)
    figure.update_layout(
        title=f"{gap['primary_gap']} per query (log-odds): mean {_ci(estimate)} (shaded: 95% interval)",
        xaxis_title=f"{first} minus {second}, nats",
    )
    return figure


def _probes_section(path: Path, root: Path, figure: _Figures) -> str:
    from afprobe.analysis import plots

    metrics = _load(path)
    summary = metrics["summary"]
    best = summary["best"]
    parts = [
        f"<h3>{html.escape(_relative(path.parent, root))}</h3>",
        f"<p>best probe: layer {best['layer']}, position {html.escape(best['position'])}, held-out AUROC "
        f"{best.get('logistic_auroc', float('nan')):.3f}; largest shuffled-label AUROC "
        f"{summary.get('max_shuffled_auroc', float('nan')):.3f} (chance is 0.5)</p>",
    ]
    adjusted = summary.get("best_selection_adjusted")
    if adjusted:
        low, high = adjusted.get("mean_diff_auroc_ci", [float("nan")] * 2)
        parts.append(
            f"<p>selection-adjusted: the cell chosen on {adjusted['selected_on_queries']} queries out of a family of "
            f"{adjusted['family_size']} layer x position cells (layer {adjusted['layer']}, "
            f"{html.escape(adjusted['position'])}) scores AUROC {adjusted['mean_diff_auroc']:.3f} [{low:.3f}, "
            f"{high:.3f}], paired d_z {adjusted['mean_diff_cohens_dz']:+.2f} on the other "
            f"{adjusted['reported_on_queries']} (difference-of-means probe); the best cell above is a maximum over "
            f"the whole family and reads high</p>"
        )
    for name, fig in plots.probe_metric_figures(metrics).items():
        parts.append(f"<h4>{html.escape(name.replace('_', ' '))}</h4>" + figure(fig))
    if (path.parent / "pca.html").exists():
        parts.append(
            f"<p class='meta'>PCA of the activations: {html.escape(_relative(path.parent, root))}/pca.html</p>"
        )
    return "\n".join(parts)


def _steering_section(path: Path, root: Path, figure: _Figures) -> str:
    from afprobe.analysis import plots

    output = _load(path)
    parts = [
        f"<h3>{html.escape(_relative(path.parent, root))}</h3>",
        f"<p>layer {output['layer']}, typical residual norm {output['typical_norm']:.1f}; baseline gap "
        f"{_ci(output['baseline_gap'])}</p>",
    ]
    for name, verdict in output.get("verdicts", {}).items():
        for key in ("steering", "ablation"):
            reading = (verdict.get(key) or {}).get("reading") if isinstance(verdict, dict) else None
            if reading:
                parts.append(f"<p class='reading'>{html.escape(name)} ({key}): {html.escape(reading)}</p>")
    for _, fig in plots.steering_figures(output).items():
        parts.append(figure(fig))
    return "\n".join(parts)


def _patching_section(path: Path, root: Path, figure: _Figures) -> str:
    from afprobe.analysis import plots

    output = _load(path)
    parts = [f"<h3>{html.escape(_relative(path.parent, root))}</h3>"]
    parts += [f"<p class='reading'>{html.escape(line)}</p>" for line in output.get("summary", [])]
    for _, fig in plots.patching_figures(output).items():
        parts.append(figure(fig))
    rows = []
    for row in output["mediation"]["rows"]:
        rows.append(
            [
                row["subspace"],
                row["layer"],
                row["direction"],
                "" if row.get("dimension") is None else row["dimension"],
                "" if row["recovery"] is None else f"{row['recovery']:+.1%}",
                "" if row["ci"][0] is None else f"[{row['ci'][0]:+.1%}, {row['ci'][1]:+.1%}]",
                "" if row.get("random_abs_p95") is None else f"{row['random_abs_p95']:.1%}",
                "" if row.get("p_vs_random") is None else f"{row['p_vs_random']:.2g}",
                "yes" if row.get("beyond_random") else "",
            ]
        )
    parts.append("<h4>mediation table</h4>")
    parts.append(
        _table(
            ["subspace", "layer", "direction", "dim", "share of gap", "95% CI", "random 95th pct", "p", "beyond"],
            rows,
        )
    )
    checks = [
        [name, next(iter(v.values())), v["tolerance"], "yes" if v["passed"] else "NO"]
        for name, v in output["checks"].items()
    ]
    parts.append(_table(["check", "measured", "tolerance", "passed"], checks))
    return "\n".join(parts)


def _verdict_section(path: Path, root: Path, figure: _Figures) -> str:
    from afprobe.analysis import plots

    output = _load(path)
    verdict = output["verdict"]
    parts = [
        f"<h3>{html.escape(_relative(path.parent, root))}</h3>",
        f"<p class='verdict'><b>{html.escape(verdict['verdict'])}</b> (rules v{verdict['rules_version']})</p>",
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in verdict["evidence"]) + "</ul>",
    ]
    if output["subspaces"]:
        parts.append(figure(plots.verdict_figure(output)))

    def interval(value: dict[str, Any] | None, percent: bool = True) -> str:
        if value is None:
            return ""
        fmt = "+.0%" if percent else "+.3f"
        return f"{value['value']:{fmt}} [{value['low']:{fmt}}, {value['high']:{fmt}}]"

    rows = [
        [
            row["name"],
            row["layer"],
            row.get("fit_seed", 0),
            row["k"],
            interval(row["share"]),
            f"{row['p_random']:.3f}",
            "" if row.get("p_holm") is None else f"{row['p_holm']:.3f}",
            interval(row["direct"]),
            interval(row["resampled"]),
            interval(row.get("cross_prompt"), percent=False),
            interval(row.get("above_negation")),
            interval(row.get("tag_through")),
        ]
        for row in output["subspaces"]
    ]
    parts.append(
        _table(
            [
                "subspace",
                "layer",
                "fitting seed",
                "k",
                "share (held out)",
                "p vs random",
                "Holm p",
                "around it",
                "other-query donor",
                "cross-prompt (nats)",
                "above negation",
                "tag's effect through it",
            ],
            rows,
        )
    )
    whole = "; ".join(f"layer {layer}: {interval(v)}" for layer, v in output["whole_residual"].items())
    path = output.get("tag_path", {})
    through = "; ".join(
        f"layer {layer}: the tag position at layer {alone['tag_layer']} carries {interval(alone)} of the gap, "
        f"holding these positions removes {interval(path['through_positions'].get(layer))} of that"
        for layer, alone in path.get("alone", {}).items()
    )
    parts.append(
        f"<p class='reading'>the whole residual at the interchanged positions carries {html.escape(whole)} of the "
        f"gap; path from the tag: {html.escape(through or 'n/a')}; family: {html.escape(output['family'])}</p>"
    )
    return "\n".join(parts)


def _sae_section(path: Path, root: Path, figure: _Figures) -> str:
    result = _load(path)
    quality = result["quality_held_out"]
    rows = [
        ["explained variance (held out)", f"{quality['explained_variance']:.3f}"],
        ["L0", f"{quality['l0']:.1f}"],
        ["dead features", f"{quality['dead_fraction']:.1%}"],
        ["training tokens", result["n_train_tokens"]],
    ]
    loss = result.get("spliced_loss")
    if loss:
        rows.append(
            [
                "next-token loss clean / spliced / zeroed",
                f"{loss['clean']:.3f} / {loss['spliced']:.3f} / {loss['zeroed']:.3f} "
                f"({loss['recovered']:.1%} recovered)",
            ]
        )
    config = result["config"]
    return (
        f"<h3>{html.escape(_relative(path.parent, root))}</h3><p>layer {result['layer']}, "
        f"{config.get('d_sae')} features, k = {config.get('k')}</p>" + _table(["", ""], rows)
    )


def _features_section(path: Path, root: Path, figure: _Figures) -> str:
    from afprobe.analysis import plots

    output = _load(path)
    parts = [f"<h3>{html.escape(_relative(path.parent, root))}</h3>"]
    parts += [f"<p class='reading'>{html.escape(line)}</p>" for line in output["summary"]]
    if output["features"]:
        parts.append(figure(plots.feature_group_figure(output)))
    first, second = output["tiers"]
    rows = [
        [
            row["feature"],
            row["group"],
            f"{row['mean_difference']:+.4f} [{row['ci'][0]:+.4f}, {row['ci'][1]:+.4f}]",
            f"{row['q_value']:.2g}",
            ", ".join(
                f"{name} {r['mean']:+.3f}{'*' if r['significant'] else ''}" for name, r in row["responses"].items()
            ),
        ]
        for row in output["features"]
    ]
    parts.append(_table(["feature", "group", f"{first} - {second} (95% CI)", "q", "responses (* = q <= alpha)"], rows))
    for feature, contexts in list(output.get("dashboard", {}).items())[:6]:
        parts.append(f"<h4>feature {html.escape(str(feature))}: where it fires hardest</h4>")
        for entry in contexts[:4]:
            if entry.get("tokens") is None:
                continue
            words = [html.escape(t) for t in entry["tokens"]]
            words[entry["at"]] = f"<mark>{words[entry['at']]}</mark>"
            parts.append(
                f"<div class='meta'>{entry['activation']:.2f} &middot; {html.escape(entry['store'])} &middot; "
                f"{html.escape(entry['tier'])}</div><div class='ctx'>{''.join(words)}</div>"
            )
    if (path.parent / "feature_dashboard.html").exists():
        parts.append(
            f"<p class='meta'>every feature's dashboard: "
            f"{html.escape(_relative(path.parent, root))}/feature_dashboard.html</p>"
        )
    return "\n".join(parts)


def _ground_truth_rows(truth: dict[str, Any]) -> list[list[str]]:
    return [
        [label, _ci(truth[key], "+.3f"), f"{truth[key].get('p_value', float('nan')):.2g}"]
        for label, key in (
            ("standard gap, free - paid", "standard_gap"),
            ("held-out phrasings, trained - not trained", "held_out_phrasings"),
            ("semantic swap gap, free - paid", "semantic_swap_gap"),
        )
    ]


def _ground_truth_section(path: Path, root: Path, figure: _Figures) -> str:
    truth = _load(path)
    return "\n".join(
        [
            f"<h3>{html.escape(_relative(path.parent, root))}</h3>",
            f"<p class='meta'>{html.escape(str(truth['model'].get('name')))}, adapter "
            f"{html.escape(str(truth['model'].get('adapter')))}; {truth['standard_gap']['n']} held-out queries</p>",
            _table(["log-odds (nats)", "mean (95% CI)", "p"], _ground_truth_rows(truth)),
            f"<p class='reading'>{html.escape(truth['reading']['origin'])}</p>",
        ]
    )


def _zoo_section(path: Path, root: Path, figure: _Figures) -> str:
    zoo = _load(path)
    parts = [
        f"<h3>{html.escape(_relative(path.parent, root) or '.')}</h3>",
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in zoo["summary"]) + "</ul>",
    ]
    verdicts = sorted({v for counts in zoo["matrix"].values() for v, n in counts.items() if n} | {"no gap to explain"})
    parts.append("<p class='reading'>Confusion matrix (organisms whose ground truth held):</p>")
    if zoo["matrix"]:
        from afprobe.analysis import plots

        parts.append(figure(plots.zoo_figure(zoo)))
    parts.append(
        _table(
            ["kind", *verdicts],
            [[kind, *(counts.get(v, 0) for v in verdicts)] for kind, counts in zoo["matrix"].items()],
        )
    )
    rows = [
        [
            row["kind"],
            row["seed"],
            "holds" if row["ground_truth_holds"] else "fails (excluded)",
            row["verdict"] or "-",
            f"v{row['rules_version']}" if row.get("rules_version") else "-",
            row.get("verdict_current_rules") or "-",
            " or ".join(row["right_verdicts"]) or "-",
            "-" if row["right"] is None else ("yes" if row["right"] else "no"),
            "; ".join(f"{k} {v:.3f}" for k, v in (row.get("recovered") or {}).items()) or "-",
        ]
        for row in zoo["rows"]
    ]
    parts.append(
        _table(
            [
                "kind",
                "seed",
                "ground truth",
                "verdict",
                "rules",
                f"under current rules (v{zoo['rules_version']})",
                "right verdicts",
                "right",
                "|cos| of u with (planted)",
            ],
            rows,
        )
    )
    for row in zoo["rows"]:
        parts.append(_details(f"{row['kind']} seed {row['seed']}: ground truth", row["criteria"]))
    if zoo.get("base"):
        parts.append(f"<p class='reading'>base model: {html.escape(zoo['base']['verdict'])}</p>")
    return "\n".join(parts)


def _comparison_section(path: Path, root: Path, figure: _Figures) -> str:
    from plotly.subplots import make_subplots

    comparison = _load(path)
    models = comparison["models"]
    parts = [f"<h3>{html.escape(_relative(path.parent, root) or '.')}</h3>"]
    rows = []
    for name, model in models.items():
        truth = model.get("ground_truth") or {}
        rows.append(
            [
                name,
                str(model.get("adapter")),
                _ci(model["gap"], "+.3f") if model.get("gap") else "-",
                _ci(truth["held_out_phrasings"], "+.3f") if truth else "-",
                _ci(truth["semantic_swap_gap"], "+.3f") if truth else "-",
                _ci(model["sa_contrast_gap"], "+.3f") if model.get("sa_contrast_gap") else "-",
                truth.get("reading", {}).get("origin", "-") if truth else "-",
            ]
        )
    parts.append(
        _table(
            [
                "model",
                "adapter",
                "gap, free - paid",
                "held-out phrasings",
                "semantic-swap gap",
                "SA contrast set",
                "behaviour says",
            ],
            rows,
        )
    )
    parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in comparison["summary"]) + "</ul>")
    subspaces = ("situational_awareness", "token_embedding", "training_context", "refusal")
    med_rows = []
    for name, model in models.items():
        for subspace in subspaces:
            shares = model["mediation"].get(subspace) or {}
            med_rows.append(
                [name, subspace]
                + [
                    f"{entry['mean']:+.0%}{'*' if entry['beyond_random'] else ''}"
                    for _, entry in sorted(shares.items(), key=lambda kv: int(kv[0]))
                ]
            )
    layers = sorted({int(k) for m in models.values() for k in (m["mediation"].get("situational_awareness") or {})})
    if layers:
        parts.append(
            "<p>Share of the gap each direction carries (mean of both patch directions; * beyond every "
            "random direction in both):</p>"
        )
        parts.append(_table(["model", "direction"] + [f"layer {layer}" for layer in layers], med_rows))
        fig = make_subplots(
            rows=1, cols=2, subplot_titles=("situational-awareness direction", "token-embedding direction")
        )
        for column, subspace in enumerate(("situational_awareness", "token_embedding"), start=1):
            for name, model in models.items():
                shares = model["mediation"].get(subspace) or {}
                keys = sorted(shares, key=int)
                fig.add_trace(
                    go.Bar(
                        x=[f"layer {k}" for k in keys],
                        y=[shares[k]["mean"] for k in keys],
                        name=name,
                        legendgroup=name,
                        showlegend=column == 1,
                    ),
                    row=1,
                    col=column,
                )
        fig.update_layout(barmode="group", yaxis_title="share of the gap", title="Mediation by model")
        parts.append(figure(fig, height=420))
    return "\n".join(parts)


_SECTIONS = {
    "zoo": _zoo_section,
    "verdict": _verdict_section,
    "comparison": _comparison_section,
    "ground_truth": _ground_truth_section,
    "gap": _gap_section,
    "probes": _probes_section,
    "steering": _steering_section,
    "patching": _patching_section,
    "sae": _sae_section,
    "features": _features_section,
}


def build_report(run_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """The report's HTML and a summary of what went into it (kinds found, figure count)."""
    from plotly.offline import get_plotlyjs

    root = Path(run_dir)
    found = find_artefacts(root)
    if not found:
        raise AfprobeError(
            f"no afprobe results under {run_dir} (gap.json, metrics.json, steering.json, patch.json, "
            "afprobe_sae.json, features.json): run a job with --out inside it first"
        )
    figure = _Figures()
    sections, provenance = [], []
    for kind, builder in _SECTIONS.items():
        if kind not in found:
            continue
        body = "\n".join(builder(path, root, figure) for path in found[kind])
        sections.append(f"<section id='{kind}'><h2>{SECTION_TITLES[kind]}</h2>{body}</section>")
        for path in found[kind]:
            content = _load(path)
            provenance.append(
                _details(
                    f"{kind}: {_relative(path, root)}",
                    {
                        "config": content.get("config"),
                        "model": content.get("model") or (content.get("store") or {}).get("model"),
                        "afprobe_version": content.get("afprobe_version"),
                    },
                )
            )
    run_config = root / "config.json"
    if run_config.is_file():
        provenance.insert(0, _details("the run's config", _load(run_config)))
    nav = " ".join(f"<a href='#{kind}'>{SECTION_TITLES[kind]}</a>" for kind in _SECTIONS if kind in found)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>afprobe report: {html.escape(root.name)}</title><style>{_STYLE}</style>"
        f"<script>{_SELF_CHECK}</script><script>{get_plotlyjs()}</script></head><body>"
        f"<h1>afprobe report: {html.escape(root.name)}</h1>"
        f"<p class='meta'>{html.escape(str(root))} &middot; written {time.strftime('%Y-%m-%d %H:%M:%S')} by afprobe "
        f"{__version__}</p><nav>{nav} <a href='#provenance'>Configs and fingerprints</a></nav>"
        + "\n".join(sections)
        + "<section id='provenance'><h2>Configs and fingerprints</h2>"
        + "\n".join(provenance)
        + "</section><p id='afprobe-status'>(figures not rendered yet: scripts are off?)</p></body></html>"
    )
    return page, {
        "kinds": list(found),
        "n_figures": figure.count,
        "files": {k: [str(p) for p in v] for k, v in found.items()},
    }


def write_report(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the report (default `run_dir/report.html`); returns its path and what went into it."""
    page, summary = build_report(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    try:
        atomic_write_text(path, page)
        if (path.parent / CHECKSUMS).is_file():  # a sealed folder stays sealed with its new report
            seal_folder(path.parent)
    except OSError as exc:
        raise AfprobeError(f"could not write {path} ({exc.strerror or exc}): free disk space or choose --out") from exc
    summary["bytes"] = path.stat().st_size
    return path, summary
