"""The caching job: paired prompts through a model, residual-stream activations at chosen positions to a store.

`run_cache(CacheConfig(...))` fills an `afprobe.store` folder shard by shard. The fast path (`backend="hooks"`)
records activations with forward hooks during the same prefix-shared forward that scores compliance, so a
prompt costs only its own ~130 tokens. The TransformerLens (`TransformerBridge`) and nnsight backends run each full
prompt through those libraries instead (slower; there for users who want their hook names, for NDIF, and to check
that all three agree).

A shard is finished once its JSON file exists; a killed job rerun with the same command skips finished shards
and produces the same store as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from afprobe import __version__
from afprobe.contrast import CONTRAST_SETS, load_situational_awareness, render_contrast_set
from afprobe.data import dataset_hash, load_queries
from afprobe.errors import AfprobeError
from afprobe.files import atomic_write_bytes, atomic_write_json
from afprobe.forward import PrefixCache, compute_prefix_cache
from afprobe.gap import GapConfig, GapResult, PairedPromptJob, build_gap_result, write_gap
from afprobe.memory import MemoryEstimate
from afprobe.metrics import (
    AnswerTokens,
    ComplianceScore,
    has_sliding_window,
    length_batches,
    plan_batch_size,
    score_batch,
    score_from_full_logits,
)
from afprobe.models import (
    LoadedModel,
    decoder_layers,
    load_remote_model,
    load_tokenizer_only,
    shared_weight_copy,
)
from afprobe.prompts import PromptSet, RenderedPrompt, render_pairs
from afprobe.store import (
    IDENTITY_FIELDS,
    POSITION_KINDS,
    STORE_DTYPES,
    ActivationStore,
    StoreError,
    StoreRow,
    hook_name,
    shard_name,
    write_manifest_csv,
)

BACKENDS = ("hooks", "transformer-lens", "nnsight")


@dataclass
class CacheConfig(PairedPromptJob):
    """One caching run; saved in the store's meta.json."""

    out: str = "activations/run"
    layers: str = "all"
    positions: str = "tag,last"
    suffix_layers: str | None = None  # layers for the `suffix` kind only (default: `layers`)
    store_dtype: str = "float32"
    backend: str = "hooks"
    shard_size: int = 32
    remote: bool | str = False  # True: run on NDIF (nnsight); "local": nnsight's offline simulation of that path
    part: str | None = None  # "i/N": this machine's slice of a job split over N machines (`afprobe merge` joins)


@dataclass
class CacheSummary:
    path: Path
    n_prompts: int
    n_shards: int
    shards_written: int
    shards_skipped: int
    seconds: float
    prefix_seconds: float
    gap: GapResult | None = None

    part: JobPart | None = None
    part_shards: int | None = None  # store shards this part is responsible for
    memory: MemoryEstimate | None = None  # the estimate the batch size was chosen by (prefix-shared path only)

    @property
    def complete(self) -> bool:
        """Every store shard is on disk (for a part: every shard of its slice)."""
        expected = self.n_shards if self.part_shards is None else self.part_shards
        return self.shards_written + self.shards_skipped == expected


@dataclass(frozen=True)
class JobPart:
    """Slice `index` of a caching job split over `count` machines (0-based, as SLURM array task ids are)."""

    index: int
    count: int

    @classmethod
    def parse(cls, spec: str) -> JobPart:
        try:
            index_text, count_text = spec.split("/")
            index, count = int(index_text), int(count_text)
        except ValueError:
            raise AfprobeError(f"--shard {spec!r} is not i/N: give e.g. 0/4 for the first of four parts") from None
        if count < 1 or not 0 <= index < count:
            raise AfprobeError(f"--shard {spec!r}: i must be 0..N-1 (e.g. $SLURM_ARRAY_TASK_ID/N with --array=0-N-1)")
        return cls(index, count)

    def owns(self, shard: int) -> bool:
        # Round robin: every part gets early (short) and late shards alike, and the assignment depends only on the
        # shard's index, so any machine can recompute it.
        return shard % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def build_prompt_set(config: CacheConfig, loaded: LoadedModel) -> PromptSet:
    """The paired prompts of a job: a dataset under a variant, or a contrast set (`situational-awareness`)."""
    if config.dataset in CONTRAST_SETS:
        pairs = load_situational_awareness(n=config.n)
        return render_contrast_set(
            loaded.tokenizer, pairs, format=config.format, max_context=loaded.max_context or None
        )
    queries = load_queries(config.dataset, column=config.column, n=config.n)
    return render_pairs(loaded.tokenizer, queries, config.prompt_config(), max_context=loaded.max_context or None)


def parse_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """`all`, a comma list (`0,10,20`), ranges (`0-10`, `0-30:6` every 6th), negative indices (`-1` = after the last
    block)."""
    if not isinstance(spec, str):
        items = [int(x) for x in spec]
    elif spec.strip() == "all":
        return list(range(n_layers + 1))
    else:
        items = []
        for part in spec.split(","):
            part = part.strip()
            try:
                part, _, step = part.partition(":")
                if "-" in part[1:]:
                    low, high = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                    items.extend(range(int(low), int(high) + 1, int(step or 1)))
                else:
                    items.append(int(part))
            except ValueError as exc:
                raise AfprobeError(f"cannot read layer {part!r}: use all, 0,5,10, 0-10, 0-30:6 or -1") from exc
    resolved = sorted({item + n_layers + 1 if item < 0 else item for item in items})
    bad = [item for item in resolved if not 0 <= item <= n_layers]
    if bad or not resolved:
        raise AfprobeError(
            f"layer {bad or spec} out of range: this model's residual stream has layers 0..{n_layers} "
            f"({n_layers} = after the last block)"
        )
    return resolved


def parse_positions(spec: str | Sequence[str], prompt_set: PromptSet) -> list[str]:
    kinds = [k.strip() for k in spec.split(",")] if isinstance(spec, str) else list(spec)
    unknown = [k for k in kinds if k not in POSITION_KINDS]
    if unknown or not kinds:
        raise AfprobeError(f"unknown position {unknown or spec!r}: choose from {', '.join(POSITION_KINDS)}")
    if "tag" in kinds and any(p.tag_span is None for p in prompt_set.prompts):
        raise AfprobeError(f"variant {prompt_set.variant.name!r} has no tier tag: drop 'tag' from --positions")
    return list(dict.fromkeys(kinds))


def prompt_positions(prompt: RenderedPrompt, kind: str, shared_prefix_len: int) -> list[int]:
    """Absolute token indices of one position kind in a prompt."""
    if kind == "tag":
        return list(range(*prompt.tag_span)) if prompt.tag_span else []
    if kind == "last":
        return [prompt.final_index]
    if kind == "request":
        return list(range(*prompt.request_span))
    if kind == "suffix":
        return list(range(shared_prefix_len, prompt.n_tokens))
    raise AfprobeError(f"unknown position {kind!r}")


class ResidualRecorder:
    """Forward hooks that copy the residual stream at given positions of each row, for chosen layers.

    Layer l < n_layers is recorded entering block l; l = n_layers leaving the last block. Hooks exist only inside
    `recording()`, so the model is unchanged afterwards.
    """

    def __init__(self, model: Any, layers: Sequence[int], kind_layers: dict[str, Sequence[int]] | None = None):
        self.blocks = decoder_layers(model)
        self.layers = list(layers)
        self.n_layers = len(self.blocks)
        self.kind_layers = kind_layers  # kind -> the layers it keeps (default: all of `layers`)

    @staticmethod
    def empty_record(positions: Sequence[dict[str, list[int]]]) -> dict[str, list[dict[int, Tensor]]]:
        return {kind: [{} for _ in positions] for kind in (positions[0] if positions else {})}

    @contextmanager
    def recording(
        self,
        positions: Sequence[dict[str, list[int]]],
        record: dict[str, list[dict[int, Tensor]]] | None = None,
    ) -> Iterator[dict[str, list[dict[int, Tensor]]]]:
        """positions[row][kind]: indices into that row's input tokens. Fills and yields
        record[kind][row][layer] = `[tokens, d_model]` (float32, CPU)."""
        if record is None:
            record = self.empty_record(positions)

        def store(layer: int, hidden: Tensor) -> None:
            for row, row_positions in enumerate(positions):
                for kind, indices in row_positions.items():
                    if self.kind_layers is not None and layer not in self.kind_layers.get(kind, self.layers):
                        continue
                    record[kind][row][layer] = hidden[row, indices].detach().float().cpu()

        handles = []
        try:
            for layer in self.layers:
                if layer < self.n_layers:

                    def pre_hook(module, args, kwargs, layer=layer):
                        store(layer, args[0] if args else kwargs["hidden_states"])

                    handles.append(self.blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True))
                else:

                    def post_hook(module, args, output, layer=layer):
                        store(layer, output[0] if isinstance(output, tuple) else output)

                    handles.append(self.blocks[-1].register_forward_hook(post_hook))
            yield record
        finally:
            for handle in handles:
                handle.remove()


def stack_record(record: dict[int, Tensor], layers: Sequence[int]) -> Float[Tensor, "tokens layers d"]:
    return torch.stack([record[layer] for layer in layers], dim=1)


# -- full-prompt backends (TransformerLens, nnsight, and plain hooks as their reference) ---------------------------


class FullForwardBackend:
    """Runs one whole sequence and returns its logits and the residual stream at the asked positions."""

    name = "hooks-full"

    def __init__(self, loaded: LoadedModel, layers: Sequence[int]):
        self.loaded = loaded
        self.layers = list(layers)
        self.recorder = ResidualRecorder(loaded.model, layers)

    @torch.inference_mode()
    def forward(
        self, ids: Sequence[int], positions: dict[str, list[int]] | None, logits_from: int = 0
    ) -> tuple[Float[Tensor, "tail vocab"], dict[str, Tensor]]:
        """Logits from position `logits_from` on, and the residual stream at `positions`."""
        tensor = torch.tensor([list(ids)], device=self.loaded.device)
        with self.recorder.recording([positions or {}]) as record:
            logits = self.loaded.model(input_ids=tensor, use_cache=False).logits[0, logits_from:].float()
        return logits, {kind: stack_record(record[kind][0], self.layers) for kind in (positions or {})}


class TransformerLensBackend(FullForwardBackend):
    """TransformerLens' TransformerBridge over the loaded model (hook names `blocks.L.hook_resid_pre`)."""

    name = "transformer-lens"

    def __init__(self, loaded: LoadedModel, layers: Sequence[int]):
        from transformer_lens.model_bridge import TransformerBridge

        self.loaded = loaded
        self.layers = list(layers)
        # TransformerBridge rewires the modules of the model it wraps, so it gets a copy: the user's model stays
        # as it was (at the cost of a second copy of the weights while this backend lives).
        model = copy.deepcopy(loaded.model)
        if not getattr(model.config, "architectures", None):
            model.config.architectures = [type(model).__name__]
        try:
            self.bridge = TransformerBridge.boot_transformers(
                loaded.fingerprint.name, hf_model=model, tokenizer=loaded.tokenizer, device=loaded.device
            )
        except (ValueError, KeyError, NotImplementedError) as exc:
            raise AfprobeError(
                f"TransformerLens cannot wrap {type(loaded.model).__name__} ({str(exc)[:120]}): use --backend hooks"
            ) from exc
        self.hook_names = {layer: hook_name(layer, loaded.n_layers) for layer in self.layers}

    @torch.inference_mode()
    def forward(
        self, ids: Sequence[int], positions: dict[str, list[int]] | None, logits_from: int = 0
    ) -> tuple[Float[Tensor, "tail vocab"], dict[str, Tensor]]:
        tensor = torch.tensor([list(ids)], device=self.loaded.device)
        if not positions:
            return self.bridge(tensor)[0, logits_from:].float(), {}
        wanted = set(self.hook_names.values())
        logits, cache = self.bridge.run_with_cache(tensor, names_filter=lambda name: name in wanted)
        acts = {
            kind: torch.stack([cache[self.hook_names[layer]][0, idx].float().cpu() for layer in self.layers], dim=1)
            for kind, idx in positions.items()
        }
        return logits[0, logits_from:].float(), acts


class NNsightBackend(FullForwardBackend):
    """nnsight's TransformersModel over the loaded model (the trace body lives in this file, as nnsight requires).

    remote: run each trace on NDIF (True) or through nnsight's local simulation of the remote path ("local": the
    request is serialised and deserialised with afprobe's modules hidden, as on the server). Remote traces send
    back only the residual stream at the recorded positions and the logits of the answer tokens.
    """

    name = "nnsight"

    def __init__(self, loaded: LoadedModel, layers: Sequence[int], remote: bool | str = False):
        self.loaded = loaded
        self.layers = list(layers)
        self.n_layers = loaded.n_layers
        self.remote = remote
        if remote:
            self.model = loaded.model  # already an nnsight model (see `afprobe.models.load_remote_model`)
            self.device = torch.device("cpu")
        else:
            from nnsight import TransformersModel

            # nnsight installs its own `forward` on every module it wraps and leaves it there: it gets a copy of the
            # module tree that shares the weights, so the user's model stays as it was. Interventions meant to act
            # through this backend go on `self.wrapped`.
            self.wrapped = shared_weight_copy(loaded.model)
            self.model = TransformersModel(self.wrapped, tokenizer=loaded.tokenizer)
            self.device = loaded.device

    @torch.inference_mode()
    def forward(
        self, ids: Sequence[int], positions: dict[str, list[int]] | None, logits_from: int = 0
    ) -> tuple[Float[Tensor, "tail vocab"], dict[str, Tensor]]:
        tensor = torch.tensor([list(ids)], device=self.device)
        wanted = sorted({i for idx in (positions or {}).values() for i in idx})
        envoys = self.model.model.layers
        n_layers = self.n_layers
        layers = self.layers if wanted else []
        saved = []
        with self.model.trace(tensor, remote=self.remote):
            for layer in layers:
                if layer < n_layers:
                    saved.append(envoys[layer].input[0, wanted].save())
                else:
                    saved.append(envoys[n_layers - 1].output[0, wanted].save())
            logits = self.model.output.logits[0, logits_from:].save()
        column = {index: j for j, index in enumerate(wanted)}
        acts = {
            kind: torch.stack([hidden[[column[i] for i in idx]].float().cpu() for hidden in saved], dim=1)
            for kind, idx in (positions or {}).items()
        }
        return logits.float().cpu(), acts


def make_backend(
    name: str, loaded: LoadedModel, layers: Sequence[int], remote: bool | str = False
) -> FullForwardBackend:
    if remote:
        return NNsightBackend(loaded, layers, remote=remote)
    if name == "transformer-lens":
        return TransformerLensBackend(loaded, layers)
    if name == "nnsight":
        return NNsightBackend(loaded, layers)
    if name == "hooks-full":
        return FullForwardBackend(loaded, layers)
    raise AfprobeError(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)}")


def full_forward_row(
    backend: FullForwardBackend, prompt: RenderedPrompt, answers: AnswerTokens, positions: dict[str, list[int]]
) -> tuple[ComplianceScore, dict[str, Tensor]]:
    """One prompt the naive way: prompt + accept (recording activations) and prompt + reject, full forwards."""
    start = prompt.n_tokens - 1  # the logits that predict the answer tokens
    accept_logits, acts = backend.forward(list(prompt.input_ids) + list(answers.accept), positions, start)
    reject_logits, _ = backend.forward(list(prompt.input_ids) + list(answers.reject), None, start)
    return score_from_full_logits(accept_logits, reject_logits, 1, answers), acts


# -- the job -------------------------------------------------------------------------------------------------------


def _identity(meta: dict[str, Any]) -> dict[str, Any]:
    identity = {field: meta.get(field) or None for field in IDENTITY_FIELDS}
    model = meta["model"]
    identity["model"] = {k: model[k] for k in ("name", "weights_sha256", "dtype", "adapter")}
    return identity


def _check_or_write_meta(out: Path, meta: dict[str, Any]) -> None:
    meta_path = out / "meta.json"
    if meta_path.is_file():
        existing = json.loads(meta_path.read_text())
        old, new = _identity(existing), _identity(meta)
        for field in IDENTITY_FIELDS:
            if old[field] != new[field]:
                raise StoreError(
                    f"store {out} was made with another {field.replace('_', ' ')} "
                    f"({_short(old[field])} there, {_short(new[field])} now): use a new --out folder or delete {out}"
                )
        if existing.get("part") != meta.get("part"):
            raise StoreError(
                f"store {out} holds {_part_text(existing.get('part'))}, this job is {_part_text(meta.get('part'))}: "
                "give each --shard its own --out folder"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"{out} exists and is not an activation store: choose an empty or new --out folder")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, meta)


def _part_text(part: dict[str, int] | None) -> str:
    return f"part {part['index']}/{part['count']}" if part else "a whole job"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def run_cache(
    config: CacheConfig,
    *,
    loaded: LoadedModel | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop_after_shards: int | None = None,
    on_plan: Callable[[MemoryEstimate], None] | None = None,
) -> CacheSummary:
    """Fill (or finish) the store at `config.out`. `progress(done, total)` counts prompts, resumed ones included;
    `on_plan` gets the memory estimate (and with it the batch size) before the first forward.

    stop_after_shards: write at most this many new shards, then return (for tests and time-boxed jobs).
    """
    start = time.perf_counter()
    if config.backend not in BACKENDS:
        raise AfprobeError(f"unknown backend {config.backend!r}: choose from {', '.join(BACKENDS)}")
    if config.store_dtype not in STORE_DTYPES:
        raise AfprobeError(f"unknown --store-dtype {config.store_dtype!r}: choose from {', '.join(STORE_DTYPES)}")
    if config.shard_size < 1:
        raise AfprobeError("--shard-size must be at least 1")
    if loaded is None:
        loaded = load_remote_model(config.model, remote=config.remote) if config.remote else config.load()
    prompt_set = build_prompt_set(config, loaded)
    queries = prompt_set.queries
    layers = parse_layers(config.layers, loaded.n_layers)
    kinds = parse_positions(config.positions, prompt_set)
    kind_layers = {kind: layers for kind in kinds}
    if config.suffix_layers is not None:
        if "suffix" not in kinds:
            raise AfprobeError("--suffix-layers needs suffix in --positions")
        kind_layers["suffix"] = parse_layers(config.suffix_layers, loaded.n_layers)
    recorded = sorted({layer for chosen in kind_layers.values() for layer in chosen})
    prompts = prompt_set.prompts
    shared = prompt_set.shared_prefix_len
    positions = [{kind: prompt_positions(p, kind, shared) for kind in kinds} for p in prompts]
    # The prefix cache must stop before every recorded position and leave each prompt a token of its own.
    first_recorded = min((min(idx) for row in positions for idx in row.values() if idx), default=shared)
    prefix_len = min(shared, first_recorded, min(p.n_tokens for p in prompts) - 1)

    out = Path(config.out)
    meta = {
        "format": "afprobe-activations/1",
        "afprobe_version": __version__,
        "model": loaded.fingerprint.to_dict(),
        "prompt_hash": prompt_set.prompt_hash,
        "dataset_hash": dataset_hash(queries),
        "layers": layers,
        "hook_names": [hook_name(layer, loaded.n_layers) for layer in layers],
        "positions": kinds,
        "position_layers": {k: v for k, v in kind_layers.items() if v != layers},
        "dtype": config.store_dtype,
        "shard_size": config.shard_size,
        "n_prompts": len(prompts),
        "n_queries": len(queries),
        "variant": prompt_set.variant.name,
        "tiers": prompt_set.variant.tier_names,
        "contrast": list(prompt_set.variant.contrast) if prompt_set.variant.contrast else None,
        "shared_prefix_tokens": shared,
        "prefix_tail": [
            loaded.tokenizer.decode([t]) for t in prompts[0].input_ids[max(0, prefix_len - 32) : prefix_len]
        ],
        "config": asdict(config),
    }
    part = JobPart.parse(config.part) if config.part else None
    if part is not None:
        meta["part"] = {"index": part.index, "count": part.count}
    try:
        _check_or_write_meta(out, meta)
    except OSError as exc:
        raise StoreError(f"cannot create store {out} ({exc.strerror or exc}): choose a writable --out folder") from exc

    n_shards = (len(prompts) + config.shard_size - 1) // config.shard_size
    answers = AnswerTokens.from_tokenizer(loaded.tokenizer)
    dtype = STORE_DTYPES[config.store_dtype]
    categories = {q.query_id: q for q in queries}
    written = skipped = done = 0
    prefix: PrefixCache | None = None
    prefix_seconds = 0.0
    full_forward = config.backend != "hooks" or bool(config.remote)
    recorder = None if full_forward else ResidualRecorder(loaded.model, recorded, kind_layers)
    backend = make_backend(config.backend, loaded, recorded, remote=config.remote) if full_forward else None
    pad_id = loaded.tokenizer.pad_token_id or 0
    estimate: MemoryEstimate | None = None
    batch_size = 1
    if recorder is not None:
        estimate, batch_size = plan_batch_size(loaded.model, prompts, prefix_len, answers, config.batch_size)
        if on_plan is not None:
            on_plan(estimate)

    owned = [shard for shard in range(n_shards) if part is None or part.owns(shard)]
    total = sum(len(_shard_rows(shard, config.shard_size, len(prompts))) for shard in owned)
    for shard in owned:
        indices = _shard_rows(shard, config.shard_size, len(prompts))
        marker = out / "shards" / f"{shard_name(shard)}.json"
        if marker.is_file():
            skipped += 1
            done += len(indices)
            if progress is not None:
                progress(done, total)
            continue
        if stop_after_shards is not None and written >= stop_after_shards:
            break
        scores: dict[int, ComplianceScore] = {}
        acts: dict[int, dict[str, Tensor]] = {}
        if recorder is not None:
            if prefix is None:
                t0 = time.perf_counter()
                prefix = compute_prefix_cache(loaded.model, prompts[0].input_ids[:prefix_len])
                prefix_seconds = time.perf_counter() - t0
            exact = has_sliding_window(prefix.cache)
            for batch in length_batches([prompts[i] for i in indices], batch_size, exact=exact):
                rows = [indices[b] for b in batch]
                relative = [{k: [j - prefix_len for j in positions[i][k]] for k in kinds} for i in rows]
                record = recorder.empty_record(relative)
                # Hooks live only around the forward of the prompts' own tokens, not the answer tokens after it.
                batch_scores = score_batch(
                    loaded.model,
                    prefix,
                    [prompts[i] for i in rows],
                    answers,
                    pad_id=pad_id,
                    stage1_context=recorder.recording(relative, record),
                )
                for position, i in enumerate(rows):
                    scores[i] = batch_scores[position]
                    acts[i] = {k: stack_record(record[k][position], kind_layers[k]) for k in kinds}
                done += len(rows)
                if progress is not None:
                    progress(done, total)
        else:
            for i in indices:
                scores[i], full = full_forward_row(backend, prompts[i], answers, positions[i])
                acts[i] = {k: full[k][:, [recorded.index(layer) for layer in kind_layers[k]]] for k in kinds}
                done += 1
                if progress is not None:
                    progress(done, total)
        _write_shard(
            out, shard, indices, prompts, positions, kinds, scores, acts, dtype, categories, config, prefix_len, loaded
        )
        written += 1

    summary = CacheSummary(
        path=out,
        n_prompts=len(prompts),
        n_shards=n_shards,
        shards_written=written,
        shards_skipped=skipped,
        seconds=time.perf_counter() - start,
        prefix_seconds=prefix_seconds,
        part=part,
        part_shards=len(owned) if part is not None else None,
        memory=estimate,
    )
    if summary.complete and part is None:
        summary.gap = _finish_store(out, config, loaded, prompt_set, prefix_len)
    return summary


def _shard_rows(shard: int, shard_size: int, n_prompts: int) -> list[int]:
    return list(range(shard * shard_size, min(n_prompts, (shard + 1) * shard_size)))


def _finish_store(
    out: Path, config: CacheConfig, loaded: LoadedModel, prompt_set: PromptSet, prefix_len: int
) -> GapResult:
    """The files a complete store gets once every shard is in: manifest.csv, gap.json and per_query.csv."""
    try:
        rows = ActivationStore.open(out).rows
        write_manifest_csv(out, rows)
        gap = _gap_from_rows(config, loaded, prompt_set, rows, prefix_len)
        write_gap(gap, out)
    except OSError as exc:
        raise StoreError(f"could not write {out / 'manifest.csv'} ({exc.strerror}): free disk space and rerun") from exc
    return gap


def _gap_from_rows(
    config: CacheConfig, loaded: LoadedModel, prompt_set: PromptSet, rows: list[StoreRow], prefix_len: int
) -> GapResult:
    """The compliance gap of the cached prompts, from the scores recorded in the same forward passes."""
    job = {f.name: getattr(config, f.name) for f in fields(PairedPromptJob)}
    gap_config = GapConfig(**{**job, "variant": prompt_set.variant.name})
    score_fields = [f.name for f in fields(ComplianceScore)]
    scores = [ComplianceScore(**{name: getattr(r, name) for name in score_fields}) for r in rows]
    return build_gap_result(gap_config, loaded, prompt_set, scores, prefix_tokens=prefix_len)


def _write_shard(
    out: Path,
    shard: int,
    indices: list[int],
    prompts: list[RenderedPrompt],
    positions: list[dict[str, list[int]]],
    kinds: list[str],
    scores: dict[int, ComplianceScore],
    acts: dict[int, dict[str, Tensor]],
    dtype: torch.dtype,
    queries: dict[str, Any],
    config: CacheConfig,
    own_start: int,
    loaded: LoadedModel,
) -> None:
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    rows: list[dict[str, Any]] = []
    offsets = {kind: 0 for kind in kinds}
    for i in indices:
        prompt, score = prompts[i], scores[i]
        row_offsets = {}
        for kind in kinds:
            count = len(positions[i][kind])
            row_offsets[kind] = [offsets[kind], count]
            offsets[kind] += count
        query = queries[prompt.query_id]
        rows.append(
            StoreRow(
                row=i,
                query_id=prompt.query_id,
                pair_id=prompt.query_id,
                tier=prompt.tier,
                variant=prompt.variant,
                dataset=config.dataset,
                harmful=query.harmful,
                n_tokens=prompt.n_tokens,
                positions={kind: positions[i][kind] for kind in kinds},
                **score.to_dict(),
                shard=shard,
                offsets=row_offsets,
                own_start=own_start,
                token_ids=list(prompt.input_ids[own_start:]),
                token_text=[loaded.tokenizer.decode([t]) for t in prompt.input_ids[own_start:]],
            ).to_dict()
        )
    for kind in kinds:
        tensors[f"resid.{kind}"] = torch.cat([acts[i][kind] for i in indices]).to(dtype).contiguous()
    base = out / "shards" / shard_name(shard)
    try:
        atomic_write_bytes(base.with_suffix(".safetensors"), save(tensors, metadata={"shard": str(shard)}))
        atomic_write_json(base.with_suffix(".json"), {"shard": shard, "rows": rows})
    except OSError as exc:
        base.with_suffix(".safetensors").unlink(missing_ok=True)
        finished = len(list((out / "shards").glob("shard-*.json")))
        raise StoreError(
            f"could not write shard {shard} to {out} ({exc.strerror or exc}); the {finished} finished shards are "
            "intact: free disk space and rerun the same command to resume"
        ) from exc


# -- joining the parts of a sharded job ------------------------------------------------------------------------------


@dataclass
class MergeSummary:
    path: Path
    n_prompts: int
    n_shards: int
    shards_copied: int
    shards_present: int
    seconds: float
    gap: GapResult | None = None


def merge_stores(
    parts: Sequence[str | Path],
    out: str | Path,
    *,
    loaded: LoadedModel | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MergeSummary:
    """Join the stores written by `afprobe cache --shard i/N` into one store at `out`.

    Every part must come from the same job (model weights, prompts, layers, positions, dtype, shard size); together
    they must hold every shard. The result equals the store one machine would have written: the same shard files,
    manifest.csv, gap.json and per_query.csv. Nothing is written until every part has been checked; rerunning an
    interrupted merge copies only what is missing.
    loaded: the job's model, if at hand; otherwise only its tokenizer is loaded (for the gap's prompt summary).
    """
    start = time.perf_counter()
    folders = [Path(p) for p in parts]
    if not folders:
        raise StoreError("no parts to merge: give the --out folders of the `afprobe cache --shard` jobs")
    metas = []
    for folder in folders:
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise StoreError(f"{folder} is not an activation store (no meta.json): give the parts' --out folders")
        metas.append(json.loads(meta_path.read_text()))
    reference = _identity(metas[0])
    for folder, meta in zip(folders[1:], metas[1:], strict=True):
        other = _identity(meta)
        for field in IDENTITY_FIELDS:
            if other[field] != reference[field]:
                raise StoreError(
                    f"{folder} was made with another {field.replace('_', ' ')} than {folders[0]} "
                    f"({_short(other[field])} vs {_short(reference[field])}): merge only parts of one job"
                )

    n_prompts, shard_size = metas[0]["n_prompts"], metas[0]["shard_size"]
    n_shards = (n_prompts + shard_size - 1) // shard_size
    source: dict[int, Path] = {}
    for folder in folders:
        for marker in sorted((folder / "shards").glob("shard-*.json")):
            shard = int(marker.stem.removeprefix("shard-"))
            if shard in source:
                if json.loads(marker.read_text()) != json.loads((source[shard] / marker.name).read_text()):
                    raise StoreError(
                        f"shard {shard} is in both {source[shard].parent} and {folder} with different rows: "
                        "merge only parts of one job"
                    )
                continue
            source[shard] = marker.parent
    missing = [shard for shard in range(n_shards) if shard not in source]
    if missing:
        counts = {meta["part"]["count"] for meta in metas if meta.get("part")}
        owner = ""
        if len(counts) == 1:
            count = counts.pop()
            owners = sorted({shard % count for shard in missing})
            plural = "s" if len(owners) > 1 else ""
            owner = f" (they belong to part{plural} {', '.join(f'{i}/{count}' for i in owners)})"
        listed = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise StoreError(
            f"{len(missing)} of {n_shards} shards are in none of the parts: {listed}{owner}; "
            "run or finish those parts (rerunning a part resumes it), then merge again"
        )

    out_path = Path(out)
    merged_meta = {key: value for key, value in metas[0].items() if key != "part"}
    merged_meta["config"] = {**metas[0]["config"], "out": str(out_path), "part": None}
    try:
        _check_or_write_meta(out_path, merged_meta)
    except OSError as exc:
        raise StoreError(f"cannot create store {out_path} ({exc.strerror or exc}): choose a writable --out") from exc
    copied = present = 0
    for shard in range(n_shards):
        name = shard_name(shard)
        if (out_path / "shards" / f"{name}.json").is_file():
            present += 1
        else:
            try:
                # The tensors first, the row list (the shard's finished marker) last, each atomically.
                for suffix in (".safetensors", ".json"):
                    _atomic_copy(source[shard] / f"{name}{suffix}", out_path / "shards" / f"{name}{suffix}")
            except OSError as exc:
                raise StoreError(
                    f"could not copy shard {shard} into {out_path} ({exc.strerror or exc}); the shards copied so far "
                    "are intact: free disk space and rerun the same merge to finish"
                ) from exc
            copied += 1
        if progress is not None:
            progress(shard + 1, n_shards)

    config = CacheConfig(**{k: v for k, v in merged_meta["config"].items() if k in _CACHE_FIELDS})
    if loaded is None:
        loaded = load_tokenizer_only(config.model, merged_meta["model"])
    prompt_set = build_prompt_set(config, loaded)
    if prompt_set.prompt_hash != merged_meta["prompt_hash"]:
        raise StoreError(
            f"the prompts rebuilt here differ from the parts' (prompt hash {prompt_set.prompt_hash[:12]} vs "
            f"{merged_meta['prompt_hash'][:12]}): merge with the same afprobe version and dataset files as the parts"
        )
    prefix_len = ActivationStore.open(out_path).rows[0].own_start
    gap = _finish_store(out_path, config, loaded, prompt_set, prefix_len)
    return MergeSummary(
        path=out_path,
        n_prompts=n_prompts,
        n_shards=n_shards,
        shards_copied=copied,
        shards_present=present,
        seconds=time.perf_counter() - start,
        gap=gap,
    )


_CACHE_FIELDS = {f.name for f in fields(CacheConfig)}


def _atomic_copy(source: Path, target: Path) -> None:
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
