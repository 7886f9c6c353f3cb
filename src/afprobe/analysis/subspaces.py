"""Learned subspaces: distributed alignment search (DAS) by interchange-intervention training.

A k-dimensional subspace of the residual stream at one layer and a set of positions is learnt so that patching only
its component from a donor run into a receiver run moves the receiver's compliance (decision-position log-odds) to
the donor's (Geiger et al., "Finding alignments between interpretable causal variables and distributed neural
representations"; pyvene's rotated-space intervention). The subspace is the span of k orthonormal columns,
parametrised as an orthogonal matrix, trained with the model frozen.

Which donor/receiver pairs it is trained on decides what it means: free vs paid runs give the subspace that carries
the gap itself (the upper bound); monitored vs unmonitored stated contexts give a situational-awareness subspace;
tag-only prompts give a tag-reaction subspace. Each is then evaluated on *held-out* free/paid pairs: the share of
the gap its interchange carries (`interchange_share`), beside random subspaces of the same dimension drawn from the
activations' own covariance (`covariance_matched_subspaces`).

What the data identify: a learned subspace is fixed only up to the directions whose interchange behaves the same on
the examples. Where the readout reads exactly the direction the two sides differ along, it is found (cosine > 0.9 in
`tests/test_subspaces.py`); where the sides differ along one direction and the readout reads another, any b with
(difference . b)(readout . b) = difference . readout interchanges exactly. So a verdict reads what a subspace
*carries* on held-out pairs and whether a named direction carries it, not a learned basis's cosines alone.

Positions are aligned from the end of each run (the tokens after the request are the same text in every prompt
kind), so a donor of another prompt kind (a stated context, a tag-only prompt) can be patched into a default-prompt
receiver: the cross-prompt interchange.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from afprobe.errors import AfprobeError
from afprobe.model.patching import PatchEdit, Patcher, PatchRun
from afprobe.stats import ratio_of_means


@dataclass(frozen=True)
class Interchange:
    """One receiver run, one donor run and the aligned positions patched between them."""

    receiver: PatchRun
    donor: PatchRun
    positions: tuple[int, ...]  # the receiver's own positions
    donor_positions: tuple[int, ...]  # the donor's, in the same order
    orientation: int = 1  # +1: the donor is the trained (monitored) side; -1: the reverse patch

    @property
    def query_id(self) -> str:
        return self.receiver.prompt.query_id

    @property
    def gap(self) -> float:
        """What a full interchange would move the receiver by: donor minus receiver log-odds."""
        return self.donor.metric - self.receiver.metric


def common_suffix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


def after_request(run: PatchRun) -> int:
    """How many of a run's own tokens come after its request (the instruction, the prefill, the answer start)."""
    span = run.prompt.request_span
    if span is None:
        raise AfprobeError(f"prompt {run.prompt.query_id}/{run.prompt.tier} has no request span")
    return len(run.tokens) - (span[1] - run.offset)


def aligned_tail(
    receiver: PatchRun, donor: PatchRun, *, orientation: int = 1, n_tail: int | None = None
) -> Interchange:
    """Pair the tokens after the request of two runs, aligned from the end: they are the same text in every prompt
    kind (the instruction, the `<OUTPUT>` prefill and the answer start), so these are the positions an interchange
    patches, also between prompts of different kinds. `n_tail` takes only the last ones.

    orientation: +1 when the donor is the trained (or monitored) side, -1 for the reverse patch; shares are computed
    on oriented changes, so the two directions of a pair add up rather than cancel."""
    n = min(after_request(receiver), after_request(donor), common_suffix_length(receiver.tokens, donor.tokens))
    if n_tail is not None:
        n = min(n, n_tail)
    if n == 0:
        raise AfprobeError(
            f"runs {receiver.prompt.query_id}/{receiver.prompt.tier} and {donor.prompt.query_id}/{donor.prompt.tier} "
            "share no tokens after the request: an interchange needs runs that end with the same tokens"
        )
    positions = tuple(range(len(receiver.tokens) - n, len(receiver.tokens)))
    donor_positions = tuple(range(len(donor.tokens) - n, len(donor.tokens)))
    return Interchange(receiver, donor, positions, donor_positions, orientation)


class RotatedSubspace(torch.nn.Module):
    """k orthonormal directions of a d_model residual stream (the rows of an orthogonally parametrised map)."""

    def __init__(self, d_model: int, k: int, *, seed: int = 0, init: Tensor | None = None):
        super().__init__()
        if not 1 <= k <= d_model:
            raise AfprobeError(f"subspace dimension {k} must be between 1 and d_model ({d_model})")
        generator = torch.Generator().manual_seed(seed)
        start = torch.randn(k, d_model, generator=generator) if init is None else init.T.float().clone()
        # The parametrisation completes the k rows to a d_model x d_model base with the global RNG, and the base shapes
        # the whole training path: seeded here, the same seed learns the same subspace (the caller's RNG untouched).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.rotation = torch.nn.Linear(d_model, k, bias=False)
            with torch.no_grad():
                self.rotation.weight.copy_(torch.linalg.qr(start.T).Q.T)
            torch.nn.utils.parametrizations.orthogonal(self.rotation)

    @property
    def basis(self) -> Float[Tensor, "d_model k"]:
        return self.rotation.weight.T


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model's parameters need no gradient while inside (their flags are put back in `finally`): backward then
    reaches only the subspace, and the user's model gains no `.grad`."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class LearnedSubspace:
    """What `learn_subspace` found, and how: fitted on `fit_queries` only."""

    basis: Float[Tensor, "d_model k"]
    layer: int
    k: int
    fit_queries: list[str]
    losses: list[float] = field(default_factory=list)  # training loss per step (normalised squared error)
    steps: int = 0
    seconds: float = 0.0

    def cosine(self, direction: Float[Tensor, " d_model"]) -> float:
        """|cos| between `direction` and its projection on the subspace: 1 when it lies inside."""
        u = direction.float() / direction.float().norm()
        return float((self.basis.float().T @ u).norm())

    def edit(self, interchange: Interchange) -> PatchEdit:
        return subspace_edit(self.basis, self.layer, interchange)


def subspace_edit(basis: Float[Tensor, "d_model k"], layer: int, interchange: Interchange) -> PatchEdit:
    return PatchEdit("resid", layer, interchange.positions, basis=basis, donor_positions=interchange.donor_positions)


def learn_subspace(
    patcher: Patcher,
    examples: Sequence[Interchange],
    layer: int,
    k: int,
    *,
    steps: int = 200,
    lr: float = 0.01,
    batch_size: int = 8,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> LearnedSubspace:
    """Train a k-dimensional subspace at `layer` so that interchanging it moves each receiver to its donor.

    Loss: the mean over a batch of ((patched - donor) / s)^2, s the mean |donor - receiver| over the examples (so the
    loss starts near 1 for a subspace that carries nothing and reaches 0 for one that carries everything). Examples
    need runs recorded with `record(prompt, for_grad=True)`.
    """
    import time

    if not examples:
        raise AfprobeError("no interchange examples to learn a subspace from")
    start = time.perf_counter()
    scale = float(np.mean([abs(e.gap) for e in examples]))
    if scale == 0:
        raise AfprobeError("every donor and receiver score the same: there is nothing for a subspace to carry")
    d_model = examples[0].receiver.resid.shape[-1]
    subspace = RotatedSubspace(d_model, k, seed=seed)
    optimiser = torch.optim.Adam(subspace.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    with frozen(patcher.model):
        for step in range(steps):
            chosen = rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)
            optimiser.zero_grad()
            basis = subspace.basis
            batch = [examples[i] for i in chosen]
            patched = patcher.patched_metrics_with_grad(
                [(e.receiver, e.donor, [subspace_edit(basis, layer, e)]) for e in batch]
            )
            donors = torch.tensor([e.donor.metric for e in batch], dtype=patched.dtype, device=patched.device)
            loss = (patched - donors).div(scale).pow(2).mean()
            loss.backward()
            optimiser.step()
            total = float(loss.detach())
            losses.append(total)
            if progress is not None:
                progress(step + 1, total)
    return LearnedSubspace(
        basis=subspace.basis.detach().clone(),
        layer=layer,
        k=k,
        fit_queries=sorted({e.query_id for e in examples}),
        losses=losses,
        steps=steps,
        seconds=time.perf_counter() - start,
    )


def interchange_deltas(
    patcher: Patcher, examples: Sequence[Interchange], basis: Float[Tensor, "d_model k"], layer: int
) -> Float[np.ndarray, " n"]:
    """Each receiver's change in log-odds when the subspace's component is taken from its donor."""
    patched = patcher.patched_metrics([(e.receiver, e.donor, [subspace_edit(basis, layer, e)]) for e in examples])
    return np.array(patched) - np.array([e.receiver.metric for e in examples])


def per_query_sums(examples: Sequence[Interchange], *values: np.ndarray) -> list[np.ndarray]:
    """Each array summed over the interchanges of one query (both patch directions of a pair, say), in first-seen
    query order: the bootstrap resamples queries, the unit that was sampled, not interchanges."""
    order = list(dict.fromkeys(e.query_id for e in examples))
    index = np.array([order.index(e.query_id) for e in examples])
    sums = []
    for value in values:
        total = np.zeros(len(order))
        np.add.at(total, index, np.asarray(value, dtype=np.float64))
        sums.append(total)
    return sums


@dataclass(frozen=True)
class InterchangeShare:
    """The share of the gap a subspace carries on held-out examples: mean(patched change) / mean(gap), both oriented
    (trained-side donors +, the reverse -), with a bootstrap interval over queries."""

    share: float
    ci_low: float
    ci_high: float
    n: int
    deltas: tuple[float, ...]
    gaps: tuple[float, ...]


def interchange_share(
    patcher: Patcher,
    examples: Sequence[Interchange],
    basis: Float[Tensor, "d_model k"],
    layer: int,
    *,
    fitted_on: Sequence[str] = (),
    n_boot: int = 2000,
    seed: int = 0,
) -> InterchangeShare:
    """The share of the held-out gap carried by `basis` (a ratio of means over examples with a bootstrap interval;
    unbounded when the gap is not distinguishable from zero). Refuses examples from queries the basis was fitted on.
    """
    leaked = sorted({e.query_id for e in examples} & set(fitted_on))
    if leaked:
        raise AfprobeError(
            f"{len(leaked)} evaluation queries were used to fit this subspace (e.g. {leaked[0]}): evaluate on "
            "held-out queries"
        )
    orientation = np.array([e.orientation for e in examples], dtype=np.float64)
    deltas = interchange_deltas(patcher, examples, basis, layer) * orientation
    gaps = np.array([e.gap for e in examples]) * orientation
    estimate = ratio_of_means(*per_query_sums(examples, deltas, gaps), n_boot=n_boot, seed=seed)
    return InterchangeShare(
        share=float(estimate["mean"]),
        ci_low=float(estimate["ci_low"]),
        ci_high=float(estimate["ci_high"]),
        n=len(examples),
        deltas=tuple(float(d) for d in deltas),
        gaps=tuple(float(g) for g in gaps),
    )


def without_tier_means(
    trained: Float[Tensor, "pairs pos d_model"], untrained: Float[Tensor, "pairs pos d_model"]
) -> Float[Tensor, "rows d_model"]:
    """Both tiers' rows with each tier's mean at each position replaced by the two tiers' mean there: what varies
    across queries and positions, without the tier difference the subspaces are asked to explain. Random subspaces
    drawn from all the rows would hold that difference in proportion to its variance, so where it dominates (a large
    gap) the null would already contain the effect it is the null for."""
    both = (trained.mean(0) + untrained.mean(0)) / 2
    rows = [side - side.mean(0) + both for side in (trained, untrained)]
    return torch.cat(rows).reshape(-1, trained.shape[-1])


def covariance_matched_subspaces(
    activations: Float[Tensor, "n d_model"], k: int, n_subspaces: int, *, seed: int = 0
) -> list[Float[Tensor, "d_model k"]]:
    """Random k-dimensional subspaces drawn like the data: k Gaussian vectors with the activations' covariance,
    orthonormalised. An isotropic draw mostly lands in directions the model never uses, which carry nothing, and
    makes any named subspace look special."""
    x = activations.double()
    centred = x - x.mean(0)
    covariance = centred.T @ centred / max(1, x.shape[0] - 1)
    values, vectors = torch.linalg.eigh(covariance)
    root = vectors * values.clamp(min=0).sqrt()
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_subspaces):
        z = torch.randn(x.shape[1], k, generator=generator, dtype=torch.float64)
        draws.append(torch.linalg.qr(root @ z).Q.float())
    return draws
