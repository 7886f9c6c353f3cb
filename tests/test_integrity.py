"""Nothing silently wrong on disk: checksummed stores and results folders, `afprobe verify`, one writer per folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from afprobe.behaviour.gap import GapConfig, run_gap, write_gap
from afprobe.cli import main
from afprobe.files import CHECKSUMS, LOCK_FILE, FolderLocked, folder_lock, read_checksums
from afprobe.store.cache_job import CacheConfig, run_cache
from afprobe.store.format import StoreError
from afprobe.store.integrity import verify_tree
from afprobe.store.merge import merge_stores
from afprobe.store.reader import ActivationStore

JOB = dict(n=4, shard_size=2, layers="0,1,2", positions="tag,last")


def flip_bytes(path, count: int = 1000) -> None:
    """Invert `count` bytes in the middle of a file (inside a shard's tensor data, past its header)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture()
def store(tiny_llama, tmp_path):
    out = tmp_path / "store"
    summary = run_cache(CacheConfig(out=str(out), **JOB), loaded=tiny_llama)
    assert summary.complete
    return out


def test_a_finished_store_is_sealed_and_verifies(store):
    listed = read_checksums(store)
    expected = {"meta.json", "manifest.csv", "gap.json", "shards/shard-00000.safetensors", "shards/shard-00001.json"}
    assert expected <= set(listed)
    report = verify_tree(store)
    assert report.ok and report.stores == [store] and report.files_checked >= len(listed)


def test_flipped_bytes_are_refused_named_and_repaired_by_rerunning(tiny_llama, store, capsys):
    shard = store / "shards" / "shard-00001.safetensors"
    original = ActivationStore.open(store).activations("last")
    flip_bytes(shard)

    # Reading the damaged shard fails with what to do; the undamaged one still reads.
    opened = ActivationStore.open(store)
    assert opened.row_tokens(0, "last").shape[0] == 1
    with pytest.raises(StoreError, match="shard-00001.safetensors is damaged.*rerun the same `afprobe cache`"):
        opened.activations("last")
    # verify names exactly that file and exits non-zero.
    report = verify_tree(store)
    assert [d.path for d in report.damage] == [shard]
    assert main(["verify", str(store)]) == 1
    printed = capsys.readouterr().out
    assert f"DAMAGED {shard}" in printed and "1 damaged" in printed

    # The same cache command rewrites the damaged shard (and only it); the store is then what it was.
    summary = run_cache(CacheConfig(out=str(store), **JOB), loaded=tiny_llama)
    assert summary.shards_repaired == 1 and summary.shards_written == 1 and summary.shards_skipped == 3
    assert torch.equal(ActivationStore.open(store).activations("last"), original)
    assert verify_tree(store).ok and main(["verify", str(store)]) == 0


def test_truncated_missing_and_changed_files_are_named(store, tiny_llama, tmp_path):
    results = tmp_path / "results" / "gap"
    write_gap(run_gap(GapConfig(n=2, n_boot=100, resolution_pairs=0), loaded=tiny_llama), results)
    assert set(read_checksums(results)) == {"gap.json", "per_query.csv"}
    assert verify_tree(tmp_path).ok

    per_query = results / "per_query.csv"
    per_query.write_bytes(per_query.read_bytes()[:40])  # truncated
    (results / "gap.json").unlink()  # missing
    (store / "meta.json").write_text((store / "meta.json").read_text().replace('"tag"', '"tak"'))  # changed
    (store / "shards" / "shard-00000.safetensors").unlink()  # a store's shard missing
    report = verify_tree(tmp_path)
    problems = {d.path.name: d.problem for d in report.damage}
    assert problems["per_query.csv"].startswith("changed") and problems["gap.json"] == "missing"
    assert problems["meta.json"].startswith("changed") and problems["shard-00000.safetensors"] == "missing"
    assert len(report.damage) == 4 and len(report.stores) == 1 and len(report.sealed) == 1
    with pytest.raises(StoreError, match="shard-00000.safetensors cannot be read"):
        ActivationStore.open(store).activations("last")


def test_merge_refuses_a_damaged_part(tiny_llama, tmp_path):
    parts = []
    for index in range(2):
        out = tmp_path / f"part{index}"
        run_cache(CacheConfig(out=str(out), part=f"{index}/2", **JOB), loaded=tiny_llama)
        parts.append(out)
    flip_bytes(parts[1] / "shards" / "shard-00001.safetensors")
    with pytest.raises(StoreError, match="damaged.*part1/shards/shard-00001.*rerun the part"):
        merge_stores(parts, tmp_path / "merged", loaded=tiny_llama)
    assert not (tmp_path / "merged").exists()


HOLDER = """
import sys, time
from pathlib import Path
from afprobe.files import folder_lock
with folder_lock(Path(sys.argv[1]), "afprobe cache (test holder)"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_one_writer_per_folder_and_a_killed_writer_is_taken_over(tiny_llama, tmp_path, capsys):
    out = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLocked, match=rf"being written by process {holder.pid} .*test holder.*wait"):
            run_cache(CacheConfig(out=str(out), **JOB), loaded=tiny_llama)
        assert not (out / "meta.json").exists()  # nothing was written by the refused job
        # Two `afprobe run`s of one experiment: the second stops before it loads anything.
        experiment = tmp_path / "exp.toml"
        experiment.write_text(f'name = "x"\nout = "{out}"\n[job]\nmodel = "no-such-model"\n')
        assert main(["run", str(experiment)]) == 2
        assert f"being written by process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's lock file is still there, but its lock died with it: the next job takes over.
    assert (out / LOCK_FILE).is_file()
    assert run_cache(CacheConfig(out=str(out), **JOB), loaded=tiny_llama).complete
    assert f"process {os.getpid()} " in (out / LOCK_FILE).read_text()


def test_the_lock_is_reentrant_in_one_process_and_released_on_error(tmp_path):
    with folder_lock(tmp_path / "x"), folder_lock(tmp_path / "x"):
        pass
    with pytest.raises(RuntimeError), folder_lock(tmp_path / "x"):
        raise RuntimeError("job failed")
    with folder_lock(tmp_path / "x"):  # released by the failure above
        pass


def test_a_sealed_folder_covers_its_unsealed_subfolders(tmp_path, store):
    target = tmp_path / "copy"
    shutil.copytree(store, target / "inner")
    (target / "inner" / CHECKSUMS).unlink()
    (target / "run.json").write_text("{}")
    from afprobe.files import seal_folder

    seal_folder(target)
    report = verify_tree(target)
    assert report.ok and report.unsealed == [] and report.sealed == [target]


EXPERIMENT = """
name = "killed"
out = "{base}/results"
activations = "{base}/store"
[job]
model = "{model}"
n = 3
[cache]
layers = "0,1,2"
positions = "tag,last"
stores = ["benign"]
shard_size = 2
[probes]
folds = 2  # 3 queries: 2 fit, 1 evaluates
n_random = 2
n_shuffles = 1
[steering]
n = 2
coefficients = [1.0]
n_random = 2
benign_n = 1
n_boot = 100
[patching]
n = 2
layers = "0,2"
positions = "key"
components = false
mediation_layers = "1"
n_random = 2
n_boot = 100
"""


def _experiment(tmp_path, name: str, model) -> list[str]:
    base = tmp_path / name
    base.mkdir()
    (base / "experiment.toml").write_text(EXPERIMENT.format(base=base, model=model))
    return [sys.executable, "-m", "afprobe.cli", "run", str(base / "experiment.toml")]


def _results_without_timing(base) -> dict[str, object]:
    """The step results, without timings and with the run's own folder written as BASE."""
    import json

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if "second" not in k and k != "timing"}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value.replace(str(base), "BASE") if isinstance(value, str) else value

    files = ("probes/metrics.json", "steering/steering.json", "patching/patch.json", "stores/store/gap.json")
    return {name: clean(json.loads((base / "results" / name).read_text())) for name in files}


def test_afprobe_run_killed_inside_and_between_steps_resumes_to_the_uninterrupted_result(tiny_llama, tmp_path):
    folder = tmp_path / "model"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = _experiment(tmp_path, "killed", folder)
    # Killed while the main store is being cached, then again once the probes are written (in the steering step).
    for marker in ("killed/store/shards/shard-00001.json", "killed/results/probes/metrics.json"):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and not (tmp_path / marker).exists() and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "results" / "patching" / "patch.json").exists()
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    assert verify_tree(tmp_path / "killed").ok

    assert subprocess.run(_experiment(tmp_path, "fresh", folder), env=env, capture_output=True).returncode == 0
    assert _results_without_timing(tmp_path / "killed") == _results_without_timing(tmp_path / "fresh")


@pytest.fixture(scope="module")
def analysis_inputs(tiny_llama, tmp_path_factory):
    from .conftest import make_probes

    return make_probes(tiny_llama, tmp_path_factory.mktemp("inputs"))


def _analysis(kind: str, inputs, out):
    from afprobe.analysis.patching import PatchConfig, run_patching
    from afprobe.analysis.probes import ProbeConfig, run_probes
    from afprobe.analysis.steering import SteerConfig, run_steering

    directions = str(inputs / "probes")
    if kind == "probes":
        return lambda loaded: run_probes(
            ProbeConfig(cache=str(inputs / "main"), out=str(out), folds=3, n_random=2, n_shuffles=1)
        )
    if kind == "steering":
        config = SteerConfig(
            directions=directions, out=str(out), n=2, coefficients=(1.0,), n_random=1, ablate=False, n_boot=100
        )
        return lambda loaded: run_steering(config, loaded=loaded)
    config = PatchConfig(
        directions=directions,
        out=str(out),
        n=2,
        layers="0,2",
        positions="key",
        components=False,
        attribution=False,
        mediation_layers="1",
        n_random=2,
        n_boot=100,
    )
    return lambda loaded: run_patching(config, loaded=loaded)


@pytest.mark.parametrize("kind", ["probes", "steering", "patching"])
def test_a_full_disk_during_a_results_writer_keeps_the_earlier_results(
    kind, tiny_llama, analysis_inputs, tmp_path, monkeypatch
):
    import errno

    import afprobe.files as files_module
    from afprobe.errors import AfprobeError
    from afprobe.files import verify_folder

    out = tmp_path / kind
    run = _analysis(kind, analysis_inputs, out)
    run(tiny_llama)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert CHECKSUMS in before and verify_folder(out) == []

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_module.os, "fsync", disk_full)
    with pytest.raises(AfprobeError, match="No space left on device.*free disk space") as info:
        run(tiny_llama)
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert verify_folder(out) == []


def _job_commands(inputs, model_folder, out) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "afprobe.cli"]
    return {
        "patch": [
            *cli, "patch", "--model", str(model_folder), "--directions", str(inputs / "probes"), "--n", "3",
            "--layers", "all", "--positions", "key", "--mediation-layers", "1", "--n-random", "2", "--n-boot", "100",
            "--out", str(out),
        ],
        "sae train": [
            *cli, "sae", "train", "--cache", str(inputs / "main"), "--layer", "1", "--d-sae", "64", "--k", "4",
            "--epochs", "40", "--batch-size", "8", "--loss-prompts", "0", "--out", str(out),
        ],
        "organism train": [
            *cli, "organism", "train", "--kind", "token", "--model", str(model_folder), "--steps", "6",
            "--batch-size", "2", "--check-n", "0", "--out", str(out),
        ],
    }  # fmt: skip


def _job_outputs(out) -> dict[str, object]:
    """Every file a job wrote, JSON without timings; weights byte for byte."""
    import json

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if "second" not in k and k not in ("timing", "out")}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    found: dict[str, object] = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.name != CHECKSUMS and path.suffix != ".html":
            found[path.name] = clean(json.loads(path.read_text())) if path.suffix == ".json" else path.read_bytes()
    return found


@pytest.mark.parametrize("job", ["patch", "sae train", "organism train"])
def test_a_job_killed_halfway_then_rerun_equals_an_uninterrupted_run(job, tiny_llama, analysis_inputs, tmp_path):
    model_folder = tmp_path / "model"
    model = tiny_llama.model
    if job == "organism train":  # the organisms' fixed recipe adapts layers 10 and up
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        config = model.config.__class__(**{**model.config.to_dict(), "num_hidden_layers": 12})
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(model_folder)
    tiny_llama.tokenizer.save_pretrained(model_folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    fresh, killed = tmp_path / "fresh", tmp_path / "killed"

    started = time.time()
    done = subprocess.run(_job_commands(analysis_inputs, model_folder, fresh)[job], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    duration = time.time() - started

    command = _job_commands(analysis_inputs, model_folder, killed)[job]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(duration / 2)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the job ended before it could be killed"
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    assert verify_tree(killed).ok
    assert _job_outputs(killed) == _job_outputs(fresh)


def _disk_full_after(monkeypatch, successes: int) -> None:
    """From the (successes + 1)-th fsync on, the disk is full."""
    import errno

    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > successes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _files_and_times(folder) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


@pytest.fixture(scope="module")
def trained_sae(analysis_inputs, tmp_path_factory):
    from afprobe.analysis.sae import SAETrainConfig, train_sae

    out = tmp_path_factory.mktemp("sae") / "sae"
    config = SAETrainConfig(
        caches=(str(analysis_inputs / "main"),), layer=1, out=str(out), d_sae=64, k=4, epochs=5, batch_size=8,
        loss_prompts=0,
    )  # fmt: skip
    train_sae(config)
    return config


def _writer(kind: str, tiny_llama, analysis_inputs, trained_sae, tmp_path):
    """A writer that writes the same folder each time it is called, and that folder."""
    from dataclasses import replace

    if kind == "sae train":
        from afprobe.analysis.sae import train_sae

        out = tmp_path / "sae"
        shutil.copytree(trained_sae.out, out)
        return (lambda: train_sae(replace(trained_sae, out=str(out)))), out
    if kind == "sae features":
        from afprobe.analysis.sae_features import FeatureConfig, run_feature_analysis

        out = tmp_path / "features"
        config = FeatureConfig(
            sae=trained_sae.out, cache=str(analysis_inputs / "main"), layer=1, out=str(out), max_features=8, top=4,
            contexts=2, n_boot=100,
        )  # fmt: skip
        return (lambda: run_feature_analysis(config)), out
    if kind == "merge":
        parts = []
        for index in range(2):
            part = tmp_path / f"part{index}"
            run_cache(CacheConfig(out=str(part), part=f"{index}/2", **JOB), loaded=tiny_llama)
            parts.append(part)
        out = tmp_path / "merged"
        return (lambda: merge_stores(parts, out, loaded=tiny_llama)), out
    assert kind == "experiment"
    from afprobe.experiment import load_experiment, run_experiment

    base = tmp_path / "exp"
    base.mkdir()
    toml = EXPERIMENT.format(base=base, model="unused").split("[steering]")[0]  # cache, gap and probes
    (base / "experiment.toml").write_text(toml)
    config = load_experiment(base / "experiment.toml")
    return (lambda: run_experiment(config, loaded=tiny_llama)), base / "results"


@pytest.mark.parametrize(
    ("kind", "successes"),
    [("sae train", 0), ("sae train", 1), ("sae features", 0), ("sae features", 1), ("merge", 0), ("experiment", 0),
     ("experiment", 2)],
)  # fmt: skip
def test_a_full_disk_in_each_writer_gives_one_line_and_keeps_what_was_there(
    kind, successes, tiny_llama, analysis_inputs, trained_sae, tmp_path, monkeypatch
):
    from afprobe.errors import AfprobeError
    from afprobe.files import verify_folder

    write, out = _writer(kind, tiny_llama, analysis_inputs, trained_sae, tmp_path)
    if kind != "sae train":
        write()
    before = _files_and_times(out)
    assert CHECKSUMS in before and verify_folder(out) == []

    _disk_full_after(monkeypatch, successes)
    with pytest.raises(AfprobeError, match="No space left on device.*free disk space") as info:
        write()
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    after = _files_and_times(out)
    if kind == "experiment" and successes:  # files rewritten with the same bytes before the disk filled
        after, before = ({k: v[0] for k, v in d.items()} for d in (after, before))
    assert after == before
    assert verify_folder(out) == []
    assert not list(out.glob(".staging-*")), "a failed write left its staging folder"


@pytest.mark.parametrize("successes", [0, 1])
def test_a_full_disk_while_an_organism_is_saved_leaves_no_adapter_and_the_rerun_works(
    successes, tiny_llama, tmp_path, monkeypatch
):
    from afprobe.analysis.organisms.training import OrganismConfig, train_organism
    from afprobe.errors import AfprobeError

    out = tmp_path / "organism"
    config = OrganismConfig(kind="token", out=str(out), model="tiny", steps=2, batch_size=2, first_layer=0)
    digest = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    _disk_full_after(monkeypatch, successes)
    with pytest.raises(AfprobeError, match="No space left on device.*free disk space") as info:
        train_organism(config, loaded=tiny_llama)
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert all(torch.equal(v, digest[k]) for k, v in tiny_llama.model.state_dict().items())

    train_organism(config, loaded=tiny_llama)
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        "adapter_config.json", "adapter_model.safetensors", "organism.json", CHECKSUMS,
    }  # fmt: skip
