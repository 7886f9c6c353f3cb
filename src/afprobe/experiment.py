"""An experiment: one TOML config, the whole pipeline, one results folder.

`run_experiment(load_experiment("experiments/quickstart.toml"))` caches the activation stores, then trains probes,
steers, trains an SAE and groups its features, patches, and writes the report. Each table of the TOML file holds the
options of one step, named as in that step's config (`afprobe.store.cache_job.CacheConfig`, `ProbeConfig`,
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
stores = ["situational-awareness-v2", "negation-control", "benign", "tag-only"]

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
filled in), one folder per step (`probes/`, `steering/`, `sae/`, `sae-features/`, `patching/`, `verdict/`),
`stores/` (each store's `gap.json` and `per_query.csv`), `run.json` (what ran, what was already done, seconds per
step) and `report.html`, which opens with the verdict. Running the same file again resumes: stores finish their
missing shards, and a step whose output exists with the same config is not run again.
"""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from afprobe import __version__
from afprobe.artefacts import BY_KIND, PER_QUERY_CSV, experiment_file
from afprobe.errors import AfprobeError
from afprobe.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    folder_lock,
    results_folder,
    verify_folder,
)
from afprobe.model.job import PairedPromptJob
from afprobe.model.loading import LoadedModel
from afprobe.store.cache_job import CacheConfig, run_cache

# Extra stores an experiment can cache beside the main one: name -> (suffix of the store's path, what changes).
EXTRA_STORES: dict[str, tuple[str, dict[str, Any]]] = {
    "situational-awareness": ("-sa", {"dataset": "situational-awareness", "n": None}),
    "situational-awareness-v2": ("-sa2", {"dataset": "situational-awareness-v2", "n": None}),
    "negation-control": ("-negation", {"dataset": "negation-control", "n": None}),
    "benign": ("-benign", {"dataset": "benign"}),
    "tag-only": ("-tag-only", {"variant": "tag-only"}),
}


@dataclass(frozen=True)
class AnalysisStep:
    """One analysis step: its TOML table (also its attribute of `ExperimentPlan`), its config class, the options the
    runner sets itself, the result that says it is done (`afprobe.artefacts`), and how to run it."""

    name: str
    artefact: str
    config_class: Callable[[], type]  # imported on use: analyses load heavy libraries
    set_by_run: frozenset[str]
    run: Callable[[Any, LoadedModel, Callable[[int, int], None] | None, Path], list[str]]  # -> lines to log


def _probe_config() -> type:
    from afprobe.analysis.probes import ProbeConfig

    return ProbeConfig


def _steer_config() -> type:
    from afprobe.analysis.steering import SteerConfig

    return SteerConfig


def _sae_config() -> type:
    from afprobe.analysis.sae import SAETrainConfig

    return SAETrainConfig


def _feature_config() -> type:
    from afprobe.analysis.sae_features import FeatureConfig

    return FeatureConfig


def _patch_config() -> type:
    from afprobe.analysis.patching import PatchConfig

    return PatchConfig


def _verdict_config() -> type:
    from afprobe.analysis.mechanism import VerdictConfig

    return VerdictConfig


def _check_config() -> type:
    from afprobe.analysis.organisms.ground_truth import CheckConfig

    return CheckConfig


def _run_probes(config: Any, loaded: LoadedModel, progress: Any, folder: Path) -> list[str]:
    from afprobe.analysis.probes import run_probes

    best = run_probes(config).best
    return [f"probes: best layer {best['layer']} at {best['position']} (AUROC {best['logistic_auroc']:.3f})"]


def _run_steering(config: Any, loaded: LoadedModel, progress: Any, folder: Path) -> list[str]:
    from afprobe.analysis.steering import run_steering

    run_steering(config, loaded=loaded, progress=progress)
    return [f"steering: {config.out}/steering.json"]


def _run_sae(config: Any, loaded: LoadedModel, progress: Any, folder: Path) -> list[str]:
    from afprobe.analysis.sae import train_sae

    quality = train_sae(config, loaded=loaded).quality_held_out
    return [
        f"sae: layer {config.layer}, explained variance {quality['explained_variance']:.3f}, "
        f"L0 {quality['l0']:.1f}, dead {quality['dead_fraction']:.1%}"
    ]


def _run_features(config: Any, loaded: LoadedModel, progress: Any, folder: Path) -> list[str]:
    from afprobe.analysis.sae_features import run_feature_analysis

    output = run_feature_analysis(config)
    lines = [f"features: {line}" for line in output.summary]
    first, second = output.tiers
    for row in output.features[:10]:
        lines.append(
            f"  feature {row['feature']} [{row['group']}]: {first} - {second} {row['mean_difference']:+.4f} "
            f"[{row['ci'][0]:+.4f}, {row['ci'][1]:+.4f}]"
        )
    return lines


def _run_patching(config: Any, loaded: LoadedModel, progress: Any, folder: Path) -> list[str]:
    from afprobe.analysis.patching import format_patch_summary, run_patching

    output = run_patching(config, loaded=loaded, progress=progress)
    return [f"patching: {line}" for line in format_patch_summary(output).splitlines()]


def _run_verdict(config: Any, loaded: LoadedModel, progress: Any, folder: Path) -> list[str]:
    from afprobe.analysis.mechanism import format_verdict_run, run_verdict

    run = run_verdict(config, loaded=loaded, progress=progress)
    return [f"verdict: {line}" for line in format_verdict_run(run).splitlines()]


def _run_ground_truth(config: Any, loaded: LoadedModel, progress: Any, folder: Path) -> list[str]:
    from afprobe.analysis.organisms.ground_truth import check_organism, format_ground_truth_lines, write_ground_truth

    truth = check_organism(loaded, config)
    write_ground_truth(truth, folder, loaded.fingerprint.to_dict())
    return [f"ground truth: {line}" for line in format_ground_truth_lines(truth)]


_JOB_FIELDS = frozenset(f.name for f in fields(PairedPromptJob))

# In the order they run (after the stores are cached, before the report).
ANALYSIS_STEPS: tuple[AnalysisStep, ...] = (
    AnalysisStep(
        "probes",
        "probes",
        _probe_config,
        frozenset({"cache", "out", "sa_cache", "benign_cache", "negation_cache"}),
        _run_probes,
    ),
    AnalysisStep(
        "steering",
        "steering",
        _steer_config,
        frozenset({"directions", "out"}) | (_JOB_FIELDS - {"n", "batch_size"}),
        _run_steering,
    ),
    AnalysisStep("sae", "sae", _sae_config, frozenset({"caches", "out", "model"}), _run_sae),
    AnalysisStep(
        "features",
        "features",
        _feature_config,
        frozenset({"sae", "cache", "layer", "out", "sa_cache", "tag_only_cache", "benign_cache"}),
        _run_features,
    ),
    AnalysisStep(
        "patching",
        "patching",
        _patch_config,
        frozenset({"directions", "out", "sae_features"}) | (_JOB_FIELDS - {"n"}),
        _run_patching,
    ),
    AnalysisStep("verdict", "verdict", _verdict_config, frozenset({"out"}) | (_JOB_FIELDS - {"n"}), _run_verdict),
    AnalysisStep("ground_truth", "ground_truth", _check_config, frozenset(), _run_ground_truth),
)
STEPS = ("cache", *(step.name for step in ANALYSIS_STEPS), "report")
STEPS_READING_STORES = frozenset({"probes", "sae", "features"})


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
    verdict: dict[str, Any] | None = None  # `afprobe.analysis.mechanism.VerdictConfig` options
    # `afprobe.analysis.organisms.ground_truth.CheckConfig` options: behavioural ground truth
    ground_truth: dict[str, Any] | None = None
    models: dict[str, dict[str, Any]] | None = None  # name -> [job] overrides: one whole run per model
    # `afprobe.analysis.organisms.zoo.ZooConfig` options: build, check and score the organism zoo with [verdict]
    zoo: dict[str, Any] | None = None
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
        "verdict",
        "ground_truth",
        "models",
        "zoo",
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
    tables: dict[str, dict[str, Any] | None] = {}
    for step in ANALYSIS_STEPS:
        table = data.get(step.name)
        if table is not None:
            _check_keys(table, _names(step.config_class()) - step.set_by_run, step.name, str(path))
        tables[step.name] = None if table is None else dict(table)
    models = data.get("models")
    if models is not None:
        if not isinstance(models, dict) or not models or not all(isinstance(v, dict) for v in models.values()):
            raise AfprobeError(f'[models] in {path} must be tables like `token = {{adapter = "organism:token"}}`')
        for model_name, overrides in models.items():
            _check_keys(overrides, _names(PairedPromptJob), f"models.{model_name}", str(path))
    if tables["features"] is not None and tables["sae"] is None:
        raise AfprobeError(f"[features] in {path} needs an [sae] table: the features are that SAE's")
    zoo = data.get("zoo")
    if zoo is not None:
        from afprobe.analysis.organisms.zoo import ZooConfig

        _check_keys(zoo, _names(ZooConfig) - {"out", "model"}, "zoo", str(path))
        others = sorted(name for name, table in tables.items() if table is not None and name != "verdict")
        if others or models is not None or data.get("cache"):
            raise AfprobeError(
                f"[zoo] in {path} runs on its own with [job] (the base model) and [verdict] (every organism's "
                f"verdict options): move {', '.join(others or ['[models]/[cache]'])} to another file"
            )
        if tables["verdict"] is None:
            raise AfprobeError(f"[zoo] in {path} needs a [verdict] table: the options every organism is scored with")
    return ExperimentConfig(
        name=name,
        out=str(data.get("out") or f"results/{name}"),
        activations=str(data.get("activations") or f"activations/{name}"),
        job=job,
        cache=cache,
        source=text,
        models=None if models is None else {k: dict(v) for k, v in models.items()},
        zoo=None if zoo is None else dict(zoo),
        **tables,
    )


def _already_done(path: Path, config: Any) -> bool:
    """True when `path` exists, was written with this exact config and its folder is intact (so the step need not
    run again; a step whose files fail their checksums runs again)."""
    if not path.is_file() or verify_folder(path.parent):
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
    verdict: Any = None
    ground_truth: Any = None

    def to_dict(self) -> dict[str, Any]:
        steps: dict[str, Any] = {"cache": {name: asdict(c) for name, c in self.stores.items()}}
        for step in ANALYSIS_STEPS:
            if getattr(self, step.name) is not None:
                steps[step.name] = asdict(getattr(self, step.name))
        return steps


def plan_experiment(config: ExperimentConfig) -> ExperimentPlan:
    """Each step's config: the file's options, the folders the run chooses, and the defaults."""
    from afprobe.analysis.patching import PatchConfig
    from afprobe.analysis.probes import ProbeConfig
    from afprobe.analysis.sae import SAETrainConfig
    from afprobe.analysis.sae_features import FeatureConfig
    from afprobe.analysis.steering import SteerConfig

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
    sa = stores.get("situational-awareness-v2") or stores.get("situational-awareness")
    negation = stores.get("negation-control")
    benign = stores.get("benign")
    tag_only = stores.get("tag-only")

    probe_config = steer_config = sae_config = feature_config = patch_config = None
    if config.probes is not None:
        probe_config = ProbeConfig(
            cache=main_cache.out,
            out=str(_step_folder("probes", out)),
            sa_cache=sa.out if sa else None,
            benign_cache=benign.out if benign else None,
            negation_cache=negation.out if negation else None,
            **config.probes,
        )
    directions = probe_config.out if probe_config is not None else None
    if config.steering is not None:
        if directions is None:
            raise AfprobeError("[steering] needs a [probes] table: it steers along the probes' directions")
        # Steering and patching evaluate: their own n, and the evaluation half of the queries (their default split).
        shared = {k: v for k, v in asdict(job).items() if k not in ("n", "split") and k not in config.steering}
        steer_config = SteerConfig(
            **shared, directions=directions, out=str(_step_folder("steering", out)), **config.steering
        )
    if config.sae is not None:
        sae_config = SAETrainConfig(
            caches=tuple(c.out for c in stores.values()),
            out=str(_step_folder("sae", out)),
            model=job.model,
            **config.sae,
        )
    if config.features is not None and sae_config is not None:
        feature_config = FeatureConfig(
            sae=sae_config.out,
            cache=main_cache.out,
            layer=sae_config.layer,
            out=str(_step_folder("features", out)),
            sa_cache=sa.out if sa else None,
            tag_only_cache=tag_only.out if tag_only else None,
            benign_cache=benign.out if benign else None,
            **config.features,
        )
    if config.patching is not None:
        shared = {k: v for k, v in asdict(job).items() if k not in ("n", "split") and k not in config.patching}
        patch_config = PatchConfig(
            **shared,
            directions=directions,
            sae_features=feature_config.out if feature_config is not None else None,
            out=str(_step_folder("patching", out)),
            **config.patching,
        )

    verdict_config = None
    if config.verdict is not None:
        # Evaluates like patching: its own n, the evaluation half (the fitting half is its own to learn from).
        shared = {k: v for k, v in asdict(job).items() if k not in ("n", "split") and k not in config.verdict}
        verdict_config = _verdict_config()(**shared, out=str(_step_folder("verdict", out)), **config.verdict)

    check_config = None
    if config.ground_truth is not None:
        check_config = _check_config()(**config.ground_truth)
    return ExperimentPlan(
        job, stores, probe_config, steer_config, sae_config, feature_config, patch_config, verdict_config, check_config
    )


def _step_folder(step: str, out: Path) -> Path:
    return experiment_file(step, out).parent


def run_experiment(
    config: ExperimentConfig,
    *,
    loaded: LoadedModel | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run every step the config names, in order; returns what run.json holds.

    only: run just these analysis steps (their configs as the file gives them; the stores are cached only when a
    chosen step reads them: probes, sae, features), then the comparison and the report.

    With a [models] table, the whole pipeline runs once per model into `out/NAME/` (stores in
    `activations-NAME`), then `comparison.json` sets the models side by side (`afprobe.analysis.organisms`)
    and one report covers them all. progress(step, done, total) reports long steps; log(line) one line per step
    (the CLI prints them). The results folder is locked for the whole run: a second run into it is refused."""
    chosen = None if only is None else frozenset(only)
    unknown = sorted((chosen or frozenset()) - {step.name for step in ANALYSIS_STEPS})
    if unknown:
        raise AfprobeError(
            f"unknown step {', '.join(unknown)} in --only: choose from {', '.join(s.name for s in ANALYSIS_STEPS)}"
        )
    absent = sorted(name for name in chosen or () if getattr(config, name) is None)
    if absent:
        raise AfprobeError(f"--only {', '.join(absent)}: {config.name} has no [{absent[0]}] table to run")
    with folder_lock(Path(config.out), f"afprobe run {config.name}"):
        return _run_locked(config, loaded=loaded, progress=progress, log=log, only=chosen)


def _run_locked(
    config: ExperimentConfig,
    *,
    loaded: LoadedModel | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    only: frozenset[str] | None = None,
) -> dict[str, Any]:
    if config.zoo is not None:
        return _run_zoo(config, log=log, progress=progress)
    if config.models is None:
        return _run_one(config, loaded=loaded, progress=progress, log=log, only=only)
    from afprobe.analysis.organisms.comparison import write_comparison
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
            only=only,
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


def _run_zoo(
    config: ExperimentConfig,
    *,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """The organism zoo (`afprobe.analysis.organisms.zoo`): [job] names the base model, [verdict] the options every
    organism is scored with; zoo.json and the report go into `out`."""
    from afprobe.analysis.organisms.zoo import ZooConfig, run_zoo
    from afprobe.report import write_report

    say = log or (lambda line: None)
    out = Path(config.out)
    started = time.perf_counter()
    with results_folder(out):
        if config.source is not None:
            atomic_write_text(out / "experiment.toml", config.source)
    job = PairedPromptJob(**config.job)
    zoo_config = ZooConfig(**{**(config.zoo or {}), "out": config.out, "model": job.model})
    run = run_zoo(zoo_config, dict(config.verdict or {}), log=say, progress=progress)
    for line in run.summary:
        say(f"zoo: {line}")
    report, summary = write_report(out)
    say(f"report: {report} ({summary['bytes'] / 1e6:.1f} MB, {summary['n_figures']} figures)")
    record = {
        "afprobe_version": __version__,
        "name": config.name,
        "zoo": str(out / "zoo.json"),
        "report": str(report),
        "seconds": time.perf_counter() - started,
    }
    with results_folder(out):
        atomic_write_json(out / "run.json", record)
    return record


def _run_one(
    config: ExperimentConfig,
    *,
    loaded: LoadedModel | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    only: frozenset[str] | None = None,
) -> dict[str, Any]:
    from afprobe.report import write_report

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
    steps = plan.to_dict()

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
    if only is not None and not only & STEPS_READING_STORES:
        stores = {}
    for name, cache_config in stores.items():
        t0 = time.perf_counter()
        summary = run_cache(cache_config, loaded=loaded, progress=step_progress(f"cache {name}"))
        gap_folder = out / BY_KIND["gap"].folder / Path(cache_config.out).name
        with results_folder(gap_folder):
            for file in (BY_KIND["gap"].file, PER_QUERY_CSV):
                if (Path(cache_config.out) / file).is_file():
                    atomic_write_bytes(gap_folder / file, (Path(cache_config.out) / file).read_bytes())
        written = summary.shards_written
        say(f"cache {name}: {cache_config.out} ({summary.n_prompts} prompts, {written} shards written)")
        finish(f"cache {name}", t0, skipped=written == 0, store=cache_config.out)

    for step in ANALYSIS_STEPS:
        step_config = getattr(plan, step.name)
        if step_config is None or (only is not None and step.name not in only):
            continue
        t0 = time.perf_counter()
        result = experiment_file(step.artefact, out)
        done = _already_done(result, step_config)
        if not done:
            for line in step.run(step_config, loaded, step_progress(step.name), result.parent):
                say(line)
        finish(step.name, t0, skipped=done)

    t0 = time.perf_counter()
    report, summary = write_report(out)
    say(f"report: {report} ({summary['bytes'] / 1e6:.1f} MB, {summary['n_figures']} figures)")
    finish("report", t0, path=str(report), bytes=summary["bytes"])
    record["seconds"] = time.perf_counter() - started
    record["report"] = str(report)
    with results_folder(out):
        atomic_write_json(out / "run.json", record)
    return record
