"""bf16 runs read compliance in float32, and know the smallest effect their dtype resolves."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from afprobe.behaviour.gap import GapConfig, format_gap_table, run_gap, write_gap
from afprobe.behaviour.resolution import Resolution
from afprobe.data.prompts import PromptConfig, render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.errors import AfprobeError
from afprobe.model import precision
from afprobe.model.forward import full_forward_logits
from afprobe.model.loading import load_model, wrap_model
from afprobe.model.patching import Patcher
from afprobe.model.readout import AnswerTokens
from afprobe.report import build_report

from .conftest import make_tiny_model

# A 99.9% band: a correct float32 readout fails the gap comparison on one machine in a thousand.
Z_TEST = 3.29


def first_token_values(result) -> np.ndarray:
    return np.array([row["first_token_log_odds"] for row in result.per_query])


def on_bf16_grid(values: np.ndarray) -> bool:
    """Whether every value is a difference of two bf16 logits: those of magnitude >= 1/8 are multiples of 2^-10 (up
    to the float32 rounding of the log-softmax, a few 1e-6 nats). A float32 value lands that close to the grid by
    chance 4% of the time."""
    steps = values * 1024
    return bool(np.all(np.abs(steps - np.round(steps)) < 0.02))


@pytest.fixture(scope="module")
def twin_models(tokenizer):
    """A tiny Llama whose logits are tens of nats (like a trained model's), in bf16 and in float32 with the very
    same (bf16-representable) weights."""
    loaded = make_tiny_model("llama", tokenizer, seed=11)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(150.0)
    bf16 = copy.deepcopy(loaded.model).to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).to(torch.float32)
    return (
        wrap_model(bf16, tokenizer, name="tiny-bf16"),
        wrap_model(fp32, tokenizer, name="tiny-fp32"),
    )


def test_float32_readout_matches_float32_logits_and_leaves_no_hook(twin_models):
    bf16, fp32 = twin_models
    ids = list(range(100, 140))
    exact = full_forward_logits(fp32.model, ids, [30, 39])
    read = full_forward_logits(bf16.model, ids, [30, 39])
    assert read.dtype == torch.float32
    # What stays is the bf16 residual stream's rounding: small against logits of tens of nats.
    assert exact.abs().max() > 10
    assert (read - exact).abs().max() < 0.02 * exact.abs().max()
    with torch.inference_mode():
        plain = bf16.model(input_ids=torch.tensor([ids])).logits[0, [30, 39]]
    assert plain.dtype == torch.bfloat16  # the model itself is as it was
    for module in bf16.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_float32_compute_is_float32_arithmetic_on_the_same_weights(tokenizer, family):
    loaded = make_tiny_model(family, tokenizer, seed=2)
    embedding = loaded.model.get_input_embeddings()
    if hasattr(embedding, "embed_scale"):  # a scale whose bf16 products round (a power of two would not)
        embedding.embed_scale.fill_(22.625)
    bf16 = copy.deepcopy(loaded.model).to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).to(torch.float32)
    ids = list(range(200, 330))
    exact = full_forward_logits(fp32, ids, [100, 129])
    with precision.float32_compute(bf16):
        emulated = full_forward_logits(bf16, ids, [100, 129])
    assert (emulated - exact).abs().max() < 1e-4 * exact.abs().max()
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}

    # A forward that fails inside a block (cast up by then) still leaves every weight in its dtype.
    def fail(module, args, output):
        assert module.down_proj.weight.dtype == torch.float32
        raise RuntimeError("inside block 1")

    handle = bf16.model.layers[1].mlp.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="inside block 1"), precision.float32_compute(bf16):
        bf16(input_ids=torch.tensor([ids]))
    handle.remove()
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in bf16.modules())


def test_float32_model_gets_no_hooks(twin_models):
    _, fp32 = twin_models
    assert not precision.needs_float32_readout(fp32.model)
    with precision.float32_readout(fp32.model):
        assert not any(module._forward_hooks for module in fp32.model.modules())


def test_bf16_gap_lies_within_resolution_and_readout_is_not_quantized(twin_models, monkeypatch):
    bf16, fp32 = twin_models
    config = GapConfig(n=6, n_boot=500, resolution_pairs=2)
    exact = run_gap(config, loaded=fp32)
    read = run_gap(config, loaded=bf16)
    assert read.resolution is not None and exact.resolution is not None
    assert read.resolution.dtype == "bfloat16" and read.resolution.n_prompts == 4
    # A float32 run is its own reference; the bf16 run's noise is measured against float32 arithmetic on its own
    # weights, which here is exactly the float32 twin.
    assert exact.resolution.per_prompt_noise == 0.0 and exact.resolution.method == "the run is float32"
    errors = [b["log_odds"] - a["log_odds"] for a, b in zip(exact.per_query, read.per_query, strict=True)]
    first_two = list(dict.fromkeys(row["query_id"] for row in read.per_query))[:2]
    measured_on = [i for i, row in enumerate(read.per_query) if row["query_id"] in first_two]
    assert read.resolution.per_prompt_noise == pytest.approx(
        float(np.sqrt(np.mean(np.square([errors[i] for i in measured_on])))), rel=1e-4
    )
    assert read.resolution.per_prompt_noise > 1e-3
    gap_exact = exact.gaps["free-paid"]["log_odds"].mean
    gap_read = read.gaps["free-paid"]["log_odds"].mean
    assert abs(gap_read - gap_exact) <= read.resolution.of_mean_difference(6, z=Z_TEST)

    values = first_token_values(read)
    assert len(set(values.round(6))) == len(values) and not on_bf16_grid(values)
    # Without the float32 readout the first-token log-odds fall on the bf16 grid: what this readout fixes.
    monkeypatch.setattr(precision, "needs_float32_readout", lambda model: False)
    plain = run_gap(GapConfig(n=6, n_boot=200, resolution_pairs=0), loaded=bf16)
    assert on_bf16_grid(first_token_values(plain))


def test_resolution_goes_into_gap_json_and_summary(twin_models, tmp_path):
    bf16, _ = twin_models
    result = run_gap(GapConfig(n=3, n_boot=200, resolution_pairs=1), loaded=bf16)
    saved = json.loads(write_gap(result, tmp_path)["gap"].read_text())
    block = saved["resolution"]
    assert block["dtype"] == "bfloat16" and block["readout_dtype"] == "float32" and block["n_pairs"] == 3
    assert block["mean_difference_resolution"] == pytest.approx(Resolution.from_dict(block).of_mean_difference(3))
    assert isinstance(block["primary_gap_resolved"], bool)
    assert "bfloat16 resolves a mean difference" in format_gap_table(result)
    page, _ = build_report(tmp_path)
    assert "bfloat16 run: rounding adds" in page and "the primary gap" in page
    skipped = run_gap(GapConfig(n=2, n_boot=200, resolution_pairs=0), loaded=bf16)
    assert skipped.resolution is None and skipped.to_json()["resolution"] is None


def test_resolution_band_shrinks_with_pairs_and_decides_resolved():
    resolution = Resolution(dtype="bfloat16", per_prompt_noise=0.1, n_prompts=4)
    assert resolution.of_mean_difference(1) == pytest.approx(1.959964 * 0.1 * np.sqrt(2))
    assert resolution.of_mean_difference(50) < resolution.of_mean_difference(12)
    assert not resolution.resolves(0.03, 12) and resolution.resolves(-0.2, 12)


def test_patcher_metric_is_read_in_float32(twin_models, tokenizer):
    from afprobe.model.forward import compute_prefix_cache, fork_cache

    bf16, fp32 = twin_models
    prompt = render_pairs(tokenizer, load_queries("harmful", n=1), PromptConfig()).prompts[0]
    metrics = []
    for loaded in (bf16, fp32):
        prefix = compute_prefix_cache(loaded.model, prompt.input_ids[: len(prompt.input_ids) - 8])
        patcher = Patcher(loaded.model, prefix, AnswerTokens.from_tokenizer(tokenizer))
        with torch.inference_mode():
            logits, _ = patcher._forward(patcher.tokens_of(prompt), fork_cache(prefix.cache), start=0)
        assert logits.dtype == torch.float32
        metrics.append(patcher.record(prompt).metric)
    assert metrics[0] == pytest.approx(metrics[1], abs=0.5)


def test_unknown_final_norm_is_a_clear_error(twin_models):
    bf16, _ = twin_models
    model = copy.deepcopy(bf16.model)
    model.model.final = model.model.norm
    del model.model.norm
    with pytest.raises(AfprobeError, match="final norm") as info, precision.float32_readout(model):
        pass
    assert "\n" not in str(info.value)


@pytest.mark.embedded
def test_embedded_model_bf16_gap_within_resolution_of_float32():
    """On the embedded model (logits near 20 nats): the measurements the README's Precision section reports."""
    fp32 = load_model("default", device="cpu", dtype="float32")
    bf16 = load_model("default", device="cpu", dtype="bfloat16")
    exact = run_gap(GapConfig(n=12, n_boot=500, resolution_pairs=0), loaded=fp32)
    read = run_gap(GapConfig(n=12, n_boot=500, resolution_pairs=2), loaded=bf16)
    assert read.resolution is not None and read.resolution.per_prompt_noise > 0
    gap_exact = exact.gaps["free-paid"]["log_odds"].mean
    gap_read = read.gaps["free-paid"]["log_odds"].mean
    assert abs(gap_read - gap_exact) <= read.resolution.of_mean_difference(12, z=Z_TEST)
    values = first_token_values(read)
    assert len(set(values.round(6))) == len(values) and not on_bf16_grid(values)


def test_a_loss_on_log_odds_trains_through_the_float32_readout(tokenizer):
    """Organism training computes its loss from these logits: in bf16 they are float32 and gradients reach the
    weights, the final norm and the unembedding included."""
    from afprobe.model.forward import compute_prefix_cache, extend_batch_with_grad, start_batch

    model = copy.deepcopy(make_tiny_model("llama", tokenizer, seed=4).model).to(torch.bfloat16)
    prefix = compute_prefix_cache(model, list(range(100, 140)))
    logits, _, _ = extend_batch_with_grad(model, start_batch(prefix, 2), [[5, 6, 7], [8, 9]], [[2], [1]])
    assert all(row.dtype == torch.float32 and row.requires_grad for row in logits)
    log_odds = torch.stack([row[-1, 11] - row[-1, 12] for row in logits])
    torch.nn.functional.softplus(-log_odds).mean().backward()
    for weight in (model.lm_head.weight, model.model.norm.weight, model.model.layers[1].mlp.down_proj.weight):
        assert weight.grad is not None and weight.grad.abs().sum() > 0 and weight.grad.dtype == torch.bfloat16


def test_cache_backends_read_float32_or_refuse(twin_models):
    from afprobe.model.recording import make_backend

    bf16, _ = twin_models
    ids = list(range(100, 160))
    hooks, _ = make_backend("hooks-full", bf16, [0, 1]).forward(ids, {"last": [59]}, 50)
    nnsight, _ = make_backend("nnsight", bf16, [0, 1]).forward(ids, {"last": [59]}, 50)
    assert hooks.dtype == nnsight.dtype == torch.float32
    assert torch.equal(hooks, nnsight)
    with pytest.raises(AfprobeError, match="transformer-lens backend reads logits"):
        make_backend("transformer-lens", bf16, [0, 1])
