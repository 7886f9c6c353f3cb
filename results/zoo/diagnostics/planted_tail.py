"""Measured on the first planted construction (the unit appended to block 20's MLP, afprobe up to commit
9b0fe39), whose edits and verdicts are now in results/zoo/superseded/planted-mlp-input-2026-12-03/; the current
afprobe refuses those edits, so rerun this at commit 9b0fe39.

Does patching fewer positions let the verdict's subspace fit find the planted tag-token u? Post hoc, not scored.

Run from the repository root (about 6 minutes on 2 cores):
    .venv/bin/python results/zoo/diagnostics/planted_tail.py > results/zoo/diagnostics/planted_tail.txt
Refits the tag-token subspace at layer 20 on the planted tag-token edit exactly as the zoo's verdict options do (8
fitting queries' tag-only pairs, both orientations, k 4, 40 steps, lr 0.02, batches of 4, the verdict's seed for
that subspace and layer), once on the last 4 positions (the options' `tail`) and once on the decision position
alone, and prints |cos| between u and each. Uses the verdict step's own (private) fitting helpers, as of the commit
this file arrived in.
"""

import json
from pathlib import Path

from afprobe.analysis.mechanism import SUBSPACE_NAMES, _record_pairs, _Runs
from afprobe.analysis.organisms.planted import PlantedConfig, planted
from afprobe.analysis.organisms.zoo import _saved_edit
from afprobe.analysis.subspaces import learn_subspace
from afprobe.data.prompts import PromptConfig, render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.model.loading import load_model
from afprobe.model.patching import patcher_for

LAYER = 20
folder = Path("results/zoo/organisms/planted-tag-token-s0")
record = json.loads((folder / "truth.json").read_text())
loaded = load_model("smollm2-135m-instruct")
edit = _saved_edit(folder, record, PlantedConfig(**record["planted"]["config"]))
tokenizer, max_context = loaded.tokenizer, loaded.max_context or None
tag_only = PromptConfig(variant="tag-only")
fit = render_pairs(tokenizer, load_queries("harmful", n=8, split="fit"), tag_only, max_context=max_context)
cross = render_pairs(tokenizer, load_queries("harmful", n=8, split="evaluate"), tag_only, max_context=max_context)
with planted(loaded.model, edit):
    patcher = patcher_for(loaded, [fit, cross])  # the verdict's tag-only patcher shares its prefix with both sets
    pairs = _record_pairs(patcher, fit, for_grad=True, tick=lambda n=1: None)
    for tail in (4, 1):
        subspace = learn_subspace(
            patcher,
            _Runs(pairs, tail).interchanges,
            LAYER,
            4,
            steps=40,
            lr=0.02,
            batch_size=4,
            seed=100 * SUBSPACE_NAMES.index("tag_token") + LAYER,
        )
        print(
            f"last {tail} position(s): |cos(u, subspace)| {subspace.cosine(edit.direction.float()):.3f}; "
            f"loss {subspace.losses[0]:.3g} -> {subspace.losses[-1]:.3g}; {subspace.seconds:.0f} s",
            flush=True,
        )
