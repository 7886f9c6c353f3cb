from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from afprobe.analysis.sae import SAETrainConfig, TrainingTokens, load_sae, load_training_tokens, sae_quality, train_sae
from afprobe.errors import AfprobeError


def planted_activations(n: int = 12_000, d: int = 32, n_features: int = 48, active: int = 3, seed: int = 0):
    """Activations that are sums of a few of `n_features` known directions with positive magnitudes."""
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(n_features, d, generator=generator), dim=-1)
    chosen = torch.stack([torch.randperm(n_features, generator=generator)[:active] for _ in range(n)])
    magnitudes = 1.0 + torch.rand(n, active, generator=generator)
    codes = torch.zeros(n, n_features).scatter_(1, chosen, magnitudes)
    return codes @ dictionary, dictionary


def test_training_on_planted_sparse_features_recovers_them(tmp_path):
    tokens, dictionary = planted_activations()
    config = SAETrainConfig(
        caches=(), layer=0, out=str(tmp_path / "sae"), d_sae=96, k=3, epochs=40, lr=3e-3, loss_prompts=0
    )
    result = train_sae(config, data=TrainingTokens(tokens, [{"store": "synthetic"}], {"name": "synthetic"}))
    sae = load_sae(str(tmp_path / "sae"))
    decoder = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1)  # [d_sae, d]
    best = (dictionary @ decoder.T).max(dim=1).values  # each planted feature's closest SAE feature
    assert float((best > 0.9).float().mean()) >= 0.9, best
    assert result.quality_held_out["explained_variance"] > 0.8
    assert result.quality_held_out["l0"] <= 3.0 + 1e-6
    saved = json.loads((tmp_path / "sae" / "afprobe_sae.json").read_text())
    assert saved == json.loads(json.dumps(result.to_json())) and "spliced_loss" not in saved  # typed result = file
    assert saved["config"]["k"] == 3 and saved["n_train_tokens"] == int(len(tokens) * 0.9)


def test_an_untrained_direction_set_is_not_recovered_by_chance():
    # The recovery criterion above is not loose: random unit vectors do not match a planted dictionary.
    _, dictionary = planted_activations()
    random = torch.nn.functional.normalize(torch.randn(96, dictionary.shape[1]), dim=-1)
    assert float(((dictionary @ random.T).max(dim=1).values > 0.9).float().mean()) < 0.1


def test_saved_sae_round_trips(tmp_path):
    tokens, _ = planted_activations(n=2_000)
    config = SAETrainConfig(caches=(), layer=0, out=str(tmp_path / "sae"), d_sae=64, k=4, epochs=1, loss_prompts=0)
    train_sae(config, data=TrainingTokens(tokens))
    first, second = load_sae(str(tmp_path / "sae")), load_sae(str(tmp_path / "sae"))
    x = tokens[:50]
    torch.testing.assert_close(first.encode(x), second.encode(x))
    assert sae_quality(first, x) == sae_quality(second, x)
    with pytest.raises(AfprobeError, match="no cfg.json"):
        load_sae(str(tmp_path))
    with pytest.raises(AfprobeError, match="--sae-id"):
        load_sae("some-release-name")


def test_training_tokens_come_from_stores_of_one_model(tiny_llama, tokenizer, tmp_path):
    from afprobe.store.cache_job import CacheConfig, run_cache

    from .conftest import make_tiny_model

    run_cache(CacheConfig(out=str(tmp_path / "a"), n=2, layers="1", positions="suffix"), loaded=tiny_llama)
    run_cache(CacheConfig(out=str(tmp_path / "b"), n=2, layers="1", positions="tag,last"), loaded=tiny_llama)
    data = load_training_tokens([str(tmp_path / "a"), str(tmp_path / "b")], 1)
    assert [s["position"] for s in data.sources] == ["suffix", "tag", "last"]
    assert data.tokens.shape[0] == sum(s["tokens"] for s in data.sources)
    with pytest.raises(AfprobeError, match="no layer 0"):
        load_training_tokens([str(tmp_path / "a")], 0)
    other = make_tiny_model("llama", tokenizer, seed=3)
    run_cache(CacheConfig(out=str(tmp_path / "c"), n=2, layers="1", positions="last"), loaded=other)
    with pytest.raises(AfprobeError, match="trained on one model"):
        load_training_tokens([str(tmp_path / "a"), str(tmp_path / "c")], 1)


def test_cli_sae_train(tiny_llama, tmp_path, capsys):
    from afprobe.cli import main
    from afprobe.store.cache_job import CacheConfig, run_cache

    run_cache(CacheConfig(out=str(tmp_path / "a"), n=2, layers="1", positions="suffix"), loaded=tiny_llama)
    args = ["sae", "train", "--cache", str(tmp_path / "a"), "--d-sae", "128", "--k", "8", "--epochs", "2"]
    args += ["--loss-prompts", "0"]
    assert main([*args, "--layer", "1", "--out", str(tmp_path / "sae")]) == 0
    assert "held-out explained variance" in capsys.readouterr().out
    assert load_sae(str(tmp_path / "sae")).cfg.d_sae == 128
    assert main([*args, "--layer", "5", "--out", str(tmp_path / "x")]) == 2
    assert "no layer 5" in capsys.readouterr().err


def test_spliced_loss_is_clean_for_a_perfect_reconstruction_and_worse_for_a_real_sae(tiny_llama, tmp_path):
    from afprobe.analysis.sae import spliced_loss
    from afprobe.data.prompts import render_pairs
    from afprobe.data.query_sets import load_queries
    from afprobe.store.cache_job import CacheConfig, run_cache

    class Identity:
        dtype = torch.float32

        def encode(self, x):
            return x

        def decode(self, x):
            return x

    prompt_set = render_pairs(tiny_llama.tokenizer, load_queries("harmful", n=1))
    k = prompt_set.shared_prefix_len
    perfect = spliced_loss(tiny_llama, Identity(), 1, prompt_set.prompts, k)
    assert perfect["spliced"] == pytest.approx(perfect["clean"], abs=1e-5)
    assert perfect["zeroed"] != pytest.approx(perfect["clean"], abs=1e-6)  # the splice reaches the output

    run_cache(CacheConfig(out=str(tmp_path / "a"), n=2, layers="1", positions="suffix"), loaded=tiny_llama)
    config = SAETrainConfig(
        caches=(str(tmp_path / "a"),), layer=1, out=str(tmp_path / "sae"), d_sae=64, k=2, epochs=2, loss_prompts=2
    )
    result = train_sae(config, loaded=tiny_llama)
    # 2 of 64 features cannot reconstruct a random model's residual exactly, and the loss shows it.
    assert result.spliced_loss["spliced"] != pytest.approx(result.spliced_loss["clean"], abs=1e-6)


class _IdentitySAE:
    """encode = the activation itself: each dimension is a 'feature' with a known tier effect."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, d: int = 40):
        self.cfg = type("cfg", (), {"d_in": d, "d_sae": d})()

    def encode(self, x):
        return x

    def decode(self, x):
        return x


def test_tier_differing_features_are_found_after_correction_and_only_they(tmp_path):
    from afprobe.analysis.sae_features import tier_feature_differences
    from afprobe.stats import benjamini_hochberg
    from afprobe.store.writer import create_store

    generator = torch.Generator().manual_seed(0)
    n, d = 24, 40
    base = torch.randn(n, d, generator=generator)
    free = base + 0.3 * torch.randn(n, d, generator=generator)
    paid = base + 0.3 * torch.randn(n, d, generator=generator)
    free[:, 5] += 1.0  # the one feature that differs by tier
    acts = torch.cat([free, paid])[:, None, :]
    ids = [f"q{i}" for i in range(n)] * 2
    store = create_store(tmp_path / "s", {"last": acts}, layers=[3], query_ids=ids, tiers=["free"] * n + ["paid"] * n)
    result = tier_feature_differences(_IdentitySAE(), store, 3, n_boot=500)
    # The planted feature comes first; at a 5% false-discovery rate a chance feature may join it, rarely more.
    assert result["features"][0]["feature"] == 5 and result["n_significant"] <= 2
    row = result["features"][0]
    assert row["ci"][0] < row["mean_difference"] < row["ci"][1] and row["ci"][0] > 0.5

    # With no tier effect at all, a discovery happens in about alpha = 5% of datasets (Benjamini-Hochberg controls
    # the family-wise error under the complete null): count over 20 null datasets.
    with_discoveries = 0
    for trial in range(20):
        g = torch.Generator().manual_seed(100 + trial)
        same = torch.randn(n, d, generator=g)
        null_acts = torch.cat([same, same + 0.3 * torch.randn(n, d, generator=g)])[:, None]
        null_store = create_store(
            tmp_path / f"null{trial}", {"last": null_acts}, layers=[3], query_ids=ids, tiers=["free"] * n + ["paid"] * n
        )
        with_discoveries += tier_feature_differences(_IdentitySAE(), null_store, 3, n_boot=50)["n_significant"] > 0
    assert with_discoveries <= 3  # P(more than 3 of 20 | rate 5%) < 2%
    q = benjamini_hochberg(torch.tensor([0.01, 0.04, 0.03, 0.5], dtype=torch.float64))
    assert q.tolist() == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5], abs=1e-9)


def test_cli_sae_features(tmp_path, capsys):
    from afprobe.cli import main
    from afprobe.store.writer import create_store

    tokens, _ = planted_activations(n=2_000, d=16)
    train_sae(
        SAETrainConfig(caches=(), layer=2, out=str(tmp_path / "sae"), d_sae=32, k=4, epochs=2, loss_prompts=0),
        data=TrainingTokens(tokens),
    )
    generator = torch.Generator().manual_seed(1)
    paid = tokens[:30]
    free = paid + 0.01 * torch.randn(paid.shape, generator=generator)
    ids = [f"q{i}" for i in range(30)] * 2
    create_store(
        tmp_path / "s",
        {"last": torch.cat([free, paid])[:, None]},
        layers=[2],
        query_ids=ids,
        tiers=["free"] * 30 + ["paid"] * 30,
    )
    args = ["sae", "features", "--sae", str(tmp_path / "sae"), "--cache", str(tmp_path / "s"), "--layer", "2"]
    assert main([*args, "--out", str(tmp_path / "f")]) == 0
    assert "features differ between free and paid" in capsys.readouterr().out
    assert json.loads((tmp_path / "f" / "features.json").read_text())["n_features"] == 32
    assert (tmp_path / "f" / "feature_dashboard.html").is_file()
    assert main([*args[:-1], "7", "--out", str(tmp_path / "g")]) == 2
    assert "has no layer 7 at position 'last'" in capsys.readouterr().err


def test_features_are_grouped_by_what_they_respond_to(tmp_path):
    from afprobe.analysis.sae_features import FeatureConfig, run_feature_analysis
    from afprobe.store.writer import create_store

    n, d = 40, 12
    g = torch.Generator().manual_seed(0)

    def noise():
        return 0.3 * torch.randn(n, d, generator=g)

    def paired(name, first_shift, contrast, variant="default", harmful=True, both_shift=None):
        base = 2.0 + torch.randn(n, d, generator=g)
        for feature, shift in (both_shift or {}).items():
            base[:, feature] += shift
        first, second = base + noise(), base + noise()
        for feature, shift in first_shift.items():
            first[:, feature] += shift
        ids = [f"q{i}" for i in range(n)] * 2
        tiers = [contrast[0]] * n + [contrast[1]] * n
        acts = torch.cat([first, second])[:, None]
        return create_store(
            tmp_path / name,
            {"last": acts},
            layers=[3],
            query_ids=ids,
            tiers=tiers,
            contrast=contrast,
            variant=variant,
            harmful=harmful,
        )

    # Features 1-4 differ by tier. 1 also follows the SA contrast, 2 differs as much when the tag is unexplained
    # (tag-only), 3 separates harmful from harmless requests, 4 does none of these.
    setting = paired("setting", {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}, ("free", "paid"))
    paired("sa", {1: 1.0}, ("monitored", "unmonitored"))
    paired("tag", {2: 1.0}, ("free", "paid"), variant="tag-only")
    # Harmless requests carry the same tags, so the same tier differences; feature 3 is lower on them (both tiers):
    # it tracks harmfulness.
    benign = paired("benign", {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}, ("free", "paid"), harmful=False, both_shift={3: -1.5})

    config = FeatureConfig(
        sae="identity",
        cache=str(setting.path),
        layer=3,
        out=str(tmp_path / "out"),
        sa_cache=str(tmp_path / "sa"),
        tag_only_cache=str(tmp_path / "tag"),
        benign_cache=str(benign.path),
        n_boot=200,
        top=4,
        contexts=3,
    )
    output = run_feature_analysis(config, sae=_IdentitySAE(d))
    groups = {row["feature"]: row["group"] for row in output.features}
    assert groups == {1: "situational_awareness", 2: "token", 3: "refusal", 4: "other"}
    assert output.groups["situational_awareness"] == [1]
    written = json.loads((tmp_path / "out" / "features.json").read_text())
    assert written["config"]["sa_cache"] == str(tmp_path / "sa") and written["groups"]["token"] == [2]
    # The dashboard lists each shown feature's strongest tokens, largest first.
    contexts = written["dashboard"]["1"]
    assert len(contexts) == 3 and contexts[0]["activation"] >= contexts[1]["activation"] >= contexts[2]["activation"]
    assert "feature 1: situational_awareness" in (tmp_path / "out" / "feature_dashboard.html").read_text()
    # A tag-only store must really be the tag-only variant.
    with pytest.raises(AfprobeError, match="variant 'default'"):
        run_feature_analysis(dataclasses.replace(config, tag_only_cache=str(tmp_path / "sa")), sae=_IdentitySAE(d))


def test_published_sae_loads_by_release_and_id_from_the_local_hub_cache(tmp_path, monkeypatch):
    """sae-lens' registry path (release + id -> repo -> files), offline: the files sit in a Hugging Face cache."""
    import huggingface_hub.constants
    from sae_lens import StandardSAE, StandardSAEConfig
    from safetensors.torch import save_file

    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32))
    torch.nn.init.normal_(sae.W_enc)
    sae.save_model(str(tmp_path / "local"))
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--jbloom--GPT2-Small-SAEs-Reformatted"
    folder = repo / "snapshots" / commit / "blocks.0.hook_resid_pre"
    folder.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("cfg.json", "sae_weights.safetensors"):
        (folder / name).write_bytes((tmp_path / "local" / name).read_bytes())
    save_file({"sparsity": torch.zeros(32)}, folder / "sparsity.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    loaded = load_sae("gpt2-small-res-jb", sae_id="blocks.0.hook_resid_pre")
    torch.testing.assert_close(loaded.W_enc, sae.W_enc)
    with pytest.raises(AfprobeError, match="no SAE 'nope'"):
        load_sae("gpt2-small-res-jb", sae_id="nope")
    with pytest.raises(AfprobeError, match="could not fetch"):
        load_sae("gpt2-small-res-jb", sae_id="blocks.1.hook_resid_pre")
    with pytest.raises(AfprobeError, match="give its release name and --sae-id"):
        load_sae("gpt2-small-res-jb")
