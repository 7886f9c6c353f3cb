from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch

from afprobe.analysis.patching import PatchConfig, build_columns, make_pairs, run_patching
from afprobe.analysis.probes import load_probe_set
from afprobe.data.prompts import PromptConfig, render_pairs
from afprobe.data.query_sets import load_queries
from afprobe.errors import AfprobeError
from afprobe.files import finite_json
from afprobe.model.architecture import decoder_layers
from afprobe.model.forward import compute_prefix_cache
from afprobe.model.patching import PatchEdit, Patcher
from afprobe.model.readout import AnswerTokens

from .conftest import make_probes, make_tiny_model

# A patched forward runs a different computation order (cropped cache, skipped blocks) than the full forward it
# must equal: float32 rounding only.
TOLERANCE = 1e-4


def _setup(loaded, n=2):
    prompt_set = render_pairs(loaded.tokenizer, load_queries("harmful", n=n))
    k = prompt_set.shared_prefix_len
    prefix = compute_prefix_cache(loaded.model, prompt_set.prompts[0].input_ids[:k])
    patcher = Patcher(loaded.model, prefix, AnswerTokens.from_tokenizer(loaded.tokenizer))
    pair = make_pairs(prompt_set)[0]
    return prompt_set, patcher, patcher.record(pair.trained), patcher.record(pair.untrained)


def _naive(loaded, prompt, answers, patches):
    """The way a user would write it: the whole prompt in one forward, hooks overwriting activations.

    patches: (site, layer, absolute position, head or None, source vector). Returns (metric, recorded sites)."""
    blocks = decoder_layers(loaded.model)
    n_heads = loaded.model.config.num_attention_heads
    head_dim = blocks[0].self_attn.o_proj.in_features // n_heads
    record: dict = {}
    handles = []

    def patch_rows(tensor, site, layer):
        for s, lay, pos, head, source in patches:
            if s == site and lay == layer:
                tensor = tensor.clone()
                if head is None:
                    tensor[0, pos] = source
                else:
                    tensor[0, pos, head * head_dim : (head + 1) * head_dim] = source
        return tensor

    for layer, block in enumerate(blocks):

        def pre(module, args, kwargs, layer=layer):
            hidden = patch_rows(args[0] if args else kwargs["hidden_states"], "resid", layer)
            record[("resid", layer)] = hidden[0].detach().clone()
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        def head_in(module, args, layer=layer):
            x = patch_rows(args[0], "attn_head", layer)
            record[("attn_head", layer)] = x[0].detach().clone()
            return (x, *args[1:])

        def mlp_out(module, args, output, layer=layer):
            out = patch_rows(output, "mlp", layer)
            record[("mlp", layer)] = out[0].detach().clone()
            return out

        handles += [
            block.register_forward_pre_hook(pre, with_kwargs=True),
            block.self_attn.o_proj.register_forward_pre_hook(head_in),
            block.mlp.register_forward_hook(mlp_out),
        ]
    try:
        ids = torch.tensor([list(prompt.input_ids) + list(answers.common)])
        with torch.no_grad():
            logits = loaded.model(input_ids=ids).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return float(logits[answers.accept_rest[0]] - logits[answers.reject_rest[0]]), record


def test_patched_forward_matches_the_naive_full_forward(tiny_model):
    prompt_set, patcher, free, paid = _setup(tiny_model)
    answers = patcher.answers
    k = patcher.prefix.length
    clean, donor_acts = _naive(tiny_model, paid.prompt, answers, [])
    assert paid.metric == pytest.approx(clean, abs=TOLERANCE)
    n = patcher.n_layers
    last = free.decision
    cases = [
        PatchEdit("resid", 0, (0,)),
        PatchEdit("resid", 1, (0, 3)),
        PatchEdit("resid", n - 1, (last - 2,)),
        PatchEdit("resid", n, (last,)),
        PatchEdit("attn_head", 0, (0,), head=1),
        PatchEdit("attn_head", n - 1, (last,), head=0),
        PatchEdit("mlp", 1, (0, 2)),
    ]
    for edit in cases:
        fast = patcher.patched_metric(free, paid, [edit])
        if edit.site == "resid" and edit.layer == n:
            expected = paid.metric  # the last layer's output at the decision position is all the metric reads
        else:
            head_dim = patcher.head_dim
            sources = []
            for p in edit.positions:
                vector = donor_acts[(edit.site, edit.layer)][k + p]
                if edit.site == "attn_head":
                    vector = vector[edit.head * head_dim : (edit.head + 1) * head_dim]
                sources.append((edit.site, edit.layer, k + p, edit.head, vector))
            expected, _ = _naive(tiny_model, free.prompt, answers, sources)
        assert fast == pytest.approx(expected, abs=TOLERANCE), edit


def test_identity_patches_and_whole_run_patches(tiny_model):
    _, patcher, free, paid = _setup(tiny_model)
    everything = tuple(range(len(free.tokens)))
    # Patching a run with its own activations changes nothing.
    for layer in (0, 1, patcher.n_layers):
        assert patcher.patched_metric(free, free, [PatchEdit("resid", layer, everything)]) == pytest.approx(
            free.metric, abs=TOLERANCE
        )
    # Every position at one layer, or the last layer at the decision position, carries the whole difference.
    assert patcher.patched_metric(free, paid, [PatchEdit("resid", 1, everything)]) == pytest.approx(
        paid.metric, abs=TOLERANCE
    )
    assert patcher.patched_metric(free, paid, [PatchEdit("resid", patcher.n_layers, (free.decision,))]) == (
        pytest.approx(paid.metric, abs=TOLERANCE)
    )
    # A zero-dimensional subspace patches nothing; the whole space is the full patch.
    d = free.resid.shape[-1]
    empty = PatchEdit("resid", 1, everything, basis=torch.zeros(d, 0))
    assert patcher.patched_metric(free, paid, [empty]) == free.metric
    whole = PatchEdit("resid", 1, (0, 1), basis=torch.eye(d))
    assert patcher.patched_metric(free, paid, [whole]) == pytest.approx(
        patcher.patched_metric(free, paid, [PatchEdit("resid", 1, (0, 1))]), abs=TOLERANCE
    )


def test_packed_patches_equal_one_forward_each(tiny_model):
    prompt_set, patcher, free, paid = _setup(tiny_model, n=3)
    # Other queries' runs: in a random model the tier alone moves the metric by too little to test.
    pairs = make_pairs(prompt_set)
    other, third = patcher.record(pairs[1].untrained), patcher.record(pairs[2].trained)
    d, n = free.resid.shape[-1], patcher.n_layers
    generator = torch.Generator().manual_seed(0)
    everything = tuple(range(len(free.tokens)))
    tail = everything[-4:]
    bases = [torch.linalg.qr(torch.randn(d, 16, generator=generator))[0] for _ in range(5)]

    def last(run, k):
        return tuple(range(len(run.tokens) - k, len(run.tokens)))

    jobs = [(free, other, [PatchEdit("resid", 1, everything, basis=b)]) for b in bases]
    jobs += [
        (free, other, []),  # nothing to patch: the clean metric
        (free, other, [PatchEdit("resid", 1, tail, basis=torch.zeros(d, 0))]),
        (free, other, [PatchEdit("resid", 1, everything)]),
        (free, other, [PatchEdit("resid", 0, (2, 5)), PatchEdit("resid", n - 1, tail, basis=bases[0], hold=True)]),
        (free, other, [PatchEdit("resid", n, (free.decision,))]),
        (free, other, [PatchEdit("mlp", 0, tail)]),  # not a residual edit: one forward of its own
        # Other receivers in the same packs: each sees only its own tokens before its start.
        (other, free, [PatchEdit("resid", 1, last(other, 4), basis=bases[1], donor_positions=last(free, 4))]),
        (third, free, [PatchEdit("resid", 1, last(third, 7), basis=bases[2], donor_positions=last(free, 7))]),
        (paid, third, [PatchEdit("resid", 1, last(paid, 2), donor_positions=last(third, 2))]),
    ]
    if patcher.croppable:  # a run keeps its own tokens' KV only, not another copy of the shared prefix's
        assert all(k.shape[-2] == v.shape[-2] == len(free.tokens) for k, v in free.own_kv)
    one_each = [patcher.patched_metric(receiver, donor, edits) for receiver, donor, edits in jobs]
    for pack in (1, 2, 32):
        packed = patcher.patched_metrics(jobs, pack=pack)
        assert packed == pytest.approx(one_each, abs=TOLERANCE), pack
    assert one_each[5] == one_each[6] == free.metric
    # What is packed together differs: a mask that let one job see another's tokens would show.
    assert np.ptp(one_each[:5]) > 10 * TOLERANCE
    with pytest.raises(AfprobeError, match="pack"):
        patcher.patched_metrics(jobs, pack=0)


def test_packed_patches_carry_the_same_gradient(tiny_llama):
    prompt_set, patcher, _, _ = _setup(tiny_llama, n=2)
    runs = [patcher.record(p, for_grad=True) for pair in make_pairs(prompt_set) for p in (pair.trained, pair.untrained)]
    d = runs[0].resid.shape[-1]
    weight = torch.randn(d, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def last(run, k=4):
        return tuple(range(len(run.tokens) - k, len(run.tokens)))

    def jobs():
        basis = torch.linalg.qr(weight)[0]
        return [
            (receiver, donor, [PatchEdit("resid", 1, last(receiver), basis=basis, donor_positions=last(donor))])
            for receiver, donor in ((runs[0], runs[2]), (runs[1], runs[3]), (runs[2], runs[0]))
        ]

    one_each = torch.stack([patcher.patched_metric_with_grad(*job) for job in jobs()])
    (expected,) = torch.autograd.grad(one_each.square().sum(), weight)
    packed = patcher.patched_metrics_with_grad(jobs())
    (gradient,) = torch.autograd.grad(packed.square().sum(), weight)
    assert packed.detach() == pytest.approx(one_each.detach(), abs=TOLERANCE)
    assert float(expected.norm()) > 0
    assert float((gradient - expected).norm() / expected.norm()) < 1e-3


def perfect_sae(d: int):
    """A standard SAE that reconstructs exactly: features relu(x) and relu(-x), decoded back as their difference."""
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d))
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_sae_feature_patches_and_ablations(tiny_model):
    from afprobe.model.patching import FeatureEdit

    _, patcher, free, paid = _setup(tiny_model)
    d = free.resid.shape[-1]
    sae = perfect_sae(d)
    everything = tuple(range(len(free.tokens)))
    x = free.resid[1, :3]
    torch.testing.assert_close(sae.decode(sae.encode(x)), x, atol=1e-5, rtol=0)

    def run(features, mode="patch", donor=paid, positions=everything):
        edit = PatchEdit("resid", 1, positions, features=FeatureEdit(sae, tuple(features), mode))
        return patcher.patched_metric(free, donor, [edit])

    # The empty set changes nothing, in either mode.
    assert run([]) == free.metric and run([], "ablate") == free.metric
    # Every feature of an exact SAE is the whole residual stream: the full patch, and ablation = zeroing it.
    assert run(range(2 * d)) == pytest.approx(paid.metric, abs=TOLERANCE)
    # Ablating every feature equals patching in a run whose residual stream is zero.
    blank = dataclasses.replace(free, resid=torch.zeros_like(free.resid))
    ablated = run(range(2 * d), "ablate", donor=free)
    assert ablated != pytest.approx(free.metric, abs=1e-3)
    zeroed = patcher.patched_metric(free, blank, [PatchEdit("resid", 1, everything)])
    assert ablated == pytest.approx(zeroed, abs=TOLERANCE)
    # Features of the coordinates outside a subspace leave it alone: patching dimension 0's two features is the
    # same as patching the first basis vector.
    first = PatchEdit("resid", 1, everything, basis=torch.eye(d)[:, :1])
    assert run([0, d]) == pytest.approx(patcher.patched_metric(free, paid, [first]), abs=TOLERANCE)
    with pytest.raises(AfprobeError, match="not mlp"):
        patcher.patched_metric(free, paid, [PatchEdit("mlp", 0, (0,), features=FeatureEdit(sae, (0,)))])


def test_patching_leaves_the_model_as_it_was(tiny_llama):
    _, patcher, free, paid = _setup(tiny_llama)
    blocks = decoder_layers(tiny_llama.model)

    def hook_count():
        modules = list(tiny_llama.model.modules())
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)

    before = hook_count()
    forwards = [block.__dict__.get("forward") for block in blocks]
    patcher.patched_metric(free, paid, [PatchEdit("resid", 1, (0,)), PatchEdit("attn_head", 1, (0,), head=0)])
    patcher.attribution(free, paid)
    with pytest.raises(AfprobeError, match="out of range"):
        patcher.patched_metric(free, paid, [PatchEdit("resid", 99, (0,))])
    assert hook_count() == before
    assert [block.__dict__.get("forward") for block in blocks] == forwards
    # An instance-level forward already there (accelerate installs one per module) is put back after skipping.
    blocks[0].forward = functools.partial(blocks[0].forward)
    installed = blocks[0].__dict__["forward"]
    try:
        patcher.patched_metric(free, paid, [PatchEdit("resid", 1, (0,))])
        assert blocks[0].__dict__["forward"] is installed
    finally:
        del blocks[0].forward
    # A later plain forward sees the unpatched model.
    assert patcher.record(free.prompt).metric == pytest.approx(free.metric, abs=1e-6)


def test_attribution_is_the_derivative_of_exact_patching(tiny_model):
    _, patcher, free, paid = _setup(tiny_model)
    estimate = patcher.attribution(free, paid)
    n = patcher.n_layers
    assert estimate["resid"].shape == (n + 1, len(free.tokens))
    assert estimate["attn_head"].shape == (n, len(free.tokens), patcher.n_heads)
    # Patching a tiny step eps of the way to the donor changes the metric by eps * attribution.
    eps = 1e-2
    step = dataclasses.replace(
        paid,
        resid=free.resid + eps * (paid.resid - free.resid),
        head_inputs=free.head_inputs + eps * (paid.head_inputs - free.head_inputs),
    )
    for site, layer, position, head in (("resid", 1, 0, None), ("resid", 0, 0, None), ("attn_head", 0, 0, 1)):
        edit = PatchEdit(site, layer, (position,), head=head)
        exact = (patcher.patched_metric(free, step, [edit]) - free.metric) / eps
        approx = float(estimate[site][layer, position] if head is None else estimate[site][layer, position, head])
        assert exact == pytest.approx(approx, rel=0.05, abs=2e-4), (site, layer)


def test_columns_line_up_the_tag_request_and_tail(tiny_llama):
    prompt_set, patcher, _, _ = _setup(tiny_llama, n=3)
    pairs = make_pairs(prompt_set)
    columns = build_columns(pairs, patcher, tiny_llama.tokenizer)
    assert columns[0].kind == "tag" and columns[0].label == "True"
    assert [c.kind for c in columns].count("request") == 1
    # The last column is the decision position of every pair, and the tail is the same text for every query.
    assert all(
        pos == (len(patcher.tokens_of(p.trained)) - 1,) for p, pos in zip(pairs, columns[-1].positions, strict=True)
    )
    assert not any("(varies)" in c.label for c in columns if c.kind == "post")
    # Each pair's columns cover every position from the tag to the decision position exactly once.
    for i, pair in enumerate(pairs):
        covered = sorted(p for c in columns for p in c.positions[i])
        assert covered == list(range(covered[0], len(patcher.tokens_of(pair.trained))))

    broken = dataclasses.replace(pairs[0].untrained, input_ids=pairs[0].untrained.input_ids[:-1] + (1, 2))
    with pytest.raises(AfprobeError, match="request tokenizes differently"):
        build_columns([dataclasses.replace(pairs[0], untrained=broken)], patcher, tiny_llama.tokenizer)


def test_tagged_and_untagged_prompts_pair_their_shared_tokens(tiny_llama, tmp_path):
    prompt_set = render_pairs(tiny_llama.tokenizer, load_queries("harmful", n=2), PromptConfig(variant="tag-absent"))
    pairs = make_pairs(prompt_set, ("free", "absent"))
    k = min(p.n_tokens for p in prompt_set.prompts) - 1
    k = min(k, prompt_set.shared_prefix_len)
    prefix = compute_prefix_cache(tiny_llama.model, prompt_set.prompts[0].input_ids[:k])
    patcher = Patcher(tiny_llama.model, prefix, AnswerTokens.from_tokenizer(tiny_llama.tokenizer))
    columns = build_columns(pairs, patcher, tiny_llama.tokenizer)
    for i, pair in enumerate(pairs):
        a, b = patcher.tokens_of(pair.trained), patcher.tokens_of(pair.untrained)
        assert len(a) > len(b)
        for column in columns:
            # Paired positions hold the same token in both prompts; the tag line has no partner and is left out.
            assert [a[p] for p in column.positions[i]] == [b[p] for p in column.other[i]]
            assert column.kind != "tag"
        assert columns[-1].positions[i] == (len(a) - 1,) and columns[-1].other[i] == (len(b) - 1,)

    output = run_patching(
        PatchConfig(
            variant="tag-absent",
            pair="free,absent",
            out=str(tmp_path),
            n=2,
            layers="0,2",
            positions="key",
            mediation_layers="1",
            n_random=2,
            n_boot=100,
            component_columns=1,
        ),
        loaded=tiny_llama,
    )
    assert output.patch_directions == ["absent->free", "free->absent"]
    assert all(row["passed"] for row in output.checks.values())
    assert "full_subspace_recovers_gap" not in output.checks and output.attribution is None
    assert output.attribution_skipped is not None  # the prompts differ in length: no position pairing
    with pytest.raises(AfprobeError, match="no tier 'nobody'"):
        run_patching(PatchConfig(variant="tag-absent", pair="free,nobody", out=str(tmp_path), n=2), loaded=tiny_llama)


@pytest.fixture(scope="module")
def probes_dir(tiny_llama, tmp_path_factory):
    return make_probes(tiny_llama, tmp_path_factory.mktemp("patch"), situational_awareness=True)


def test_patching_experiment_writes_grids_table_and_checks(tiny_llama, probes_dir):
    out = probes_dir / "run"
    config = PatchConfig(
        directions=str(probes_dir / "probes"),
        out=str(out),
        n=3,
        layers="0,1,2",
        positions="key",
        mediation_layers="1",
        n_random=4,
        n_boot=200,
    )
    output = run_patching(config, loaded=tiny_llama)
    assert all(row["passed"] for row in output.checks.values()), output.checks
    # Fitted on the fitting half, evaluated on the other: never a query of both.
    fitted = set(load_probe_set(probes_dir / "probes").metrics.fit_queries)
    assert fitted and len(output.queries) == 3 and fitted.isdisjoint(output.queries)
    saved = json.loads((out / "patch.json").read_text())  # strict JSON: NaN would fail in browsers
    assert saved == finite_json(output.to_json())  # the typed result is the file
    assert type(output).from_json(saved).to_json() == saved
    assert saved["config"]["layers"] == "0,1,2"
    names = {row["subspace"] for row in saved["mediation"]["rows"]}
    assert names == {"full", "empty", "situational_awareness", "training_context", "refusal", "token_embedding"}
    full = [r for r in saved["mediation"]["rows"] if r["subspace"] == "full"]
    assert all(r["recovery"] == pytest.approx(1.0, abs=1e-3) for r in full)
    assert all(r["recovery"] == 0.0 for r in saved["mediation"]["rows"] if r["subspace"] == "empty")
    named = [r for r in saved["mediation"]["rows"] if r["subspace"] == "training_context"]
    assert all("random_abs_p95" in r and "reading" in r for r in named)
    tested = [r for r in saved["mediation"]["rows"] if r.get("p_vs_random") is not None]
    assert tested and all(r["p_holm"] >= r["p_vs_random"] for r in tested)
    assert all(r["p_holm"] < 0.05 for r in tested if r["beyond_random"])
    assert all(f"over the {len(tested)} subspace" in r["reading"] for r in tested)
    sweep = np.array(saved["sweep"]["paid->free"]["mean"], dtype=float)
    assert sweep.shape == (3, len(saved["sweep_columns"]))
    # The last layer only reaches the decision position's own logits: every other column recovers nothing there.
    assert np.allclose(sweep[2, :-1], 0.0, atol=1e-3) and sweep[2, -1] == pytest.approx(1.0, abs=1e-3)
    assert saved["attribution"]["spearman"]["paid->free"]["resid"] is not None
    for name in ("patch_resid", "mediation", "attribution", "patch_components"):
        assert (out / f"{name}.html").exists()
    assert "True" in (out / "patch_resid.html").read_text()  # token labels reach the hover text


def test_directions_from_another_model_are_refused(tokenizer, probes_dir):
    other = make_tiny_model("llama", tokenizer, seed=7)
    config = PatchConfig(directions=str(probes_dir / "probes"), out=str(probes_dir / "x"), n=2)
    with pytest.raises(AfprobeError, match="computed on another model"):
        run_patching(config, loaded=other)


def test_one_tier_variant_is_refused(tiny_llama, tmp_path):
    with pytest.raises(AfprobeError, match="two tiers"):
        run_patching(PatchConfig(variant="no-tag", out=str(tmp_path), n=2), loaded=tiny_llama)


def test_an_evaluation_never_sees_a_fitting_query(tiny_llama, probes_dir, tmp_path):
    config = PatchConfig(
        directions=str(probes_dir / "probes"), out=str(tmp_path / "p"), n=3, split="all", layers="1", n_random=2
    )
    with pytest.raises(AfprobeError, match="were used to fit the directions"):
        run_patching(config, loaded=tiny_llama)
    from afprobe.analysis.steering import SteerConfig, run_steering

    steer = SteerConfig(directions=str(probes_dir / "probes"), out=str(tmp_path / "s"), n=3, split="fit")
    with pytest.raises(AfprobeError, match="were used to fit the directions"):
        run_steering(steer, loaded=tiny_llama)
    assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()


def test_cli_patch(tiny_llama, tmp_path, capsys):
    from afprobe.cli import main

    folder = tmp_path / "model"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    args = ["patch", "--model", str(folder), "--n", "2", "--layers", "0,2", "--positions", "key"]
    args += ["--no-components", "--n-random", "2", "--n-boot", "100", "--out", str(tmp_path / "p")]
    assert main([*args, "--mediation-layers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "checks: all passed" in printed and "token_embedding at layer 1" in printed
    assert main([*args, "--mediation-layers", "best"]) == 2
    assert "needs --directions" in capsys.readouterr().err
    assert main([*args, "--mediation-layers", "9"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_rows_compared_with_a_null_are_corrected_as_one_family():
    from afprobe.analysis.patching import _correct_over_rows

    rows = [
        {"reading": "a", "p_vs_random": 0.01, "n_random": 99, "beyond_random": True},
        {"reading": "b", "p_vs_random": 0.04, "n_random": 99, "beyond_random": True},
        {"reading": "c", "p_vs_random": None},
        {"reading": "d", "p_vs_random": 0.5, "n_random": 99, "beyond_random": False},
    ]
    readings = _correct_over_rows(rows, "SAE feature-set x direction")
    assert [r["p_holm"] for r in rows if "p_holm" in r] == pytest.approx([0.03, 0.08, 0.5])
    assert "p_holm" not in rows[2] and len(readings) == 3
    # p 0.04 alone would be beyond random; one of three comparisons, it is not.
    assert [r.get("beyond_random") for r in rows] == [True, False, None, False]
    assert all("Holm over the 3 SAE feature-set x direction rows" in r for r in readings)
    assert "smallest possible 0.01" in readings[0]


@pytest.mark.parametrize("no_gap", [True, False])
def test_feature_set_shares_are_read_out_only_of_a_gap(no_gap):
    from types import SimpleNamespace

    from afprobe.analysis.patching import FeatureSets, _add_feature_rows

    n = 6
    names = ["sae_empty", "sae_token", "sae_token_random_0", "sae_token_random_1"]
    plan = SimpleNamespace(
        feature_sets=FeatureSets(None, 1, "last", "f", names, [(), (1,), (2,), (3,)], [None, None, 1, 1]),
        config=PatchConfig(n_boot=100),
        directions=["paid->free", "free->paid"],
    )
    rng = np.random.default_rng(0)
    m = SimpleNamespace(
        sae_patch=rng.normal(0.5, 0.1, (2, n, 4)) * np.array([0, 1, 0.1, 0.1]),
        sae_ablated=np.stack([np.ones((n, 4)), np.zeros((n, 4))], axis=-1),  # ablation leaves the gap (1) as it was
        sae_whole=np.ones((2, n)),
        receiver_metric=np.zeros((2, n)),
        totals=np.ones((2, n)),
    )
    output = {
        "no_gap": no_gap,
        "mediation": {"rows": []},
        "checks": {"self_patch_changes_nothing": {"tolerance": 1e-3, "passed": True}},
        "summary": ["first-token gap ...", "checks: all passed"],
    }
    _add_feature_rows(output, plan, m)
    assert len(output["mediation"]["rows"]) == 3  # the numbers stay in patch.json either way
    read_out = [line for line in output["summary"] if line.startswith("sae_token")]
    assert len(read_out) == (0 if no_gap else 3) and output["summary"][-1] == "checks: all passed"


def test_sae_feature_sets_join_the_mediation_table(tiny_llama, tmp_path):
    from afprobe.analysis.sae_features import FeatureConfig, run_feature_analysis
    from afprobe.store.cache_job import CacheConfig, run_cache

    run_cache(CacheConfig(out=str(tmp_path / "store"), n=3, layers="1", positions="tag"), loaded=tiny_llama)
    sae = perfect_sae(tiny_llama.d_model)
    sae.save_model(str(tmp_path / "sae"))
    # alpha = 1 keeps every feature, so the one group is the whole SAE: for an exact SAE, patching it is patching
    # the whole residual stream at the position the features were found at (the tag; in a random model the tag
    # barely reaches the last token).
    features = FeatureConfig(
        sae=str(tmp_path / "sae"),
        cache=str(tmp_path / "store"),
        layer=1,
        out=str(tmp_path / "f"),
        alpha=1.0,
        max_features=2 * tiny_llama.d_model,
        n_boot=100,
        top=2,
        position="tag",
    )
    found = run_feature_analysis(features)
    assert found.groups["other"] and found.missing_responses == ["situational_awareness", "tag_only", "refusal"]
    config = PatchConfig(
        n=3,
        layers="1",
        positions="key",
        components=False,
        attribution=False,
        mediation_layers="1",
        n_random=2,
        n_boot=100,
        sae_features=str(tmp_path / "f"),
        out=str(tmp_path / "p"),
    )
    output = run_patching(config, loaded=tiny_llama)
    rows = [r for r in output.mediation["rows"] if r.get("family") == "sae"]
    assert {r["direction"] for r in rows} == {*output.patch_directions, "ablate from both runs"}
    assert all(r["subspace"] == "sae_other" for r in rows)
    # The one set is every feature: no random set of its size exists, so there is no null and no p-value.
    assert all(r["p_vs_random"] is None and "p_holm" not in r for r in rows)
    for row in rows:
        if row["direction"] in output.patch_directions:
            assert row["position"] == "tag" and row["whole_residual"]["recovery"] > 0.5
            assert row["recovery"] == pytest.approx(row["whole_residual"]["recovery"], abs=1e-3)
    assert output.checks["empty_feature_set_changes_nothing"] == {
        "max_abs_change": 0.0,
        "tolerance": 1e-3,
        "passed": True,
    }
    assert (tmp_path / "p" / "sae_mediation.html").is_file()
    # Features of another model are refused.
    other = make_tiny_model("llama", tiny_llama.tokenizer, seed=5)
    with pytest.raises(AfprobeError, match="patch that model"):
        run_patching(dataclasses.replace(config, out=str(tmp_path / "q")), loaded=other)


@pytest.mark.embedded
def test_embedded_model_patch_matches_the_full_forward(tokenizer):
    from afprobe.model.loading import load_model

    loaded = load_model(device="cpu")
    _, patcher, free, paid = _setup(loaded, n=1)
    # Patching the tag alone at layer 0 is the whole difference between the runs (nothing else differs there).
    assert patcher.patched_metric(free, paid, [PatchEdit("resid", 0, (0,))]) == pytest.approx(paid.metric, abs=1e-3)
    # A mid-network cell equals the naive way: the whole 3,000-token prompt with a hook overwriting the cell.
    layer, position = 12, free.decision - 2
    _, donor_acts = _naive(loaded, paid.prompt, patcher.answers, [])
    source = donor_acts[("resid", layer)][patcher.prefix.length + position]
    expected, _ = _naive(
        loaded, free.prompt, patcher.answers, [("resid", layer, patcher.prefix.length + position, None, source)]
    )
    fast = patcher.patched_metric(free, paid, [PatchEdit("resid", layer, (position,))])
    assert fast == pytest.approx(expected, abs=1e-3)
    assert fast != pytest.approx(free.metric, abs=1e-6)  # the cell matters, so the comparison is not vacuous


def test_random_feature_sets_match_the_groups_in_size_and_activation(tmp_path):
    from types import SimpleNamespace

    from afprobe.analysis.patching import MATCH_NEIGHBOURS, load_feature_sets

    d_sae = 64
    perfect_sae(d_sae // 2).save_model(str(tmp_path / "sae"))
    mean = [0.0] * d_sae
    for f in range(d_sae):
        mean[f] = float(f)  # feature f is active f units on average
    features = {
        "model": {"name": "m", "weights_sha256": "abc"},
        "sae": {"path": str(tmp_path / "sae"), "sae_id": None},
        "layer": 1,
        "position": "last",
        "n_features": d_sae,
        "features": [{"feature": f} for f in (40, 41, 5)],
        "groups": {"token": [40, 41], "situational_awareness": [5], "refusal": [], "other": []},
        "alive_features": list(range(d_sae)),
        "mean_activation": mean,
        "fit_queries": ["harmful-001"],
    }
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "features.json").write_text(json.dumps(features))
    loaded = SimpleNamespace(fingerprint=SimpleNamespace(weights_sha256="abc"), device="cpu")
    config = PatchConfig(sae_features=str(tmp_path / "f"), n_random=5)
    with pytest.raises(AfprobeError, match="were used to fit the SAE features"):
        load_feature_sets(config, loaded, ["harmful-001"])
    sets = load_feature_sets(config, loaded, ["harmful-002"])
    assert sets.names[:4] == ["sae_empty", "sae_token", "sae_situational_awareness", "sae_all_tier_differing"]
    assert sets.sets[:4] == [(), (40, 41), (5,), (40, 41, 5)]
    for name, chosen, match in zip(sets.names, sets.sets, sets.matches, strict=True):
        if match is None:
            continue
        target = sets.sets[match]
        assert name.startswith(sets.names[match] + "_random_") and len(chosen) == len(target)
        assert not set(chosen) & {40, 41, 5} and len(set(chosen)) == len(chosen)
        # Each stand-in is among the live features nearest in mean activation to the feature it replaces.
        for stand_in, original in zip(chosen, target, strict=True):
            assert abs(stand_in - original) <= MATCH_NEIGHBOURS
    assert sum(m is not None for m in sets.matches) == 3 * 5
    with pytest.raises(AfprobeError, match="patch that model"):
        load_feature_sets(
            PatchConfig(sae_features=str(tmp_path / "f")),
            SimpleNamespace(fingerprint=SimpleNamespace(weights_sha256="other"), device="cpu"),
            ["harmful-002"],
        )
    with pytest.raises(AfprobeError, match="no features.json"):
        load_feature_sets(PatchConfig(sae_features=str(tmp_path / "missing")), loaded, ["harmful-002"])
