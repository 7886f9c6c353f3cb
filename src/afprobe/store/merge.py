"""Merging the parts of a cache job run on several machines into the one-machine store."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from afprobe.behaviour.gap import GapResult
from afprobe.files import folder_lock
from afprobe.model.loading import LoadedModel, load_tokenizer_only
from afprobe.store.cache_job import CacheConfig, build_prompt_set, finish_store
from afprobe.store.format import IDENTITY_FIELDS, StoreError, StoreMeta, shard_name
from afprobe.store.reader import ActivationStore
from afprobe.store.writer import StoreWriter, shard_intact, short_repr


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
        metas.append(StoreMeta.from_json(json.loads(meta_path.read_text())))
    reference = metas[0].identity()
    for folder, meta in zip(folders[1:], metas[1:], strict=True):
        other = meta.identity()
        for field in IDENTITY_FIELDS:
            if other[field] != reference[field]:
                raise StoreError(
                    f"{folder} was made with another {field.replace('_', ' ')} than {folders[0]} "
                    f"({short_repr(other[field])} vs {short_repr(reference[field])}): merge only parts of one job"
                )

    n_prompts, shard_size = metas[0].n_prompts, metas[0].shard_size
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
        counts = {meta.part["count"] for meta in metas if meta.part}
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

    damaged = [
        source[shard] / shard_name(shard)
        for shard in range(n_shards)
        if not shard_intact(source[shard] / shard_name(shard))
    ]
    if damaged:
        raise StoreError(
            f"{len(damaged)} shard(s) of the parts are damaged (checksum differs), first {damaged[0]}: rerun the "
            "part that wrote each (it rewrites damaged shards), then merge again"
        )

    out_path = Path(out)
    merged_meta = replace(metas[0], part=None, config={**metas[0].config, "out": str(out_path), "part": None})
    with folder_lock(out_path, "afprobe merge"):
        return _merge_into(out_path, merged_meta, source, n_prompts, n_shards, loaded, progress, start)


def _merge_into(
    out_path: Path,
    merged_meta: StoreMeta,
    source: dict[int, Path],
    n_prompts: int,
    n_shards: int,
    loaded: LoadedModel | None,
    progress: Callable[[int, int], None] | None,
    start: float,
) -> MergeSummary:
    writer = StoreWriter.open(out_path, merged_meta)
    copied = present = 0
    for shard in range(n_shards):
        if writer.check_shard(shard) == "done":
            present += 1
        else:
            writer.copy_shard(shard, source[shard].parent)
            copied += 1
        if progress is not None:
            progress(shard + 1, n_shards)

    config = CacheConfig(**{k: v for k, v in merged_meta.config.items() if k in _CACHE_FIELDS})
    if loaded is None:
        loaded = load_tokenizer_only(config.model, merged_meta.model)
    prompt_set = build_prompt_set(config, loaded)
    if prompt_set.prompt_hash != merged_meta.prompt_hash:
        raise StoreError(
            f"the prompts rebuilt here differ from the parts' (prompt hash {prompt_set.prompt_hash[:12]} vs "
            f"{merged_meta.prompt_hash[:12]}): merge with the same afprobe version and dataset files as the parts"
        )
    prefix_len = ActivationStore.open(out_path).rows[0].own_start
    gap = finish_store(writer, config, loaded, prompt_set, prefix_len)
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
