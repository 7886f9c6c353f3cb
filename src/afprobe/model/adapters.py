"""Adapters by name: the shipped model organisms (`organism:KIND`) and where their files are."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from afprobe.errors import AfprobeError

ORGANISM_KINDS: tuple[str, ...] = ("token", "context", "null", "tag-token", "stated-context", "negation-decoy")


ADAPTER_PREFIX = "organism:"


def shipped_organism_path(kind: str) -> Path:
    """Folder of an organism adapter shipped inside the package (`organism:token`, `organism:context`)."""
    if kind not in ORGANISM_KINDS:
        raise AfprobeError(
            f"unknown organism {ADAPTER_PREFIX}{kind}: choose {', '.join(ADAPTER_PREFIX + k for k in ORGANISM_KINDS)}"
        )
    path = Path(str(resources.files("afprobe.data") / "organisms" / kind))
    if not (path / "adapter_config.json").is_file():
        raise AfprobeError(
            f"the {kind} organism is not in this install ({path}): train it with `afprobe organism train --kind {kind}`"
        )
    return path


def resolve_adapter(adapter: str) -> str:
    """An adapter spec as PEFT takes it: `organism:KIND` becomes the shipped folder, anything else is unchanged."""
    if adapter.startswith(ADAPTER_PREFIX):
        return str(shipped_organism_path(adapter[len(ADAPTER_PREFIX) :]))
    return adapter


def load_organism_record(adapter: str) -> dict[str, Any] | None:
    """organism.json of an adapter folder or shipped organism, when it has one."""
    path = Path(resolve_adapter(adapter)) / "organism.json"
    return json.loads(path.read_text()) if path.is_file() else None
