"""Recording the residual stream during a forward: afprobe's hooks, or TransformerLens and nnsight as alternative
backends for the cache job."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from afprobe.data.prompts import RenderedPrompt
from afprobe.errors import AfprobeError
from afprobe.model.architecture import decoder_layers, decoder_layers_path, hook_name, residual_hooks
from afprobe.model.loading import LoadedModel, shared_weight_copy
from afprobe.model.precision import float32_readout, needs_float32_readout
from afprobe.model.readout import (
    AnswerTokens,
    ComplianceScore,
    score_from_full_logits,
)

BACKENDS = ("hooks", "transformer-lens", "nnsight")


class ResidualRecorder:
    """Forward hooks that copy the residual stream at given positions of each row, for chosen layers.

    Layer l < n_layers is recorded entering block l; l = n_layers leaving the last block. Hooks exist only inside
    `recording()`, so the model is unchanged afterwards.
    """

    def __init__(self, model: Any, layers: Sequence[int], kind_layers: dict[str, Sequence[int]] | None = None):
        self.model = model
        self.layers = list(layers)
        self.n_layers = len(decoder_layers(model))
        self.kind_layers = kind_layers  # kind -> the layers it keeps (default: all of `layers`)

    @staticmethod
    def empty_record(positions: Sequence[dict[str, list[int]]]) -> dict[str, list[dict[int, Tensor]]]:
        return {kind: [{} for _ in positions] for kind in (positions[0] if positions else {})}

    @contextmanager
    def recording(
        self,
        positions: Sequence[dict[str, list[int]]],
        record: dict[str, list[dict[int, Tensor]]] | None = None,
    ) -> Iterator[dict[str, list[dict[int, Tensor]]]]:
        """positions[row][kind]: indices into that row's input tokens. Fills and yields
        record[kind][row][layer] = `[tokens, d_model]` (float32, CPU)."""
        if record is None:
            record = self.empty_record(positions)

        def store(layer: int, hidden: Tensor) -> None:
            for row, row_positions in enumerate(positions):
                for kind, indices in row_positions.items():
                    if self.kind_layers is not None and layer not in self.kind_layers.get(kind, self.layers):
                        continue
                    record[kind][row][layer] = hidden[row, indices].detach().float().cpu()

        with residual_hooks(
            self.model, {layer: (lambda hidden, layer=layer: store(layer, hidden)) for layer in self.layers}
        ):
            yield record


def stack_record(record: dict[int, Tensor], layers: Sequence[int]) -> Float[Tensor, "tokens layers d"]:
    return torch.stack([record[layer] for layer in layers], dim=1)


class FullForwardBackend:
    """Runs one whole sequence and returns its logits and the residual stream at the asked positions."""

    name = "hooks-full"

    def __init__(self, loaded: LoadedModel, layers: Sequence[int]):
        self.loaded = loaded
        self.layers = list(layers)
        self.recorder = ResidualRecorder(loaded.model, layers)

    @torch.inference_mode()
    def forward(
        self, ids: Sequence[int], positions: dict[str, list[int]] | None, logits_from: int = 0
    ) -> tuple[Float[Tensor, "tail vocab"], dict[str, Tensor]]:
        """Logits from position `logits_from` on, and the residual stream at `positions`."""
        tensor = torch.tensor([list(ids)], device=self.loaded.device)
        with self.recorder.recording([positions or {}]) as record, float32_readout(self.loaded.model):
            logits = self.loaded.model(input_ids=tensor, use_cache=False).logits[0, logits_from:].float()
        return logits, {kind: stack_record(record[kind][0], self.layers) for kind in (positions or {})}


class TransformerLensBackend(FullForwardBackend):
    """TransformerLens' TransformerBridge over the loaded model (hook names `blocks.L.hook_resid_pre`)."""

    name = "transformer-lens"

    def __init__(self, loaded: LoadedModel, layers: Sequence[int]):
        from transformer_lens.model_bridge import TransformerBridge

        if needs_float32_readout(loaded.model):
            raise AfprobeError(
                f"the transformer-lens backend reads logits in the model's dtype ({loaded.dtype}), too coarse for "
                "log-odds: use --backend hooks, or --dtype float32"
            )
        self.loaded = loaded
        self.layers = list(layers)
        # TransformerBridge rewires the modules of the model it wraps, so it gets a copy: the user's model stays
        # as it was (at the cost of a second copy of the weights while this backend lives).
        model = copy.deepcopy(loaded.model)
        if not getattr(model.config, "architectures", None):
            model.config.architectures = [type(model).__name__]
        try:
            self.bridge = TransformerBridge.boot_transformers(
                loaded.fingerprint.name, hf_model=model, tokenizer=loaded.tokenizer, device=loaded.device
            )
        except (ValueError, KeyError, NotImplementedError) as exc:
            raise AfprobeError(
                f"TransformerLens cannot wrap {type(loaded.model).__name__} ({str(exc)[:120]}): use --backend hooks"
            ) from exc
        self.hook_names = {layer: hook_name(layer, loaded.n_layers) for layer in self.layers}

    @torch.inference_mode()
    def forward(
        self, ids: Sequence[int], positions: dict[str, list[int]] | None, logits_from: int = 0
    ) -> tuple[Float[Tensor, "tail vocab"], dict[str, Tensor]]:
        tensor = torch.tensor([list(ids)], device=self.loaded.device)
        if not positions:
            return self.bridge(tensor)[0, logits_from:].float(), {}
        wanted = set(self.hook_names.values())
        logits, cache = self.bridge.run_with_cache(tensor, names_filter=lambda name: name in wanted)
        acts = {
            kind: torch.stack([cache[self.hook_names[layer]][0, idx].float().cpu() for layer in self.layers], dim=1)
            for kind, idx in positions.items()
        }
        return logits[0, logits_from:].float(), acts


class NNsightBackend(FullForwardBackend):
    """nnsight's TransformersModel over the loaded model (the trace body lives in this file, as nnsight requires).

    remote: run each trace on NDIF (True) or through nnsight's local simulation of the remote path ("local": the
    request is serialised and deserialised with afprobe's modules hidden, as on the server). Remote traces send
    back only the residual stream at the recorded positions and the logits of the answer tokens.
    """

    name = "nnsight"

    def __init__(self, loaded: LoadedModel, layers: Sequence[int], remote: bool | str = False):
        self.loaded = loaded
        self.layers = list(layers)
        self.n_layers = loaded.n_layers
        self.remote = remote
        if remote:
            self.model = loaded.model  # already an nnsight model (see `afprobe.model.loading.load_remote_model`)
            self.device = torch.device("cpu")
            # The module tree behind the envoys (on the meta device when the weights live on NDIF).
            self.layers_path = decoder_layers_path(loaded.model._module)
        else:
            from nnsight import TransformersModel

            # nnsight installs its own `forward` on every module it wraps and leaves it there: it gets a copy of the
            # module tree that shares the weights, so the user's model stays as it was. Interventions meant to act
            # through this backend go on `self.wrapped`.
            self.wrapped = shared_weight_copy(loaded.model)
            self.model = TransformersModel(self.wrapped, tokenizer=loaded.tokenizer)
            self.device = loaded.device
            self.layers_path = decoder_layers_path(self.wrapped)

    @torch.inference_mode()
    def forward(
        self, ids: Sequence[int], positions: dict[str, list[int]] | None, logits_from: int = 0
    ) -> tuple[Float[Tensor, "tail vocab"], dict[str, Tensor]]:
        tensor = torch.tensor([list(ids)], device=self.device)
        wanted = sorted({i for idx in (positions or {}).values() for i in idx})
        envoys = self.model
        for attribute in self.layers_path.split("."):
            envoys = getattr(envoys, attribute)
        n_layers = self.n_layers
        layers = self.layers if wanted else []
        saved = []
        readout = nullcontext() if self.remote else float32_readout(self.wrapped)
        with readout, self.model.trace(tensor, remote=self.remote):
            for layer in layers:
                if layer < n_layers:
                    saved.append(envoys[layer].input[0, wanted].save())
                else:
                    saved.append(envoys[n_layers - 1].output[0, wanted].save())
            logits = self.model.output.logits[0, logits_from:].save()
        column = {index: j for j, index in enumerate(wanted)}
        acts = {
            kind: torch.stack([hidden[[column[i] for i in idx]].float().cpu() for hidden in saved], dim=1)
            for kind, idx in (positions or {}).items()
        }
        return logits.float().cpu(), acts


def make_backend(
    name: str, loaded: LoadedModel, layers: Sequence[int], remote: bool | str = False
) -> FullForwardBackend:
    if remote:
        return NNsightBackend(loaded, layers, remote=remote)
    if name == "transformer-lens":
        return TransformerLensBackend(loaded, layers)
    if name == "nnsight":
        return NNsightBackend(loaded, layers)
    if name == "hooks-full":
        return FullForwardBackend(loaded, layers)
    raise AfprobeError(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)}")


def full_forward_row(
    backend: FullForwardBackend, prompt: RenderedPrompt, answers: AnswerTokens, positions: dict[str, list[int]]
) -> tuple[ComplianceScore, dict[str, Tensor]]:
    """One prompt the naive way: prompt + accept (recording activations) and prompt + reject, full forwards."""
    start = prompt.n_tokens - 1  # the logits that predict the answer tokens
    accept_logits, acts = backend.forward(list(prompt.input_ids) + list(answers.accept), positions, start)
    reject_logits, _ = backend.forward(list(prompt.input_ids) + list(answers.reject), None, start)
    return score_from_full_logits(accept_logits, reject_logits, 1, answers), acts
