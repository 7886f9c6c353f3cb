"""How small an effect the run's dtype can resolve, measured rather than assumed.

A few pairs are scored again with the model computing in float32 (`afprobe.model.precision.float32_compute`: the
same weights, cast up one block at a time, so no float32 copy of the model is needed). The root mean square of the
run's log-odds minus those is the noise the dtype adds to one prompt; a mean of n paired differences (a gap, a
patching or steering effect) carries noise of that times sqrt(2 / n), and `Resolution.of_mean_difference(n)` is the
band numerical noise alone fills 95% of the time. A float32 run is its own reference: its noise is zero.

(Two low-precision paths that are equal in exact arithmetic, such as prefix-shared and full forwards, are no
substitute: on row-deterministic kernels they round the same way and can report 10,000 times less noise than
there is, as they did on tiny bf16 models.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np

from afprobe.data.prompts import PromptSet
from afprobe.model.precision import float32_compute, needs_float32_readout
from afprobe.model.readout import ComplianceScore, score_prompts

METHOD = "run dtype vs float32 arithmetic on the same weights, float32 readout, prefix-shared"

Metric = Literal["log_odds", "first_token_log_odds"]

# Two standard errors of a normal: numerical noise alone stays inside this band 95% of the time.
Z_95 = 1.959964


@dataclass(frozen=True)
class Resolution:
    """The numerical noise of one prompt's log-odds in the run's dtype, and what it lets a mean resolve."""

    dtype: str
    per_prompt_noise: float  # nats, the standard deviation rounding adds to one prompt's log-odds
    n_prompts: int
    first_token_noise: float = 0.0  # the same for the first-divergent-token log-odds (patching's metric)
    method: str = METHOD
    readout_dtype: str = "float32"
    seconds: float = 0.0

    def noise(self, metric: Metric = "log_odds") -> float:
        return self.first_token_noise if metric == "first_token_log_odds" else self.per_prompt_noise

    def of_mean_difference(self, n_pairs: int, *, z: float = Z_95, metric: Metric = "log_odds") -> float:
        """Half-width of the band (95% by default) that numerical noise alone puts around a mean of `n_pairs`
        paired differences (each difference carries the noise of two prompts)."""
        return z * self.noise(metric) * math.sqrt(2.0 / max(n_pairs, 1))

    def resolves(self, effect: float, n_pairs: int, metric: Metric = "log_odds") -> bool:
        return abs(effect) > self.of_mean_difference(n_pairs, metric=metric)

    def describe(self, n_pairs: int, metric: Metric = "log_odds") -> str:
        if self.method == "the run is float32":
            return "float32 run: no rounding noise against float32 arithmetic, so every difference is resolved"
        return (
            f"{self.dtype} resolves a mean difference of +-{self.of_mean_difference(n_pairs, metric=metric):.3g} "
            f"nats over {n_pairs} queries (per-prompt noise {self.noise(metric):.2g} nats, measured on "
            f"{self.n_prompts} prompts)"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Resolution:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


def measure_resolution(
    model: Any,
    tokenizer: Any,
    prompt_set: PromptSet,
    scores: Sequence[ComplianceScore] | None = None,
    *,
    n_pairs: int = 2,
    on_prompt: Callable[[int], None] | None = None,
) -> Resolution:
    """Score the prompts of the first `n_pairs` queries in float32 arithmetic and compare them with the run's
    scores: `scores` (of every prompt of `prompt_set`) when the run has them, else scored here."""
    chosen = resolution_prompts(prompt_set, n_pairs)
    if not chosen:
        raise ValueError("measuring the resolution needs at least one pair")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    start = time.perf_counter()
    if dtype == "float32" and not needs_float32_readout(model):
        if on_prompt is not None:
            on_prompt(len(chosen))
        return Resolution(dtype=dtype, per_prompt_noise=0.0, n_prompts=len(chosen), method="the run is float32")
    subset = replace(
        prompt_set,
        queries=prompt_set.queries[:n_pairs],
        prompts=[prompt_set.prompts[i] for i in chosen],
    )
    run = [scores[i] for i in chosen] if scores is not None else score_prompts(model, tokenizer, subset, batch_size=1)
    with float32_compute(model):
        reference = score_prompts(model, tokenizer, subset, batch_size=1, on_batch=on_prompt)

    def rms(field: str) -> float:
        differences = np.array([getattr(a, field) - getattr(b, field) for a, b in zip(run, reference, strict=True)])
        return float(np.sqrt(np.mean(differences**2)))

    return Resolution(
        dtype=dtype,
        per_prompt_noise=rms("log_odds"),
        first_token_noise=rms("first_token_log_odds"),
        n_prompts=len(chosen),
        seconds=time.perf_counter() - start,
    )


def resolution_prompts(prompt_set: PromptSet, n_pairs: int) -> list[int]:
    """Indices of every prompt of the first `n_pairs` queries (all their tiers)."""
    chosen = {q.query_id for q in prompt_set.queries[:n_pairs]}
    return [i for i, prompt in enumerate(prompt_set.prompts) if prompt.query_id in chosen]
