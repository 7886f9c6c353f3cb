"""Which queries fit and which evaluate: directions, subspaces, best layers and feature sets are fitted on one half
of a dataset's queries and every causal test evaluates on the other half.

The role of a query is its position in the dataset as loaded (before `--n`): even positions fit, odd ones evaluate.
So the first 2n queries hold n of each, `--n` never moves a query from one role to the other, and a store cached
with `--split all` serves both (probes read its fitting rows). Outputs record the split and the query ids they
used; an evaluation refuses directions fitted on any of its queries (`check_disjoint`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, TypeVar

from afprobe.errors import AfprobeError

Split = Literal["all", "fit", "evaluate"]
SPLITS: tuple[Split, ...] = ("all", "fit", "evaluate")
SPLIT_RULE = "even positions of the dataset fit, odd positions evaluate"

T = TypeVar("T")


def split_items(items: Sequence[T], split: str) -> list[T]:
    """The items (queries in dataset order) that `split` keeps."""
    if split not in SPLITS:
        raise AfprobeError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if split == "all":
        return list(items)
    return list(items[0 if split == "fit" else 1 :: 2])


def check_disjoint(fitted: Iterable[str] | None, evaluated: Iterable[str], what: str) -> None:
    """Refuse an evaluation that would see a query `what` was fitted on (`fitted` None: not recorded)."""
    if fitted is None:
        raise AfprobeError(
            f"{what} does not record which queries it was fitted on (made by an older afprobe): fit it again"
        )
    shared = sorted(set(fitted) & set(evaluated))
    if shared:
        raise AfprobeError(
            f"{len(shared)} of the evaluated queries (e.g. {shared[0]}) were used to fit {what}: evaluate with "
            "--split evaluate, or fit on --split fit"
        )
