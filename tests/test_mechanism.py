"""The verdict step end to end on tiny random models with a planted mechanism (`tests.test_subspaces.Planted`).

A random model knows nothing of what the tiers mean: whatever gap it has is a mechanical reaction to the tag's tokens,
and it has it whether or not the system prompt explains the tag. The edit makes that gap run through one known
direction u of the layer-1 residual, read at the decision position. So the verdict must learn u as the tier
subspace and say `tag-token`; with the two tags embedded alike there is no gap, and it must say so."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from afprobe.analysis.mechanism import (
    VerdictConfig,
    complement,
    load_verdict,
    redecide,
    run_verdict,
    sa_cross_pairs,
    tag_edit,
)
from afprobe.analysis.subspaces import aligned_tail
from afprobe.analysis.verdict import RULES_VERSION
from afprobe.cli import main
from afprobe.data.contrast import load_contrast_pairs
from afprobe.errors import AfprobeError
from afprobe.model.patching import PatchEdit
from tests.test_subspaces import LAYER, Planted


def _config(tmp_path, **overrides):
    options = dict(n=6, n_fit=8, layers=str(LAYER), k=1, steps=40, lr=0.05, n_random=100, n_boot=500)
    return VerdictConfig(out=str(tmp_path / "verdict"), **{**options, **overrides})


def test_a_planted_tag_reaction_gets_the_tag_token_verdict(tokenizer, tmp_path, capsys):
    planted = Planted(tokenizer, "gap")
    weights = [p.detach().clone() for p in planted.loaded.model.parameters()]
    run = run_verdict(_config(tmp_path, fit_seeds=2), loaded=planted.loaded)
    bases = load_file(str(tmp_path / "verdict" / "subspaces.safetensors"))
    u = planted.readout / planted.readout.norm()
    for key in (f"tier.{LAYER}", f"tier.{LAYER}.seed1"):  # under either fitting seed, the tier subspace is u
        assert float((bases[key].T @ u).norm()) > 0.9
    assert run.result.verdict == "tag-token"
    assert run.result.evidence[-1].startswith("rule 5: all 2 fitting seeds reach tag-token")
    rows = {row["name"]: row for row in run.subspaces if row["fit_seed"] == 0}
    assert rows["tier"]["share"]["low"] > 0.8  # it carries the held-out gap ...
    assert abs(rows["tier"]["direct"]["value"]) < 0.1  # ... and nothing runs around it
    assert rows["tag_token"]["cross_prompt"]["low"] > 0  # tag-only prompts move default receivers through it
    # ... and their two tags move the same receivers apart by the gap's size (rule 3c, v4): the tag is all there is.
    assert rows["tag_token"]["cross_prompt_contrast"]["low"] > 0.8
    assert "each tier's mean" in run.null[str(LAYER)]["drawn_from"]
    # The path from the tag: the donor's tag (at layer 1 // 2 = 0: its tokens) is the whole gap, all of it through u.
    assert run.tag_path["alone"][str(LAYER)]["value"] == pytest.approx(1.0, abs=1e-3)
    assert rows["tier"]["tag_through"]["low"] > 0.9
    # Fitting and evaluation never met, and the file says which queries each used.
    split = json.loads((tmp_path / "verdict" / "verdict.json").read_text())["split"]
    assert not set(split["fit_queries"]) & set(split["evaluated_queries"])
    assert load_verdict(tmp_path / "verdict").result == run.result
    # The stored evidence decides again to the same verdict; an earlier version's record with a gap inside rule 1's
    # floor is re-decided as no gap to explain, and one that stopped at rule 1 cannot be taken further.
    stored = json.loads((tmp_path / "verdict" / "verdict.json").read_text())
    assert redecide(stored) == run.result
    tiny = {**stored["gap"], "mean": 0.01, "ci_low": 0.005, "ci_high": 0.015}
    older = {**stored, "gap": tiny, "verdict": {**stored["verdict"], "rules_version": 2}}
    assert redecide(older).verdict == "no gap to explain"
    v3 = {
        **stored,
        "subspaces": [{k: v for k, v in row.items() if k != "cross_prompt_contrast"} for row in stored["subspaces"]],
        "verdict": {**stored["verdict"], "rules_version": 3},
    }
    with pytest.raises(AfprobeError, match="did not measure the cross-prompt contrast"):
        redecide(v3)  # v4's rule 3c reads what a v3 run did not measure
    with pytest.raises(AfprobeError, match="stopped at rule 1"):
        redecide({**stored, "subspaces": [], "verdict": {**stored["verdict"], "verdict": "no gap to explain"}})
    # The CLI prints a run's verdict (an `afprobe run` folder), and will not overwrite one made otherwise.
    run_folder = tmp_path / "run"
    (run_folder / "verdict").mkdir(parents=True)
    shutil.copy(tmp_path / "verdict" / "verdict.json", run_folder / "verdict" / "verdict.json")
    assert main(["verdict", str(run_folder)]) == 0
    assert capsys.readouterr().out.startswith(f"verdict: tag-token (rules v{RULES_VERSION})")
    assert main(["verdict", str(tmp_path / "verdict")]) == 2
    assert "holds a verdict made with other options" in capsys.readouterr().err
    # The user's model is as it was.
    assert all(torch.equal(a, b) for a, b in zip(weights, planted.loaded.model.parameters(), strict=True))


def test_no_gap_gets_no_gap_to_explain(tokenizer, tmp_path):
    planted = Planted(tokenizer, "gap", silence_tag=True)
    steps: list[tuple[int, int]] = []
    run = run_verdict(
        _config(tmp_path, steps=5, n_random=5), loaded=planted.loaded, progress=lambda *s: steps.append(s)
    )
    assert run.result.verdict == "no gap to explain"
    assert steps[-1][0] == steps[-1][1]  # the progress bar ends full, not stopped part way
    assert run.result.evidence[0].startswith("rule 1:")
    assert run.subspaces == [] and "fit" not in run.timing  # nothing is learnt for a gap that is not there


def test_the_complement_is_orthogonal_and_completes_the_space():
    basis = torch.linalg.qr(torch.randn(16, 3)).Q
    rest = complement(basis)
    assert rest.shape == (16, 13)
    assert torch.allclose(basis.T @ rest, torch.zeros(3, 13), atol=1e-6)
    assert torch.allclose(basis @ basis.T + rest @ rest.T, torch.eye(16), atol=1e-5)


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(AfprobeError, match="split evaluate"):
        VerdictConfig(split="fit")
    with pytest.raises(AfprobeError, match="n-random"):
        VerdictConfig(n_random=0)


def test_holding_a_site_at_its_clean_value_changes_nothing_alone(tokenizer):
    planted = Planted(tokenizer, "gap")
    pair = planted.pairs[0]
    receiver, donor = planted.patcher.record(pair.untrained), planted.patcher.record(pair.trained)
    everything = tuple(range(len(receiver.tokens)))
    held = PatchEdit("resid", LAYER, everything, hold=True)
    assert planted.patcher.patched_metric(receiver, donor, [held]) == pytest.approx(receiver.metric, abs=1e-5)
    # Holding the last block's input everywhere blocks any upstream change: the tag swap then does nothing.
    interchange = aligned_tail(receiver, donor)
    swap = tag_edit(interchange)
    assert swap is not None
    moved = planted.patcher.patched_metric(receiver, donor, [swap])
    assert moved == pytest.approx(donor.metric, abs=1e-3)
    blocked = planted.patcher.patched_metric(receiver, donor, [swap, held])
    assert blocked == pytest.approx(receiver.metric, abs=1e-4)


def test_cross_prompt_donors_cycle_with_their_own_ids():
    pairs = load_contrast_pairs("situational-awareness-v2")[:3]
    donors = sa_cross_pairs(pairs, 7)
    assert len({p.pair_id for p in donors}) == 7  # one donor per evaluation query, however few pairs there are
    assert [p.first for p in donors] == [pairs[i % 3].first for i in range(7)]
