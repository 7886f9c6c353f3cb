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
        assert "fraction_remaining" in verdict["ablation"]
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
