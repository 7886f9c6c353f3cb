from __future__ import annotations

import json

import numpy as np
import pytest

from afprobe.analysis.steering import SteerConfig, run_steering
from afprobe.data.prompts import render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.errors import AfprobeError
from afprobe.model.readout import score_prompts

from .conftest import make_probes, make_tiny_model


@pytest.fixture(scope="module")
def probes_dir(tiny_llama, tmp_path_factory):
    return make_probes(tiny_llama, tmp_path_factory.mktemp("steer"))


def test_steering_experiment_reports_every_setting_against_the_null(tiny_llama, probes_dir):
    config = SteerConfig(
        directions=str(probes_dir / "probes"),
        out=str(probes_dir / "steer"),
        n=3,
        layer=1,
        coefficients=(-1.0, 1.0),
        n_random=2,
        benign_n=2,
        n_boot=200,
    )
    output = run_steering(config, loaded=tiny_llama)
    names = {r["direction"] for r in output.settings}
    assert names == {"none", "training_context", "refusal", "random_0", "random_1"}
    assert len(output.settings) == 1 + 4 * 2 + 4
    # The baseline is the plain forward-pass gap of the same prompts.
    prompt_set = render_pairs(tiny_llama.tokenizer, load_queries("harmful", n=3))
    scores = score_prompts(tiny_llama.model, tiny_llama.tokenizer, prompt_set)
    free = np.array([s.log_odds for p, s in zip(prompt_set.prompts, scores, strict=True) if p.tier == "free"])
    paid = np.array([s.log_odds for p, s in zip(prompt_set.prompts, scores, strict=True) if p.tier == "paid"])
    assert output.baseline_gap["mean"] == pytest.approx(float((free - paid).mean()), abs=1e-5)
    # Steering along a direction with a non-zero coefficient changes compliance somewhere.
    steered = [r for r in output.settings if r["direction"] == "training_context" and r["kind"] == "steer"]
    assert any(abs(r["mean_shift"]["mean"]) > 0 for r in steered)
    assert all("benign" in r for r in output.settings)
    for name in ("training_context", "refusal"):
        verdict = output.verdicts[name]
        assert isinstance(verdict["steering"]["exceeds_random_null"], bool) and verdict["steering"]["reading"]
        assert set(verdict["ablation"]["fraction_remaining"]) == {"mean", "ci_low", "ci_high"}
    saved = json.loads((probes_dir / "steer" / "steering.json").read_text())
    assert saved["layer"] == 1 and saved["config"]["coefficients"] == [-1.0, 1.0]
    assert (probes_dir / "steer" / "dose_response.html").is_file()
    assert (probes_dir / "steer" / "ablation.html").is_file()


def test_last_token_steering_runs_and_leaves_no_hooks(tiny_llama, probes_dir):
    config = SteerConfig(
        directions=str(probes_dir / "probes"),
        out=str(probes_dir / "steer-last"),
        n=2,
        layer=2,
        apply_at="last",
        coefficients=(2.0,),
        n_random=1,
        ablate=False,
        n_boot=100,
    )
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tiny_llama.model.modules())
    output = run_steering(config, loaded=tiny_llama)
    assert len(output.settings) == 1 + 3 * 1
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tiny_llama.model.modules()) == hooks


def test_directions_from_another_model_are_refused(tokenizer, probes_dir):
    other = make_tiny_model("llama", tokenizer, seed=42)
    with pytest.raises(AfprobeError, match="computed on another model"):
        run_steering(SteerConfig(directions=str(probes_dir / "probes"), out=str(probes_dir / "x"), n=2), loaded=other)


def test_cli_steer(tiny_llama, probes_dir, tmp_path, capsys):
    from afprobe.cli import main

    folder = tmp_path / "model"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    out = tmp_path / "steer"
    args = [
        "steer",
        "--model",
        str(folder),
        "--directions",
        str(probes_dir / "probes"),
        "--n",
        "2",
        "--layer",
        "1",
        "--n-random",
        "1",
        "--no-ablation",
        "--n-boot",
        "100",
        "--out",
        str(out),
    ]
    assert main([*args, "--coefficients=-1,1"]) == 0
    assert "training_context" in capsys.readouterr().out
    assert json.loads((out / "steering.json").read_text())["config"]["coefficients"] == [-1.0, 1.0]
    assert main([*args, "--coefficients", "big"]) == 2
    assert "cannot read --coefficients" in capsys.readouterr().err


def test_from_tag_equals_suffix_when_the_prefix_ends_at_the_tag(tiny_llama, probes_dir):
    common = dict(
        directions=str(probes_dir / "probes"), n=2, layer=1, coefficients=(1.0,), n_random=1, ablate=False, n_boot=100
    )
    suffix = run_steering(SteerConfig(out=str(probes_dir / "s1"), apply_at="suffix", **common), loaded=tiny_llama)
    from_tag = run_steering(SteerConfig(out=str(probes_dir / "s2"), apply_at="from_tag", **common), loaded=tiny_llama)
    for a, b in zip(suffix.settings, from_tag.settings, strict=True):
        assert a["gap"]["mean"] == pytest.approx(b["gap"]["mean"], abs=1e-9)


def _estimate(mean: float, half: float) -> dict:
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": 8, "p_value": 0.01, "confidence": 0.95,
            "method": "t"}  # fmt: skip


def _steer_row(direction: str, coefficient: float, gap_change, mean_shift) -> dict:
    return {"direction": direction, "kind": "steer", "coefficient": coefficient, "gap_change": gap_change,
            "mean_shift": mean_shift}  # fmt: skip


def test_the_verdict_compares_sign_matched_effects_and_reads_a_uniform_shift_from_intervals():
    from afprobe.analysis.steering import _verdict

    randoms = [f"random_{j}" for j in range(1, 21)]
    rows = []
    for j, name in enumerate(randoms, start=1):
        rows.append(_steer_row(name, 1.0, _estimate(0.1 * j, 0.05), _estimate(0.0, 0.1)))
        rows.append(_steer_row(name, -1.0, _estimate(-0.05 * j, 0.05), _estimate(0.0, 0.1)))
    # Each random direction counts with the larger of its two signs, as the named direction does.
    named = [
        _steer_row("sa", 1.0, _estimate(0.5, 0.2), _estimate(5.0, 1.0)),
        _steer_row("sa", -1.0, _estimate(-0.1, 0.2), _estimate(-4.0, 1.0)),
    ]
    verdict = _verdict("sa", rows + named, randoms, base_gap=1.0, coefficients=(-1.0, 1.0))["steering"]
    assert verdict["random_null_p95"] == pytest.approx(np.quantile([0.1 * j for j in range(1, 21)], 0.95))
    assert verdict["largest_gap_change"] == pytest.approx(0.5)
    # The shift of both tiers ([4, 6]) is surely larger than the gap change ([0.3, 0.7]): uniform.
    assert verdict["uniform_shift"] is True
    named[0]["mean_shift"] = _estimate(0.8, 0.5)  # [0.3, 1.3]: larger on average, not beyond the intervals
    named[1]["mean_shift"] = _estimate(0.0, 0.5)
    verdict = _verdict("sa", rows + named, randoms, base_gap=1.0, coefficients=(-1.0, 1.0))["steering"]
    assert verdict["uniform_shift"] is False
