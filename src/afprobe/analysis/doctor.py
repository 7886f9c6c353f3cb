"""`afprobe doctor`: before a long run on a new model, check that afprobe computes on it what it claims to.

Each check measures one thing on the user's own model and prompts and says PASS, WARN or FAIL, with a one-line fix:
the model loads; the chat template carries the system prompt and the prompt ends with the `<OUTPUT>` prefill; the
accept and reject strings can be read as log-odds; the prefix-shared forward matches the full forward (SUPPORTED or
SILENTLY WRONG, within a tolerance for the dtype); the residual stream afprobe records is the model's own hidden state;
patching a run with itself changes nothing and patching the whole last residual recovers the donor; no intervention
leaves the weights changed; what the dtype resolves; and what the planned run will cost on this machine.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from afprobe import __version__
from afprobe.artefacts import ResultRecord
from afprobe.behaviour.resolution import Resolution, measure_resolution
from afprobe.data import prompt_text as text
from afprobe.data.prompts import (
    FOLDED,
    PLAIN,
    PromptSet,
    RenderedPrompt,
    common_prefix_length,
    parse_positions,
    prompt_positions,
    render_pairs,
    system_prompt_placement,
)
from afprobe.errors import AfprobeError
from afprobe.files import atomic_write_json, finite_json, results_folder
from afprobe.model.architecture import decoder_layers, final_norm, parse_layers, text_config
from afprobe.model.forward import PrefixCache, compute_prefix_cache, extend_batch, start_batch
from afprobe.model.interventions import ablate_directions, add_direction
from afprobe.model.job import PairedPromptJob
from afprobe.model.loading import LoadedModel
from afprobe.model.memory import GIB, batch_plan, dtype_bytes
from afprobe.model.patching import PatchEdit, Patcher
from afprobe.model.readout import AnswerTokens, score_prompt_full, score_prompts
from afprobe.model.recording import ResidualRecorder

Status = Literal["PASS", "WARN", "FAIL", "SKIP"]
DOCTOR_FILE = "doctor.json"

# Tolerances, fixed before any model was checked. Float32: the prefix-shared and the full forward differ only in the
# order attention sums over a split sequence (1e-4 nats on the tiny test models; 1e-3 leaves room for 80 layers).
# Lower precision: each path rounds on its own, so the bound is a multiple of the rounding noise measured on this
# model (`measure_resolution`), never below the float32 one.
FLOAT32_LOG_ODDS_TOLERANCE = 1e-3
ROUNDING_MULTIPLE = 5.0
FLOAT32_RELATIVE_TOLERANCE = 1e-3  # residual stream, |recorded - reference| / |reference|
HALF_RELATIVE_TOLERANCE = 5e-2
# Below this probability of the accept/reject strings' shared start, the log-odds are read on a path the model
# rarely takes.
SHARED_START_WARN = 0.05


@dataclass(frozen=True)
class Check:
    """One line of the doctor's table."""

    name: str
    status: Status
    measured: str  # what was found, one line
    fix: str = ""  # what to do, one line (WARN and FAIL)
    state: str | None = None  # SUPPORTED / SILENTLY WRONG for the forward-equivalence checks
    values: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DoctorConfig(PairedPromptJob):
    """A preflight of the run `afprobe cache` would do with the same flags; saved in doctor.json."""

    layers: str = "all"  # the planned run's layers and positions (for the estimates)
    positions: str = "tag,last"
    store_dtype: str = "float32"
    check_pairs: int = 2  # query pairs the checks run on
    out: str | None = None


@dataclass
class DoctorResult(ResultRecord):
    """What doctor.json holds."""

    afprobe_version: str
    config: dict[str, Any]
    model: dict[str, Any]
    checks: list[Check]
    seconds: float

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAIL"]

    @property
    def warned(self) -> list[Check]:
        return [c for c in self.checks if c.status == "WARN"]

    def check(self, name: str) -> Check:
        for candidate in self.checks:
            if candidate.name == name:
                return candidate
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        data["checks"] = [c.to_dict() for c in self.checks]
        data["passed"] = not self.failed
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DoctorResult:
        data = {k: v for k, v in data.items() if k != "passed"}
        return cls(**{**data, "checks": [Check(**c) for c in data["checks"]]})


@dataclass
class Subject:
    """What the checks run on: the model, the checked prompts and their shared prefix (computed once, timed)."""

    loaded: LoadedModel
    prompt_set: PromptSet
    prefix: PrefixCache
    prefix_seconds: float
    resolution: Resolution | None = None  # set by the resolution check, read by the tolerances after it

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def prompts(self) -> list[RenderedPrompt]:
        return self.prompt_set.prompts

    @property
    def own_start(self) -> int:
        return self.prefix.length

    def tolerance(self) -> float:
        """For log-odds: float32's, or a multiple of the rounding noise measured on this model."""
        if self.loaded.dtype == torch.float32:
            return FLOAT32_LOG_ODDS_TOLERANCE
        noise = self.resolution.per_prompt_noise if self.resolution is not None else 0.0
        return max(FLOAT32_LOG_ODDS_TOLERANCE, ROUNDING_MULTIPLE * noise)


CHECK_NAMES = (
    "model loads",
    "prompts render",
    "chat template",
    "answer strings",
    "prefix sharing",
    "residual stream",
    "patching",
    "resolution",
    "weights unchanged",
    "run estimate",
)


def run_doctor(
    config: DoctorConfig,
    *,
    loaded: LoadedModel | None = None,
    progress: Callable[[str], None] | None = None,
) -> DoctorResult:
    """Run every check; a check that cannot run (the model did not load, the prompts did not render) is SKIP."""
    started = time.perf_counter()
    say = progress or (lambda name: None)
    checks: list[Check] = []

    def skipped_from(name: str) -> list[Check]:
        rest = CHECK_NAMES[CHECK_NAMES.index(name) + 1 :]
        return [Check(n, "SKIP", f"not run: {name!r} failed") for n in rest]

    def finish(model: dict[str, Any]) -> DoctorResult:
        return DoctorResult(
            afprobe_version=__version__,
            config=asdict(config),
            model=model,
            checks=checks,
            seconds=time.perf_counter() - started,
        )

    say("model loads")
    if loaded is None:
        try:
            loaded = config.load()
        except AfprobeError as exc:
            checks.append(Check("model loads", "FAIL", str(exc), "check --model, --adapter and --format"))
            checks.extend(skipped_from("model loads"))
            return finish({"name": config.model})
    model_info = describe_model(loaded)
    checks.append(
        Check(
            "model loads",
            "PASS",
            f"{model_info['family']}, {model_info['n_layers']} layers, d_model {model_info['d_model']}, context "
            f"{model_info['max_context']:,}, {model_info['dtype']} on {model_info['device']}",
            values=model_info,
        )
    )
    digest_before = exact_weights_digest(loaded.model)

    say("prompts render")
    try:
        queries = config.queries()
        planned_pairs = len(queries)
        prompt_set = render_pairs(
            loaded.tokenizer,
            queries[: max(1, config.check_pairs)],
            config.prompt_config(),
            max_context=loaded.max_context,
        )
        # The planned run's longest prompt must fit too, not only the checked ones.
        longest = max(queries, key=lambda q: len(q.text))
        render_pairs(loaded.tokenizer, [longest], config.prompt_config(), max_context=loaded.max_context)
    except AfprobeError as exc:
        checks.append(Check("prompts render", "FAIL", str(exc), "see the message; `afprobe prompt` shows one"))
        checks.extend(skipped_from("prompts render"))
        return finish(model_info)
    checks.append(
        Check(
            "prompts render",
            "PASS",
            f"{planned_pairs} queries x {len(prompt_set.variant.tiers)} tiers; the checked prompts have "
            f"{min(p.n_tokens for p in prompt_set.prompts):,}-{prompt_set.max_tokens:,} tokens, "
            f"{prompt_set.shared_prefix_len:,} shared",
        )
    )

    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    prefix = compute_prefix_cache(loaded.model, prompt_set.prompts[0].input_ids[: prompt_set.prefix_len()])
    sync()
    subject = Subject(loaded, prompt_set, prefix, time.perf_counter() - t0)
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("chat template", lambda: check_chat_template(loaded.tokenizer, prompt_set)),
        ("answer strings", lambda: check_answer_strings(subject)),
        ("resolution", lambda: check_resolution(subject)),
        ("prefix sharing", lambda: check_prefix_sharing(subject)),
        ("residual stream", lambda: check_residual_stream(subject)),
        ("patching", lambda: check_patching(subject)),
        ("weights unchanged", lambda: check_weights_unchanged(loaded, digest_before)),
        ("run estimate", lambda: check_run_estimate(subject, config, planned_pairs)),
    ]
    for name, run_check in steps:
        say(name)
        t0 = time.perf_counter()
        try:
            done = run_check()
        except Exception as exc:  # noqa: BLE001 - a check that crashes is a failed check, named, not a traceback
            message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            done = Check(name, "FAIL", f"the check raised {type(exc).__name__}: {message}", "report this model")
        checks.append(replace(done, seconds=time.perf_counter() - t0))
    checks.sort(key=lambda c: CHECK_NAMES.index(c.name))
    return finish(model_info)


def describe_model(loaded: LoadedModel) -> dict[str, Any]:
    config = text_config(loaded.model)
    return {
        **loaded.fingerprint.to_dict(),
        "family": getattr(config, "model_type", type(loaded.model).__name__),
        "architecture": type(loaded.model).__name__,
        "device": str(loaded.device),
        "n_parameters": sum(p.numel() for p in loaded.model.parameters()),
    }


def exact_weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, byte for byte (the fingerprint's digest samples; this one does not)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


# -- the checks -----------------------------------------------------------------------------------------------------


def check_chat_template(tokenizer: Any, prompt_set: PromptSet) -> Check:
    """Where the system prompt goes, that the prompt ends with the prefill, and that a pair differs only in its tag."""
    placement = system_prompt_placement(tokenizer, prompt_set.format)
    problems, notes = [], [f"system prompt: {placement}"]
    status: Status = "PASS"
    fix = ""
    if placement == FOLDED:
        status = "WARN"
        fix = (
            "the template refuses or drops a system message, so afprobe puts the system prompt at the start of the "
            "user turn: fine for the gap, but say so when comparing with models that read it as a system message"
        )
    elif placement == PLAIN:
        status = "WARN"
        fix = "no chat template: prompts are plain text (right for a base model; for a chat model use its tokenizer)"
    for prompt in prompt_set.prompts:
        tail = tokenizer.decode(list(prompt.input_ids[-8:]))
        if not tail.rstrip().endswith(text.OUTPUT_PREFILL):
            problems.append(f"{prompt.query_id}/{prompt.tier} ends with {tail[-24:]!r}, not {text.OUTPUT_PREFILL!r}")
        if prompt_set.system_prompt.strip()[:200] not in prompt.text:
            problems.append(f"{prompt.query_id}/{prompt.tier} does not contain the system prompt")
    by_query: dict[str, list[RenderedPrompt]] = {}
    for prompt in prompt_set.prompts:
        by_query.setdefault(prompt.query_id, []).append(prompt)
    shifted = 0
    for pair in by_query.values():
        first, *others = pair
        for other in others:
            if len(other.input_ids) != len(first.input_ids):
                shifted += 1
                continue
            outside = [
                i
                for i, (a, b) in enumerate(zip(first.input_ids, other.input_ids, strict=True))
                if a != b and not _inside(i, first.tag_span) and not _inside(i, other.tag_span)
            ]
            if outside:
                problems.append(f"{first.query_id}: the tiers' prompts differ outside the tag (token {outside[0]})")
    if shifted:
        notes.append(f"{shifted} pair(s) whose tags tokenize to different lengths (patching aligns by position)")
    if problems:
        return Check(
            "chat template",
            "FAIL",
            "; ".join(problems[:2]),
            "render with --format plain, or give a tokenizer whose template keeps the system prompt and ends with "
            "the generation prompt",
            values={"placement": placement, "problems": problems},
        )
    return Check("chat template", status, "; ".join(notes), fix, values={"placement": placement})


def _inside(index: int, span: tuple[int, int] | None) -> bool:
    return span is not None and span[0] <= index < span[1]


def check_answer_strings(
    subject: Subject,
    accept: str = text.ACCEPT_TAG,
    reject: str = text.REJECT_TAG,
) -> Check:
    """The accept and reject strings' tokens, where they first differ, and how likely their shared start is."""
    tokenizer = subject.loaded.tokenizer
    accept_ids = tuple(tokenizer(accept, add_special_tokens=False)["input_ids"])
    reject_ids = tuple(tokenizer(reject, add_special_tokens=False)["input_ids"])
    shared = common_prefix_length([accept_ids, reject_ids])
    values: dict[str, Any] = {
        "accept": [tokenizer.decode([t]) for t in accept_ids],
        "reject": [tokenizer.decode([t]) for t in reject_ids],
        "first_difference": shared,
    }
    unk = getattr(tokenizer, "unk_token_id", None)
    if not accept_ids or not reject_ids or shared == min(len(accept_ids), len(reject_ids)):
        return Check(
            "answer strings",
            "FAIL",
            f"{accept!r} -> {values['accept']} and {reject!r} -> {values['reject']}: "
            + ("identical" if accept_ids == reject_ids else "one is a prefix of the other"),
            "the log-odds cannot be read from these tokens: use a tokenizer that tells the two tags apart",
            values=values,
        )
    if unk is not None and unk in (accept_ids[shared], reject_ids[shared]):
        return Check(
            "answer strings",
            "FAIL",
            f"the first differing token is the unknown token ({tokenizer.decode([unk])!r})",
            "the log-odds would compare unknown tokens: use a tokenizer that covers the tags",
            values=values,
        )
    measured = (
        f"accept {values['accept']}, reject {values['reject']}; they differ at token {shared} "
        f"({values['accept'][shared]!r} vs {values['reject'][shared]!r})"
    )
    if shared == 0:
        return Check("answer strings", "PASS", measured, values=values)
    # The log-odds are read after teacher-forcing the shared start: say how likely the model finds it.
    k = subject.own_start
    start = list(accept_ids[:shared])
    rows = [list(p.input_ids[k:]) + start for p in subject.prompts]
    keep = [list(range(len(row) - shared - 1, len(row) - 1)) for row in rows]
    logps = []
    for row, row_keep in zip(rows, keep, strict=True):
        logits, _, _ = extend_batch(subject.model, start_batch(subject.prefix, 1), [row], [row_keep])
        logps.append(float(torch.log_softmax(logits[0], dim=-1)[torch.arange(shared), torch.tensor(start)].sum()))
    p_shared = math.exp(sum(logps) / len(logps))
    values["p_shared_start"] = p_shared
    measured += f"; the model gives their shared start {p_shared:.2g} (geometric mean over the checked prompts)"
    if p_shared < SHARED_START_WARN:
        return Check(
            "answer strings",
            "WARN",
            measured,
            "the model rarely starts its answer this way, so the log-odds describe an unlikely path: check the "
            "prompt's ending with `afprobe prompt --tail 300` and the model's own answers with `afprobe gap --sample`",
            values=values,
        )
    return Check("answer strings", "PASS", measured, values=values)


def check_resolution(subject: Subject) -> Check:
    """The rounding noise of the run's dtype against float32 arithmetic on the same weights."""
    resolution = measure_resolution(
        subject.model, subject.loaded.tokenizer, subject.prompt_set, n_pairs=len(subject.prompt_set.queries)
    )
    subject.resolution = resolution
    n = 100
    return Check(
        "resolution",
        "PASS",
        f"{resolution.dtype}: {resolution.per_prompt_noise:.3g} nats of rounding noise per prompt; a mean gap over "
        f"{n} pairs is resolved beyond +-{resolution.of_mean_difference(n):.3g} nats",
        values=resolution.to_dict(),
    )


def check_prefix_sharing(subject: Subject) -> Check:
    """afprobe's prefix-shared scores (all prompts in one batch, and one at a time) against the plain way: the whole
    prompt in one forward, for the first pair (each of those costs a forward of the full prompt per answer)."""
    model, tokenizer, prompts = subject.model, subject.loaded.tokenizer, subject.prompts
    shared = score_prompts(model, tokenizer, subject.prompt_set, batch_size=len(prompts), prefix=subject.prefix)
    single = score_prompts(model, tokenizer, subject.prompt_set, batch_size=1, prefix=subject.prefix)
    errors = []
    for prompt, batched, alone in list(zip(prompts, shared, single, strict=True))[:2]:
        full = score_prompt_full(model, tokenizer, prompt)
        for score in (batched, alone):
            errors.append(abs(score.log_odds - full.log_odds))
            errors.append(abs(score.first_token_log_odds - full.first_token_log_odds))
    for batched, alone in zip(shared, single, strict=True):
        errors.append(abs(batched.log_odds - alone.log_odds))
    worst = max(errors)
    tolerance = subject.tolerance()
    values = {"max_abs_error": worst, "tolerance": tolerance, "n_prompts": len(prompts)}
    measured = (
        f"largest |prefix-shared - full| log-odds {worst:.2g} nats (2 prompts against the full forward, "
        f"{len(prompts)} batched against one at a time; tolerance {tolerance:.2g})"
    )
    if worst <= tolerance:
        return Check("prefix sharing", "PASS", measured, state="SUPPORTED", values=values)
    return Check(
        "prefix sharing",
        "FAIL",
        measured,
        "afprobe's fast path computes something else on this model: do not trust its numbers; report the model",
        state="SILENTLY WRONG",
        values=values,
    )


def check_residual_stream(subject: Subject) -> Check:
    """The residual afprobe records (prefix-shared, as the cache job does) against `output_hidden_states` of the full
    forward, at the last prompt token of every layer."""
    loaded, model = subject.loaded, subject.model
    n_layers = len(decoder_layers(model))
    prompt = subject.prompts[0]
    own = list(prompt.input_ids[subject.own_start :])
    recorder = ResidualRecorder(model, list(range(n_layers + 1)))
    with recorder.recording([{"last": [len(own) - 1]}]) as record:
        extend_batch(model, start_batch(subject.prefix, 1), [own], [[len(own) - 1]])
    with torch.inference_mode():
        ids = torch.tensor([list(prompt.input_ids)], device=loaded.device)
        hidden = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states
    if hidden is None or len(hidden) != n_layers + 1:
        return Check(
            "residual stream",
            "WARN",
            f"the model returns {0 if hidden is None else len(hidden)} hidden states for {n_layers} blocks",
            "cannot compare with the model's own hidden states; the prefix-sharing check still covers the output",
        )
    errors = []
    norm = final_norm(model)
    for layer in range(n_layers + 1):
        recorded = record["last"][0][layer][0].to(loaded.device)
        reference = hidden[layer][0, -1].float()
        candidates = [recorded]
        if layer == n_layers:  # most families return the last state after the final norm
            with torch.inference_mode():
                candidates.append(norm(recorded.to(loaded.dtype)[None])[0].float())
        errors.append(min(float((c - reference).norm() / reference.norm().clamp_min(1e-12)) for c in candidates))
    tolerance = FLOAT32_RELATIVE_TOLERANCE if loaded.dtype == torch.float32 else HALF_RELATIVE_TOLERANCE
    worst = max(range(len(errors)), key=errors.__getitem__)
    values = {"relative_error": errors, "tolerance": tolerance}
    measured = (
        f"layers 0-{n_layers}: largest relative difference {errors[worst]:.2g} (layer {worst}; tolerance {tolerance:g})"
    )
    if errors[worst] <= tolerance:
        return Check("residual stream", "PASS", measured, state="SUPPORTED", values=values)
    return Check(
        "residual stream",
        "FAIL",
        measured,
        "the hooks read another tensor than the model's residual stream at this layer: report the model",
        state="SILENTLY WRONG",
        values=values,
    )


def check_patching(subject: Subject) -> Check:
    """A self-patch changes nothing; the donor's whole last residual at the decision position gives the donor's
    log-odds; so does every position at the middle layer when the pair has one length."""
    model = subject.model
    n_layers = len(decoder_layers(model))
    receiver_prompt, donor_prompt = subject.prompts[0], subject.prompts[1]
    patcher = Patcher(model, subject.prefix, AnswerTokens.from_tokenizer(subject.loaded.tokenizer))
    receiver, donor = patcher.record(receiver_prompt), patcher.record(donor_prompt)
    middle = n_layers // 2
    everywhere = tuple(range(len(receiver.tokens)))
    self_patch = patcher.patched_metric(receiver, receiver, [PatchEdit("resid", middle, everywhere)])
    last = patcher.patched_metric(
        receiver,
        donor,
        [PatchEdit("resid", n_layers, (receiver.decision,), donor_positions=(donor.decision,))],
    )
    errors = {"self_patch": abs(self_patch - receiver.metric), "last_layer_full_patch": abs(last - donor.metric)}
    if len(receiver.tokens) == len(donor.tokens):
        whole = patcher.patched_metric(receiver, donor, [PatchEdit("resid", middle, everywhere)])
        errors["middle_layer_full_patch"] = abs(whole - donor.metric)
    tolerance = subject.tolerance()
    values = {
        **errors,
        "receiver": receiver.metric,
        "donor": donor.metric,
        "tolerance": tolerance,
    }
    measured = (
        f"clean receiver {receiver.metric:+.3f}, donor {donor.metric:+.3f}; "
        + ", ".join(f"{name.replace('_', ' ')} off by {error:.2g}" for name, error in errors.items())
        + f" (tolerance {tolerance:.2g})"
    )
    if max(errors.values()) <= tolerance:
        return Check("patching", "PASS", measured, state="SUPPORTED", values=values)
    return Check(
        "patching",
        "FAIL",
        measured,
        "patching does not reproduce the runs it patches on this model: do not trust its recoveries; report it",
        state="SILENTLY WRONG",
        values=values,
    )


def check_weights_unchanged(loaded: LoadedModel, before: str) -> Check:
    """Steering, ablation, patching, the float32 readout and float32 arithmetic have all run on the model by now
    (the checks above); run a steer and an ablation once more, then compare every weight byte with the start."""
    model = loaded.model
    n_layers = len(decoder_layers(model))
    direction = torch.ones(loaded.d_model)
    ids = torch.tensor([[1, 2, 3]], device=loaded.device)
    with torch.inference_mode():
        with add_direction(model, direction, layers=[n_layers // 2], coefficient=4.0):
            model(input_ids=ids)
        with ablate_directions(model, direction):
            model(input_ids=ids)
    after = exact_weights_digest(model)
    if after == before:
        return Check(
            "weights unchanged",
            "PASS",
            "every parameter and buffer is byte-identical after steering, ablation, patching and float32 scoring",
            values={"sha256": after},
        )
    return Check(
        "weights unchanged",
        "FAIL",
        "the weights changed during the checks",
        "an intervention wrote into the model: report it; reload the model before trusting later results",
        values={"before": before, "after": after},
    )


def check_run_estimate(subject: Subject, config: DoctorConfig, planned_pairs: int) -> Check:
    """Time, memory and disk for caching `planned_pairs` pairs, from forwards measured on this machine."""
    loaded, model, prompt_set = subject.loaded, subject.model, subject.prompt_set
    k = subject.own_start
    answers = AnswerTokens.from_tokenizer(loaded.tokenizer)
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    prefix_seconds = subject.prefix_seconds
    sync()
    t0 = time.perf_counter()
    score_prompts(model, loaded.tokenizer, prompt_set, batch_size=1, prefix=subject.prefix)
    sync()
    per_prompt = (time.perf_counter() - t0) / len(prompt_set.prompts)
    own = max(p.n_tokens for p in prompt_set.prompts) - k
    estimate, batch = batch_plan(
        model,
        prefix_tokens=k,
        own_tokens=own,
        answer_tokens=max(len(answers.accept), len(answers.reject)),
        requested=config.batch_size,
        default=1 if loaded.device.type == "cpu" else 64,
    )
    n_tiers = len(prompt_set.variant.tiers)
    n_prompts = planned_pairs * n_tiers
    layers = parse_layers(config.layers, len(decoder_layers(model)))
    kinds = parse_positions(config.positions, prompt_set)
    tokens_per_prompt = sum(len(prompt_positions(prompt_set.prompts[0], kind, k)) for kind in kinds)
    disk = n_prompts * tokens_per_prompt * len(layers) * loaded.d_model * dtype_bytes(_store_dtype(config))
    hours = (prefix_seconds + n_prompts * per_prompt) / 3600
    values = {
        "prefix_seconds": prefix_seconds,
        "seconds_per_prompt_batch_1": per_prompt,
        "planned_pairs": planned_pairs,
        "planned_prompts": n_prompts,
        "estimated_hours_batch_1": hours,
        "batch_size": batch,
        "memory": estimate.to_dict(),
        "store_bytes": disk,
        "layers": len(layers),
        "positions": kinds,
    }
    measured = (
        f"shared prefix {prefix_seconds:.2f} s once, then {per_prompt:.2f} s per prompt at batch 1: "
        f"{planned_pairs} pairs ~ {hours * 60:.1f} min; peak memory {estimate.peak / GIB:.2f} GiB at batch {batch}; "
        f"store {disk / GIB:.2f} GiB ({len(layers)} layers x {', '.join(kinds)})"
    )
    return Check("run estimate", "PASS", measured, values=values)


def _store_dtype(config: DoctorConfig) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[config.store_dtype]


def write_doctor(result: DoctorResult, out: str | Path) -> Path:
    """Write doctor.json into `out`; returns its path."""
    folder = Path(out)
    with results_folder(folder):
        atomic_write_json(folder / DOCTOR_FILE, finite_json(result.to_json()))
    return folder / DOCTOR_FILE


def format_doctor_table(result: DoctorResult) -> str:
    """The table the CLI prints: one row per check, its fix below it."""
    model = result.model
    lines = [f"afprobe doctor: {model.get('name', result.config.get('model'))} ({model.get('family', '?')})", ""]
    width = max(len(c.name) for c in result.checks)
    for c in result.checks:
        state = f" [{c.state}]" if c.state else ""
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.measured}{state}")
        if c.fix and c.status in ("WARN", "FAIL"):
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    counts = {s: sum(c.status == s for c in result.checks) for s in ("PASS", "WARN", "FAIL", "SKIP")}
    lines += ["", ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" ({result.seconds:.0f} s)"]
    return "\n".join(lines)
