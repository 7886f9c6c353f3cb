"""Reading an activation store: memory-mapped shards, rows, selections and batches."""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from afprobe.data.contrast import CONTRAST_SETS
from afprobe.data.splits import split_items
from afprobe.files import file_sha256
from afprobe.model.architecture import hook_name
from afprobe.store.format import StoreError, StoreMeta, StoreRow, flat_row, shard_name

_NUMPY_VIEW = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, torch.bfloat16)}


def _read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return 8 + length, header


class _MappedShard:
    """A safetensors file mapped into memory; tensors are views on the mapping (nothing is read until used)."""

    def __init__(self, path: Path):
        self.path = path
        self.data_start, self.header = _read_safetensors_header(path)
        end = max((info["data_offsets"][1] for key, info in self.header.items() if key != "__metadata__"), default=0)
        if path.stat().st_size < self.data_start + end:
            raise ValueError(f"truncated: {path.stat().st_size} bytes of {self.data_start + end}")
        with path.open("rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)

    def tensor(self, name: str) -> Tensor:
        info = self.header[name]
        numpy_dtype, torch_view = _NUMPY_VIEW[info["dtype"]]
        start, end = info["data_offsets"]
        count = int(np.prod(info["shape"])) if info["shape"] else 1
        array = np.frombuffer(self._map, dtype=numpy_dtype, count=count, offset=self.data_start + start)
        array = array.reshape(info["shape"])
        assert end - start == array.nbytes
        with warnings.catch_warnings():
            # The mapping is read-only on purpose; torch would warn that the array is not writable.
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        return tensor.view(torch_view) if torch_view is not None else tensor


class ActivationStore:
    """Read access to a finished (or partly finished) store.

    >>> store = ActivationStore.open("activations/quickstart")
    >>> rows = store.select(tier="free")
    >>> acts = store.activations("last", layers=[10, 20], rows=rows)   # [rows, 2, d_model]
    """

    def __init__(
        self,
        path: Path,
        meta: StoreMeta,
        rows: list[StoreRow],
        checksums: dict[int, str] | None = None,
        *,
        verify: bool = True,
    ):
        self.path = path
        self.meta = meta
        self.rows = rows
        self.checksums = checksums or {}  # shard -> SHA-256 of its tensors, recorded when it was written
        self.verify = verify
        self._shards: dict[int, _MappedShard] = {}

    @classmethod
    def open(cls, path: str | Path, *, allow_incomplete: bool = False, verify: bool = True) -> ActivationStore:
        """verify: check each shard against its recorded checksum the first time it is read (one read of the file,
        about as long as reading its tensors once; `afprobe verify` checks a whole store up front)."""
        folder = Path(path)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise StoreError(f"{folder} is not an activation store (no meta.json): run `afprobe cache --out {folder}`")
        try:
            meta = StoreMeta.from_json(json.loads(meta_path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(
                f"{meta_path} is damaged ({type(exc).__name__}): run `afprobe verify {folder}`, then recreate the "
                "store with the same `afprobe cache` command into a new folder"
            ) from exc
        rows: list[StoreRow] = []
        checksums: dict[int, str] = {}
        for shard_json in sorted((folder / "shards").glob("shard-*.json")):
            try:
                content = json.loads(shard_json.read_text())
                rows.extend(StoreRow(**row) for row in content["rows"])
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(
                    f"{shard_json} is damaged ({type(exc).__name__}): rerun the same `afprobe cache` command to "
                    "rewrite it"
                ) from exc
            if content.get("sha256"):
                checksums[int(content["shard"])] = content["sha256"]
        rows.sort(key=lambda r: r.row)
        if not allow_incomplete and meta.part:
            part = meta.part
            raise StoreError(
                f"{folder} is part {part['index']}/{part['count']} of a sharded job, not a whole store: "
                f"join the parts with `afprobe merge PART_FOLDERS... --out STORE`"
            )
        if not allow_incomplete and len(rows) != meta.n_prompts:
            raise StoreError(
                f"store {folder} is incomplete ({len(rows)} of {meta.n_prompts} prompts): "
                "rerun the same `afprobe cache` command to finish it"
            )
        return cls(folder, meta, rows, checksums, verify=verify)

    # -- what is in it ------------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.meta.layers)

    @property
    def positions(self) -> list[str]:
        return list(self.meta.positions)

    def layers_of(self, kind: str) -> list[int]:
        """The layers cached for one position kind (`--suffix-layers` can give `suffix` fewer than the others)."""
        return self.meta.layers_of(kind)

    def context(self, row: int, position: int, before: int = 12, after: int = 4) -> tuple[list[str], int] | None:
        """The text of the tokens around absolute `position` of a row, and the index of `position` in that list
        (None for stores cached before token text was kept)."""
        info = self.rows[row]
        if info.token_text is None:
            return None
        # The shared prefix's last tokens are kept once, in meta.json: they are the same for every row.
        tail = list(self.meta.prefix_tail or [])
        text = tail + info.token_text
        local = position - info.own_start + len(tail)
        if not len(tail) <= local < len(text):
            return None
        start = max(0, local - before)
        return text[start : local + after + 1], local - start

    @property
    def d_model(self) -> int:
        return int(self.meta.model["d_model"])

    def queries_for(self, split: str) -> list[str]:
        """The ids of this store's queries that `split` (fit, evaluate, all) keeps, in store order.

        A store cached with `--split all` holds the dataset's first queries in dataset order, so their roles follow
        their order here (`afprobe.data.splits`); one cached with `--split fit` or `evaluate` holds only that role. A
        contrast set's pairs only ever fit."""
        order = list(dict.fromkeys(row.query_id for row in self.rows))
        cached = self.meta.config.get("split", "all")
        if self.meta.config.get("dataset") in CONTRAST_SETS or split == "all":
            return order if split in ("all", "fit") else []
        if cached == "all":
            return split_items(order, split)
        return order if cached == split else []

    def __len__(self) -> int:
        return len(self.rows)

    def manifest(self) -> list[dict[str, Any]]:
        """One dict per row (`pandas.DataFrame(store.manifest())` gives a table)."""
        return [flat_row(row) for row in self.rows]

    def select(
        self,
        *,
        tier: str | Sequence[str] | None = None,
        variant: str | Sequence[str] | None = None,
        query_ids: Sequence[str] | None = None,
    ) -> list[int]:
        """Indices (into `store.rows`) of the rows matching every given filter."""

        def wanted(value: str, allowed: str | Sequence[str] | None) -> bool:
            return allowed is None or value == allowed if isinstance(allowed, str | None) else value in allowed

        ids = set(query_ids) if query_ids is not None else None
        return [
            i
            for i, row in enumerate(self.rows)
            if wanted(row.tier, tier) and wanted(row.variant, variant) and (ids is None or row.query_id in ids)
        ]

    def compliance(self, rows: Sequence[int] | None = None) -> Float[Tensor, " rows"]:
        """Forward-pass log-odds (accept minus reject) recorded for each row."""
        chosen = range(len(self.rows)) if rows is None else rows
        return torch.tensor([self.rows[i].log_odds for i in chosen])

    # -- tensors ------------------------------------------------------------------------------------------------
    def _shard(self, index: int) -> _MappedShard:
        if index not in self._shards:
            path = self.path / "shards" / f"{shard_name(index)}.safetensors"
            fix = f"rerun the same `afprobe cache` command to rewrite it (`afprobe verify {self.path}` lists all)"
            try:
                if self.verify and index in self.checksums and file_sha256(path) != self.checksums[index]:
                    raise StoreError(f"{path} is damaged (its checksum differs from the one recorded): {fix}")
                self._shards[index] = _MappedShard(path)
            except (OSError, ValueError, struct.error) as exc:
                raise StoreError(f"{path} cannot be read ({type(exc).__name__}): {fix}") from exc
        return self._shards[index]

    def _layer_columns(self, layers: Sequence[int] | None, kind: str | None = None) -> list[int]:
        have = self.layers if kind is None else self.layers_of(kind)
        if layers is None:
            return list(range(len(have)))
        missing = [layer for layer in layers if layer not in have]
        if missing:
            where = f" for position {kind!r}" if kind is not None and have != self.layers else ""
            raise StoreError(f"layers {missing} are not in store {self.path}{where} (it has {have})")
        return [have.index(layer) for layer in layers]

    def _check_kind(self, kind: str) -> None:
        if kind not in self.positions:
            raise StoreError(f"position {kind!r} is not in store {self.path} (it has {', '.join(self.positions)})")

    def row_tokens(self, row: int, kind: str, layers: Sequence[int] | None = None) -> Float[Tensor, "tokens layers d"]:
        """All cached tokens of one kind for one row: `[tokens, layers, d_model]` (float32)."""
        self._check_kind(kind)
        columns = self._layer_columns(layers, kind)
        info = self.rows[row]
        start, count = info.offsets[kind]
        tensor = self._shard(info.shard).tensor(f"resid.{kind}")
        return tensor[start : start + count][:, columns].float()

    def activations(
        self,
        kind: str = "last",
        *,
        layers: Sequence[int] | None = None,
        rows: Sequence[int] | None = None,
        reduce: Literal["last", "first", "mean"] = "last",
    ) -> Float[Tensor, "rows layers d"]:
        """One vector per row: the row's tokens of `kind` reduced to one (its last token, first, or mean)."""
        chosen = range(len(self.rows)) if rows is None else rows
        out = []
        for row in chosen:
            tokens = self.row_tokens(row, kind, layers)
            if tokens.shape[0] == 0:
                raise StoreError(f"row {row} has no {kind!r} tokens")
            out.append(tokens.mean(0) if reduce == "mean" else tokens[-1 if reduce == "last" else 0])
        if not out:
            return torch.zeros(0, len(self._layer_columns(layers, kind)), self.d_model)
        return torch.stack(out)

    def stack(
        self,
        positions: Sequence[str] | None = None,
        *,
        layers: Sequence[int] | None = None,
        rows: Sequence[int] | None = None,
        reduce: Literal["last", "first", "mean"] = "last",
    ) -> Float[Tensor, "rows layers positions d"]:
        """`[rows, layers, positions, d_model]`: each position kind reduced to one vector per row."""
        kinds = list(positions) if positions is not None else self.positions
        return torch.stack([self.activations(k, layers=layers, rows=rows, reduce=reduce) for k in kinds], dim=2)

    def token_activations(
        self, kind: str, layer: int, rows: Sequence[int] | None = None
    ) -> tuple[Float[Tensor, "tokens d"], Tensor]:
        """Every cached token of `kind` at one layer, `[tokens, d_model]`, and the row each token belongs to."""
        chosen = range(len(self.rows)) if rows is None else rows
        parts, owners = [], []
        for row in chosen:
            tokens = self.row_tokens(row, kind, [layer])[:, 0]
            parts.append(tokens)
            owners.append(torch.full((tokens.shape[0],), row, dtype=torch.long))
        if not parts:
            return torch.zeros(0, self.d_model), torch.zeros(0, dtype=torch.long)
        return torch.cat(parts), torch.cat(owners)

    def iter_batches(
        self, layer: int, kind: str = "suffix", batch_size: int = 4096, *, shuffle: bool = True, seed: int = 0
    ) -> Iterator[Float[Tensor, "batch d"]]:
        """`[batch, d_model]` activation batches of one layer, the form sae-lens' trainer consumes."""
        tokens, _ = self.token_activations(kind, layer)
        order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed)) if shuffle else None
        for start in range(0, tokens.shape[0], batch_size):
            index = slice(start, start + batch_size)
            yield tokens[order[index]] if order is not None else tokens[index]

    def export_sae_dataset(self, layer: int, out: str | Path, kind: str = "suffix", context_size: int = 1) -> Path:
        """Write one layer's activations as a Hugging Face dataset in sae-lens' cached-activations format.

        The column is named by the layer's TransformerLens hook (`blocks.L.hook_resid_pre`) and each row holds
        `context_size` consecutive tokens `[context_size, d_model]`; set the same `context_size` in the sae-lens
        config and `use_cached_activations=True`, `cached_activations_path=out`.
        """
        from datasets import Array2D, Dataset, Features

        tokens, _ = self.token_activations(kind, layer)
        usable = (tokens.shape[0] // context_size) * context_size
        if usable == 0:
            raise StoreError(f"store {self.path} has fewer than {context_size} {kind!r} tokens to export")
        name = hook_name(layer, self.meta.n_model_layers)
        array = tokens[:usable].reshape(-1, context_size, self.d_model).numpy().astype(np.float32)
        features = Features({name: Array2D(shape=(context_size, self.d_model), dtype="float32")})
        dataset = Dataset.from_dict({name: list(array)}, features=features)
        dataset.save_to_disk(str(out))
        return Path(out)
