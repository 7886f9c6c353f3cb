"""An experiment: one TOML config, the whole pipeline, one results folder.

`run_experiment(load_experiment("experiments/quickstart.toml"))` caches the activation stores, then trains probes,
steers, trains an SAE and groups its features, patches, and writes the report. Each table of the TOML file holds the
options of one step, named as in that step's config (`afprobe.activations.CacheConfig`, `ProbeConfig`,
`SteerConfig`, `PatchConfig`, `SAETrainConfig`, `FeatureConfig`); a step whose table is absent is skipped, and so is
its section of the report. `[job]` holds what every job over prompts shares (model, dataset, variant, n, device...).

```toml
name = "quickstart"
out = "results/quickstart"            # the results folder
activations = "activations/quickstart" # the stores: this path, and -sa, -benign, -tag-only beside it

[job]
model = "smollm2-135m-instruct"
n = 50

[cache]
positions = "tag,last,suffix"
suffix_layers = "18"
stores = ["situational-awareness", "benign", "tag-only"]

[probes]
[steering]
n = 6
[sae]
layer = 18
[features]
[patching]
n = 3
```

The results folder holds `experiment.toml` (the file as given), `config.json` (every option of every step, defaults
filled in), one folder per step (`probes/`, `steering/`, `sae/`, `sae-features/`, `patching/`), `stores/` (each
store's `gap.json` and `per_query.csv`), `run.json` (what ran, what was already done, seconds per step) and
`report.html`. Running the same file again resumes: stores finish their missing shards, and a step whose output
exists with the same config is not run again.
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from afprobe import __version__
from afprobe.activations import CacheConfig, run_cache
from afprobe.errors import AfprobeError
from afprobe.files import atomic_write_json, atomic_write_text, results_folder
from afprobe.gap import PairedPromptJob
from afprobe.models import LoadedModel

# Extra stores an experiment can cache beside the main one: name -> (suffix of the store's path, what changes).
EXTRA_STORES: dict[str, tuple[str, dict[str, Any]]] = {
    "situational-awareness": ("-sa", {"dataset": "situational-awareness", "n": None}),
    "benign": ("-benign", {"dataset": "benign"}),
    "tag-only": ("-tag-only", {"variant": "tag-only"}),
}
STEPS = ("cache", "probes", "steering", "sae", "features", "patching", "ground_truth", "report")


@dataclass
class ExperimentConfig:
    """A parsed experiment file: the run's name and folders and each step's table (None: skipped)."""

    name: str
    out: str
    activations: str
    job: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, Any] | None = None
    steering: dict[str, Any] | None = None
    sae: dict[str, Any] | None = None
    features: dict[str, Any] | None = None
    patching: dict[str, Any] | None = None
    ground_truth: dict[str, Any] | None = None  # `afprobe.organisms.CheckConfig` options: behavioural ground truth
    models: dict[str, dict[str, Any]] | None = None  # name -> [job] overrides: one whole run per model
    source: str | None = None  # the TOML text


def _check_keys(table: dict[str, Any], allowed: set[str], where: str, path: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise AfprobeError(
            f"unknown option {', '.join(unknown)} in [{where}] of {path}: choose from {', '.join(sorted(allowed))}"
        )


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and check an experiment file (unknown tables or options are errors that name the fix)."""
    from afprobe.patch_analysis import PatchConfig
    from afprobe.probes import ProbeConfig
    from afprobe.sae import SAETrainConfig
    from afprobe.sae_analysis import FeatureConfig
    from afprobe.steering import SteerConfig

    file = Path(path)
    if not file.is_file():
        raise AfprobeError(f"experiment file {path} does not exist: see experiments/ for examples")
    text = file.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AfprobeError(f"{path} is not valid TOML ({exc}): fix that line") from exc
    top = {
        "name",
        "out",
        "activations",
        "job",
        "cache",
        "probes",
        "steering",
        "sae",
        "features",
        "patching",
        "ground_truth",
        "models",
    }
    _check_keys(data, top, "top level", str(path))
    name = str(data.get("name") or file.stem)
    job = dict(data.get("job", {}))
    _check_keys(job, _names(PairedPromptJob), "job", str(path))
    cache = dict(data.get("cache", {}))
    _check_keys(cache, (_names(CacheConfig) - _names(PairedPromptJob) - {"out"}) | {"stores"}, "cache", str(path))
    unknown_stores = sorted(set(cache.get("stores", [])) - set(EXTRA_STORES))
    if unknown_stores:
        raise AfprobeError(
            f"unknown store {unknown_stores} in [cache] of {path}: choose from {', '.join(EXTRA_STORES)}"
        )
    owned = {
        "probes": (ProbeConfig, {"cache", "out", "sa_cache", "benign_cache"}),
        "steering": (SteerConfig, {"directions", "out"} | (_names(PairedPromptJob) - {"n", "batch_size"})),
        "sae": (SAETrainConfig, {"caches", "out", "model"}),
        "features": (FeatureConfig, {"sae", "cache", "layer", "out", "sa_cache", "tag_only_cache", "benign_cache"}),
        "patching": (PatchConfig, {"directions", "out", "sae_features"} | (_names(PairedPromptJob) - {"n"})),
    }
    tables: dict[str, dict[str, Any] | None] = {}
    for step, (cls, set_by_run) in owned.items():
        table = data.get(step)
        if table is not None:
            _check_keys(table, _names(cls) - set_by_run, step, str(path))
        tables[step] = None if table is None else dict(table)
    ground_truth = data.get("ground_truth")
    if ground_truth is not None:
        from afprobe.organisms import CheckConfig

        _check_keys(ground_truth, _names(CheckConfig), "ground_truth", str(path))
    models = data.get("models")
    if models is not None:
        if not isinstance(models, dict) or not models or not all(isinstance(v, dict) for v in models.values()):
            raise AfprobeError(f'[models] in {path} must be tables like `token = {{adapter = "organism:token"}}`')
        for model_name, overrides in models.items():
            _check_keys(overrides, _names(PairedPromptJob), f"models.{model_name}", str(path))
    if tables["features"] is not None and tables["sae"] is None:
        raise AfprobeError(f"[features] in {path} needs an [sae] table: the features are that SAE's")
    return ExperimentConfig(
        name=name,
        out=str(data.get("out") or f"results/{name}"),
        activations=str(data.get("activations") or f"activations/{name}"),
        job=job,
        cache=cache,
        source=text,
        ground_truth=None if ground_truth is None else dict(ground_truth),
        models=None if models is None else {k: dict(v) for k, v in models.items()},
        **tables,
    )


def _already_done(path: Path, config: Any) -> bool:
    """True when `path` exists and was written with this exact config (so the step need not run again)."""
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text()).get("config")
    except (OSError, json.JSONDecodeError):
        return False
    return saved == json.loads(json.dumps(asdict(config)))


@dataclass
class ExperimentPlan:
    """Every step's config, filled in from an experiment file (None: the step is skipped)."""

    job: PairedPromptJob
    stores: dict[str, CacheConfig]
    probes: Any = None
    steering: Any = None
    sae: Any = None
    features: Any = None
    patching: Any = None

    def to_dict(self) -> dict[str, Any]:
        steps: dict[str, Any] = {"cache": {name: asdict(c) for name, c in self.stores.items()}}
        for step in ("probes", "steering", "sae", "features", "patching"):
            if getattr(self, step) is not None:
                steps[step] = asdict(getattr(self, step))
        return steps


def plan_experiment(config: ExperimentConfig) -> ExperimentPlan:
    """Each step's config: the file's options, the folders the run chooses, and the defaults."""
    from afprobe.patch_analysis import PatchConfig
    from afprobe.probes import ProbeConfig
    from afprobe.sae import SAETrainConfig
    from afprobe.sae_analysis import FeatureConfig
    from afprobe.steering import SteerConfig

    out = Path(config.out)
    job = PairedPromptJob(**config.job)
    store_options = {k: v for k, v in config.cache.items() if k != "stores"}
    main_cache = CacheConfig(**{**asdict(job), **store_options, "out": config.activations})
    stores = {"main": main_cache}
    for extra in config.cache.get("stores", []):
        suffix, change = EXTRA_STORES[extra]
        extra_config = CacheConfig(**{**asdict(main_cache), **change, "out": config.activations + suffix})
        if extra == "tag-only" and config.sae is not None and "layer" in config.sae:
            # The tag-only store serves the SAE's token test: its layer is enough.
            layer = str(config.sae["layer"])
            extra_config.layers = layer
            extra_config.suffix_layers = layer if "suffix" in extra_config.positions else None
        stores[extra] = extra_config
    sa = stores.get("situational-awareness")
    benign = stores.get("benign")
    tag_only = stores.get("tag-only")

    probe_config = steer_config = sae_config = feature_config = patch_config = None
    if config.probes is not None:
        probe_config = ProbeConfig(
            cache=main_cache.out,
            out=str(out / "probes"),
            sa_cache=sa.out if sa else None,
            benign_cache=benign.out if benign else None,
            **config.probes,
        )
    directions = probe_config.out if probe_config is not None else None
    if config.steering is not None:
        if directions is None:
            raise AfprobeError("[steering] needs a [probes] table: it steers along the probes' directions")
        shared = {k: v for k, v in asdict(job).items() if k != "n" and k not in config.steering}
        steer_config = SteerConfig(**shared, directions=directions, out=str(out / "steering"), **config.steering)
    if config.sae is not None:
        sae_config = SAETrainConfig(
            caches=tuple(c.out for c in stores.values()), out=str(out / "sae"), model=job.model, **config.sae
        )
    if config.features is not None and sae_config is not None:
        feature_config = FeatureConfig(
            sae=sae_config.out,
            cache=main_cache.out,
            layer=sae_config.layer,
            out=str(out / "sae-features"),
            sa_cache=sa.out if sa else None,
            tag_only_cache=tag_only.out if tag_only else None,
            benign_cache=benign.out if benign else None,
            **config.features,
        )
    if config.patching is not None:
        shared = {k: v for k, v in asdict(job).items() if k != "n" and k not in config.patching}
        patch_config = PatchConfig(
            **shared,
            directions=directions,
            sae_features=feature_config.out if feature_config is not None else None,
            out=str(out / "patching"),
            **config.patching,
        )

    return ExperimentPlan(job, stores, probe_config, steer_config, sae_config, feature_config, patch_config)


def run_experiment(
    config: ExperimentConfig,
    *,
    loaded: LoadedModel | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every step the config names, in order; returns what run.json holds.

    With a [models] table, the whole pipeline runs once per model into `out/NAME/` (stores in
    `activations-NAME`), then `comparison.json` sets the models side by side (`afprobe.organisms`) and one report
    covers them all. progress(step, done, total) reports long steps; log(line) one line per step (the CLI prints
    them)."""
    if config.models is None:
        return _run_one(config, loaded=loaded, progress=progress, log=log)
    from afprobe.organisms import write_comparison
    from afprobe.report import write_report

    if loaded is not None:
        raise AfprobeError("an experiment with [models] loads each model itself: do not pass `loaded`")
    say = log or (lambda line: None)
    out = Path(config.out)
    started = time.perf_counter()
    with results_folder(out):
        if config.source is not None:
            atomic_write_text(out / "experiment.toml", config.source)
    record: dict[str, Any] = {"afprobe_version": __version__, "name": config.name, "models": {}}
    for name, overrides in config.models.items():
        say(f"== {name} ==")
        one = ExperimentConfig(
            **{
                **{f.name: getattr(config, f.name) for f in fields(ExperimentConfig)},
                "name": f"{config.name}-{name}",
                "out": str(out / name),
                "activations": f"{config.activations}-{name}",
                "job": {**config.job, **overrides},
                "models": None,
                "source": None,
            }
        )
        record["models"][name] = _run_one(
            one,
            progress=None if progress is None else (lambda step, d, t, n=name: progress(f"{n}: {step}", d, t)),
            log=lambda line, n=name: say(f"{n}: {line}"),
        )
    comparison = write_comparison(out, list(config.models))
    for line in comparison["summary"]:
        say(f"comparison: {line}")
    report, summary = write_report(out)
    say(f"report: {report} ({summary['bytes'] / 1e6:.1f} MB, {summary['n_figures']} figures)")
    record["seconds"] = time.perf_counter() - started
    record["report"] = str(report)
    with results_folder(out):
        atomic_write_json(out / "run.json", record)
    return record


def _run_one(
    config: ExperimentConfig,
    *,
    loaded: LoadedModel | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from afprobe.patch_analysis import format_patch_summary, run_patching
    from afprobe.probes import run_probes
    from afprobe.report import write_report
    from afprobe.sae import train_sae
    from afprobe.sae_analysis import run_feature_analysis
    from afprobe.steering import run_steering

    say = log or (lambda line: None)
    out = Path(config.out)
    started = time.perf_counter()
    record: dict[str, Any] = {"afprobe_version": __version__, "name": config.name, "steps": {}}

    def step_progress(step: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(step, done, total))

    def finish(step: str, t0: float, skipped: bool = False, **info: Any) -> None:
        record["steps"][step] = {"seconds": time.perf_counter() - t0, "skipped": skipped, **info}
        with results_folder(out):
            atomic_write_json(out / "run.json", record)

    plan = plan_experiment(config)
    job, stores = plan.job, plan.stores
    probe_config, steer_config, sae_config = plan.probes, plan.steering, plan.sae
    feature_config, patch_config = plan.features, plan.patching
    steps = plan.to_dict()
    if config.ground_truth is not None:
        from afprobe.organisms import CheckConfig

        steps["ground_truth"] = asdict(CheckConfig(**config.ground_truth))

    with results_folder(out):
        if config.source is not None:
            atomic_write_text(out / "experiment.toml", config.source)
        atomic_write_json(
            out / "config.json",
            {"afprobe_version": __version__, "name": config.name, "out": config.out, "steps": steps},
        )

    t0 = time.perf_counter()
    if loaded is None:
        say(f"loading {job.model}...")
        loaded = job.load()
    for name, cache_config in stores.items():
        t0 = time.perf_counter()
        summary = run_cache(cache_config, loaded=loaded, progress=step_progress(f"cache {name}"))
        gap_folder = out / "stores" / Path(cache_config.out).name
        with results_folder(gap_folder):
            for file in ("gap.json", "per_query.csv"):
                if (Path(cache_config.out) / file).is_file():
                    shutil.copyfile(Path(cache_config.out) / file, gap_folder / file)
        written = summary.shards_written
        say(f"cache {name}: {cache_config.out} ({summary.n_prompts} prompts, {written} shards written)")
        finish(f"cache {name}", t0, skipped=written == 0, store=cache_config.out)

    if probe_config is not None:
        t0 = time.perf_counter()
        done = _already_done(out / "probes" / "metrics.json", probe_config)
        if not done:
            metrics = run_probes(probe_config)
            best = metrics["summary"]["best"]
            say(f"probes: best layer {best['layer']} at {best['position']} (AUROC {best['logistic_auroc']:.3f})")
        finish("probes", t0, skipped=done)
    if steer_config is not None:
        t0 = time.perf_counter()
        done = _already_done(out / "steering" / "steering.json", steer_config)
        if not done:
            run_steering(steer_config, loaded=loaded, progress=step_progress("steering"))
            say(f"steering: {steer_config.out}/steering.json")
        finish("steering", t0, skipped=done)
    if sae_config is not None:
        t0 = time.perf_counter()
        done = _already_done(out / "sae" / "afprobe_sae.json", sae_config)
        if not done:
            result = train_sae(sae_config, loaded=loaded)
            quality = result["quality_held_out"]
            say(
                f"sae: layer {sae_config.layer}, explained variance {quality['explained_variance']:.3f}, "
                f"L0 {quality['l0']:.1f}, dead {quality['dead_fraction']:.1%}"
            )
        finish("sae", t0, skipped=done)
    if feature_config is not None:
        t0 = time.perf_counter()
        done = _already_done(out / "sae-features" / "features.json", feature_config)
        if not done:
            output = run_feature_analysis(feature_config)
            for line in output["summary"]:
                say(f"features: {line}")
            first, second = output["tiers"]
            for row in output["features"][:10]:
                say(
                    f"  feature {row['feature']} [{row['group']}]: {first} - {second} {row['mean_difference']:+.4f} "
                    f"[{row['ci'][0]:+.4f}, {row['ci'][1]:+.4f}]"
                )
        finish("features", t0, skipped=done)
    if patch_config is not None:
        t0 = time.perf_counter()
        done = _already_done(out / "patching" / "patch.json", patch_config)
        if not done:
            output = run_patching(patch_config, loaded=loaded, progress=step_progress("patching"))
            for line in format_patch_summary(output).splitlines():
                say(f"patching: {line}")
        finish("patching", t0, skipped=done)

    if config.ground_truth is not None:
        from afprobe.organisms import CheckConfig, check_organism, format_ground_truth_lines, write_ground_truth

        t0 = time.perf_counter()
        check_config = CheckConfig(**config.ground_truth)
        done = _already_done(out / "ground_truth" / "ground_truth.json", check_config)
        if not done:
            truth = check_organism(loaded, check_config)
            write_ground_truth(truth, out / "ground_truth", loaded.fingerprint.to_dict())
            for line in format_ground_truth_lines(truth):
                say(f"ground truth: {line}")
        finish("ground_truth", t0, skipped=done)

    t0 = time.perf_counter()
    report, summary = write_report(out)
    say(f"report: {report} ({summary['bytes'] / 1e6:.1f} MB, {summary['n_figures']} figures)")
    finish("report", t0, path=str(report), bytes=summary["bytes"])
    record["seconds"] = time.perf_counter() - started
    record["report"] = str(report)
    with results_folder(out):
        atomic_write_json(out / "run.json", record)
    return record
