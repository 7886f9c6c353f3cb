"""Sparse autoencoders with sae-lens: train one on a layer's cached activations, load one, measure its quality.

`train_sae(SAETrainConfig(caches=(...), layer=L, out=DIR))` reads one layer's activations (`[tokens, d_model]`)
from one or more activation stores (a store cached with `--positions suffix` gives every token after the shared
prefix; otherwise every position kind the store holds), holds out a slice for evaluation, trains a TopK SAE with
sae-lens' trainer and writes it in sae-lens' format (`cfg.json`, `sae_weights.safetensors`, loadable with
`sae_lens.SAE.load_from_disk`) with `afprobe_sae.json` beside it: the config, the stores and model it was trained
on, and its quality on the held-out tokens (explained variance, L0, dead features).

`load_sae(path)` loads a saved SAE; `load_sae(release, sae_id=...)` a published one through sae-lens' registry
(needs the hub, or its files in the local Hugging Face cache). `spliced_loss` measures what the model loses when
the SAE's reconstruction replaces the layer. What the features do is `afprobe.analysis.sae_features`'s business.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from afprobe import __version__
from afprobe.artefacts import ResultRecord, result_file
from afprobe.data.prompts import RenderedPrompt
from afprobe.errors import AfprobeError
from afprobe.files import atomic_write_json, results_folder, staged_writes
from afprobe.model.forward import compute_prefix_cache, extend_batch, start_batch
from afprobe.model.interventions import residual_edit
from afprobe.model.loading import LoadedModel
from afprobe.store.reader import ActivationStore


@dataclass
class SAETrainConfig:
    """One SAE training run; saved in afprobe_sae.json."""

    caches: tuple[str, ...]
    layer: int
    out: str
    d_sae: int | None = None  # default: 8 x d_model
    k: int = 32  # active features per token (TopK)
    lr: float = 4e-4
    batch_size: int = 512
    epochs: float = 20.0  # passes over the training tokens
    holdout: float = 0.1
    seed: int = 0
    device: str = "cpu"
    loss_prompts: int = 8  # harmful prompts scored with the SAE spliced in (0: skip)
    model: str | None = None  # the model to splice into (default: the one the stores name)


@dataclass
class TrainingTokens:
    """One layer's activations from the stores, and where they came from."""

    tokens: Float[Tensor, "n d_model"]
    sources: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)


def load_training_tokens(caches: Sequence[str], layer: int) -> TrainingTokens:
    """Every cached token of `layer` in the stores (all from one model)."""
    if not caches:
        raise AfprobeError("no activation stores given: pass at least one --cache")
    parts, sources, model = [], [], {}
    for path in caches:
        store = ActivationStore.open(path)
        fingerprint = store.meta.model
        if model and fingerprint["weights_sha256"] != model["weights_sha256"]:
            raise AfprobeError(
                f"store {path} was cached from {fingerprint['name']}, the others from {model['name']}: an SAE is "
                "trained on one model's activations"
            )
        model = fingerprint
        # `suffix` already holds the tag, last and request tokens: taking the others too would count them twice.
        kinds = ["suffix"] if "suffix" in store.positions and layer in store.layers_of("suffix") else store.positions
        kinds = [kind for kind in kinds if layer in store.layers_of(kind)]
        if not kinds:
            raise AfprobeError(f"store {path} has no layer {layer} (it has {store.layers}): cache that layer first")
        for kind in kinds:
            tokens, _ = store.token_activations(kind, layer)
            parts.append(tokens.float())
            sources.append({"store": str(path), "position": kind, "tokens": int(tokens.shape[0])})
    tokens = torch.cat(parts)
    if tokens.shape[0] < 2:
        raise AfprobeError(
            f"only {tokens.shape[0]} cached tokens at layer {layer}: cache more prompts or --positions suffix"
        )
    return TrainingTokens(tokens, sources, model)


def _batches(tokens: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless shuffled batches (a new order every pass), the data provider sae-lens' trainer reads."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(tokens.shape[0], generator=generator)
        for start in range(0, tokens.shape[0] - batch_size + 1, batch_size):
            yield tokens[order[start : start + batch_size]]


@torch.no_grad()
def sae_quality(sae: Any, tokens: Float[Tensor, "n d_model"], batch_size: int = 4096) -> dict[str, float]:
    """Explained variance of the reconstruction, mean L0, and the fraction of features never active on `tokens`."""
    squared_error, active, fired = 0.0, 0.0, None
    for start in range(0, tokens.shape[0], batch_size):
        x = tokens[start : start + batch_size].to(sae.device, sae.dtype)
        features = sae.encode(x)
        squared_error += float(((sae.decode(features) - x).float() ** 2).sum())
        on = features != 0
        active += float(on.sum())
        fired = on.any(0) if fired is None else fired | on.any(0)
    variance = float(((tokens - tokens.mean(0)) ** 2).sum())
    assert fired is not None
    return {
        "explained_variance": 1.0 - squared_error / max(variance, 1e-12),
        "l0": active / tokens.shape[0],
        "dead_fraction": float((~fired).float().mean()),
        "n_tokens": int(tokens.shape[0]),
    }


@dataclass
class SAEResult(ResultRecord):
    """A trained SAE's record; `to_json()` is afprobe_sae.json (the weights are sae-lens' files beside it)."""

    OPTIONAL = ("spliced_loss",)

    afprobe_version: str
    config: dict[str, Any]  # the SAETrainConfig
    model: dict[str, Any]
    layer: int
    sources: list[dict[str, Any]]  # the stores the training tokens came from
    n_train_tokens: int
    quality_held_out: dict[str, float]  # explained variance, L0, dead fraction on held-out tokens
    quality_train: dict[str, float]
    spliced_loss: dict[str, Any] | None = None  # next-token loss: clean, with the SAE spliced in, layer zeroed
    seconds: dict[str, float] = field(default_factory=dict)


def train_sae(
    config: SAETrainConfig, *, data: TrainingTokens | None = None, loaded: LoadedModel | None = None
) -> SAEResult:
    """Train, evaluate on held-out tokens (and, with `loss_prompts`, spliced into the model) and save; returns what
    afprobe_sae.json holds."""
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    started = time.perf_counter()
    if data is None:
        data = load_training_tokens(config.caches, config.layer)
    tokens = data.tokens
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(tokens.shape[0], generator=generator)
    n_holdout = max(1, int(round(config.holdout * tokens.shape[0])))
    held_out, train = tokens[order[:n_holdout]], tokens[order[n_holdout:]]
    batch_size = min(config.batch_size, train.shape[0])
    d_model = tokens.shape[1]
    d_sae = config.d_sae or 8 * d_model
    if not 0 < config.k <= d_sae:
        raise AfprobeError(f"k = {config.k} active features must be between 1 and d_sae = {d_sae}")

    torch.manual_seed(config.seed)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=d_model,
            d_sae=d_sae,
            k=config.k,
            dtype="float32",
            device=config.device,
            normalize_activations="expected_average_only_in",
        )
    )
    total = int(config.epochs * train.shape[0])
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=total,
            train_batch_size_samples=batch_size,
            lr=config.lr,
            lr_end=config.lr,
            device=config.device,
            logger=LoggingConfig(log_to_wandb=False),
            n_batches_for_norm_estimate=max(1, min(100, train.shape[0] // batch_size)),
            dead_feature_window=max(1, min(1000, total // batch_size // 4)),
            feature_sampling_window=max(1, min(2000, total // batch_size // 2)),
        ),
        sae,
        _batches(train, batch_size, config.seed),
    )
    sae = trainer.fit()
    sae.eval()
    trained_seconds = time.perf_counter() - started

    out = Path(config.out)
    with results_folder(out), staged_writes(out) as staging:
        sae.save_inference_model(staging)
    inference = load_sae(str(out), device=config.device)
    result = SAEResult(
        afprobe_version=__version__,
        config=asdict(config),
        model=data.model,
        layer=config.layer,
        sources=data.sources,
        n_train_tokens=int(train.shape[0]),
        quality_held_out=sae_quality(inference, held_out),
        quality_train=sae_quality(inference, train[: min(len(train), 20_000)]),
    )
    if config.loss_prompts > 0:
        result.spliced_loss = _spliced_loss_for(config, inference, data, loaded)
    result.seconds = {"train": trained_seconds, "total": time.perf_counter() - started}
    with results_folder(out):
        atomic_write_json(result_file("sae", out), result.to_json())
    return result


@torch.no_grad()
def spliced_loss(
    loaded: LoadedModel, sae: Any, layer: int, prompts: Sequence[RenderedPrompt], prefix_len: int
) -> dict[str, float]:
    """Next-token loss on the prompts' own tokens (after the shared prefix) when the residual stream at `layer` is
    replaced by the SAE's reconstruction, against the clean model and against zeroing it.

    `recovered` = (zeroed - spliced) / (zeroed - clean): 1 means the reconstruction loses nothing the model uses.
    The shared prefix runs clean (it is computed once), so only the prompts' own positions are spliced.
    """
    model = loaded.model
    prefix = compute_prefix_cache(model, prompts[0].input_ids[:prefix_len])

    def loss(edit: Any) -> float:
        total, count = 0.0, 0
        for prompt in prompts:
            own = list(prompt.input_ids[prefix_len:])
            if len(own) < 2:
                continue
            context = residual_edit(model, [layer], edit) if edit is not None else nullcontext()
            with context:
                logits, _, _ = extend_batch(model, start_batch(prefix, 1), [own], [list(range(len(own) - 1))])
            targets = torch.tensor(own[1:], device=logits[0].device)
            total += float(torch.nn.functional.cross_entropy(logits[0], targets, reduction="sum"))
            count += len(own) - 1
        if count == 0:
            raise AfprobeError("the prompts have no own tokens to score after the shared prefix")
        return total / count

    def reconstruct(hidden: Tensor, _layer: int) -> Tensor:
        return sae.decode(sae.encode(hidden.to(sae.dtype))).to(hidden.dtype)

    clean = loss(None)
    spliced = loss(reconstruct)
    zeroed = loss(lambda hidden, _layer: torch.zeros_like(hidden))
    return {
        "clean": clean,
        "spliced": spliced,
        "zeroed": zeroed,
        "increase": spliced - clean,
        "recovered": (zeroed - spliced) / (zeroed - clean) if zeroed != clean else float("nan"),
        "n_prompts": len(prompts),
    }


def _spliced_loss_for(
    config: SAETrainConfig, sae: Any, data: TrainingTokens, loaded: LoadedModel | None
) -> dict[str, float]:
    from afprobe.data.prompts import render_pairs
    from afprobe.data.query_sets import load_queries

    if loaded is None:
        from afprobe.model.loading import load_model

        spec = config.model or data.model.get("name")
        if not spec:
            raise AfprobeError("the stores do not name their model: pass --model, or --loss-prompts 0")
        loaded = load_model(spec, adapter=data.model.get("adapter"), device=config.device)
    if data.model and loaded.fingerprint.weights_sha256 != data.model.get("weights_sha256"):
        raise AfprobeError(
            f"{loaded.fingerprint.name} is not the model the stores were cached from ({data.model.get('name')}): "
            "pass that model with --model, or --loss-prompts 0"
        )
    prompt_set = render_pairs(loaded.tokenizer, load_queries("harmful", n=max(1, (config.loss_prompts + 1) // 2)))
    prompts = prompt_set.prompts[: config.loss_prompts]
    # Two own tokens each: the loss needs at least one next-token prediction inside the run.
    prefix_len = prompt_set.prefix_len(spare=2, prompts=prompts)
    return spliced_loss(loaded, sae, config.layer, prompts, prefix_len)


def load_sae(spec: str, *, sae_id: str | None = None, device: str = "cpu") -> Any:
    """A saved SAE folder, or a published SAE by sae-lens release name and `sae_id`."""
    from sae_lens import SAE

    path = Path(spec)
    if path.exists():
        if not (path / "cfg.json").exists():
            raise AfprobeError(f"{spec} holds no SAE (no cfg.json): give the folder `afprobe sae train` wrote")
        return SAE.load_from_disk(str(path), device=device)
    if sae_id is None:
        raise AfprobeError(f"{spec} is not a folder; for a published SAE give its release name and --sae-id")
    try:
        return SAE.from_pretrained(release=spec, sae_id=sae_id, device=device)
    except (ValueError, KeyError) as exc:
        raise AfprobeError(f"sae-lens has no SAE {sae_id!r} in release {spec!r} ({exc})") from exc
    except OSError as exc:
        raise AfprobeError(
            f"could not fetch SAE {spec}/{sae_id} ({exc}): this machine needs the hub or the files in its cache"
        ) from exc
