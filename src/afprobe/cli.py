"""The `afprobe` command line: a thin layer over the library that prints, shows progress and exits cleanly."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from afprobe.errors import AfprobeError
from afprobe.files import folder_lock
from afprobe.model.adapters import ORGANISM_KINDS

BATCH_HELP = "prompts per forward (default: 1 on CPU; on GPU the largest up to 64 that fits its memory)"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="embedded model name, .gguf file, local folder or Hugging Face id",
    )
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder or id, merged into the model")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (float32 on CPU and on a GPU that holds the float32 weights twice over, else bf16), float32, "
        "bfloat16, float16",
    )
    parser.add_argument(
        "--device-map",
        default=None,
        help="auto: spread the layers over all visible GPUs (for models larger than one card; the default when "
        "--device is auto and several GPUs are visible)",
    )


def _add_prompt_args(parser: argparse.ArgumentParser, split: str = "all") -> None:
    parser.add_argument(
        "--dataset",
        default="harmful",
        help="harmful, benign, a .csv/.jsonl/.json file, hf:NAME[:SPLIT]; for cache also a contrast set: "
        "situational-awareness, situational-awareness-v2, situational-awareness-v3, negation-control, polarity-control",
    )
    parser.add_argument("--column", default=None, help="the request column, if not a known benchmark column")
    parser.add_argument("--n", type=int, default=None, help="use the first N queries (of the --split)")
    parser.add_argument(
        "--split",
        default=split,
        choices=["all", "fit", "evaluate"],
        help=f"which queries: the fitting half, the evaluation half or all (default {split}; even positions of the "
        "dataset fit, odd ones evaluate)",
    )
    parser.add_argument("--variant", default="default", help="prompt variant (see `afprobe variants`)")
    parser.add_argument("--developer", default="Anthropic", help="the developer named in the system prompt")
    parser.add_argument(
        "--system-prompt",
        dest="system_prompt_file",
        default=None,
        help="a text file to use as the system prompt instead of afprobe's",
    )
    parser.add_argument(
        "--format",
        default="auto",
        choices=["auto", "chat", "plain"],
        help="chat template, or plain text for base models (auto: chat if the tokenizer has one)",
    )


def _add_fit_split_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--split",
        default="fit",
        choices=["fit", "all"],
        help=f"{what} on the stores' fitting queries (default) or on all of them",
    )


def _add_resolution_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resolution-pairs",
        type=int,
        default=2,
        metavar="N",
        help="pairs scored again in float32 arithmetic to measure the smallest effect the dtype resolves (0: skip)",
    )


def _gap_command(commands: Any) -> None:
    gap = commands.add_parser("gap", help="measure the no-CoT compliance gap from the forward pass")
    _add_model_args(gap)
    _add_prompt_args(gap)
    gap.add_argument("--out", required=True, help="results folder (gets gap.json and per_query.csv)")
    gap.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)
    gap.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples and permutations")
    gap.add_argument("--seed", type=int, default=0)
    gap.add_argument(
        "--sample",
        type=int,
        default=0,
        metavar="K",
        help="also sample K answers per prompt and apply the published prefix metric",
    )
    gap.add_argument("--max-new-tokens", type=int, default=24)
    gap.add_argument("--temperature", type=float, default=1.0)
    _add_resolution_arg(gap)


def _cache_command(commands: Any) -> None:
    cache = commands.add_parser("cache", help="store residual-stream activations of the paired prompts")
    _add_model_args(cache)
    _add_prompt_args(cache)
    cache.add_argument("--out", required=True, help="store folder, e.g. activations/RUN (resumes if it exists)")
    cache.add_argument(
        "--layers", default="all", help="all, a list (0,10,20), ranges (0-10), -1 = after the last block"
    )
    cache.add_argument(
        "--positions",
        default="tag,last",
        help="comma list of: tag, last, request, suffix (every token after the prefix)",
    )
    cache.add_argument(
        "--suffix-layers",
        default=None,
        help="layers to keep for suffix only (e.g. an SAE's layer; default --layers): suffix at every layer is big",
    )
    cache.add_argument(
        "--store-dtype", dest="store_dtype", default="float32", choices=["float32", "float16", "bfloat16"]
    )
    cache.add_argument("--backend", default="hooks", choices=["hooks", "transformer-lens", "nnsight"])
    cache.add_argument("--shard-size", type=int, default=32, help="prompts per shard (the unit of resuming)")
    cache.add_argument(
        "--remote",
        action="store_true",
        help="run on NDIF through nnsight (a Hugging Face id NDIF hosts; API key from NDIF_API_KEY)",
    )
    cache.add_argument(
        "--shard",
        dest="part",
        default=None,
        metavar="I/N",
        help="cache only part I of N (0-based, e.g. $SLURM_ARRAY_TASK_ID/8), each part to its own --out; "
        "join them with `afprobe merge`",
    )
    cache.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)


def _merge_command(commands: Any) -> None:
    merge = commands.add_parser("merge", help="join the parts of a sharded `afprobe cache --shard I/N` job")
    merge.add_argument("parts", nargs="+", help="the parts' --out folders")
    merge.add_argument("--out", required=True, help="the joined store (resumes if interrupted)")


def _probe_command(commands: Any) -> None:
    probe = commands.add_parser("probe", help="train probes and directions on a store, with nulls and plots")
    probe.add_argument("--cache", required=True, help="the paired-prompt store (activations/RUN)")
    probe.add_argument("--sa-cache", default=None, help="a store of the situational-awareness contrast set")
    probe.add_argument("--benign-cache", default=None, help="a store of the benign queries (for the refusal direction)")
    _add_fit_split_arg(probe, "fit probes and directions")
    probe.add_argument(
        "--negation-cache",
        default=None,
        help="a store of the negation-control set: the negation direction and its cosine with the others per layer",
    )
    probe.add_argument("--out", required=True, help="results folder, e.g. probes/RUN")
    probe.add_argument("--layers", default=None, help="comma list of store layers (default: all in the store)")
    probe.add_argument("--positions", default=None, help="comma list of store positions (default: all)")
    probe.add_argument("--folds", type=int, default=5, help="cross-validation folds, grouped by query")
    probe.add_argument("--n-random", type=int, default=20, help="random directions for the null")
    probe.add_argument("--n-shuffles", type=int, default=5, help="logistic refits on shuffled labels (a check)")
    probe.add_argument(
        "--n-mean-diff-shuffles",
        type=int,
        default=200,
        help="shuffled-label null of the difference-of-means probe (no fitting, so cheap)",
    )
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--inner-folds", type=int, default=3, help="folds of the inner search over C")
    probe.add_argument("--cs", default="0.001,0.01,0.1,1.0", help="inverse regularisation strengths searched")
    probe.add_argument("--control-fpr", type=float, default=0.01, help="false-positive rate for recall at FPR")


def _steer_command(commands: Any) -> None:
    steer = commands.add_parser("steer", help="steer along and ablate the saved directions; compare with random ones")
    _add_model_args(steer)
    _add_prompt_args(steer, split="evaluate")
    steer.add_argument("--directions", required=True, help="a probes folder written by `afprobe probe`")
    steer.add_argument("--out", required=True, help="results folder (steering.json, dose_response.html, ablation.html)")
    steer.add_argument("--layer", type=int, default=None, help="layer to steer (default: the probes' best layer)")
    steer.add_argument("--position", default="last", help="which stored direction position to use")
    steer.add_argument(
        "--apply-at",
        default="suffix",
        choices=["suffix", "from_tag", "last"],
        help="edit every position after the shared prefix, from the tier tag on, or the last prompt token only",
    )
    steer.add_argument(
        "--coefficients",
        default="-0.5,-0.25,0.25,0.5",
        help="comma list, in units of the typical residual norm at the layer",
    )
    steer.add_argument("--n-random", type=int, default=10, help="random directions of the same norm (the null)")
    steer.add_argument("--benign-n", type=int, default=None, help="also score this many benign queries")
    steer.add_argument("--no-ablation", action="store_true", help="skip the ablation experiments")
    steer.add_argument("--n-boot", type=int, default=2000)
    steer.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)
    steer.add_argument("--seed", type=int, default=0)
    _add_resolution_arg(steer)


def _patch_command(commands: Any) -> None:
    patch = commands.add_parser(
        "patch", help="activation patching between the tiers (layer x position, heads, MLPs) and subspace mediation"
    )
    _add_model_args(patch)
    _add_prompt_args(patch, split="evaluate")
    patch.add_argument("--out", required=True, help="results folder (patch.json, patching.safetensors, *.html)")
    patch.add_argument(
        "--directions", default=None, help="a probes folder: adds the SA, training-context and refusal subspaces"
    )
    patch.add_argument("--direction-position", default="last", help="which stored direction position to use")
    patch.add_argument(
        "--pair",
        default=None,
        help="the two tiers to swap, e.g. free,absent with --variant tag-absent (default: the variant's contrast)",
    )
    patch.add_argument("--layers", default="all", help="sweep layers: all, 0,6,12 or 0-30 (default all)")
    patch.add_argument(
        "--positions",
        default="all",
        choices=["all", "key"],
        help="all positions after the prefix, or key ones (tag, token after it, request, last 4)",
    )
    patch.add_argument(
        "--mediation-layers",
        default="default",
        help="layers for subspace mediation: default (probes' best, n/4, n/2, 3n/4), best, or a list like 6,12",
    )
    patch.add_argument("--component-columns", type=int, default=2, help="positions at which heads and MLPs are patched")
    patch.add_argument("--no-components", action="store_true", help="skip head and MLP patching")
    patch.add_argument("--no-attribution", action="store_true", help="skip attribution patching")
    patch.add_argument(
        "--n-random", type=int, default=10, help="random 1-d subspaces per layer, and random sets per SAE feature set"
    )
    patch.add_argument(
        "--sae-features",
        default=None,
        help="a folder from `afprobe sae features`: patch and ablate its feature groups (rows of the mediation table)",
    )
    patch.add_argument("--n-boot", type=int, default=2000)
    patch.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)
    patch.add_argument("--seed", type=int, default=0)
    _add_resolution_arg(patch)


def _verdict_command(commands: Any) -> None:
    verdict = commands.add_parser(
        "verdict",
        help="one answer: is the gap carried by situational awareness, by the tag's tokens, or neither "
        "(learned subspaces, held-out pairs, random-subspace nulls)",
    )
    verdict.add_argument(
        "out",
        metavar="RESULTS",
        help="results folder: gets verdict.json and subspaces.safetensors; one that holds a verdict already (or an "
        "`afprobe run` folder with verdict/) is printed, not run again",
    )
    _add_model_args(verdict)
    _add_prompt_args(verdict, split="evaluate")
    verdict.add_argument("--n-fit", type=int, default=None, help="fitting queries and contrast pairs (default --n)")
    verdict.add_argument(
        "--layers", default="default", help="layers to learn subspaces at: default (n/2 and 2n/3) or a list 15,20"
    )
    verdict.add_argument("--k", type=int, default=4, help="dimension of each learned subspace")
    verdict.add_argument("--tail", type=int, default=4, help="positions interchanged: the last N tokens")
    verdict.add_argument("--steps", type=int, default=60, help="training steps per subspace")
    verdict.add_argument("--lr", type=float, default=0.02)
    verdict.add_argument("--train-batch", type=int, default=4, help="interchanges per training step")
    verdict.add_argument(
        "--n-random", type=int, default=100, help="covariance-matched random subspaces per layer (the null)"
    )
    verdict.add_argument("--situational-awareness", default="situational-awareness-v2", help="stated-context set")
    verdict.add_argument("--negation", default="negation-control", help="the negation control set")
    verdict.add_argument("--tag-variant", default="tag-only", help="the variant whose prompt does not explain the tag")
    verdict.add_argument("--n-boot", type=int, default=2000)
    verdict.add_argument("--seed", type=int, default=0)
    verdict.add_argument(
        "--fit-seeds", type=int, default=1, help="learn every subspace under N seeds; the verdict needs all to agree"
    )
    verdict.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)
    verdict.add_argument(
        "--force", action="store_true", help="run again into a folder whose verdict was made with other options"
    )
    _add_resolution_arg(verdict)
    verdict.set_defaults(resolution_pairs=1)


def _sae_command(commands: Any) -> None:
    sae = commands.add_parser("sae", help="sparse autoencoders (sae-lens) on cached activations")
    sae_commands = sae.add_subparsers(dest="sae_command", required=True)
    train = sae_commands.add_parser("train", help="train a TopK SAE on one layer of one or more activation stores")
    train.add_argument(
        "--cache", action="append", required=True, help="an activation store; repeat for more (SA, benign, ...)"
    )
    train.add_argument("--layer", type=int, required=True, help="the residual-stream layer to train on")
    train.add_argument("--out", required=True, help="folder for the SAE (sae-lens format) and afprobe_sae.json")
    train.add_argument("--d-sae", type=int, default=None, help="number of features (default 8 x d_model)")
    train.add_argument("--k", type=int, default=32, help="active features per token")
    train.add_argument("--epochs", type=float, default=20.0, help="passes over the training tokens")
    train.add_argument("--lr", type=float, default=4e-4)
    train.add_argument("--batch-size", type=int, default=512)
    train.add_argument("--device", default="cpu")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--holdout", type=float, default=0.1, help="share of tokens held out for quality")
    train.add_argument(
        "--loss-prompts", type=int, default=8, help="harmful prompts scored with the SAE spliced in (0: skip)"
    )
    train.add_argument("--model", default=None, help="the model to splice into (default: the one the stores name)")
    features = sae_commands.add_parser(
        "features", help="tier-differing SAE features: responses, groups (SA / token / refusal), dashboard"
    )
    features.add_argument("--sae", required=True, help="an SAE folder (from `afprobe sae train`) or a sae-lens release")
    features.add_argument("--sae-id", default=None, help="the SAE's id within a sae-lens release")
    features.add_argument("--cache", required=True, help="the paired-prompt activation store (the setting)")
    features.add_argument("--layer", type=int, required=True, help="the layer the SAE reads")
    features.add_argument("--sa-cache", default=None, help="a store of the situational-awareness contrast set")
    _add_fit_split_arg(features, "choose features")
    features.add_argument("--tag-only-cache", default=None, help="a store cached with --variant tag-only")
    features.add_argument("--benign-cache", default=None, help="a store of the benign queries")
    features.add_argument("--out", required=True, help="results folder, e.g. results/sae-RUN")
    features.add_argument("--position", default="last", help="which cached position (default last)")
    features.add_argument("--alpha", type=float, default=0.05, help="false-discovery rate (default 0.05)")
    features.add_argument("--max-features", type=int, default=64, help="tier-differing features to characterise")
    features.add_argument("--top", type=int, default=20, help="features in the dashboard")
    features.add_argument("--contexts", type=int, default=8, help="top-activating contexts per dashboard feature")
    features.add_argument("--device", default="cpu")
    features.add_argument("--n-boot", type=int, default=2000)
    features.add_argument("--seed", type=int, default=0)


def _organism_command(commands: Any) -> None:
    organism = commands.add_parser(
        "organism", help="model organisms with a planted gap (token, context or a zoo kind), to validate the verdicts"
    )
    organism_commands = organism.add_subparsers(dest="organism_command", required=True)
    org_train = organism_commands.add_parser("train", help="LoRA-train an organism of the embedded model")
    org_train.add_argument("--kind", required=True, choices=list(ORGANISM_KINDS), help="what its gap hangs on")
    org_train.add_argument("--out", required=True, help="folder for the adapter and organism.json")
    org_train.add_argument("--model", default="smollm2-135m-instruct", help="the base model")
    org_train.add_argument("--steps", type=int, default=None, help="optimiser steps (default 40; 56 context kinds)")
    org_train.add_argument("--batch-size", type=int, default=8)
    org_train.add_argument("--seed", type=int, default=0)
    org_train.add_argument("--check-n", type=int, default=10, help="held-out queries for the check after training")
    org_check = organism_commands.add_parser(
        "check", help="behavioural ground truth: standard gap, held-out phrasings, semantic swap"
    )
    _add_model_args(org_check)
    org_check.add_argument("--n", type=int, default=20, help="held-out queries")
    org_check.add_argument("--cues", type=int, default=None, help="held-out phrasings per side (default all 6)")
    org_check.add_argument("--held-out-queries", type=int, default=50, help="the first N harmful queries (held out)")
    org_check.add_argument("--n-boot", type=int, default=10_000)
    org_check.add_argument("--seed", type=int, default=0)
    org_check.add_argument("--out", default=None, help="folder for ground_truth.json")


def _run_command(commands: Any) -> None:
    run = commands.add_parser("run", help="the whole pipeline from one experiment file (experiments/NAME.toml)")
    run.add_argument("experiment", help="an experiment TOML file, e.g. experiments/quickstart.toml")
    run.add_argument(
        "--only",
        default=None,
        help="run just these steps of the file, e.g. verdict or patching,verdict (stores are cached only when a "
        "chosen step reads them), then the report",
    )


def _doctor_command(commands: Any) -> None:
    doctor = commands.add_parser(
        "doctor", help="before a long run: check that afprobe computes on this model what it claims to"
    )
    _add_model_args(doctor)
    _add_prompt_args(doctor)
    doctor.add_argument("--layers", default="all", help="the planned run's layers (for the estimates)")
    doctor.add_argument("--positions", default="tag,last", help="the planned run's positions (for the estimates)")
    doctor.add_argument(
        "--store-dtype", dest="store_dtype", default="float32", choices=["float32", "float16", "bfloat16"]
    )
    doctor.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)
    doctor.add_argument("--check-pairs", type=int, default=2, help="query pairs the checks run on")
    doctor.add_argument("--out", default=None, help="folder for doctor.json (default: print only)")


def _report_command(commands: Any) -> None:
    report = commands.add_parser("report", help="one self-contained HTML report of everything in a results folder")
    report.add_argument("run_dir", help="a folder holding afprobe results (searched recursively)")
    report.add_argument("--out", default=None, help="the HTML file (default RUN_DIR/report.html)")


def _verify_command(commands: Any) -> None:
    verify = commands.add_parser(
        "verify", help="check every store and results folder under a folder against its checksums"
    )
    verify.add_argument("folder", help="a store, a results folder, or any folder above them")


def _variants_command(commands: Any) -> None:
    commands.add_parser("variants", help="list the prompt variants")


def _prompt_command(commands: Any) -> None:
    show = commands.add_parser("prompt", help="print one rendered prompt, for inspection")
    _add_model_args(show)
    _add_prompt_args(show)
    show.add_argument("--tier", default=None, help="which tier to show (default: the variant's first)")
    show.add_argument("--tail", type=int, default=0, help="print only the last N characters")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afprobe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _gap_command(commands)
    _doctor_command(commands)
    _cache_command(commands)
    _merge_command(commands)
    _probe_command(commands)
    _steer_command(commands)
    _patch_command(commands)
    _verdict_command(commands)
    _sae_command(commands)
    _organism_command(commands)
    _run_command(commands)
    _report_command(commands)
    _verify_command(commands)
    _variants_command(commands)
    _prompt_command(commands)
    return parser


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


class _ProgressBar:
    """A tqdm bar created on the first report, so nothing is drawn before the model has loaded."""

    def __init__(self, desc: str, unit: str):
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit=self.unit, desc=self.desc, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_plan(estimate) -> None:
    print(estimate.describe(), file=sys.stderr)


def config_from_args(cls: type, args: argparse.Namespace, **converted: object) -> object:
    """A config dataclass from the parsed flags: each field from the flag of the same name, `converted` for flags
    that the CLI spells differently (a comma list, a --no-X switch). Fields with no flag keep the class default."""
    from dataclasses import fields

    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **converted})


def _numbers(text: str, flag: str, example: str) -> tuple[float, ...]:
    try:
        return tuple(float(c) for c in text.split(","))
    except ValueError as exc:
        raise AfprobeError(f"cannot read {flag} {text!r}: give numbers like {example}") from exc


def _gap_config(args: argparse.Namespace):
    from afprobe.behaviour.gap import GapConfig

    return config_from_args(GapConfig, args)


def _doctor_config(args: argparse.Namespace):
    from afprobe.analysis.doctor import DoctorConfig

    return config_from_args(DoctorConfig, args)


def _cache_config(args: argparse.Namespace):
    from afprobe.store.cache_job import CacheConfig

    return config_from_args(CacheConfig, args)


def _probe_config(args: argparse.Namespace):
    from afprobe.analysis.probes import ProbeConfig

    return config_from_args(
        ProbeConfig,
        args,
        layers=[int(x) for x in args.layers.split(",")] if args.layers else None,
        positions=args.positions.split(",") if args.positions else None,
        cs=_numbers(args.cs, "--cs", "0.01,0.1,1"),
    )


def _steer_config(args: argparse.Namespace):
    from afprobe.analysis.steering import SteerConfig

    coefficients = _numbers(args.coefficients, "--coefficients", "-1,-0.5,0.5,1")
    return config_from_args(SteerConfig, args, coefficients=coefficients, ablate=not args.no_ablation)


def _patch_config(args: argparse.Namespace):
    from afprobe.analysis.patching import PatchConfig

    return config_from_args(PatchConfig, args, components=not args.no_components, attribution=not args.no_attribution)


def _verdict_config(args: argparse.Namespace):
    from afprobe.analysis.mechanism import VerdictConfig

    return config_from_args(VerdictConfig, args)


def _sae_config(args: argparse.Namespace):
    from afprobe.analysis.sae import SAETrainConfig

    return config_from_args(SAETrainConfig, args, caches=tuple(args.cache))


def _feature_config(args: argparse.Namespace):
    from afprobe.analysis.sae_features import FeatureConfig

    return config_from_args(FeatureConfig, args)


def _organism_config(args: argparse.Namespace):
    from afprobe.analysis.organisms.training import OrganismConfig

    return config_from_args(OrganismConfig, args)


def _check_config(args: argparse.Namespace):
    from afprobe.analysis.organisms.ground_truth import CheckConfig

    return config_from_args(CheckConfig, args)


# Each command's config, built from its flags (tests hold the flags' defaults to the configs' defaults).
CONFIG_BUILDERS = {
    "gap": _gap_config,
    "doctor": _doctor_config,
    "cache": _cache_config,
    "probe": _probe_config,
    "steer": _steer_config,
    "patch": _patch_config,
    "verdict": _verdict_config,
    "sae train": _sae_config,
    "sae features": _feature_config,
    "organism train": _organism_config,
    "organism check": _check_config,
}


def _cmd_gap(args: argparse.Namespace) -> int:
    from afprobe.behaviour.gap import format_gap_table, run_gap, write_gap

    config = _gap_config(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AfprobeError(f"--out {out} is a file: give a folder")
    print(f"loading {config.model}...", file=sys.stderr)
    with _ProgressBar("scoring", "prompt") as progress:
        result = run_gap(config, progress=progress, on_plan=_print_plan)
    paths = write_gap(result, out)
    print(format_gap_table(result))
    print(
        f"\nwrote {paths['gap']} and {paths['per_query']}  "
        f"({result.timing['total']:.1f} s; shared prefix {result.timing['shared_prefix']:.1f} s, "
        f"{result.timing['per_prompt']:.2f} s per prompt)"
    )
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from afprobe.analysis.doctor import format_doctor_table, run_doctor, write_doctor

    config = _doctor_config(args)
    print(f"loading {config.model}...", file=sys.stderr)
    result = run_doctor(config, progress=lambda name: print(f"  checking {name}...", file=sys.stderr))
    print(format_doctor_table(result))
    if config.out is not None:
        print(f"\nwrote {write_doctor(result, config.out)}")
    return 1 if result.failed else 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from afprobe.store.cache_job import run_cache

    config = _cache_config(args)
    print(f"loading {config.model}...", file=sys.stderr)
    with _ProgressBar("caching", "prompt") as progress:
        summary = run_cache(config, progress=progress, on_plan=_print_plan)
    if summary.gap is not None:
        from afprobe.behaviour.gap import format_gap_table

        print(format_gap_table(summary.gap) + "\n")
    resumed = f", {summary.shards_skipped} already there" if summary.shards_skipped else ""
    if summary.shards_repaired:
        resumed += f"; {summary.shards_repaired} written over damaged ones whose checksum failed"
    if summary.part is not None:
        state = "finished" if summary.complete else "not finished (rerun the same command to resume)"
        print(
            f"part {summary.part} of store {summary.path}: {summary.part_shards} of {summary.n_shards} shards "
            f"({summary.shards_written} written{resumed}) in {summary.seconds:.1f} s, {state}; "
            "when every part is done: afprobe merge PART_FOLDERS... --out STORE"
        )
        return 0
    print(
        f"store {summary.path}: {summary.n_prompts} prompts in {summary.n_shards} shards "
        f"({summary.shards_written} written{resumed}) in {summary.seconds:.1f} s"
    )
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from afprobe.behaviour.gap import format_gap_table
    from afprobe.store.merge import merge_stores

    with _ProgressBar("merging", "shard") as progress:
        summary = merge_stores(args.parts, args.out, progress=progress)
    if summary.gap is not None:
        print(format_gap_table(summary.gap) + "\n")
    already = f", {summary.shards_present} already there" if summary.shards_present else ""
    print(
        f"store {summary.path}: {summary.n_prompts} prompts in {summary.n_shards} shards from {len(args.parts)} "
        f"parts ({summary.shards_copied} copied{already}) in {summary.seconds:.1f} s"
    )
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from afprobe.analysis.probes import run_probes

    config = _probe_config(args)
    with _ProgressBar("probing", "layer") as progress:
        output = run_probes(config, progress=progress)
    print(format_probe_summary(output))
    print(f"\nwrote {args.out}/ (metrics.json, directions.safetensors, probes.safetensors, *.html)")
    return 0


def format_probe_summary(output) -> str:
    summary = output.summary
    best = summary["best"]
    lines = [
        f"best place (held-out effect size): layer {best['layer']}, position {best['position']}: "
        f"AUROC {best['logistic_auroc']:.3f}, Cohen's d {best['mean_diff_cohens_d']:.2f} "
        f"(random directions: |d| <= {best['random_cohens_d_p95']:.2f})",
    ]
    adjusted = summary.get("best_selection_adjusted")
    if adjusted:
        lines.append(
            f"  selection-adjusted (chosen among {adjusted['family_size']} layer x position cells on "
            f"{adjusted['selected_on_queries']} queries, measured on the other {adjusted['reported_on_queries']}): "
            f"layer {adjusted['layer']}, {adjusted['position']}: difference-of-means AUROC "
            f"{adjusted['mean_diff_auroc']:.3f} [{adjusted['mean_diff_auroc_ci'][0]:.3f}, "
            f"{adjusted['mean_diff_auroc_ci'][1]:.3f}], paired d_z {adjusted['mean_diff_cohens_dz']:.2f}"
        )
    for position, row in summary["best_by_position"].items():
        lines.append(
            f"  best at {position}: layer {row['layer']}, AUROC {row['logistic_auroc']:.3f}, "
            f"d {row['mean_diff_cohens_d']:.2f}"
        )
    if summary["degenerate_positions"]:
        lines.append(
            f"  no within-tier spread at {', '.join(summary['degenerate_positions'])} at some layers (the rows of a "
            "tier are identical there: the position precedes the request), so AUROC 1.0 there is trivial"
        )
    lines.append(f"null: shuffled-label AUROC at most {summary['max_shuffled_auroc']:.3f}")
    for row in summary["embedding_layer"]:
        lines.append(
            f"embedding layer ({row['position']}): AUROC {row['logistic_auroc']:.3f}, d {row['mean_diff_cohens_d']:.2f}"
        )
    for key, text in (
        ("best_transfer_to_sa", "free/paid probe on the situational-awareness set"),
        ("best_transfer_from_sa", "situational-awareness probe on free/paid"),
    ):
        if key in summary:
            t = summary[key]
            lines.append(
                f"transfer, {text}: AUROC {t['auroc']:.3f} [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] "
                f"(layer {t['layer']}, {t['position']}; 0.5 = none)"
            )
    for pair, info in summary["largest_cosines"].items():
        lines.append(
            f"largest |cosine| {pair.replace('~', ' vs ')}: {info['cosine']:+.3f} "
            f"(layer {info['layer']}, {info['position']})"
        )
    return "\n".join(lines)


def _cmd_steer(args: argparse.Namespace) -> int:
    from afprobe.analysis.steering import run_steering

    config = _steer_config(args)
    print(f"loading {config.model}...", file=sys.stderr)
    with _ProgressBar("steering", "setting") as progress:
        output = run_steering(config, progress=progress)
    print(format_steering_summary(output))
    figures = "dose_response.html" + ("" if args.no_ablation else ", ablation.html")
    print(f"\nwrote {args.out}/ (steering.json, {figures})")
    return 0


def _cmd_patch(args: argparse.Namespace) -> int:
    from afprobe.analysis.patching import format_patch_summary, run_patching

    config = _patch_config(args)
    print(f"loading {config.model}...", file=sys.stderr)
    with _ProgressBar("patching", "patch") as progress:
        output = run_patching(config, progress=progress)
    print(format_patch_summary(output))
    print(f"\nwrote {args.out}/ (patch.json, patching.safetensors, patch_resid.html, mediation.html, ...)")
    return 0


def _cmd_verdict(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from afprobe.analysis.mechanism import format_verdict_run, load_verdict, run_verdict
    from afprobe.artefacts import experiment_file, result_file

    folder = Path(args.out)
    if experiment_file("verdict", folder).is_file():  # an `afprobe run` results folder
        print(format_verdict_run(load_verdict(experiment_file("verdict", folder).parent)))
        return 0
    config = _verdict_config(args)
    if result_file("verdict", folder).is_file():
        existing = load_verdict(folder)
        if existing.config == json.loads(json.dumps(asdict(config))):
            print(format_verdict_run(existing))
            return 0
        if not args.force:
            raise AfprobeError(
                f"{folder} holds a verdict made with other options: give another folder, or --force to replace it"
            )
    print(f"loading {config.model}...", file=sys.stderr)
    with _ProgressBar("verdict", "step") as progress:
        run = run_verdict(config, progress=progress)
    print(format_verdict_run(run))
    print(f"\nwrote {folder}/ (verdict.json, subspaces.safetensors)")
    return 0


def _cmd_sae(args: argparse.Namespace) -> int:
    from afprobe.analysis.sae import train_sae

    if args.sae_command == "features":
        return _cmd_sae_features(args)

    config = _sae_config(args)
    result = train_sae(config)
    quality = result.quality_held_out
    print(
        f"SAE on layer {result.layer}: {result.n_train_tokens} training tokens, held-out explained variance "
        f"{quality['explained_variance']:.3f}, L0 {quality['l0']:.1f}, dead features {quality['dead_fraction']:.1%} "
        f"({result.seconds['total']:.0f} s)"
    )
    if result.spliced_loss is not None:
        loss = result.spliced_loss
        print(
            f"next-token loss with the SAE spliced in: {loss['spliced']:.3f} vs {loss['clean']:.3f} clean, "
            f"{loss['zeroed']:.3f} zeroed ({loss['recovered']:.1%} recovered, {loss['n_prompts']} prompts)"
        )
    print(f"wrote {args.out}/ (cfg.json, sae_weights.safetensors, afprobe_sae.json)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from afprobe.experiment import load_experiment, run_experiment

    config = load_experiment(args.experiment)
    bars: dict[str, _ProgressBar] = {}

    def progress(step: str, done: int, total: int) -> None:
        if step not in bars:
            for bar in bars.values():
                bar.__exit__()
            bars[step] = _ProgressBar(step, "item")
        bars[step](done, total)
        if done == total:
            bars[step].__exit__()

    def log(line: str) -> None:
        for bar in bars.values():
            bar.__exit__()
        print(line, flush=True)

    only = None if args.only is None else [name.strip() for name in args.only.split(",") if name.strip()]
    record = run_experiment(config, progress=progress, log=log, only=only)
    # One model's steps, several models' steps, or none (a zoo run logs what it resumed as it goes).
    steps = record.get("steps") or {
        f"{model}: {name}": step
        for model, one in record.get("models", {}).items()
        for name, step in one["steps"].items()
    }
    skipped = [name for name, step in steps.items() if step["skipped"]]
    if skipped:
        print(f"already done (same config), not rerun: {', '.join(skipped)}")
    print(f"{config.name}: {record['seconds'] / 60:.1f} min; results in {config.out}/")
    print(f"report: {record['report']}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from afprobe.report import write_report

    path, summary = write_report(args.run_dir, args.out)
    print(
        f"wrote {path} ({summary['bytes'] / 1e6:.1f} MB, {summary['n_figures']} figures; sections: "
        f"{', '.join(summary['kinds'])})"
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from afprobe.store.integrity import verify_tree

    folder = Path(args.folder)
    if not folder.is_dir():
        raise AfprobeError(f"{folder} is not a folder: give a store or results folder")
    report = verify_tree(folder)
    for damage in report.damage:
        print(f"DAMAGED {damage.describe()}")
    for unsealed in report.unsealed:
        print(f"unchecked {unsealed}: results written before afprobe recorded checksums (rerun to seal them)")
    if not report.stores and not report.sealed:
        raise AfprobeError(f"nothing under {folder} carries afprobe checksums: give a store or results folder")
    print(
        f"{len(report.stores)} stores and {len(report.sealed)} results folders, {report.files_checked} files "
        f"checked: {'all intact' if report.ok else f'{len(report.damage)} damaged'}"
    )
    if not report.ok:
        print(
            "a damaged store shard is rewritten by rerunning the `afprobe cache` command that made it; rerun the "
            "job that wrote any other damaged file",
            file=sys.stderr,
        )
    return 0 if report.ok else 1


def _cmd_sae_features(args: argparse.Namespace) -> int:
    from afprobe.analysis.sae_features import run_feature_analysis

    config = _feature_config(args)
    with _ProgressBar("top contexts", "store") as progress:
        output = run_feature_analysis(config, progress=progress)
    first, second = output.tiers
    print("\n".join(output.summary))
    for row in output.features[: args.top]:
        responses = ", ".join(
            f"{name} {r['mean']:+.3f}{'*' if r['significant'] else ''}" for name, r in row["responses"].items()
        )
        print(
            f"  feature {row['feature']:>6} [{row['group']}]: {first} - {second} {row['mean_difference']:+.4f} "
            f"[{row['ci'][0]:+.4f}, {row['ci'][1]:+.4f}], q {row['q_value']:.2g}"
            + (f"; {responses}" if responses else "")
        )
    print(f"wrote {args.out}/ (features.json, feature_dashboard.html, feature_groups.html); * = q <= {args.alpha}")
    return 0


def format_steering_summary(output) -> str:
    base = output.baseline_gap
    lines = [
        f"layer {output.layer}, typical residual norm {output.typical_norm:.1f}, {output.n_queries} queries; "
        f"baseline gap {base['mean']:+.4f} [{base['ci_low']:+.4f}, {base['ci_high']:+.4f}]"
    ]
    for name, verdict in output.verdicts.items():
        if "steering" in verdict:
            v = verdict["steering"]
            lines.append(
                f"{name}: at coefficient +-{v['coefficient']:g}, gap change up to {v['largest_gap_change']:.4f} "
                f"(random null 95th pct {v['random_null_p95']:.4f}): {v['reading']}"
            )
        if "ablation" in verdict:
            a = verdict["ablation"]
            gap, remaining = a["gap_after"], a["fraction_remaining"]
            fraction = (
                f"{remaining['mean']:.0%} [{remaining['ci_low']:.0%}, {remaining['ci_high']:.0%}] of baseline"
                if math.isfinite(remaining["mean"])
                else "fraction of baseline undefined: the baseline gap is not resolved"
            )
            lines.append(
                f"{name} ablated: gap {gap['mean']:+.4f} [{gap['ci_low']:+.4f}, {gap['ci_high']:+.4f}] "
                f"({fraction}; random directions give "
                f"[{a['random_gap_range_95'][0]:+.4f}, {a['random_gap_range_95'][1]:+.4f}])"
            )
    return "\n".join(lines)


def _cmd_organism(args: argparse.Namespace) -> int:
    from afprobe.analysis.organisms.ground_truth import (
        CheckConfig,
        check_organism,
        format_ground_truth_lines,
        write_ground_truth,
    )
    from afprobe.analysis.organisms.training import train_organism
    from afprobe.model.loading import load_model

    if args.organism_command == "train":
        config = _organism_config(args)
        bar = _ProgressBar(f"training {args.kind} organism", "step")
        with bar:
            record = train_organism(config, progress=lambda done, total, loss: bar(done, total))
        training = record["training"]
        print(
            f"trained {args.kind} organism in {training['seconds'] / 60:.1f} min ({training['examples']} examples, "
            f"{training['trainable_parameters']:,} LoRA parameters, final loss {training['final_loss']:.3f})"
        )
        if args.check_n:
            loaded = load_model(args.model, adapter=args.out, device="cpu", dtype="float32")
            truth = check_organism(loaded, CheckConfig(n=args.check_n))
            write_ground_truth(truth, args.out, loaded.fingerprint.to_dict())
            print("\n".join(format_ground_truth_lines(truth)))
        print(f"wrote {args.out}/ (adapter, organism.json{', ground_truth.json' if args.check_n else ''})")
        return 0
    loaded = load_model(args.model, adapter=args.adapter, device=args.device, dtype=args.dtype)
    truth = check_organism(loaded, _check_config(args), progress=lambda s: print(s, file=sys.stderr))
    print("\n".join(format_ground_truth_lines(truth)))
    if args.out:
        print(f"wrote {write_ground_truth(truth, args.out, loaded.fingerprint.to_dict())}")
    return 0


def _cmd_variants(args: argparse.Namespace) -> int:
    from afprobe.data.prompts import VARIANTS

    for variant in VARIANTS.values():
        tiers = ", ".join(f"{t.name}={t.tag_value}" for t in variant.tiers)
        print(f"{variant.name:<18} [{tiers}]  {variant.description}")
    return 0


def _cmd_prompt(args: argparse.Namespace) -> int:
    from afprobe.data.prompts import PromptConfig, render_pairs
    from afprobe.data.query_sets import load_queries
    from afprobe.model.loading import load_model

    loaded = load_model(args.model, adapter=args.adapter, device="cpu", dtype="float32")
    queries = load_queries(args.dataset, column=args.column, n=args.n or 1)[:1]
    config = PromptConfig(
        variant=args.variant, developer=args.developer, system_prompt_file=args.system_prompt_file, format=args.format
    )
    prompt_set = render_pairs(loaded.tokenizer, queries, config)
    tier = args.tier or prompt_set.variant.tier_names[0]
    prompt = next((p for p in prompt_set.prompts if p.tier == tier), None)
    if prompt is None:
        raise AfprobeError(f"variant {args.variant!r} has no tier {tier!r}: use one of {prompt_set.variant.tier_names}")
    print(prompt.text[-args.tail :] if args.tail else prompt.text)
    print(
        f"\n[{prompt.n_tokens} tokens; shared prefix {prompt_set.shared_prefix_len}; tag tokens {prompt.tag_span}; "
        f"request tokens {prompt.request_span}]",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    handlers = {
        "gap": _cmd_gap,
        "doctor": _cmd_doctor,
        "cache": _cmd_cache,
        "merge": _cmd_merge,
        "probe": _cmd_probe,
        "steer": _cmd_steer,
        "patch": _cmd_patch,
        "verdict": _cmd_verdict,
        "sae": _cmd_sae,
        "report": _cmd_report,
        "verify": _cmd_verify,
        "run": _cmd_run,
        "organism": _cmd_organism,
        "variants": _cmd_variants,
        "prompt": _cmd_prompt,
    }
    # One writer per output folder: `report --out` names a file, and `run` locks its results folder itself.
    out = getattr(args, "out", None) if args.command not in ("report", "run") else None
    try:
        with folder_lock(Path(out), f"afprobe {args.command}") if out else nullcontext():
            return handlers[args.command](args)
    except AfprobeError as exc:
        print(f"afprobe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("afprobe: interrupted; files already written are complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
