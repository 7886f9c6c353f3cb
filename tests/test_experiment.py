from __future__ import annotations

import json
from pathlib import Path

import pytest

from afprobe.errors import AfprobeError
from afprobe.experiment import load_experiment, plan_experiment, run_experiment

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_shipped_experiment_reads_and_plans(path):
    config = load_experiment(path)
    plan = plan_experiment(config)
    assert plan.stores["main"].out == config.activations
    assert json.dumps(plan.to_dict())  # every step's config is plain data (it goes into config.json)


def test_quickstart_experiment_runs_every_step():
    plan = plan_experiment(load_experiment(Path(__file__).parent.parent / "experiments" / "quickstart.toml"))
    assert set(plan.stores) == {"main", "situational-awareness-v2", "negation-control", "benign", "tag-only"}
    assert plan.probes.sa_cache == plan.stores["situational-awareness-v2"].out
    assert plan.probes.negation_cache == plan.stores["negation-control"].out
    assert plan.steering.split == plan.patching.split == "evaluate" and plan.probes.split == "fit"
    assert plan.stores["tag-only"].layers == "18" and plan.stores["tag-only"].variant == "tag-only"
    assert plan.sae.caches == tuple(c.out for c in plan.stores.values())
    assert plan.features.tag_only_cache == plan.stores["tag-only"].out
    assert plan.patching.sae_features == plan.features.out and plan.patching.directions == plan.probes.out


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_bad_experiment_files_get_one_line_errors(tmp_path):
    with pytest.raises(AfprobeError, match="does not exist"):
        load_experiment(tmp_path / "nope.toml")
    with pytest.raises(AfprobeError, match="not valid TOML"):
        load_experiment(_write(tmp_path, "name = \n"))
    with pytest.raises(AfprobeError, match=r"unknown option colour in \[steering\]"):
        load_experiment(_write(tmp_path, "[probes]\n[steering]\ncolour = 1\n"))
    with pytest.raises(AfprobeError, match=r"unknown option out in \[probes\]"):
        load_experiment(_write(tmp_path, "[probes]\nout = 'x'\n"))  # the run chooses each step's folder
    with pytest.raises(AfprobeError, match="unknown store"):
        load_experiment(_write(tmp_path, "[cache]\nstores = ['imaginary']\n"))
    with pytest.raises(AfprobeError, match=r"needs an \[sae\] table"):
        load_experiment(_write(tmp_path, "[features]\n"))
    with pytest.raises(AfprobeError, match=r"needs a \[probes\] table"):
        plan_experiment(load_experiment(_write(tmp_path, "[steering]\n")))


def test_run_writes_one_results_folder_and_resumes(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(
        tmp_path,
        """
name = "tiny"
[job]
n = 3
[cache]
layers = "0,1,2"
positions = "tag,last,suffix"
suffix_layers = "1"
stores = ["situational-awareness", "benign", "tag-only"]
[probes]
folds = 2  # 3 queries: 2 fit, 1 evaluates
n_random = 2
n_shuffles = 1
[steering]
n = 2
coefficients = [1.0]
n_random = 1
benign_n = 1
ablate = false
n_boot = 100
[sae]
layer = 1
d_sae = 32
k = 4
epochs = 2
batch_size = 32
loss_prompts = 2
[features]
alpha = 1.0
max_features = 4
n_boot = 100
[patching]
n = 2
layers = "0,2"
positions = "key"
components = false
mediation_layers = "1"
n_random = 2
n_boot = 100
[verdict]
n = 2
n_fit = 2
layers = "1"
k = 1
steps = 2
n_random = 3
n_boot = 100
""",
    )
    lines: list[str] = []
    record = run_experiment(load_experiment(path), loaded=tiny_llama, log=lines.append)
    out = tmp_path / "results" / "tiny"
    for name in (
        "experiment.toml",
        "config.json",
        "run.json",
        "report.html",
        "probes/metrics.json",
        "steering/steering.json",
        "sae/afprobe_sae.json",
        "sae-features/features.json",
        "patching/patch.json",
        "verdict/verdict.json",
        "verdict/subspaces.safetensors",
        "stores/tiny/gap.json",
        "stores/tiny-sa/per_query.csv",
    ):
        assert (out / name).is_file(), name
    assert (out / "experiment.toml").read_text() == path.read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["steps"]["steering"]["coefficients"] == [1.0] and config["steps"]["probes"]["folds"] == 2
    assert (tmp_path / "activations" / "tiny-tag-only" / "meta.json").is_file()
    assert not any(step["skipped"] for step in record["steps"].values())
    page = (out / "report.html").read_text()
    for section in ("gap", "probes", "steering", "patching", "sae", "features", "verdict"):
        assert f"<section id='{section}'>" in page
    assert page.index("<section id='verdict'>") < page.index("<section id='gap'>")  # the report opens with it
    verdict = json.loads((out / "verdict" / "verdict.json").read_text())
    assert verdict["verdict"]["verdict"] in (
        "situational-awareness",
        "tag-token",
        "mixed",
        "no gap to explain",
        "undetermined",
    )
    assert any(line.startswith("verdict: verdict: ") for line in lines)
    assert any(line.startswith("features: ") for line in lines)

    # Again with the same file: nothing is recomputed but the report.
    again = run_experiment(load_experiment(path), loaded=tiny_llama)
    assert all(step["skipped"] for name, step in again["steps"].items() if name != "report")
    # A changed option reruns that step only.
    path.write_text(path.read_text().replace("n_random = 1", "n_random = 2"))
    third = run_experiment(load_experiment(path), loaded=tiny_llama)
    assert [name for name, step in third["steps"].items() if not step["skipped"]] == ["steering", "report"]
    # --only: one step, the stores untouched.
    assert path.read_text().count("steps = 2") == 1
    path.write_text(path.read_text().replace("steps = 2", "steps = 3"))
    fourth = run_experiment(load_experiment(path), loaded=tiny_llama, only=["verdict"])
    assert [name for name, step in fourth["steps"].items() if not step["skipped"]] == ["verdict", "report"]
    assert not any(name.startswith("cache") for name in fourth["steps"])
    with pytest.raises(AfprobeError, match="unknown step verdic"):
        run_experiment(load_experiment(path), loaded=tiny_llama, only=["verdic"])
