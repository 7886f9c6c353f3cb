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
from afprobe.data.contrast import CONTRAST_SETS, load_situational_awareness, render_contrast_set
from afprobe.data.prompts import PromptSet, RenderedPrompt, parse_positions, prompt_positions, render_pairs
from afprobe.data.query_sets import dataset_hash, load_queries
from afprobe.errors import AfprobeError
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
    # The prefix cache must also stop before every recorded position.
    first_recorded = min((min(idx) for row in positions for idx in row.values() if idx), default=shared)
    prefix_len = min(prompt_set.prefix_len(), first_recorded)

    out = Path(config.out)
    part = JobPart.parse(config.part) if config.part else None
    meta = StoreMeta(
        afprobe_version=__version__,
        model=loaded.fingerprint.to_dict(),
        prompt_hash=prompt_set.prompt_hash,
        dataset_hash=dataset_hash(queries),
        layers=layers,
        hook_names=[hook_name(layer, loaded.n_layers) for layer in layers],
        positions=kinds,
        position_layers={k: v for k, v in kind_layers.items() if v != layers},
        dtype=config.store_dtype,
        shard_size=config.shard_size,
        n_prompts=len(prompts),
        n_queries=len(queries),
        variant=prompt_set.variant.name,
        tiers=prompt_set.variant.tier_names,
        contrast=list(prompt_set.variant.contrast) if prompt_set.variant.contrast else None,
        shared_prefix_tokens=shared,
        prefix_tail=[loaded.tokenizer.decode([t]) for t in prompts[0].input_ids[max(0, prefix_len - 32) : prefix_len]],
        config=asdict(config),
        part={"index": part.index, "count": part.count} if part is not None else None,
    )
    writer = StoreWriter.open(out, meta)

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
    pad_id = pad_token_id(loaded.tokenizer)
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
        if writer.has_shard(shard):
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
        tensors, shard_rows = _shard_contents(
            shard, indices, prompts, positions, kinds, scores, acts, dtype, categories, config, prefix_len, loaded
        )
        writer.write_shard(shard, tensors, shard_rows)
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
        summary.gap = finish_store(writer, config, loaded, prompt_set, prefix_len)
    return summary


def _shard_rows(shard: int, shard_size: int, n_prompts: int) -> list[int]:
    return list(range(shard * shard_size, min(n_prompts, (shard + 1) * shard_size)))


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
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """A shard's tensors (`resid.<kind>`, rows' tokens in row order) and its rows."""
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
