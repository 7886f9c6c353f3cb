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

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from afprobe import __version__
from afprobe.behaviour.gap import GapConfig, GapResult, build_gap_result, write_gap
from afprobe.data.contrast import CONTRAST_SETS, load_contrast_pairs, render_contrast_set
from afprobe.data.prompts import PromptSet, RenderedPrompt, parse_positions, prompt_positions, render_pairs
from afprobe.data.query_sets import dataset_hash
from afprobe.errors import AfprobeError
from afprobe.files import CHECKSUMS, folder_lock
from afprobe.model.architecture import has_sliding_window, hook_name, pad_token_id, parse_layers
from afprobe.model.forward import PrefixCache, compute_prefix_cache
from afprobe.model.job import PairedPromptJob
from afprobe.model.loading import LoadedModel, load_remote_model
from afprobe.model.memory import MemoryEstimate
from afprobe.model.readout import (
    AnswerTokens,
    ComplianceScore,
    length_batches,
    plan_batch_size,
    score_batch,
)
from afprobe.model.recording import BACKENDS, ResidualRecorder, full_forward_row, make_backend, stack_record
from afprobe.store.format import STORE_DTYPES, StoreError, StoreMeta, StoreRow
from afprobe.store.writer import StoreWriter


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
    shards_repaired: int = 0  # finished shards found damaged (checksum) and written again, among shards_written

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
    """The paired prompts of a job: a dataset under a variant, or a contrast set (`CONTRAST_SETS`)."""
    if config.dataset in CONTRAST_SETS:
        pairs = load_contrast_pairs(config.dataset, n=config.n)
        return render_contrast_set(
            loaded.tokenizer, config.dataset, pairs, format=config.format, max_context=loaded.max_context or None
        )
    queries = config.queries()
    return render_pairs(loaded.tokenizer, queries, config.prompt_config(), max_context=loaded.max_context or None)


@dataclass
class CachePlan:
    """What a cache job settles before its first forward: the prompts, which positions and layers it records, how
    much of the shared prefix it caches once, and the store's meta.json."""

    config: CacheConfig
    prompt_set: PromptSet
    kinds: list[str]
    kind_layers: dict[str, list[int]]  # kind -> the layers kept for it
    recorded: list[int]  # every layer any kind keeps
    positions: list[dict[str, list[int]]]  # per prompt: kind -> absolute token indices
    prefix_len: int
    part: JobPart | None
    meta: StoreMeta

    @property
    def prompts(self) -> list[RenderedPrompt]:
        return self.prompt_set.prompts

    @property
    def n_shards(self) -> int:
        return (len(self.prompts) + self.config.shard_size - 1) // self.config.shard_size

    def owned_shards(self) -> list[int]:
        return [shard for shard in range(self.n_shards) if self.part is None or self.part.owns(shard)]

    def shard_rows(self, shard: int) -> list[int]:
        size = self.config.shard_size
        return list(range(shard * size, min(len(self.prompts), (shard + 1) * size)))


def plan_cache(config: CacheConfig, loaded: LoadedModel) -> CachePlan:
    prompt_set = build_prompt_set(config, loaded)
    layers = parse_layers(config.layers, loaded.n_layers)
    kinds = parse_positions(config.positions, prompt_set)
    kind_layers = {kind: layers for kind in kinds}
    if config.suffix_layers is not None:
        if "suffix" not in kinds:
            raise AfprobeError("--suffix-layers needs suffix in --positions")
        kind_layers["suffix"] = parse_layers(config.suffix_layers, loaded.n_layers)
    prompts = prompt_set.prompts
    shared = prompt_set.shared_prefix_len
    positions = [{kind: prompt_positions(p, kind, shared) for kind in kinds} for p in prompts]
    # The prefix cache must also stop before every recorded position.
    first_recorded = min((min(idx) for row in positions for idx in row.values() if idx), default=shared)
    prefix_len = min(prompt_set.prefix_len(), first_recorded)
    part = JobPart.parse(config.part) if config.part else None
    variant = prompt_set.variant
    meta = StoreMeta(
        afprobe_version=__version__,
        model=loaded.fingerprint.to_dict(),
        prompt_hash=prompt_set.prompt_hash,
        dataset_hash=dataset_hash(prompt_set.queries),
        layers=layers,
        hook_names=[hook_name(layer, loaded.n_layers) for layer in layers],
        positions=kinds,
        position_layers={k: v for k, v in kind_layers.items() if v != layers},
        dtype=config.store_dtype,
        shard_size=config.shard_size,
        n_prompts=len(prompts),
        n_queries=len(prompt_set.queries),
        variant=variant.name,
        tiers=variant.tier_names,
        contrast=list(variant.contrast) if variant.contrast else None,
        shared_prefix_tokens=shared,
        prefix_tail=[loaded.tokenizer.decode([t]) for t in prompts[0].input_ids[max(0, prefix_len - 32) : prefix_len]],
        config=asdict(config),
        part={"index": part.index, "count": part.count} if part is not None else None,
    )
    recorded = sorted({layer for chosen in kind_layers.values() for layer in chosen})
    return CachePlan(config, prompt_set, kinds, kind_layers, recorded, positions, prefix_len, part, meta)


ShardActivations = tuple[dict[int, ComplianceScore], dict[int, dict[str, Tensor]]]


class _PrefixSharedPass:
    """The fast path: each prompt's own tokens on a fork of the shared prefix's KV cache, in length-sorted
    batches, the residual stream recorded by hooks in the same forward that scores compliance."""

    def __init__(self, plan: CachePlan, loaded: LoadedModel, on_plan: Callable[[MemoryEstimate], None] | None):
        self.plan, self.loaded = plan, loaded
        self.answers = AnswerTokens.from_tokenizer(loaded.tokenizer)
        self.recorder = ResidualRecorder(loaded.model, plan.recorded, plan.kind_layers)
        self.pad_id = pad_token_id(loaded.tokenizer)
        self.prefix: PrefixCache | None = None  # computed when the first shard needs it (not at all on a resume)
        self.prefix_seconds = 0.0
        self.estimate, self.batch_size = plan_batch_size(
            loaded.model, plan.prompts, plan.prefix_len, self.answers, plan.config.batch_size, one_forward=False
        )
        if on_plan is not None:
            on_plan(self.estimate)

    def run(self, indices: list[int], advance: Callable[[int], None]) -> ShardActivations:
        plan, prompts, kinds = self.plan, self.plan.prompts, self.plan.kinds
        if self.prefix is None:
            t0 = time.perf_counter()
            self.prefix = compute_prefix_cache(self.loaded.model, prompts[0].input_ids[: plan.prefix_len])
            self.prefix_seconds = time.perf_counter() - t0
        scores: dict[int, ComplianceScore] = {}
        acts: dict[int, dict[str, Tensor]] = {}
        exact = has_sliding_window(self.prefix.cache)
        for batch in length_batches([prompts[i] for i in indices], self.batch_size, exact=exact):
            rows = [indices[b] for b in batch]
            relative = [{k: [j - plan.prefix_len for j in plan.positions[i][k]] for k in kinds} for i in rows]
            record = self.recorder.empty_record(relative)
            # Hooks live only around the forward of the prompts' own tokens, not the answer tokens after it.
            batch_scores = score_batch(
                self.loaded.model,
                self.prefix,
                [prompts[i] for i in rows],
                self.answers,
                pad_id=self.pad_id,
                stage1_context=self.recorder.recording(relative, record),
            )
            for position, i in enumerate(rows):
                scores[i] = batch_scores[position]
                acts[i] = {k: stack_record(record[k][position], plan.kind_layers[k]) for k in kinds}
            advance(len(rows))
        return scores, acts


class _FullForwardPass:
    """The naive path (TransformerLens, nnsight, NDIF): each prompt whole, once with each answer."""

    prefix_seconds = 0.0
    estimate = None

    def __init__(self, plan: CachePlan, loaded: LoadedModel):
        self.plan = plan
        self.answers = AnswerTokens.from_tokenizer(loaded.tokenizer)
        self.backend = make_backend(plan.config.backend, loaded, plan.recorded, remote=plan.config.remote)

    def run(self, indices: list[int], advance: Callable[[int], None]) -> ShardActivations:
        plan = self.plan
        scores: dict[int, ComplianceScore] = {}
        acts: dict[int, dict[str, Tensor]] = {}
        for i in indices:
            scores[i], full = full_forward_row(self.backend, plan.prompts[i], self.answers, plan.positions[i])
            acts[i] = {k: full[k][:, [plan.recorded.index(layer) for layer in plan.kind_layers[k]]] for k in plan.kinds}
            advance(1)
        return scores, acts


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
    plan = plan_cache(config, loaded)
    with folder_lock(Path(config.out), "afprobe cache"):
        return _fill_store(config, plan, loaded, progress, stop_after_shards, on_plan, start)


def _fill_store(
    config: CacheConfig,
    plan: CachePlan,
    loaded: LoadedModel,
    progress: Callable[[int, int], None] | None,
    stop_after_shards: int | None,
    on_plan: Callable[[MemoryEstimate], None] | None,
    start: float,
) -> CacheSummary:
    writer = StoreWriter.open(config.out, plan.meta)
    full_forward = config.backend != "hooks" or bool(config.remote)
    forward = _FullForwardPass(plan, loaded) if full_forward else _PrefixSharedPass(plan, loaded, on_plan)

    owned = plan.owned_shards()
    total = sum(len(plan.shard_rows(shard)) for shard in owned)
    written = skipped = repaired = done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    for shard in owned:
        indices = plan.shard_rows(shard)
        state = writer.check_shard(shard)
        if state == "done":
            skipped += 1
            advance(len(indices))
            continue
        if stop_after_shards is not None and written >= stop_after_shards:
            break
        scores, acts = forward.run(indices, advance)
        tensors, rows = _shard_contents(plan, loaded, shard, indices, scores, acts)
        writer.write_shard(shard, tensors, rows)
        written += 1
        repaired += state == "damaged"

    summary = CacheSummary(
        path=Path(config.out),
        n_prompts=len(plan.prompts),
        n_shards=plan.n_shards,
        shards_written=written,
        shards_skipped=skipped,
        shards_repaired=repaired,
        seconds=time.perf_counter() - start,
        prefix_seconds=forward.prefix_seconds,
        part=plan.part,
        part_shards=len(owned) if plan.part is not None else None,
        memory=forward.estimate,
    )
    if summary.complete and plan.part is None:
        summary.gap = finish_store(writer, config, loaded, plan.prompt_set, plan.prefix_len)
    else:
        _seal(writer)
    return summary


def _seal(writer: StoreWriter) -> None:
    try:
        writer.seal()
    except OSError as exc:
        raise StoreError(
            f"could not write {writer.folder / CHECKSUMS} ({exc.strerror}): free disk space and rerun the same "
            "command (the shards are intact)"
        ) from exc


def finish_store(
    writer: StoreWriter, config: CacheConfig, loaded: LoadedModel, prompt_set: PromptSet, prefix_len: int
) -> GapResult:
    """The files a complete store gets once every shard is in: manifest.csv, gap.json and per_query.csv."""
    out = writer.folder
    try:
        rows = writer.finish()
        gap = _gap_from_rows(config, loaded, prompt_set, rows, prefix_len)
        write_gap(gap, out)
    except OSError as exc:
        raise StoreError(f"could not write {out / 'manifest.csv'} ({exc.strerror}): free disk space and rerun") from exc
    _seal(writer)
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


def _shard_contents(
    plan: CachePlan,
    loaded: LoadedModel,
    shard: int,
    indices: list[int],
    scores: dict[int, ComplianceScore],
    acts: dict[int, dict[str, Tensor]],
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """A shard's tensors (`resid.<kind>`, rows' tokens in row order) and its rows."""
    prompts, positions, kinds, config, own_start = (
        plan.prompts,
        plan.positions,
        plan.kinds,
        plan.config,
        plan.prefix_len,
    )
    queries = {q.query_id: q for q in plan.prompt_set.queries}
    dtype = STORE_DTYPES[config.store_dtype]
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
    return tensors, rows
