"""The verdict's rules on constructed evidence: each verdict is reached exactly when its rule says, and a failing
condition is named in the evidence lines."""

from __future__ import annotations

import dataclasses

import pytest

from afprobe.analysis.verdict import (
    ALPHA,
    CEILING_SHARE,
    GAP_FLOOR,
    MIN_SHARE,
    OVERSHOOT,
    RULES_VERSION,
    VERDICTS,
    Interval,
    SubspaceEvidence,
    VerdictEvidence,
    decide,
    format_verdict,
)
from afprobe.stats import Estimate

GAP = Estimate(mean=0.5, ci_low=0.3, ci_high=0.7, n=20, p_value=0.001)
TIER = SubspaceEvidence("tier", 18, 4, Interval(0.9, 0.8, 1.0))
STRONG = dict(
    share=Interval(0.6, 0.45, 0.75),
    p_holm=0.01,
    cross_prompt=Interval(0.4, 0.2, 0.6),
    cross_prompt_contrast=Interval(0.5, 0.3, 0.7),
    above_negation=Interval(0.4, 0.2, 0.6),
)
WEAK = dict(
    share=Interval(0.05, -0.05, 0.15),
    p_holm=0.6,
    cross_prompt=Interval(0.0, -0.1, 0.1),
    cross_prompt_contrast=Interval(0.0, -0.1, 0.1),
)
WHOLE = Interval(1.0, 0.9, 1.1)


def evidence(
    sa: dict | None,
    tag: dict | None,
    *,
    gap: Estimate = GAP,
    tier=TIER,
    resolved: bool = True,
    whole: Interval | None = WHOLE,
    seed: int = 0,
):
    rows = [dataclasses.replace(tier, fit_seed=seed)] if tier is not None else []
    if sa is not None:
        rows.append(SubspaceEvidence("situational_awareness", 18, 4, fit_seed=seed, **sa))
    if tag is not None:
        kept = {k: v for k, v in tag.items() if k != "above_negation"}
        rows.append(SubspaceEvidence("tag_token", 18, 4, fit_seed=seed, **kept))
    return VerdictEvidence(
        gap, resolved, tuple(rows), family="4 subspaces x 1 layer", whole={} if whole is None else {18: whole}
    )


def test_each_verdict_follows_its_rule():
    assert decide(evidence(STRONG, WEAK)).verdict == "situational-awareness"
    assert decide(evidence(WEAK, STRONG)).verdict == "tag-token"
    assert decide(evidence(STRONG, STRONG)).verdict == "mixed"
    assert decide(evidence(WEAK, WEAK)).verdict == "undetermined"
    no_gap = Estimate(mean=0.01, ci_low=-0.02, ci_high=0.04, n=20)
    assert decide(evidence(STRONG, WEAK, gap=no_gap)).verdict == "no gap to explain"
    assert decide(evidence(STRONG, WEAK, resolved=False)).verdict == "no gap to explain"
    assert {decide(evidence(a, b)).verdict for a in (STRONG, WEAK) for b in (STRONG, WEAK)} <= set(VERDICTS)


def test_rule_1_wants_a_gap_that_clears_the_floor():
    # v3: fine-tuning noise alone gave the zoo's null organisms gaps of about 0.01 nats with intervals excluding zero.
    tiny = Estimate(mean=-0.010, ci_low=-0.015, ci_high=-0.005, n=8)
    result = decide(evidence(STRONG, WEAK, gap=tiny))
    assert result.verdict == "no gap to explain" and f"within {GAP_FLOOR} nats" in result.evidence[0]
    straddling = Estimate(mean=0.2, ci_low=GAP_FLOOR - 0.01, ci_high=0.3, n=8)  # could be the floor's noise
    assert decide(evidence(STRONG, WEAK, gap=straddling)).verdict == "no gap to explain"
    cleared = Estimate(mean=-0.2, ci_low=-0.3, ci_high=-(GAP_FLOOR + 0.01), n=8)  # either sign, beyond the floor
    result = decide(evidence(STRONG, WEAK, gap=cleared))
    assert result.verdict == "situational-awareness" and "clears" in result.evidence[0]
    assert result.thresholds["gap_floor"] == GAP_FLOOR


def test_an_unlocalised_gap_is_undetermined_whatever_the_candidates_show():
    low_ceiling = dataclasses.replace(TIER, share=Interval(0.6, CEILING_SHARE - 0.01, 0.9))
    result = decide(evidence(STRONG, WEAK, tier=low_ceiling))
    assert result.verdict == "undetermined" and "not localised at any tested layer" in result.evidence[-2]
    assert decide(evidence(STRONG, WEAK, tier=None)).verdict == "undetermined"
    # Rule 2 v2: the positions themselves must carry the gap, whatever a subspace there does.
    for whole in (Interval(0.38, CEILING_SHARE - 0.01, 0.6), None):
        result = decide(evidence(STRONG, STRONG, whole=whole))
        assert result.verdict == "undetermined" and result.carrying == {}
        assert "not localised at any tested layer" in result.evidence[-2]
    # A second, localised layer is scored; the unlocalised one is named and skipped.
    base = evidence(STRONG, STRONG, whole=Interval(0.38, 0.2, 0.6))
    at_20 = [dataclasses.replace(row, layer=20) for row in evidence(WEAK, STRONG).subspaces]
    mixed_layers = dataclasses.replace(
        base, subspaces=base.subspaces + tuple(at_20), whole={18: base.whole[18], 20: WHOLE}
    )
    result = decide(mixed_layers)
    assert result.verdict == "tag-token" and result.carrying == {"tag_token": [20]}
    assert any("at layer 18 not scored: the gap is not localised there" in line for line in result.evidence)


@pytest.mark.parametrize(
    "change",
    [
        # Its share is above the whole residual's by more than OVERSHOOT, intervals apart: the illusion.
        {"share": Interval(1.6, 1.1 + OVERSHOOT + 0.01, 1.9)},
        # What runs around it pushes the other way: the interchange opened a pathway of its own.
        {"around": Interval(-0.4, -0.5, -OVERSHOOT - 0.01)},
    ],
)
def test_an_overshooting_subspace_does_not_carry_the_gap(change):
    result = decide(evidence({**STRONG, **change}, WEAK))
    assert result.verdict == "undetermined"
    line = next(line for line in result.evidence if line.startswith("rule 3: situational_awareness"))
    assert "does not carry" in line and "overshoots" in line
    # Within the margin it still carries.
    fine = {**STRONG, "around": Interval(-0.05, -0.1 - 0.0, 0.0)}
    assert decide(evidence(fine, WEAK)).verdict == "situational-awareness"


def test_seeds_must_agree():
    agree = evidence(STRONG, WEAK)
    other = evidence(STRONG, WEAK, seed=1)
    both = dataclasses.replace(agree, subspaces=agree.subspaces + other.subspaces)
    result = decide(both)
    assert result.verdict == "situational-awareness" and "rule 5: all 2 fitting seeds" in result.evidence[-1]
    assert result.carrying == {"situational_awareness": [18]}
    assert any(line.startswith("seed 1: rule 3") for line in result.evidence)
    flipped = evidence(WEAK, STRONG, seed=1)
    result = decide(dataclasses.replace(agree, subspaces=agree.subspaces + flipped.subspaces))
    assert result.verdict == "undetermined" and "unstable" in result.evidence[-1]
    assert "seed 0: situational-awareness, seed 1: tag-token" in result.evidence[-1]
    single = decide(agree)
    assert "stability across seeds not tested" in single.evidence[-1]


@pytest.mark.parametrize(
    "change, named",
    [
        ({"share": Interval(0.5, MIN_SHARE - 0.01, 0.7)}, "share"),
        ({"p_holm": ALPHA}, "Holm p"),
        ({"p_holm": None}, "no random-subspace null"),
        ({"cross_prompt_contrast": Interval(0.4, MIN_SHARE - 0.01, 0.6)}, "cross-prompt contrast"),
        ({"cross_prompt_contrast": None}, "no cross-prompt contrast"),
        ({"above_negation": Interval(0.1, -0.1, 0.3)}, "above negation"),
        ({"above_negation": None}, "no negation control"),
    ],
)
def test_situational_awareness_needs_every_condition(change, named):
    result = decide(evidence({**STRONG, **change}, WEAK))
    assert result.verdict == "undetermined"
    line = next(line for line in result.evidence if line.startswith("rule 3: situational_awareness"))
    assert "does not carry" in line and named in line


def test_a_donor_that_only_differs_from_the_receiver_is_no_contrast():
    # Rules v4, 3c: tag-token-s2's situational-awareness subspace moved default receivers +2.93 nats toward the
    # trained tier with either side of the stated-context contrast as donor (the v2 test passed), while the two sides
    # moved the same receivers alike. That is no evidence the contrast prompts use the subspace the tiers use.
    shift_only = {
        **STRONG,
        "cross_prompt": Interval(2.93, 1.5, 4.3),
        "cross_prompt_contrast": Interval(0.02, -0.03, 0.07),
    }
    result = decide(evidence(shift_only, WEAK))
    assert result.verdict == "undetermined" and RULES_VERSION >= 4
    line = next(line for line in result.evidence if line.startswith("rule 3: situational_awareness"))
    assert "does not carry" in line and f"< {MIN_SHARE:.0%}" in line


def test_the_verdict_text_names_the_rules_and_the_family():
    result = decide(evidence(STRONG, WEAK))
    text = format_verdict(result)
    assert text.startswith(f"verdict: situational-awareness (rules v{RULES_VERSION})")
    assert "Holm over 4 subspaces x 1 layer" in text and result.carrying == {"situational_awareness": [18]}
    assert result.to_dict()["thresholds"] == {
        "gap_floor": GAP_FLOOR,
        "ceiling_share": CEILING_SHARE,
        "min_share": MIN_SHARE,
        "alpha": ALPHA,
        "overshoot": OVERSHOOT,
    }
