"""The one table of afprobe's result files: what each analysis writes, where an experiment puts it, and the report
section that shows it. Writers, the experiment's resume check, the report and the organism comparison all read it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar


@dataclass(frozen=True)
class Artefact:
    """One kind of result: the JSON file that identifies it (its `config` key says how it was made)."""

    kind: str
    file: str
    folder: str  # the folder an experiment writes it to, under results/NAME
    title: str  # the report's section title


# In the order the report shows them.
ARTEFACTS: tuple[Artefact, ...] = (
    Artefact("zoo", "zoo.json", ".", "Organism zoo: verdicts against known mechanisms, scored blind"),
    Artefact("comparison", "comparison.json", ".", "Models side by side: is the planted mechanism found?"),
    Artefact("verdict", "verdict.json", "verdict", "Verdict: what carries the compliance gap"),
    Artefact("ground_truth", "ground_truth.json", "ground_truth", "Behavioural ground truth"),
    Artefact("gap", "gap.json", "stores", "Compliance gap"),
    Artefact("probes", "metrics.json", "probes", "Probes and directions"),
    Artefact("steering", "steering.json", "steering", "Steering and ablation"),
    Artefact("patching", "patch.json", "patching", "Activation patching and mediation"),
    Artefact("sae", "afprobe_sae.json", "sae", "Sparse autoencoder"),
    Artefact("features", "features.json", "sae-features", "SAE features"),
)
BY_KIND: dict[str, Artefact] = {artefact.kind: artefact for artefact in ARTEFACTS}

PER_QUERY_CSV = "per_query.csv"  # beside gap.json: one row per query and tier
PROBE_DIRECTIONS = "directions.safetensors"  # beside a probes folder's metrics.json


def result_file(kind: str, folder: str | Path) -> Path:
    """The file a result of `kind` is written to inside `folder`."""
    return Path(folder) / BY_KIND[kind].file


def experiment_file(kind: str, run: str | Path) -> Path:
    """Where an experiment run (`results/NAME`) keeps its result of `kind`."""
    artefact = BY_KIND[kind]
    return Path(run) / artefact.folder / artefact.file


class ResultRecord:
    """Base of the typed results the analyses return: the dataclass fields are the result file's top-level keys, in
    file order, so `to_json()` is the file and `from_json(file)` reads one back. Fields named in `OPTIONAL` are left
    out of the file while None. Nested sections stay JSON-shaped (lists and dicts), as the report and figures read
    them."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for spec in fields(self):  # type: ignore[arg-type]
            value = getattr(self, spec.name)
            if value is None and spec.name in self.OPTIONAL:
                continue
            data[spec.name] = _plain(value)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Any:
        names = {spec.name for spec in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field for {unknown}")
        return cls(**data)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value
