"""What checking a store's checksums costs: reading every activation of a store with and without the per-shard
check, and `afprobe verify` on it, against the store's size.

    python benchmarks/bench_verify.py [--rows 4096] [--layers 25] [--d-model 576] [--shards 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from afprobe.files import atomic_write_json
from afprobe.store.integrity import verify_tree
from afprobe.store.reader import ActivationStore
from afprobe.store.writer import StoreWriter


def build(folder: Path, rows: int, layers: int, d_model: int, shards: int) -> int:
    """A store of random activations (`last` position, one token per row) in `shards` shards; returns its bytes."""
    from afprobe.store.writer import create_store

    per_shard = rows // shards
    create_store(
        folder,
        {"last": torch.randn(per_shard, layers, d_model)},
        layers=list(range(layers)),
        query_ids=[f"q{i // 2}" for i in range(per_shard)],
        tiers=["free", "paid"] * (per_shard // 2),
    )
    # More shards of the same shape, written the way the cache job writes them.
    store = ActivationStore.open(folder)
    writer = StoreWriter(folder, store.meta)
    template = [row.to_dict() for row in store.rows]
    for shard in range(1, shards):
        rows_of_shard = [{**row, "row": row["row"] + shard * per_shard, "shard": shard} for row in template]
        writer.write_shard(shard, {"resid.last": torch.randn(per_shard, layers, d_model)}, rows_of_shard)
    meta = replace(store.meta, n_prompts=per_shard * shards)
    atomic_write_json(folder / "meta.json", meta.to_json())
    writer.seal()
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def read_all(folder: Path, verify: bool) -> float:
    start = time.perf_counter()
    store = ActivationStore.open(folder, verify=verify)
    store.activations("last").sum()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=25)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--shards", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "store"
        size = build(folder, args.rows, args.layers, args.d_model, args.shards)
        read_all(folder, verify=False)  # warm the page cache, so both timings read from memory
        plain = min(read_all(folder, verify=False) for _ in range(3))
        checked = min(read_all(folder, verify=True) for _ in range(3))
        start = time.perf_counter()
        report = verify_tree(folder)
        verify_seconds = time.perf_counter() - start
    print(
        f"store: {size / 1e6:.0f} MB in {args.shards} shards ({args.rows} rows x {args.layers} layers x {args.d_model})"
    )
    print(f"read every activation, no check:      {plain:.2f} s")
    print(f"read every activation, shards checked: {checked:.2f} s ({checked / plain:.2f}x)")
    print(
        f"afprobe verify (every file):           {verify_seconds:.2f} s, {size / 1e6 / verify_seconds:.0f} MB/s, "
        f"{'intact' if report.ok else 'DAMAGED'}"
    )


if __name__ == "__main__":
    main()
