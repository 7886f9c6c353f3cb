"""The activation store: a folder of safetensors shards written by `afprobe cache`, read back memory-mapped.

Layout of `activations/RUN/`:

    meta.json                 identity (model fingerprint, prompt and dataset hashes, layers, positions, dtype),
                              the full config, shard size, status
    shards/shard-00000.safetensors
                              one tensor per position kind, `resid.<kind>`: [tokens, layers, d_model], the tokens of
                              that kind of every prompt in the shard, in row order
    shards/shard-00000.json   the shard's rows (query id, tier, variant, token count, position indices, where each
                              row's tokens sit in the tensors, forward-pass compliance); written last, so a shard
                              counts as finished only once this file exists
    manifest.csv              every row in one table, written when the store is complete

Layer index l is the residual stream entering decoder layer l (TransformerLens `blocks.l.hook_resid_pre`);
l = n_layers is the output of the last layer before the final norm (`blocks.{n-1}.hook_resid_post`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from afprobe.data.prompts import POSITION_KINDS  # noqa: F401  (part of the store format)
from afprobe.errors import AfprobeError

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# The fields that must match before a job may add shards to an existing store.
IDENTITY_FIELDS = (
    "model",
    "prompt_hash",
    "dataset_hash",
    "layers",
    "position_layers",
    "positions",
    "dtype",
    "shard_size",
    "n_prompts",
)


class StoreError(AfprobeError):
    """An activation store is missing, incomplete, or does not match the job."""


FORMAT = "afprobe-activations/1"


@dataclass
class StoreMeta:
    """meta.json: what a store holds and how it was made. `model` is the model's fingerprint
    (`ModelFingerprint.to_dict()`); `config` the job's full config; `part` says which part of a sharded job."""

    model: dict[str, Any]
    prompt_hash: str
    dataset_hash: str
    layers: list[int]
    hook_names: list[str]
    positions: list[str]
    dtype: str
    shard_size: int
    n_prompts: int
    n_queries: int
    variant: str
    tiers: list[str]
    contrast: list[str] | None
    config: dict[str, Any]
    format: str = FORMAT
    afprobe_version: str | None = None
    position_layers: dict[str, list[int]] | None = None  # kinds kept at other layers than `layers` (suffix)
    shared_prefix_tokens: int | None = None
    prefix_tail: list[str] | None = None  # the shared prefix's last tokens, for contexts in dashboards
    part: dict[str, int] | None = None  # {"index": i, "count": n} for `afprobe cache --shard i/n`
    extra: dict[str, Any] = field(default_factory=dict)  # keys written by other afprobe versions, kept as they are

    # meta.json's key order; optional keys that are None are left out.
    _ORDER = (
        "format",
        "afprobe_version",
        "model",
        "prompt_hash",
        "dataset_hash",
        "layers",
        "hook_names",
        "positions",
        "position_layers",
        "dtype",
        "shard_size",
        "n_prompts",
        "n_queries",
        "variant",
        "tiers",
        "contrast",
        "shared_prefix_tokens",
        "prefix_tail",
        "config",
        "part",
    )
    _OPTIONAL = ("afprobe_version", "position_layers", "shared_prefix_tokens", "prefix_tail", "part")

    def to_json(self) -> dict[str, Any]:
        data = {key: getattr(self, key) for key in self._ORDER}
        data = {key: value for key, value in data.items() if value is not None or key not in self._OPTIONAL}
        return {**data, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoreMeta:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{key: value for key, value in data.items() if key in known},
            extra={key: value for key, value in data.items() if key not in known},
        )

    @property
    def n_model_layers(self) -> int:
        return int(self.model["n_layers"])

    def layers_of(self, kind: str) -> list[int]:
        """The layers kept for a position kind."""
        return list((self.position_layers or {}).get(kind, self.layers))

    def identity(self) -> dict[str, Any]:
        """What must match before a job may add shards to this store (or a merge may join it)."""
        identity = {name: getattr(self, name) or None for name in IDENTITY_FIELDS}
        identity["model"] = {k: self.model[k] for k in ("name", "weights_sha256", "dtype", "adapter")}
        return identity


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


@dataclass(frozen=True)
class StoreRow:
    """One prompt of the store."""

    row: int
    query_id: str
    pair_id: str
    tier: str
    variant: str
    dataset: str
    harmful: bool
    n_tokens: int
    positions: dict[str, list[int]]
    log_odds: float
    first_token_log_odds: float
    p_accept: float
    logp_accept: float
    logp_reject: float
    shard: int
    offsets: dict[str, list[int]]  # kind -> [start, count] in the shard's tensor
    # The prompt's tokens from `own_start` (the shared prefix's end) on, as ids and as text, for dashboards.
    own_start: int = 0
    token_ids: list[int] | None = None
    token_text: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def flat_row(row: StoreRow) -> dict[str, Any]:
    hidden = ("positions", "offsets", "own_start", "token_ids", "token_text")
    flat = {k: v for k, v in row.to_dict().items() if k not in hidden}
    for kind, indices in row.positions.items():
        flat[f"{kind}_positions"] = " ".join(map(str, indices))
    return flat
