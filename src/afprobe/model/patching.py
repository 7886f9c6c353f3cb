"""Activation patching between the free- and paid-tier run of the same query.

The *receiver* run is the one patched, the *donor* run supplies the activations: `paid->free` puts paid-tier
activations into the free-tier run. The effect of a patch is read off the **decision position** (the last token of
the answer start both continuations share, `<`), as the first-divergent-token log-odds accept minus reject. That is
a function of one position's logits, so patching the last layer's output at the decision position moves it exactly
to the donor's value; the whole-continuation log-odds of `afprobe gap` also depend on the answer tokens after it.

Patching only runs what differs. Both runs share the system prompt (its KV cache is computed once), and a patch at
layer l, own-token position p changes nothing at positions before p nor at layers below l. So a patched forward
starts from the receiver's KV cache cropped to position p, runs only the tokens from p on, and skips the blocks below
l: their output is the receiver's residual stream at layer l, recorded once. Caches with sliding-window layers
(Gemma 3) cannot be cropped; there the forward starts at the first token after the prefix (still skipping blocks).
Many patched runs (a null's random subspaces, a training batch) are packed into one forward: each run's tokens side
by side over one cache, a block-diagonal mask keeping them apart (`Patcher.patched_metrics`).

Positions are indices into a run's own tokens (0 = the first token after the shared prefix); layers follow the
activation store (l < n_layers: entering block l; l = n_layers: leaving the last block).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from afprobe.data.prompts import PromptSet, RenderedPrompt, cacheable_prefix_len
from afprobe.errors import AfprobeError
from afprobe.model.architecture import (
    decoder_layers,
    has_sliding_window,
    register_residual_hook,
    removing,
    text_config,
)
from afprobe.model.forward import PrefixCache, additive_mask, compute_prefix_cache, fork_cache
from afprobe.model.loading import LoadedModel
from afprobe.model.precision import float32_readout, hidden_dtype
from afprobe.model.readout import AnswerTokens

Site = Literal["resid", "attn_head", "mlp"]


@dataclass(frozen=True)
class FeatureEdit:
    """SAE features to patch (take the donor's activations) or ablate (set to zero) in the residual stream.

    Only those features' decoder contributions change: the other features and the SAE's reconstruction error stay
    the receiver's, so an SAE that reconstructs perfectly makes patching every feature a full patch.
    """

    sae: Any
    features: tuple[int, ...]
    mode: Literal["patch", "ablate"] = "patch"

    @torch.no_grad()
    def delta(self, current: Float[Tensor, "n d"], source: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        sae = self.sae
        mask = torch.zeros(sae.cfg.d_sae, device=sae.device, dtype=sae.dtype)
        mask[list(self.features)] = 1
        own = sae.encode(current.to(sae.device, sae.dtype)) * mask
        target = torch.zeros_like(own) if self.mode == "ablate" else sae.encode(source.to(sae.device, sae.dtype)) * mask
        # decode is affine: the difference of two decodes is the features' contribution alone.
        return (sae.decode(target) - sae.decode(own)).to(current.device, current.dtype)


@dataclass(frozen=True)
class PatchEdit:
    """Replace activations of the receiver with the donor's at one site, layer and set of positions.

    site: `resid` (the residual stream), `attn_head` (one head's output, the input of the output projection, so
    a head's contribution is patched before heads are mixed) or `mlp` (the MLP block's output).
    basis: for `resid`, an orthonormal `[d_model, k]` basis: only the component in its span is patched (k = 0
    patches nothing). None patches the whole vector.
    features: for `resid`, SAE features to patch or ablate instead (an empty set changes nothing).
    hold: for `resid`, take the values from the receiver's own clean run instead of the donor's: with another edit
    upstream, this holds a site at its clean value, so the upstream change reaches the output only around it (path
    patching).
    """

    site: Site
    layer: int
    positions: tuple[int, ...]
    head: int | None = None
    basis: Float[Tensor, "d_model k"] | None = None
    donor_positions: tuple[int, ...] | None = None  # where in the donor run to read (default: `positions`)
    features: FeatureEdit | None = None  # for `resid`: patch or ablate only these SAE features
    hold: bool = False  # for `resid`: the receiver's own clean values (path patching)

    @property
    def source_positions(self) -> list[int]:
        return list(self.positions if self.donor_positions is None else self.donor_positions)


@dataclass
class PatchRun:
    """One prompt's clean run after the shared prefix, with what patching needs from it."""

    prompt: RenderedPrompt
    tokens: tuple[int, ...]  # own tokens + the shared answer start; the last one is the decision position
    offset: int  # absolute position of tokens[0] (the shared prefix length)
    # Keys and values of `tokens` at every layer, without the shared prefix (kept once, by the patcher); None where
    # the cache has sliding-window layers (never cropped) or the run was kept only as a donor.
    own_kv: list[tuple[Tensor, Tensor]] | None
    resid: Float[Tensor, "layer pos d_model"]  # n_layers + 1 layers
    head_inputs: Float[Tensor, "block pos heads_x_head_dim"]
    mlp_out: Float[Tensor, "block pos d_model"]
    metric: float

    @property
    def decision(self) -> int:
        return len(self.tokens) - 1


# A packed forward's query tokens at most: attention scores grow with them times the cached tokens.
PACKED_TOKENS = 512

# One patched run to score: the receiver, the donor and the edits taking the donor's activations into the receiver.
PatchJob = tuple[PatchRun, PatchRun, Sequence[PatchEdit]]


def _passthrough(*args: Any, **kwargs: Any) -> Any:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _skipping(blocks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Blocks whose forward returns its input unchanged while inside (their output is replaced anyway). An
    instance-level `forward` already there (accelerate's device hooks) is put back afterwards."""
    saved = [(block, block.__dict__.get("forward")) for block in blocks]
    try:
        for block in blocks:
            block.forward = _passthrough
        yield
    finally:
        for block, original in saved:
            if original is not None:
                block.forward = original
            elif block.__dict__.get("forward") is _passthrough:
                del block.forward


class Patcher:
    """Records clean runs and scores patched ones for prompts that share `prefix`."""

    def __init__(self, model: Any, prefix: PrefixCache, answers: AnswerTokens):
        self.model = model
        self.prefix = prefix
        self.answers = answers
        self.blocks = decoder_layers(model)
        self.n_layers = len(self.blocks)
        for block in self.blocks:
            if not hasattr(getattr(block, "self_attn", None), "o_proj") or not hasattr(block, "mlp"):
                raise AfprobeError(
                    f"patching needs decoder blocks with self_attn.o_proj and mlp (Llama, Qwen2, Gemma, Mistral "
                    f"layouts); {type(block).__name__} has not"
                )
        self.n_heads = int(text_config(model).num_attention_heads)
        self.head_dim = self.blocks[0].self_attn.o_proj.in_features // self.n_heads
        self.croppable = not has_sliding_window(prefix.cache)
        self.device = next(model.parameters()).device
        self.accept_id = self.answers.accept_rest[0]
        self.reject_id = self.answers.reject_rest[0]
        self._grad_prefix: Any = None  # the prefix cache as ordinary tensors, made once for runs recorded for_grad

    # -- clean runs -------------------------------------------------------------------------------------------------

    def tokens_of(self, prompt: RenderedPrompt) -> tuple[int, ...]:
        if tuple(prompt.input_ids[: self.prefix.length]) != self.prefix.input_ids:
            raise AfprobeError(f"prompt {prompt.query_id}/{prompt.tier} does not start with the shared prefix")
        return tuple(prompt.input_ids[self.prefix.length :]) + self.answers.common

    def _metric(self, logits: Tensor) -> float:
        return float(logits[self.accept_id] - logits[self.reject_id])

    def record(self, prompt: RenderedPrompt, *, for_grad: bool = False) -> PatchRun:
        """Run one prompt's own tokens from the prefix cache, recording every site at every own position.

        for_grad: record outside inference mode, so that `patched_metric_with_grad` can use the run."""
        with torch.no_grad() if for_grad else torch.inference_mode():
            return self._record(prompt, for_grad)

    def _record(self, prompt: RenderedPrompt, for_grad: bool) -> PatchRun:
        tokens = self.tokens_of(prompt)
        resid: dict[int, Tensor] = {}
        heads: dict[int, Tensor] = {}
        mlps: dict[int, Tensor] = {}

        def keep(into: dict[int, Tensor], layer: int) -> Any:
            def hook(hidden: Tensor) -> None:
                into[layer] = hidden[0].detach().clone()

            return hook

        with removing([]) as handles:
            for layer in range(self.n_layers + 1):
                handles.append(register_residual_hook(self.blocks, layer, keep(resid, layer)))
            for layer in range(self.n_layers):
                handles += self._component_hooks(layer, keep(heads, layer), keep(mlps, layer))
            if for_grad and self._grad_prefix is None:
                self._grad_prefix = _normal_tensors(self.prefix.cache)
            prefix = fork_cache(self._grad_prefix if for_grad else self.prefix.cache)
            logits, cache = self._forward(tokens, prefix, start=0)
            offset = self.prefix.length
            # Copies, not slices: a slice would keep the whole cache, prefix included, alive with every run.
            own_kv = (
                [(layer.keys[..., offset:, :].clone(), layer.values[..., offset:, :].clone()) for layer in cache.layers]
                if self.croppable
                else None
            )
        return PatchRun(
            prompt=prompt,
            tokens=tokens,
            offset=self.prefix.length,
            own_kv=own_kv,
            resid=torch.stack([resid[layer] for layer in range(self.n_layers + 1)]),
            head_inputs=torch.stack([heads[layer] for layer in range(self.n_layers)]),
            mlp_out=torch.stack([mlps[layer] for layer in range(self.n_layers)]),
            metric=self._metric(logits),
        )

    def _component_hooks(self, layer: int, head_inputs: Any, mlp_output: Any) -> list[Any]:
        """Observe block `layer`'s attention-head outputs (the input of o_proj, heads side by side) and MLP output."""
        block = self.blocks[layer]
        return [
            block.self_attn.o_proj.register_forward_pre_hook(lambda module, args: head_inputs(args[0])),
            block.mlp.register_forward_hook(lambda module, args, output: mlp_output(output)),
        ]

    def _forward(self, tokens: Sequence[int], cache: Any, start: int) -> tuple[Tensor, Any]:
        """Run tokens[start:] on `cache` (which holds the prefix and tokens[:start]); logits at the last token."""
        offset = self.prefix.length
        ids = torch.tensor([list(tokens[start:])], device=self.device)
        with float32_readout(self.model):
            output = self.model(
                input_ids=ids,
                attention_mask=torch.ones(1, offset + len(tokens), dtype=torch.long, device=self.device),
                position_ids=torch.arange(offset + start, offset + len(tokens), device=self.device)[None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return output.logits[0, -1], output.past_key_values

    # -- patched runs -----------------------------------------------------------------------------------------------

    def _check(self, receiver: PatchRun, donor: PatchRun, edits: Sequence[PatchEdit]) -> None:
        if receiver.offset != self.prefix.length:
            raise AfprobeError(
                f"the receiver was recorded after a {receiver.offset}-token prefix, this patcher's is "
                f"{self.prefix.length}: record receivers with the patcher that patches them"
            )
        for edit in edits:
            top = self.n_layers if edit.site == "resid" else self.n_layers - 1
            if not 0 <= edit.layer <= top:
                raise AfprobeError(f"{edit.site} layer {edit.layer} out of range 0..{top}")
            if edit.positions and not 0 <= min(edit.positions) <= max(edit.positions) < len(receiver.tokens):
                raise AfprobeError(f"positions {edit.positions} outside the run's {len(receiver.tokens)} own tokens")
            source = edit.source_positions
            if edit.hold and edit.site != "resid":
                raise AfprobeError(f"hold takes the receiver's residual stream, not its {edit.site}")
            source_run = receiver if edit.hold else donor
            if len(source) != len(edit.positions) or (
                source and not 0 <= min(source) <= max(source) < len(source_run.tokens)
            ):
                raise AfprobeError(
                    f"donor positions {source} do not pair with positions {edit.positions} inside the donor's "
                    f"{len(donor.tokens)} own tokens"
                )
            if (edit.features is not None or edit.basis is not None) and edit.site != "resid":
                raise AfprobeError(f"a basis or SAE features patch the residual stream, not {edit.site}")
            if edit.site == "attn_head" and not (edit.head is not None and 0 <= edit.head < self.n_heads):
                raise AfprobeError(f"head {edit.head} out of range 0..{self.n_heads - 1}")

    @torch.inference_mode()
    def patched_metric(self, receiver: PatchRun, donor: PatchRun, edits: Sequence[PatchEdit]) -> float:
        """The receiver's decision-position log-odds with the edits applied (donor activations patched in)."""
        return float(self._patched_metric(receiver, donor, edits))

    def patched_metric_with_grad(
        self, receiver: PatchRun, donor: PatchRun, edits: Sequence[PatchEdit]
    ) -> Float[Tensor, ""]:
        """`patched_metric` as a tensor that carries gradients to whatever the edits were built from (a learned
        basis): what interchange-intervention training differentiates. The model's own weights get no gradient."""
        for run in (receiver, donor):
            if run.resid.is_inference():
                raise AfprobeError(
                    "runs recorded for patching with gradients need record(prompt, for_grad=True) (inference-mode "
                    "tensors cannot be differentiated through)"
                )
        with torch.enable_grad():
            return self._patched_metric(receiver, donor, edits)

    def _patched_metric(
        self, receiver: PatchRun, donor: PatchRun, edits: Sequence[PatchEdit]
    ) -> float | Float[Tensor, ""]:
        self._check(receiver, donor, edits)
        edits = _effective(edits)
        if not edits:
            return receiver.metric if not torch.is_grad_enabled() else torch.tensor(receiver.metric)
        start_layer = min(e.layer for e in edits)
        if self.croppable:
            start = min(min(e.positions) for e in edits)
            cache = self._cache_through([(receiver, start)], start_layer)
        else:
            start, cache = 0, fork_cache(self.prefix.cache)

        seed = receiver.resid[start_layer, start:][None]
        resid_edits: dict[int, list[PatchEdit]] = {}
        for edit in edits:
            if edit.site == "resid":
                resid_edits.setdefault(edit.layer, []).append(edit)

        def edit_resid(hidden: Tensor, layer: int) -> Tensor:
            if layer == start_layer:
                hidden = seed.to(hidden.dtype)
            for edit in resid_edits.get(layer, []):
                hidden = _replace(hidden, edit, (receiver if edit.hold else donor).resid[layer], start)
            return hidden

        with self._running_from(start_layer, resid_edits, edit_resid) as handles:
            for edit in edits:
                if edit.site == "attn_head":
                    handles.append(self._head_hook(edit, donor, start))
                elif edit.site == "mlp":
                    handles.append(self._mlp_hook(edit, donor, start))
            logits, _ = self._forward(receiver.tokens, cache, start)
        return logits[self.accept_id] - logits[self.reject_id]

    @torch.inference_mode()
    def patched_metrics(self, jobs: Sequence[PatchJob], *, pack: int = 64) -> list[float]:
        """`patched_metric` of each (receiver, donor, edits) job, residual-stream jobs packed into shared forwards.

        A packed forward holds up to `pack` jobs (and `PACKED_TOKENS` tokens) that start at the same layer: each
        job's tokens from its first patched position on, side by side, over one KV cache that holds the shared prefix
        and every job's receiver tokens before that position; a block-diagonal causal mask lets each job see the
        prefix, its own receiver's tokens and itself only, at its own position ids. Nothing is recomputed or copied
        per job, and each job's metric equals its own `patched_metric` up to floating-point summation order. Jobs
        with head, MLP or SAE feature edits, caches that cannot be cropped (sliding windows) and `pack` = 1 run one
        forward each.
        """
        return [float(m) for m in self._patched_metrics(jobs, pack)]

    def patched_metrics_with_grad(self, jobs: Sequence[PatchJob], *, pack: int = 64) -> Float[Tensor, " job"]:
        """`patched_metrics` as one tensor that carries gradients (see `patched_metric_with_grad`)."""
        for receiver, donor, _ in jobs:
            if receiver.resid.is_inference() or donor.resid.is_inference():
                raise AfprobeError(
                    "runs recorded for patching with gradients need record(prompt, for_grad=True) (inference-mode "
                    "tensors cannot be differentiated through)"
                )
        with torch.enable_grad():
            return torch.stack([torch.as_tensor(m, device=self.device) for m in self._patched_metrics(jobs, pack)])

    def _patched_metrics(self, jobs: Sequence[PatchJob], pack: int) -> list[float | Tensor]:
        if pack < 1:
            raise AfprobeError(f"pack must be at least 1, not {pack}")
        for receiver, donor, edits in jobs:
            self._check(receiver, donor, edits)
        out: list[float | Tensor] = [receiver.metric for receiver, _, _ in jobs]
        groups: dict[int, list[int]] = {}
        for i, (receiver, donor, edits) in enumerate(jobs):
            kept = _effective(edits)
            if not kept:
                continue
            if pack == 1 or not self.croppable or any(e.site != "resid" or e.features is not None for e in kept):
                out[i] = self._patched_metric(receiver, donor, kept)
                continue
            groups.setdefault(min(e.layer for e in kept), []).append(i)
        for start_layer, members in groups.items():
            for indices in _chunks(members, [self._width(jobs[i]) for i in members], pack, PACKED_TOKENS):
                packed = [(jobs[i][0], jobs[i][1], _effective(jobs[i][2])) for i in indices]
                for i, metric in zip(indices, self._packed_metrics(packed, start_layer), strict=True):
                    out[i] = metric
        return out

    @staticmethod
    def _width(job: PatchJob) -> int:
        receiver, _, edits = job
        return len(receiver.tokens) - min(min(e.positions) for e in _effective(edits))

    def _packed_metrics(self, jobs: Sequence[PatchJob], start_layer: int) -> Tensor:
        """One forward for jobs that start at `start_layer`; their metrics `[job]`."""
        offset = self.prefix.length
        starts = [min(min(e.positions) for e in edits) for _, _, edits in jobs]
        widths = [len(receiver.tokens) - start for (receiver, _, _), start in zip(jobs, starts, strict=True)]
        # KV columns: the prefix, each receiver's own tokens before the start (once per receiver and start), then
        # the packed tokens.
        segments: dict[tuple[int, int], int] = {}  # (receiver, start) -> index into `segment_runs`
        segment_runs: list[tuple[PatchRun, int]] = []
        for (receiver, _, _), start in zip(jobs, starts, strict=True):
            if (id(receiver), start) not in segments:
                segments[id(receiver), start] = len(segment_runs)
                segment_runs.append((receiver, start))
        cache = self._cache_through(segment_runs, start_layer)
        n_cached = offset + sum(s for _, s in segment_runs)
        n_new = sum(widths)
        block = torch.repeat_interleave(
            torch.arange(len(jobs), device=self.device), torch.tensor(widths, device=self.device)
        )
        row = torch.arange(n_new, device=self.device)
        visible = torch.zeros(n_new, n_cached + n_new, dtype=torch.bool, device=self.device)
        visible[:, :offset] = True
        first_column = list(itertools.accumulate((s for _, s in segment_runs), initial=offset))
        for b, ((receiver, _, _), start) in enumerate(zip(jobs, starts, strict=True)):
            column = first_column[segments[id(receiver), start]]
            visible[block == b, column : column + start] = True
        visible[:, n_cached:] = (block[:, None] == block[None, :]) & (row[:, None] >= row[None, :])
        mask = additive_mask(visible[None], hidden_dtype(self.model))
        positions = torch.cat(
            [
                offset + start + torch.arange(width, device=self.device)
                for start, width in zip(starts, widths, strict=True)
            ]
        )[None]
        last = torch.cumsum(torch.tensor(widths, device=self.device), 0) - 1
        ids = torch.tensor(
            [[t for (receiver, _, _), start in zip(jobs, starts, strict=True) for t in receiver.tokens[start:]]],
            device=self.device,
        )
        by_layer: dict[int, list[tuple[int, PatchEdit]]] = {}
        for b, (_, _, edits) in enumerate(jobs):
            for edit in edits:
                by_layer.setdefault(edit.layer, []).append((b, edit))

        def edit_resid(hidden: Tensor, layer: int) -> Tensor:
            if layer == start_layer:
                pieces = [
                    r.resid[start_layer, s:][None].to(hidden.dtype) for (r, _, _), s in zip(jobs, starts, strict=True)
                ]
            else:
                pieces = list(hidden.split(widths, dim=1))
            for b, edit in by_layer.get(layer, []):
                receiver, donor, _ = jobs[b]
                source = (receiver if edit.hold else donor).resid[layer]
                pieces[b] = _replace(pieces[b], edit, source, starts[b])
            return torch.cat(pieces, dim=1)

        with self._running_from(start_layer, by_layer, edit_resid), float32_readout(self.model):
            logits = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=last,
            ).logits[0]
        return logits[:, self.accept_id] - logits[:, self.reject_id]

    def _cache_through(self, runs: Sequence[tuple[PatchRun, int]], from_layer: int) -> Any:
        """A KV cache holding the shared prefix, then each (run, start)'s own tokens before `start` in turn, at the
        layers from `from_layer` on (the prefix alone below: those blocks are skipped, never read)."""
        for_grad = not runs[0][0].resid.is_inference()
        if for_grad and self._grad_prefix is None:
            self._grad_prefix = _normal_tensors(self.prefix.cache)
        cache = fork_cache(self._grad_prefix if for_grad else self.prefix.cache)
        for run, _ in runs:
            if run.own_kv is None:
                raise AfprobeError(
                    f"run {run.prompt.query_id}/{run.prompt.tier} keeps no KV cache (kept only as a donor, or the "
                    "model's cache has sliding windows): it cannot be a receiver here"
                )
        length = self.prefix.length + sum(start for _, start in runs)
        for layer_index, layer_cache in enumerate(cache.layers):
            if layer_index < from_layer:
                # Skipped blocks never read their cache, but the model sizes its mask by the first layer's length:
                # a zero-stride stand-in of that length costs no memory.
                for name in ("keys", "values"):
                    tensor = getattr(layer_cache, name)
                    setattr(
                        layer_cache, name, tensor.new_zeros(()).expand(*tensor.shape[:-2], length, tensor.shape[-1])
                    )
                continue
            own = [run.own_kv[layer_index] for run, start in runs if start > 0]
            if own:
                starts = [start for _, start in runs if start > 0]
                layer_cache.keys = torch.cat(
                    [layer_cache.keys, *(k[..., :s, :] for (k, _), s in zip(own, starts, strict=True))], dim=-2
                )
                layer_cache.values = torch.cat(
                    [layer_cache.values, *(v[..., :s, :] for (_, v), s in zip(own, starts, strict=True))], dim=-2
                )
        return cache

    @contextmanager
    def _running_from(
        self, start_layer: int, edited_layers: Iterable[int], edit_resid: Callable[[Tensor, int], Tensor]
    ) -> Iterator[list[Any]]:
        """While inside, a forward skips the blocks below `start_layer` (their output is replaced there anyway) and
        hands the residual stream at `start_layer` and `edited_layers` to `edit_resid(hidden, layer)`. Yields the list
        of hook handles, removed on exit with any added to it."""
        with ExitStack() as stack:
            stack.enter_context(_skipping(self.blocks if start_layer == self.n_layers else self.blocks[:start_layer]))
            handles = stack.enter_context(removing([]))
            for layer in sorted({start_layer, *edited_layers}):
                handles.append(
                    register_residual_hook(self.blocks, layer, lambda hidden, layer=layer: edit_resid(hidden, layer))
                )
            yield handles

    def _head_hook(self, edit: PatchEdit, donor: PatchRun, start: int) -> Any:
        assert edit.head is not None
        columns = slice(edit.head * self.head_dim, (edit.head + 1) * self.head_dim)
        rows = [p - start for p in edit.positions]
        source = donor.head_inputs[edit.layer, edit.source_positions, columns]

        def hook(module, args):
            x = args[0].clone()
            x[0, rows, columns] = source.to(x.dtype)
            return (x, *args[1:])

        return self.blocks[edit.layer].self_attn.o_proj.register_forward_pre_hook(hook)

    def _mlp_hook(self, edit: PatchEdit, donor: PatchRun, start: int) -> Any:
        rows = [p - start for p in edit.positions]
        source = donor.mlp_out[edit.layer, edit.source_positions]

        def hook(module, args, output):
            out = output.clone()
            out[0, rows] = source.to(out.dtype)
            return out

        return self.blocks[edit.layer].mlp.register_forward_hook(hook)

    # -- attribution patching ---------------------------------------------------------------------------------------

    def attribution(self, receiver: PatchRun, donor: PatchRun) -> dict[str, Tensor]:
        """First-order estimate of every single-site patch from one forward and one backward pass of the receiver.

        estimate(site) = (donor activation - receiver activation) . d metric / d activation, per layer and
        own position (and head). Returns `resid [layer, pos]`, `attn_head [block, pos, head]`, `mlp [block, pos]`.
        """
        if len(receiver.tokens) != len(donor.tokens):
            raise AfprobeError(
                "attribution patching compares the two runs position by position: their own tokens differ in "
                f"length ({len(receiver.tokens)} vs {len(donor.tokens)})"
            )
        captured: dict[tuple[str, int], Tensor] = {}

        def capture(site: str, layer: int) -> Any:
            def hook(hidden: Tensor) -> Tensor | None:
                if site == "resid" and layer == 0:
                    # A leaf to differentiate from: the graph then exists whatever requires_grad the weights have.
                    hidden = hidden.detach().requires_grad_(True)
                    captured[(site, layer)] = hidden
                    return hidden
                captured[(site, layer)] = hidden
                return None

            return hook

        with removing([]) as handles, torch.enable_grad():
            for layer in range(self.n_layers + 1):
                handles.append(register_residual_hook(self.blocks, layer, capture("resid", layer)))
            for layer in range(self.n_layers):
                handles += self._component_hooks(layer, capture("attn_head", layer), capture("mlp", layer))
            logits, _ = self._forward(receiver.tokens, fork_cache(self.prefix.cache), start=0)
            metric = logits[self.accept_id] - logits[self.reject_id]
            keys = list(captured)
            grads = torch.autograd.grad(metric, [captured[key] for key in keys])
        gradient = {key: grad[0].detach() for key, grad in zip(keys, grads, strict=True)}

        def estimate(site: str, donor_acts: Tensor, receiver_acts: Tensor, n: int) -> Tensor:
            g = torch.stack([gradient[(site, layer)] for layer in range(n)]).float()
            return (donor_acts.float() - receiver_acts.float()) * g

        resid = estimate("resid", donor.resid, receiver.resid, self.n_layers + 1).sum(-1)
        heads = estimate("attn_head", donor.head_inputs, receiver.head_inputs, self.n_layers)
        heads = heads.reshape(*heads.shape[:2], self.n_heads, self.head_dim).sum(-1)
        mlp = estimate("mlp", donor.mlp_out, receiver.mlp_out, self.n_layers).sum(-1)
        return {"resid": resid.cpu(), "attn_head": heads.cpu(), "mlp": mlp.cpu()}


def patcher_for(loaded: LoadedModel, sets: Sequence[PromptSet]) -> Patcher:
    """A patcher whose cached prefix is what every prompt of `sets` shares (they need one system prompt)."""
    every = [p for s in sets for p in s.prompts]
    k = cacheable_prefix_len(every)
    if k < 1:
        raise AfprobeError("the prompts share no prefix to cache: give prompt sets with one system prompt")
    prefix = compute_prefix_cache(loaded.model, every[0].input_ids[:k])
    return Patcher(loaded.model, prefix, AnswerTokens.from_tokenizer(loaded.tokenizer))


def _normal_tensors(cache: Any) -> Any:
    """A copy of a KV cache whose tensors are ordinary (not inference-mode) tensors: autograd can save them."""
    copied = fork_cache(cache)
    for layer in getattr(copied, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.is_inference():
                setattr(layer, name, tensor.clone())
    return copied


def _chunks(items: list[int], widths: list[int], most: int, tokens: int) -> Iterator[list[int]]:
    """`items` in order, in runs of at most `most` items and `tokens` summed width (an item wider than that alone)."""
    run: list[int] = []
    total = 0
    for item, width in zip(items, widths, strict=True):
        if run and (len(run) == most or total + width > tokens):
            yield run
            run, total = [], 0
        run.append(item)
        total += width
    if run:
        yield run


def _effective(edits: Sequence[PatchEdit]) -> list[PatchEdit]:
    """The edits that change something (positions, a basis of rank > 0, at least one SAE feature)."""
    return [
        e
        for e in edits
        if e.positions
        and (e.basis is None or e.basis.shape[1] > 0)
        and (e.features is None or len(e.features.features) > 0)
    ]


def _replace(hidden: Tensor, edit: PatchEdit, donor_layer: Tensor, start: int) -> Tensor:
    """hidden with the donor's activations (or their component in edit.basis) at the edit's positions."""
    rows = [p - start for p in edit.positions]
    source = donor_layer[edit.source_positions].to(hidden.dtype)
    out = hidden.clone()
    if edit.features is not None:
        current = out[0, rows]
        out[0, rows] = current + edit.features.delta(current, source)
    elif edit.basis is None:
        out[0, rows] = source
    else:
        q = edit.basis.to(hidden.device, hidden.dtype)
        current = out[0, rows]
        out[0, rows] = current + ((source - current) @ q) @ q.T
    return out
