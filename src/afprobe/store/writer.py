"""The one writer of an activation store: meta.json first (or the check that an existing store is this job's), then
shards (tensors first, then rows with the tensors' SHA-256, each file atomic), then manifest.csv and SHA256SUMS.
The cache job, the merge of parts and `create_store` (activations from elsewhere) all write through `StoreWriter`;
the jobs hold the store's writer lock (`afprobe.files.folder_lock`) while they write."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor

from afprobe.files import atomic_write_bytes, atomic_write_json, bytes_sha256, file_sha256, seal_folder
from afprobe.model.architecture import hook_name
from afprobe.store.format import IDENTITY_FIELDS, StoreError, StoreMeta, StoreRow, flat_row, shard_name
from afprobe.store.reader import ActivationStore


class StoreWriter:
    """Writes one store folder. `StoreWriter.open(folder, meta)` creates the store, or resumes it after checking
    that the store there was made by the same job."""

    def __init__(self, folder: Path, meta: StoreMeta):
        self.folder = folder
        self.meta = meta

    @classmethod
    def open(cls, folder: str | Path, meta: StoreMeta) -> StoreWriter:
        folder = Path(folder)
        try:
            _check_or_write_meta(folder, meta)
        except OSError as exc:
            raise StoreError(
                f"cannot create store {folder} ({exc.strerror or exc}): choose a writable --out folder"
            ) from exc
        return cls(folder, meta)

    def _base(self, index: int) -> Path:
        return self.folder / "shards" / shard_name(index)

    def has_shard(self, index: int) -> bool:
        """A shard is finished once its row file exists (it is written last)."""
        return self._base(index).with_suffix(".json").is_file()

    def check_shard(self, index: int) -> str:
        """`done`, `missing`, or `damaged`: finished, but its tensors no longer match the checksum in its row file
        (or either file is unreadable). A damaged shard's files are removed, so that the job writes it again."""
        base = self._base(index)
        if not self.has_shard(index):
            return "missing"
        if shard_intact(base):
            return "done"
        base.with_suffix(".json").unlink(missing_ok=True)
        base.with_suffix(".safetensors").unlink(missing_ok=True)
        return "damaged"

    def finished_shards(self) -> int:
        return len(list((self.folder / "shards").glob("shard-*.json")))

    def write_shard(self, index: int, tensors: dict[str, Tensor], rows: Sequence[dict[str, Any]]) -> None:
        """The shard's tensors (`resid.<kind>`), then its rows. A failed write (full disk) removes the half shard
        and leaves every finished one as it was."""
        from safetensors.torch import save

        base = self._base(index)
        blob = save(tensors, metadata={"shard": str(index)})
        try:
            atomic_write_bytes(base.with_suffix(".safetensors"), blob)
            atomic_write_json(
                base.with_suffix(".json"), {"shard": index, "sha256": bytes_sha256(blob), "rows": list(rows)}
            )
        except OSError as exc:
            base.with_suffix(".safetensors").unlink(missing_ok=True)
            raise StoreError(
                f"could not write shard {index} to {self.folder} ({exc.strerror or exc}); the "
                f"{self.finished_shards()} finished shards are intact: free disk space and rerun the same command "
                "to resume"
            ) from exc

    def copy_shard(self, index: int, source: Path) -> None:
        """Shard `index` from another store folder (a part of a sharded job), tensors first, rows last."""
        name = shard_name(index)
        try:
            for suffix in (".safetensors", ".json"):
                _atomic_copy(source / "shards" / f"{name}{suffix}", self.folder / "shards" / f"{name}{suffix}")
        except OSError as exc:
            raise StoreError(
                f"could not copy shard {index} into {self.folder} ({exc.strerror or exc}); the shards copied so far "
                "are intact: free disk space and rerun the same merge to finish"
            ) from exc

    def finish(self) -> list[StoreRow]:
        """manifest.csv, once every shard is in; returns the store's rows."""
        rows = ActivationStore.open(self.folder).rows
        write_manifest_csv(self.folder, rows)
        return rows

    def seal(self) -> None:
        """SHA256SUMS over every file of the store (meta.json, manifest, shards, gap files)."""
        seal_folder(self.folder)


def shard_intact(base: Path) -> bool:
    """Whether a finished shard's row file reads and its tensors match the checksum recorded there (shards written
    before checksums were recorded only need to read)."""
    try:
        recorded = json.loads(base.with_suffix(".json").read_text()).get("sha256")
        return recorded is None or file_sha256(base.with_suffix(".safetensors")) == recorded
    except (OSError, ValueError):
        return False


def _check_or_write_meta(out: Path, meta: StoreMeta) -> None:
    meta_path = out / "meta.json"
    if meta_path.is_file():
        existing = StoreMeta.from_json(json.loads(meta_path.read_text()))
        old, new = existing.identity(), meta.identity()
        for name in IDENTITY_FIELDS:
            if old[name] != new[name]:
                raise StoreError(
                    f"store {out} was made with another {name.replace('_', ' ')} "
                    f"({short_repr(old[name])} there, {short_repr(new[name])} now): use a new --out folder or "
                    f"delete {out}"
                )
        if existing.part != meta.part:
            raise StoreError(
                f"store {out} holds {_part_text(existing.part)}, this job is {_part_text(meta.part)}: "
                "give each --shard its own --out folder"
            )
        return
    if out.exists() and any(not path.name.startswith(".") for path in out.iterdir()):
        raise StoreError(f"{out} exists and is not an activation store: choose an empty or new --out folder")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, meta.to_json())


def _part_text(part: dict[str, int] | None) -> str:
    return f"part {part['index']}/{part['count']}" if part else "a whole job"


def short_repr(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _atomic_copy(source: Path, target: Path) -> None:
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_manifest_csv(store_dir: Path, rows: Sequence[StoreRow]) -> Path:
    path = store_dir / "manifest.csv"
    flat = [flat_row(row) for row in rows]
    if not flat:
        return path
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(flat[0].keys()))
    writer.writeheader()
    writer.writerows(flat)
    atomic_write_bytes(path, buffer.getvalue().encode())
    return path


def create_store(
    path: str | Path,
    activations: dict[str, Float[Tensor, "rows layers d"]],
    *,
    layers: Sequence[int],
    query_ids: Sequence[str],
    tiers: Sequence[str],
    contrast: tuple[str, str] | None = ("free", "paid"),
    variant: str = "external",
    n_layers: int | None = None,
    log_odds: Sequence[float] | None = None,
    model_name: str = "external",
    harmful: bool = True,
) -> ActivationStore:
    """Write activations computed elsewhere (one token per row and position kind) as a store afprobe can read.

    For importing activations from other tools, and for synthetic data with a known answer.
    """
    folder = Path(path)
    if (folder / "meta.json").exists():
        raise StoreError(f"{folder} already holds a store: choose a new folder")
    kinds = list(activations)
    n_rows = len(query_ids)
    first = activations[kinds[0]]
    if any(t.shape[:2] != (n_rows, len(layers)) for t in activations.values()) or len(tiers) != n_rows:
        raise StoreError("every activation tensor must be [rows, layers, d_model] with one row per query id and tier")
    d_model = int(first.shape[-1])
    n_layers = n_layers if n_layers is not None else max(layers)
    meta = StoreMeta(
        model={
            "name": model_name,
            "source": "external",
            "weights_sha256": "external",
            "dtype": "float32",
            "adapter": None,
            "n_layers": n_layers,
            "d_model": d_model,
            "vocab_size": 0,
            "max_context": 0,
        },
        prompt_hash="external",
        dataset_hash="external",
        layers=list(layers),
        hook_names=[hook_name(layer, n_layers) for layer in layers],
        positions=kinds,
        dtype="float32",
        shard_size=n_rows,
        n_prompts=n_rows,
        n_queries=len(set(query_ids)),
        variant=variant,
        tiers=sorted(set(tiers)),
        contrast=list(contrast) if contrast else None,
        config={},
    )
    rows = [
        StoreRow(
            row=i,
            query_id=query_ids[i],
            pair_id=query_ids[i],
            tier=tiers[i],
            variant=variant,
            dataset="external",
            harmful=harmful,
            n_tokens=0,
            positions={k: [0] for k in kinds},
            log_odds=float(log_odds[i]) if log_odds is not None else float("nan"),
            first_token_log_odds=float("nan"),
            p_accept=float("nan"),
            logp_accept=float("nan"),
            logp_reject=float("nan"),
            shard=0,
            offsets={k: [i, 1] for k in kinds},
        ).to_dict()
        for i in range(n_rows)
    ]
    writer = StoreWriter.open(folder, meta)
    writer.write_shard(0, {f"resid.{k}": v.float().contiguous() for k, v in activations.items()}, rows)
    writer.seal()
    return ActivationStore.open(folder)
