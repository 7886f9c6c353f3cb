"""Query sets: afprobe's own harmful and benign requests, and loaders for the public benchmarks.

`load_queries(spec)` takes `harmful` (alias `default`) or `benign` (the shipped sets, 111 each, matched in form:
benign row i mirrors harmful row i), a `.csv` / `.jsonl` / `.json` file, or `hf:NAME[:SPLIT]` for a Hugging Face
dataset (online only). Columns are recognised from the public benchmarks: AdvBench `goal`, HarmBench `Behavior`
(only the `standard` functional category is kept), StrongREJECT `forbidden_prompt`; `column=` overrides.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from afprobe.data.prompts import Query
from afprobe.data.splits import split_items
from afprobe.errors import DatasetError

BUILTIN_DATASETS = {"harmful": "harmful.jsonl", "benign": "benign.jsonl"}


_ALIASES = {"default": "harmful"}


# Text columns in the order they are tried, with the benchmark each comes from.
KNOWN_TEXT_COLUMNS = {
    "goal": "AdvBench",
    "Behavior": "HarmBench",
    "forbidden_prompt": "StrongREJECT",
    "text": "generic",
    "prompt": "generic",
    "query": "generic",
    "request": "generic",
}


_ID_COLUMNS = ("id", "BehaviorID", "query_id")


_CATEGORY_COLUMNS = ("category", "SemanticCategory")


def dataset_hash(queries: Sequence[Query]) -> str:
    """sha256 over the queries' ids and texts, in order: identifies exactly which requests a result used."""
    digest = hashlib.sha256()
    for query in queries:
        digest.update(f"{query.query_id}\x00{query.text}\x01".encode())
    return digest.hexdigest()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{number} is not valid JSON ({exc.msg}): fix or remove that line") from exc
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{number} is not a JSON object: each line must be an object of columns")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): fix the file") from exc
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DatasetError(f"{path} must hold a JSON list of objects (one per query)")
    return data


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            if reader.fieldnames is None:
                return []
            if any(None in row for row in rows):
                bad = next(i for i, row in enumerate(rows, start=2) if None in row)
                raise DatasetError(f"{path}:{bad} has more fields than the header: quote fields that hold commas")
            return rows
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} could not be read as UTF-8 CSV ({exc}): save it as UTF-8 CSV") from exc


def _rows_from_hf(name: str) -> list[dict[str, Any]]:
    dataset_name, _, split = name.partition(":")
    try:
        from datasets import load_dataset

        dataset = load_dataset(dataset_name, split=split or "train")
    except Exception as exc:
        raise DatasetError(
            f"could not load Hugging Face dataset {dataset_name!r} ({str(exc).splitlines()[0][:160]}): "
            "check the name and your network, or download it and pass the CSV/JSONL file"
        ) from exc
    return [dict(row) for row in dataset]


def _read_rows(spec: str) -> tuple[list[dict[str, Any]], str]:
    name = _ALIASES.get(spec, spec)
    if name in BUILTIN_DATASETS:
        file = resources.files("afprobe.data") / "queries" / BUILTIN_DATASETS[name]
        with resources.as_file(file) as path:
            return _read_jsonl(path), f"afprobe:{name}"
    if name.startswith("hf:"):
        return _rows_from_hf(name[3:]), name
    path = Path(name).expanduser()
    if not path.exists():
        raise DatasetError(
            f"dataset {spec!r} not found: give harmful, benign, a .csv/.jsonl/.json file, or hf:NAME[:SPLIT]"
        )
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path), str(path)
    if suffix == ".jsonl":
        return _read_jsonl(path), str(path)
    if suffix == ".json":
        return _read_json(path), str(path)
    raise DatasetError(f"dataset file {path} has an unknown extension: use .csv, .jsonl or .json")


def _pick_column(columns: Iterable[str], column: str | None, source: str) -> str:
    columns = list(columns)
    if column is not None:
        if column not in columns:
            raise DatasetError(f"column {column!r} not in {source} (columns: {', '.join(columns)}): fix --column")
        return column
    for candidate in KNOWN_TEXT_COLUMNS:
        if candidate in columns:
            return candidate
    raise DatasetError(
        f"{source} has none of the known request columns ({', '.join(KNOWN_TEXT_COLUMNS)}); "
        f"its columns are {', '.join(columns) or 'none'}: name the request column with --column"
    )


def load_queries(
    spec: str = "harmful",
    *,
    column: str | None = None,
    n: int | None = None,
    harmful: bool | None = None,
    split: str = "all",
) -> list[Query]:
    """Load requests from a dataset spec (see the module docstring); `split` keeps the fitting or the evaluation
    queries (`afprobe.data.splits`), then `n` keeps the first n of those."""
    rows, source = _read_rows(spec)
    if not rows:
        raise DatasetError(f"dataset {source} is empty: give a file with at least one request")
    text_column = _pick_column(rows[0].keys(), column, source)
    if text_column == "Behavior" and "FunctionalCategory" in rows[0]:
        # HarmBench's contextual and copyright behaviours are not single requests.
        rows = [row for row in rows if row.get("FunctionalCategory") == "standard"]
    is_harmful = harmful if harmful is not None else not source.endswith("benign")
    queries: list[Query] = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        request = row.get(text_column)
        if request is None or not str(request).strip():
            continue
        query_id = next((str(row[c]) for c in _ID_COLUMNS if row.get(c) not in (None, "")), f"row-{index:05d}")
        if query_id in seen:
            raise DatasetError(f"{source} has the id {query_id!r} twice: query ids must be unique to pair tiers")
        seen.add(query_id)
        category = next((str(row[c]) for c in _CATEGORY_COLUMNS if row.get(c)), "")
        queries.append(Query(query_id=query_id, text=str(request).strip(), category=category, harmful=is_harmful))
    if not queries:
        raise DatasetError(f"dataset {source} has no non-empty requests in column {text_column!r}")
    queries = split_items(queries, split)
    if n is not None:
        if n < 1:
            raise DatasetError(f"--n must be at least 1, got {n}")
        queries = queries[:n]
    return queries
