"""Measured on the first planted construction (the unit appended to block 20's MLP, afprobe up to commit
9b0fe39), whose edits and verdicts are now in results/zoo/superseded/planted-mlp-input-2026-12-03/; the current
afprobe refuses those edits, so rerun this at commit 9b0fe39.

Why the zoo's planted organisms came out as they did, measured on the embedded model after they were scored.

Run from the repository root (about 15-20 minutes on 2 cores):
    .venv/bin/python results/zoo/diagnostics/planted_directions.py > results/zoo/diagnostics/planted_directions.txt
Reads the planted edits' u (results/zoo/organisms/planted-*/planted.safetensors) and the subspaces the verdict step
learnt for the planted tag-token edit; records residuals entering block 20 at the decision position of the base
model (the edit sits after that stream, so the stream is the same with or without it). Nothing here is scored.
Readings are in the residual stream's own units (what the planted unit reads before its gain), not nats.

1. Does u generalise? Each prompt pair's trained-minus-untrained difference read along u, on the fitting queries /
   pairs u was made from and on the held-out ones the ground truth uses (12 each), and the cosine between the fitting
   half's and the held-out half's own mean differences.
2. Is there a gap to plant along stated contexts alone? u_SA with the bare tag's direction removed (both without the
   mean residual's direction, as the edit does), read on the default prompt's tier pairs.
3. What does the planted tag-token edit's learnt 4-d subspace hold? Its |cos| with u and with the tier difference
   at each of the 4 positions it patches.
4. Is there a layer where 1 and 2 come out otherwise? The same measurements at every residual stream, with each
   layer's own u (the fitting half's mean difference, without the mean residual's direction).
"""

import torch
from safetensors.torch import load_file

from afprobe.analysis.patching import make_pairs
from afprobe.data.contrast import load_contrast_pairs, render_contrast_set
from afprobe.data.prompts import PromptConfig, render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.data.splits import split_items
from afprobe.model.loading import load_model
from afprobe.model.patching import patcher_for

LAYER, N, STATED = 20, 12, "situational-awareness-v2"
TAG_TOKEN_VERDICT = "results/zoo/verdicts/aa0ca2d4ebf5/subspaces.safetensors"  # planted-tag-token-s0 (zoo.json)

loaded = load_model("smollm2-135m-instruct")
tokenizer, max_context = loaded.tokenizer, loaded.max_context or None
queries = {split: load_queries("harmful", n=N, split=split) for split in ("fit", "evaluate")}


def differences(prompt_set, positions=1):
    """Trained minus untrained residual at the last `positions` tokens of every stream: (pair, layer, position, d)."""
    patcher = patcher_for(loaded, [prompt_set])
    rows = []
    for pair in make_pairs(prompt_set):
        trained = patcher.record(pair.trained).resid[:, -positions:].float()
        untrained = patcher.record(pair.untrained).resid[:, -positions:].float()
        rows.append(trained - untrained)
    return torch.stack(rows)


def stated(split):
    pairs = split_items(load_contrast_pairs(STATED), split)[:N]
    return render_contrast_set(tokenizer, STATED, pairs, queries[split], max_context=max_context)


def variant(split, name):
    return render_pairs(tokenizer, queries[split], PromptConfig(variant=name), max_context=max_context)


def without(x, *directions):
    for d in directions:
        d = d / d.norm()
        x = x - (x @ d) * d
    return x


def reading(rows, u):
    values = rows @ (u / u.norm())
    half = 1.96 * values.std() / len(values) ** 0.5
    return f"{float(values.mean()):+.3f} [{float(values.mean() - half):+.3f}, {float(values.mean() + half):+.3f}]"


def cos(a, b):
    return float(a @ b / a.norm() / b.norm())


print(f"residual entering block {LAYER}, decision position; {N} fitting and {N} held-out queries; contrast {STATED}")
every = {("stated", s): differences(stated(s))[:, :, -1] for s in ("fit", "evaluate")} | {
    (v, s): differences(variant(s, v), positions=4) for v in ("default", "tag-only") for s in ("fit", "evaluate")
}
d = {key: rows[:, LAYER] for key, rows in every.items()}
base = patcher_for(loaded, [variant("fit", "default")])
mean_residuals = torch.stack([base.record(p).resid[:, -1].float() for p in variant("fit", "default").prompts]).mean(0)
mean_residual = mean_residuals[LAYER]

print("\n1. each pair's difference read along the planted u (mean [95% interval]):")
for kind in ("situational-awareness", "tag-token"):
    u = load_file(f"results/zoo/organisms/planted-{kind}-s0/planted.safetensors")["u"].float()
    source = "stated" if kind == "situational-awareness" else "tag-only"
    rows = {s: d[(source, s)] if source == "stated" else d[(source, s)][:, -1] for s in ("fit", "evaluate")}
    print(
        f"  u from {kind}: its own contrast, fitting pairs {reading(rows['fit'], u)}, held-out pairs "
        f"{reading(rows['evaluate'], u)}; default prompt's tier pairs, held out "
        f"{reading(d[('default', 'evaluate')][:, -1], u)}"
    )
    print(
        "    cos(fitting half's mean difference, held-out half's) "
        f"{cos(rows['fit'].mean(0), rows['evaluate'].mean(0)):.3f}"
    )

print("\n2. stated contexts with the bare tag's direction removed:")
stated_u = without(d[("stated", "fit")].mean(0), mean_residual)
tag_u = without(d[("tag-only", "fit")][:, -1].mean(0), mean_residual)
only_stated = without(stated_u, tag_u)
kept = float(only_stated.norm() / stated_u.norm())
print(f"  cos(u_SA, u_tag) {cos(stated_u, tag_u):.3f}; u_SA without u_tag keeps {kept:.3f} of its norm")
for key, label in [
    (("default", "evaluate"), "default prompt's tier pairs, held out"),
    (("tag-only", "evaluate"), "tag-only pairs, held out"),
    (("stated", "fit"), "stated-context fitting pairs"),
    (("stated", "evaluate"), "stated-context pairs, held out"),
]:
    rows = d[key] if key[0] == "stated" else d[key][:, -1]
    print(f"  {label}: {reading(rows, only_stated)}")

print("\n3. the planted tag-token edit's learnt subspaces at layer 20 (|cos| with each vector; positions -4..-1):")
u = load_file("results/zoo/organisms/planted-tag-token-s0/planted.safetensors")["u"].float()
subspaces = load_file(TAG_TOKEN_VERDICT)
for name in ("tag_token.20", "tier.20"):
    basis, _ = torch.linalg.qr(subspaces[name].float())

    def held(x, basis=basis):
        return float((basis.T @ x).norm() / x.norm())

    per_position = [f"{held(d[('tag-only', 'fit')][:, j].mean(0)):.3f}" for j in range(4)]
    sizes = [f"{float(d[('tag-only', 'fit')][:, j].mean(0).norm()):.2f}" for j in range(4)]
    print(
        f"  {name}: u {held(u):.3f}; the tag-only tier difference at each patched position {per_position} "
        f"(norms {sizes})"
    )

print("\n4. every residual stream (u made at that stream from the fitting half; readings on held-out pairs):")
print(
    "  stream | cos(fit, held-out mean difference) SA, tag | held-out SA pairs along u_SA | "
    "default tier pairs along u_SA without u_tag"
)
for layer in range(mean_residuals.shape[0]):
    sa_fit, sa_held = every[("stated", "fit")][:, layer], every[("stated", "evaluate")][:, layer]
    tag_fit, tag_held = every[("tag-only", "fit")][:, layer, -1], every[("tag-only", "evaluate")][:, layer, -1]
    if float(sa_fit.mean(0).norm()) == 0:
        print(f"  {layer:2d} | no difference (before the sentences)")
        continue
    stated_u = without(sa_fit.mean(0), mean_residuals[layer])
    only_stated = without(stated_u, without(tag_fit.mean(0), mean_residuals[layer]))
    print(
        f"  {layer:2d} | {cos(sa_fit.mean(0), sa_held.mean(0)):+.3f}, {cos(tag_fit.mean(0), tag_held.mean(0)):+.3f} | "
        f"{reading(sa_held, stated_u)} (fitting {reading(sa_fit, stated_u)}) | "
        f"{reading(every[('default', 'evaluate')][:, layer, -1], only_stated)}"
    )
