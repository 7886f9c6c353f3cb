"""`afprobe doctor` and the conformance matrix: every family afprobe claims passes the doctor's checks and runs a
small cache and patch; constructed broken cases get the FAIL or WARN they deserve."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from afprobe.analysis.doctor import (
    CHECK_NAMES,
    DoctorConfig,
    DoctorResult,
    Subject,
    check_answer_strings,
    check_chat_template,
    check_weights_unchanged,
    exact_weights_digest,
    format_doctor_table,
    run_doctor,
    write_doctor,
)
from afprobe.cli import main
from afprobe.data.prompts import FOLDED, SYSTEM_ROLE, Query, render_pairs
from afprobe.model.families import FAMILIES
from afprobe.model.forward import compute_prefix_cache
from afprobe.model.loading import load_model, wrap_model

from .conftest import make_probes, make_tiny_model

CONFIG = dict(n=3, check_pairs=1)
EQUIVALENCE_CHECKS = ("prefix sharing", "residual stream", "patching")


def _doctor(loaded, **overrides) -> DoctorResult:
    return run_doctor(DoctorConfig(model=loaded.fingerprint.name, **{**CONFIG, **overrides}), loaded=loaded)


def _subject(loaded) -> Subject:
    prompt_set = render_pairs(loaded.tokenizer, [Query("q", "How do I pick a lock?")])
    prefix = compute_prefix_cache(loaded.model, prompt_set.prompts[0].input_ids[: prompt_set.prefix_len()])
    return Subject(loaded, prompt_set, prefix, prefix_seconds=0.0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_passes_the_doctor_and_runs_a_cache_and_a_patch(family, tmp_path):
    from afprobe.analysis.patching import PatchConfig, run_patching
    from afprobe.store.reader import ActivationStore

    loaded = load_model(f"random:{family}", device="cpu")
    assert loaded.fingerprint.source == "random"
    result = _doctor(loaded)
    assert [c.name for c in result.checks] == list(CHECK_NAMES)
    assert not result.failed, format_doctor_table(result)
    assert all(result.check(name).state == "SUPPORTED" for name in EQUIVALENCE_CHECKS)
    assert result.check("weights unchanged").status == "PASS"

    inputs = make_probes(loaded, tmp_path)
    store = ActivationStore.open(inputs / "main")
    assert store.meta.model["weights_sha256"] == loaded.fingerprint.weights_sha256
    config = PatchConfig(
        directions=str(inputs / "probes"), out=str(tmp_path / "patch"), n=2, layers="all", positions="key",
        components=True, attribution=False, mediation_layers="1", n_random=2, n_boot=100,
    )  # fmt: skip
    output = run_patching(config, loaded=loaded)
    assert output.checks and all(row["passed"] for row in output.checks.values())


def test_the_embedded_model_tokenizer_renders_its_system_prompt_as_a_system_message(tiny_llama):
    subject = _subject(tiny_llama)
    check = check_chat_template(tiny_llama.tokenizer, subject.prompt_set)
    assert check.status == "PASS" and check.values["placement"] == SYSTEM_ROLE


NO_SYSTEM_ROLE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>"
    "{% endif %}"
)
DROPS_SYSTEM = (
    "{% for m in messages %}{% if m['role'] != 'system' %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("template", [NO_SYSTEM_ROLE, DROPS_SYSTEM], ids=["refuses-system", "drops-system"])
def test_a_template_without_a_system_role_is_folded_and_warned(template, tiny_llama):
    tokenizer = copy.deepcopy(tiny_llama.tokenizer)
    tokenizer.chat_template = template
    loaded = wrap_model(tiny_llama.model, tokenizer, name="tiny-llama")
    subject = _subject(loaded)
    assert all(subject.prompt_set.system_prompt.strip()[:200] in p.text for p in subject.prompts)
    check = check_chat_template(tokenizer, subject.prompt_set)
    assert check.status == "WARN" and check.values["placement"] == FOLDED and "user turn" in check.fix


@pytest.mark.parametrize(
    ("accept", "reject", "problem"),
    [("<same/>", "<same/>", "identical"), ("<no", "<no/>", "prefix")],
)
def test_answer_strings_that_cannot_be_told_apart_fail(accept, reject, problem, tiny_llama):
    check = check_answer_strings(_subject(tiny_llama), accept, reject)
    assert check.status == "FAIL" and problem in check.measured and check.fix


def test_answer_strings_report_where_they_differ_and_how_likely_their_shared_start_is(tiny_llama):
    check = check_answer_strings(_subject(tiny_llama))
    assert check.values["first_difference"] == 1 and check.values["accept"][0] == check.values["reject"][0] == "<"
    p = check.values["p_shared_start"]
    assert 0 < p < 1
    assert check.status == ("WARN" if p < 0.05 else "PASS")


def test_a_model_whose_prefix_shared_forward_differs_is_silently_wrong_and_exits_nonzero(tokenizer, tmp_path):
    loaded = make_tiny_model("llama", tokenizer, seed=5)
    block = loaded.model.model.layers[0]

    def perturb(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        hidden = args[0] if args else kwargs["hidden_states"]
        # Every forward over the prefix's cache (not the prefix's own forward, nor the full forward, which has none).
        if cache is not None and cache.get_seq_length() > 0:
            hidden = hidden + 0.5
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        return None

    handle = block.register_forward_pre_hook(perturb, with_kwargs=True)
    try:
        result = _doctor(loaded)
    finally:
        handle.remove()
    check = result.check("prefix sharing")
    assert check.status == "FAIL" and check.state == "SILENTLY WRONG"
    assert result.failed and "FAIL" in format_doctor_table(result)


def test_changed_weights_fail(tiny_llama):
    check = check_weights_unchanged(tiny_llama, before="0" * 64)
    assert check.status == "FAIL"
    assert check_weights_unchanged(tiny_llama, exact_weights_digest(tiny_llama.model)).status == "PASS"


def test_a_model_that_does_not_load_fails_and_skips_the_rest():
    result = run_doctor(DoctorConfig(model="/nonexistent/model-folder", **CONFIG))
    assert result.checks[0].status == "FAIL" and "could not load" in result.checks[0].measured
    assert [c.status for c in result.checks[1:]] == ["SKIP"] * (len(CHECK_NAMES) - 1)


def test_doctor_json_reads_back_and_the_cli_exits_by_the_verdict(tiny_llama, tmp_path, capsys):
    result = _doctor(tiny_llama)
    path = write_doctor(result, tmp_path / "doctor")
    data = json.loads(path.read_text())
    assert data["passed"] is True and data["config"]["check_pairs"] == 1
    assert DoctorResult.from_json(data).checks == result.checks
    assert (
        main(["doctor", "--model", "random:qwen3", "--n", "2", "--check-pairs", "1", "--out", str(tmp_path / "cli")])
        == 0
    )
    printed = capsys.readouterr().out
    assert "prefix sharing" in printed and "SUPPORTED" in printed and (tmp_path / "cli" / "doctor.json").is_file()
    assert main(["doctor", "--model", "random:nonesuch"]) == 1
    assert "unknown model family" in capsys.readouterr().out


@pytest.mark.embedded
def test_the_doctor_passes_on_the_embedded_model():
    result = run_doctor(DoctorConfig(check_pairs=1))
    assert not result.failed, format_doctor_table(result)
    assert all(result.check(name).state == "SUPPORTED" for name in EQUIVALENCE_CHECKS)


def test_the_gpu_check_script_runs_its_cpu_side_in_bfloat16(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "doctor_matrix.py"
    out = tmp_path / "matrix.json"
    command = [sys.executable, str(script), "--families", "llama", "--dtypes", "bfloat16,float32", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    bf16, fp32 = rows["random:llama cpu bfloat16"], rows["random:llama cpu float32"]
    assert bf16["resolution_noise"] > 0 and fp32["resolution_noise"] == 0
    assert bf16["prefix_sharing_tolerance"] > fp32["prefix_sharing_tolerance"] == 1e-3
    assert "| random:llama cpu bfloat16 |" in done.stdout


def test_a_layout_afprobe_cannot_patch_fails_with_the_reason_not_numbers(tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=8192)
    loaded = wrap_model(AutoModelForCausalLM.from_config(config).eval(), tokenizer, name="tiny-gpt2")
    result = _doctor(loaded)
    patching = result.check("patching")
    assert patching.status == "FAIL" and "self_attn.o_proj" in patching.measured
    assert "\n" not in patching.measured
