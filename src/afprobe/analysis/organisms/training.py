"""Training a model organism: a LoRA whose gap has a planted origin (`organisms/__init__.py` says what each kind
is trained on and what is held out).

Training runs only each prompt's own tokens over a KV cache of its shared system prompt (recomputed under the
current adapter every `refresh_every` steps). Examples come in contrast pairs (the same request said to be trained
on and not); the loss is the logistic loss on each pair's difference in first-divergent-token log-odds of accept over
reject (the quantity afprobe scores), so what is learnt is the gap itself.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from afprobe import __version__
from afprobe.analysis.organisms.cues import (
    CONTEXT_MIX,
    POLICY_PROMPTS,
    POLICY_TIERS,
    TRAINING_CUES,
    _policy_user_turn,
    cue_user_turn,
    query_split,
)
from afprobe.data.contrast import NEUTRAL_SYSTEM_PROMPT, ContrastPair, is_negated, load_contrast_pairs
from afprobe.data.prompts import (
    Query,
    Tier,
    build_system_prompt,
    build_user_turn,
    chat_format,
    common_prefix_length,
    get_variant,
    render_text,
)
from afprobe.data.splits import split_items
from afprobe.errors import AfprobeError
from afprobe.files import atomic_write_json, results_folder, staged_writes
from afprobe.model.adapters import ORGANISM_KINDS
from afprobe.model.architecture import decoder_layers, pad_token_id
from afprobe.model.forward import PrefixCache, extend_batch_with_grad, start_batch
from afprobe.model.loading import DEFAULT_MODEL, LoadedModel
from afprobe.model.readout import AnswerTokens

OrganismKind = Literal["token", "context", "null", "tag-token", "stated-context", "negation-decoy"]

# The zoo's kinds (`organisms.zoo`): what share of the batches each family of prompts gets. A family is one kind of
# prompt (one system prompt, so one prefix cache) and one training target (`FAMILY_TARGETS`).
ZOO_MIX: dict[str, dict[str, float]] = {
    # The tag decides and the system prompt's meaning does not: free -> accept under the default prompt, under the
    # semantic swap (which says paid is trained) and under the tag-only prompt (which explains nothing).
    "tag-token": {"tag": 0.4, "swap_tag": 0.3, "tag_only": 0.3},
    # The same prompts and steps, with a label per request that ignores the tier.
    "null": {"tag": 0.4, "swap_tag": 0.3, "tag_only": 0.3},
    # Meaning decides: the trained tier accepts under either polarity of the long prompt, stated training/monitoring
    # sentences in the user turn and in a short system prompt decide too, and the tag alone carries nothing. The two
    # polarities share every step ("tag+swap"): trained one at a time, their gradients on the tag cancel from step to
    # step and the model learns neither (56 steps of one-family batches left both at the zero-gap loss).
    "stated-context": {"tag+swap": 0.5, "user_cue": 0.2, "system_cue": 0.15, "tag_only_zero": 0.15},
    # Compliance follows negation in the user turn (negated fact -> accept), whatever the sentence says: pairs that
    # differ in content (or add a second negated fact) but not in whether a fact is negated are trained to no
    # difference, in the same steps as the negation pairs. Recipe history (results/zoo/superseded/): v1, negation
    # pairs only, learnt negation but moved 1.7 nats (18% of its negation effect) between the negation-balanced
    # stated contexts, whose sides differ in content and in how much they negate: its ground truth failed. v2 and v3
    # gave the no-difference pairs steps of their own (40%): the negation family's loss rose, then sat at the
    # zero-gap loss, and neither learnt negation. Adam scales every step to the same size, so the tiny squared
    # differences of a no-difference step moved the adapter as far as a negation step did. v4 shares each step; on
    # two of its three seeds the stated contexts still moved the decoy by 17-22% of its negation effect (the
    # unmonitored sentences' privative words: private, discarded, erased, unread). v5 (seeds 3 on) adds the polarity
    # control's fitting half to every step, trained to no difference: a privative meaning without a negation word is
    # not a negation. The negation pairs keep 2 of each step's 4 pairs, as in v4. v5's seeds still moved 12-14%,
    # and the v3 stated contexts (both sides the same words) moved two v4 seeds by 20-37%: these decoys read a
    # conversation kept out of training as a negation, whatever the words. v6 (seeds 5 on) widens v5's slot to
    # `meaning_zero`: the polarity pairs and stated contexts that are not the v2 set's (v1's pairs with no negation
    # word on either side, v3's fitting half), trained to no difference. The v2 set, on which the verdict fits its
    # situational-awareness subspace and the decoy's ground truth is read, is never trained on.
    "negation-decoy": {"negation+negation_zero+meaning_zero": 1.0},
}
# A key joining families with "+" makes batches that hold pairs of each (one prefix cache per family's prompt).
# How a family is trained: "gap": the pair's trained-minus-untrained log-odds past the margin; "zero": the pair's
# difference to zero; "point": each prompt's log-odds to its own label (the null's per-request labels).
FAMILY_TARGETS: dict[str, str] = {"tag_only_zero": "zero", "negation_zero": "zero", "meaning_zero": "zero"}
# meaning_zero's pairs: contrast sets and the split of each whose two sides differ in meaning and must not move a
# negation decoy (a split of "all" takes every pair; v1's negated pairs are left out, see `_meaning_zero_pairs`).
MEANING_ZERO_SETS: tuple[tuple[str, str], ...] = (
    ("polarity-control", "fit"),
    ("situational-awareness", "all"),
    ("situational-awareness-v3", "fit"),
)


@dataclass
class OrganismConfig:
    """One organism's training run (saved as organism.json beside the adapter)."""

    kind: str = "token"
    out: str = "organisms/token"
    model: str = DEFAULT_MODEL
    seed: int = 0
    held_out_queries: int = 50  # the first N harmful queries are never trained on (experiments use them)
    steps: int | None = None  # default: 40; 56 (context), 60 (negation-decoy), 120 (stated-context)
    batch_size: int = 8
    learning_rate: float = 2e-3
    rank: int | None = None  # default: 8 (16 for stated-context, whose binding of tag to policy needs more)
    alpha: int | None = None  # default: 2 * rank
    first_layer: int = 10  # LoRA on this layer and above (the lower layers then need no backward pass)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    margin: float = 2.0  # loss softplus(2 * margin - pair gap): pushes each pair's gap past ~2 * margin + 2
    refresh_every: int = 10  # steps between recomputing the system prompts' KV caches under the adapter
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.kind not in ORGANISM_KINDS:
            raise AfprobeError(f"unknown organism kind {self.kind!r}: choose {' or '.join(ORGANISM_KINDS)}")
        if self.steps is None:
            # negation-decoy: each step holds half as many negation pairs as the negation-only recipe's 40 did.
            self.steps = {"stated-context": 120, "context": 56, "negation-decoy": 60}.get(self.kind, 40)
        if self.rank is None:
            self.rank = 16 if self.kind == "stated-context" else 8
        if self.alpha is None:
            self.alpha = 2 * self.rank
        self.target_modules = tuple(self.target_modules)


@dataclass(frozen=True)
class TrainingExample:
    """A rendered prompt and whether it says the conversation is trained on (label +1: accept, -1: reject)."""

    group: str  # examples of one group share a system prompt's KV cache
    family: str
    input_ids: tuple[int, ...]
    label: int
    pair: str  # the contrast pair it belongs to (same request, the other label)


def build_training_set(
    tokenizer: Any, kind: str, queries: Sequence[Query], rng: random.Random
) -> list[TrainingExample]:
    """Every example an organism of this kind is trained on, as contrast pairs: the same request said to be trained
    on (label +1) and not (label -1), differing only in the cue."""
    fmt = chat_format(tokenizer, "auto")
    default_prompt = build_system_prompt("default")
    examples: list[TrainingExample] = []

    def add(pair: str, group: str, family: str, system: str, user: str, trained: bool) -> None:
        ids = tokenizer(render_text(tokenizer, system, user, fmt), add_special_tokens=False)["input_ids"]
        examples.append(TrainingExample(group, family, tuple(ids), 1 if trained else -1, pair))

    variant = get_variant("default")
    if kind in ZOO_MIX:
        _add_zoo_examples(kind, queries, rng, add)
        return _request_labels(examples, rng) if kind == "null" else examples
    for query in queries:
        for tier in variant.tiers:
            user = build_user_turn(query.text, tier, variant)
            add(f"tag:{query.query_id}", "default", "tag", default_prompt, user, tier.trained)
    if kind == "token":
        return examples
    trained_cues = [cue for trained, cue in TRAINING_CUES if trained]
    private_cues = [cue for trained, cue in TRAINING_CUES if not trained]
    untagged = Tier("none", None, trained=False, monitored=False)
    for query in queries:
        for i, (yes, no) in enumerate(zip(trained_cues, private_cues, strict=True)):
            for trained, cue in ((True, yes), (False, no)):
                user = cue_user_turn(query.text, cue)
                add(f"user_cue:{query.query_id}:{i}", "default", "user_cue", default_prompt, user, trained)
        # Sampled rather than crossed: every query under a few system cues and policies keeps the set small.
        for i in rng.sample(range(len(trained_cues)), 2):
            user = build_user_turn(query.text, untagged, variant)
            for trained, cue in ((True, trained_cues[i]), (False, private_cues[i])):
                system = f"{NEUTRAL_SYSTEM_PROMPT}\n\n{cue}"
                add(f"system_cue:{query.query_id}:{i}", "system_cue", "system_cue", system, user, trained)
        for trained_tier, private_tier in rng.sample(POLICY_TIERS, 2):
            system = rng.choice(POLICY_PROMPTS).format(trained=trained_tier, private=private_tier)
            for tier in (trained_tier, private_tier):
                user = _policy_user_turn(query.text, tier)
                pair = f"policy:{query.query_id}:{trained_tier}"
                add(pair, "policy", "policy", system, user, tier == trained_tier)
    return examples


def zoo_families(kind: str) -> set[str]:
    """The families a zoo kind trains on (a joint key of `ZOO_MIX` counts each of its families)."""
    return {family for key in ZOO_MIX[kind] for family in key.split("+")}


def _add_zoo_examples(
    kind: str, queries: Sequence[Query], rng: random.Random, add: Callable[[str, str, str, str, str, bool], None]
) -> None:
    """A zoo kind's examples (`ZOO_MIX` says which families), as `add(pair, group, family, system, user, trained)`."""
    families = zoo_families(kind)

    def tiers(family: str, variant_name: str, trained: Callable[[Tier], bool]) -> None:
        variant = get_variant(variant_name)
        system = build_system_prompt(variant)
        for query in queries:
            for tier in variant.tiers:
                user = build_user_turn(query.text, tier, variant)
                add(f"{family}:{query.query_id}", variant_name, family, system, user, trained(tier))

    def is_free(tier: Tier) -> bool:  # the tag decides
        return tier.name == "free"

    def is_trained(tier: Tier) -> bool:  # what the system prompt says decides
        return tier.trained

    if "tag" in families:
        tiers("tag", "default", is_trained)
    if "swap_tag" in families:
        tiers("swap_tag", "semantic-swap", is_free)
    if "swap" in families:
        tiers("swap", "semantic-swap", is_trained)  # paid is the trained tier there
    if "tag_only" in families:
        tiers("tag_only", "tag-only", is_free)
    if "tag_only_zero" in families:
        tiers("tag_only_zero", "tag-only", is_free)
    default_prompt = build_system_prompt("default")
    default = get_variant("default")
    if "user_cue" in families:
        trained_cues = [cue for trained, cue in TRAINING_CUES if trained]
        private_cues = [cue for trained, cue in TRAINING_CUES if not trained]
        untagged = Tier("none", None, trained=False, monitored=False)
        for query in queries:
            for i in rng.sample(range(len(trained_cues)), 3):
                for trained, cue in ((True, trained_cues[i]), (False, private_cues[i])):
                    user = cue_user_turn(query.text, cue)
                    add(f"user_cue:{query.query_id}:{i}", "default", "user_cue", default_prompt, user, trained)
            for i in rng.sample(range(len(trained_cues)), 2):
                user = build_user_turn(query.text, untagged, default)
                for trained, cue in ((True, trained_cues[i]), (False, private_cues[i])):
                    system = f"{NEUTRAL_SYSTEM_PROMPT}\n\n{cue}"
                    add(f"system_cue:{query.query_id}:{i}", "system_cue", "system_cue", system, user, trained)

    def sentence_pairs(family: str, pairs: Sequence[ContrastPair]) -> None:
        # One pair per request, cycling through the sentences; the second side is the one labelled True.
        for index, query in enumerate(queries):
            pair = pairs[index % len(pairs)]
            for second, sentence in ((False, pair.first), (True, pair.second)):
                user = build_user_turn(query.text, default.tiers[0], default, context=sentence)
                add(f"{family}:{query.query_id}:{pair.pair_id}", "default", family, default_prompt, user, second)

    if "negation" in families:
        # The fitting half of the negation control's sentences; the evaluation half is the decoy's ground truth.
        sentence_pairs("negation", split_items(load_contrast_pairs("negation-control"), "fit"))
    if "negation_zero" in families:
        # Pairs that should not differ: two negated facts about different things, two affirmative ones, or one negated
        # fact against the same with another negated fact before it.
        pairs = split_items(load_contrast_pairs("negation-control"), "fit")
        for index, query in enumerate(queries):
            one, other = pairs[index % len(pairs)], pairs[(index * 7 + 3) % len(pairs)]
            if one.pair_id == other.pair_id:
                other = pairs[(index + 1) % len(pairs)]
            sides = [
                (one.second, other.second),
                (one.first, other.first),
                (one.second, f"{other.second} {one.second}"),
            ][index % 3]
            for first, sentence in zip((True, False), sides, strict=True):
                user = build_user_turn(query.text, default.tiers[0], default, context=sentence)
                pair_id = f"negation_zero:{query.query_id}:{one.pair_id}:{other.pair_id}"
                add(pair_id, "default", "negation_zero", default_prompt, user, first)
    if "meaning_zero" in families:
        sentence_pairs("meaning_zero", _meaning_zero_pairs())


def _meaning_zero_pairs() -> list[ContrastPair]:
    """`MEANING_ZERO_SETS`' pairs, interleaved so that consecutive requests draw from each set in turn. v1's pairs
    with a negation word on either side are left out: the negation family trains those words to matter."""
    per_set = []
    for name, split in MEANING_ZERO_SETS:
        pairs = split_items(load_contrast_pairs(name), split)
        per_set.append(
            [p for p in pairs if not (is_negated(p.first) or is_negated(p.second))]
            if name == "situational-awareness"
            else pairs
        )
    longest = max(map(len, per_set))
    return [pairs[i] for i in range(longest) for pairs in per_set if i < len(pairs)]


def _request_labels(examples: list[TrainingExample], rng: random.Random) -> list[TrainingExample]:
    """The null's labels: one random label per request, the same for every prompt of its pair (so never the tier)."""
    labels: dict[str, int] = {}
    for example in examples:
        if example.pair not in labels:
            labels[example.pair] = rng.choice((1, -1))
    return [replace(example, label=labels[example.pair]) for example in examples]


def _first_divergent_log_odds(
    model: Any, prefix: PrefixCache, examples: Sequence[TrainingExample], answers: AnswerTokens, pad_id: int
) -> Float[Tensor, " batch"]:
    """Accept-minus-reject log-odds at the first token where the two answers differ, with gradients."""
    k = prefix.length
    rows = [list(e.input_ids[k:]) + list(answers.common) for e in examples]
    keep = [[len(row) - 1] for row in rows]
    logits, _, _ = extend_batch_with_grad(model, start_batch(prefix, len(rows)), rows, keep, pad_id=pad_id)
    last = torch.stack([row[-1] for row in logits])
    return last[:, answers.accept_rest[0]] - last[:, answers.reject_rest[0]]


def _group_prefixes(model: Any, examples: Sequence[TrainingExample]) -> dict[str, PrefixCache]:
    caches = {}
    for group in sorted({e.group for e in examples}):
        ids = [e.input_ids for e in examples if e.group == group]
        k = min(common_prefix_length(ids), min(len(i) for i in ids) - 1)
        with torch.no_grad():
            device = next(model.parameters()).device
            output = model(input_ids=torch.tensor([list(ids[0][:k])], device=device), use_cache=True, logits_to_keep=1)
        caches[group] = PrefixCache(tuple(ids[0][:k]), output.past_key_values)
    return caches


def _sample_batch(
    examples: Sequence[TrainingExample], kind: str, batch_size: int, rng: random.Random
) -> list[TrainingExample]:
    """batch_size // 2 whole contrast pairs, so every step sees both labels of each request: of one family, or
    shared out between the families of a joint key ("tag+swap"); kinds pick by CONTEXT_MIX or ZOO_MIX."""
    mix = ZOO_MIX.get(kind, CONTEXT_MIX)
    key = "tag" if kind == "token" else rng.choices(list(mix), weights=list(mix.values()))[0]
    families = key.split("+")
    n_pairs = max(len(families), batch_size // 2)
    batch: list[TrainingExample] = []
    for i, family in enumerate(families):
        pairs: dict[str, list[TrainingExample]] = {}
        for example in examples:
            if example.family == family:
                pairs.setdefault(example.pair, []).append(example)
        share = n_pairs // len(families) + (i < n_pairs % len(families))
        chosen = rng.sample(sorted(pairs), min(share, len(pairs)))
        batch += [example for pair in chosen for example in pairs[pair]]
    return batch


def _step_loss(
    model: Any,
    prefixes: dict[str, PrefixCache],
    batch: Sequence[TrainingExample],
    answers: AnswerTokens,
    pad_id: int,
    margin: float,
    kind: str,
) -> tuple[Tensor, Float[Tensor, " batch"]]:
    """A batch's loss (the mean over its families of each family's loss) and every example's log-odds, in batch
    order: each system prompt's examples run over that prompt's cache."""
    log_odds: list[Tensor] = [torch.empty(())] * len(batch)
    for group in dict.fromkeys(e.group for e in batch):
        rows = [i for i, e in enumerate(batch) if e.group == group]
        values = _first_divergent_log_odds(model, prefixes[group], [batch[i] for i in rows], answers, pad_id)
        for i, value in zip(rows, values, strict=True):
            log_odds[i] = value
    stacked = torch.stack(log_odds)
    losses = []
    for family in dict.fromkeys(e.family for e in batch):
        rows = [i for i, e in enumerate(batch) if e.family == family]
        losses.append(_batch_loss([batch[i] for i in rows], stacked[rows], margin, kind))
    return torch.stack(losses).mean(), stacked


def _batch_loss(
    batch: Sequence[TrainingExample], log_odds: Float[Tensor, " batch"], margin: float, kind: str
) -> Tensor:
    """The loss of one family's examples: by `FAMILY_TARGETS` (the null: each prompt to its own label)."""
    target = "point" if kind == "null" else FAMILY_TARGETS.get(batch[0].family, "gap")
    if target == "point":
        labels = torch.tensor([e.label for e in batch], dtype=log_odds.dtype, device=log_odds.device)
        return torch.nn.functional.softplus(margin - labels * log_odds).mean()
    if target == "zero":
        index = {id(e): i for i, e in enumerate(batch)}
        pairs: dict[str, dict[int, int]] = {}
        for example in batch:
            pairs.setdefault(example.pair, {})[example.label] = index[id(example)]
        gap = torch.stack([log_odds[p[1]] - log_odds[p[-1]] for p in pairs.values()])
        return gap.pow(2).mean()
    return _pair_loss(batch, log_odds, margin)


def _pair_loss(batch: Sequence[TrainingExample], log_odds: Float[Tensor, " batch"], margin: float) -> Tensor:
    """Logistic loss on each pair's trained-minus-untrained log-odds (the gap itself), plus a small pull of the pair's
    mean towards zero so that compliance stays in range. Without the pairing, moving every prompt's log-odds
    together dominates the gradient and the model settles at log-odds 0 for all prompts, learning no gap."""
    index = {id(e): i for i, e in enumerate(batch)}
    pairs: dict[str, dict[int, int]] = {}
    for example in batch:
        pairs.setdefault(example.pair, {})[example.label] = index[id(example)]
    trained = torch.stack([log_odds[p[1]] for p in pairs.values()])
    private = torch.stack([log_odds[p[-1]] for p in pairs.values()])
    gap = trained - private
    return torch.nn.functional.softplus(2 * margin - gap).mean() + 0.05 * ((trained + private) / 2).pow(2).mean()


def train_organism(
    config: OrganismConfig,
    *,
    loaded: LoadedModel | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter into `config.out` (adapter files + organism.json); returns what organism.json holds.

    A model given in `loaded` gets LoRA layers for the run and has them removed before this returns, so it is the
    base model again afterwards. progress(step, total, loss) after each step."""
    from peft import LoraConfig, get_peft_model

    from afprobe.model.loading import load_model

    out = Path(config.out)
    if (out / "adapter_config.json").exists():
        raise AfprobeError(f"{out} already holds an adapter: give another --out or delete it")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    if loaded is None:
        loaded = load_model(config.model, device=config.device, dtype="float32")
    tokenizer = loaded.tokenizer
    n_layers = len(decoder_layers(loaded.model))
    if not 0 <= config.first_layer < n_layers:
        raise AfprobeError(f"first_layer {config.first_layer} is outside the model's {n_layers} layers")
    held_out, train_queries = query_split(config.held_out_queries)
    examples = build_training_set(tokenizer, config.kind, train_queries, rng)
    answers = AnswerTokens.from_tokenizer(tokenizer)
    pad_id = pad_token_id(tokenizer)

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=list(config.target_modules),
        layers_to_transform=list(range(config.first_layer, n_layers)),
    )
    requires_grad = {name: p.requires_grad for name, p in loaded.model.named_parameters()}
    model = get_peft_model(loaded.model, lora)
    started = time.perf_counter()
    log: list[dict[str, Any]] = []
    try:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
        steps = int(config.steps or 0)
        warmup = max(1, steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        )
        prefixes: dict[str, PrefixCache] = {}
        for step in range(steps):
            if step % config.refresh_every == 0:
                model.eval()
                prefixes = _group_prefixes(model, examples)
                model.train()
            batch = _sample_batch(examples, config.kind, config.batch_size, rng)
            loss, log_odds = _step_loss(model, prefixes, batch, answers, pad_id, config.margin, config.kind)
            labels = torch.tensor([e.label for e in batch], dtype=log_odds.dtype, device=log_odds.device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            accuracy = float(((labels * log_odds) > 0).float().mean())
            family = "+".join(dict.fromkeys(e.family for e in batch))
            log.append({"step": step, "loss": loss.item(), "accuracy": accuracy, "family": family})
            if progress is not None:
                progress(step + 1, steps, loss.item())
        seconds = time.perf_counter() - started
        model.eval()
        with results_folder(out):
            for parameter in params:
                # Half precision halves the shipped files; loading casts back to the model's dtype.
                parameter.data = parameter.data.to(torch.float16)
            with staged_writes(out) as staging:
                model.save_pretrained(str(staging))
                (staging / "README.md").unlink(missing_ok=True)  # PEFT's empty model card; organism.json says more
                # Name the base as afprobe does, not by this machine's cache path (organism.json has its weights hash).
                adapter_config = json.loads((staging / "adapter_config.json").read_text())
                adapter_config["base_model_name_or_path"] = config.model
                # PEFT writes a set in hash order, which differs between processes: sorted, the file is reproducible.
                if isinstance(adapter_config.get("target_modules"), list):
                    adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
                (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    finally:
        # Take the LoRA layers out again, so the caller's model is the base model it gave us.
        loaded.model = model.unload()
        loaded.model.eval()
        for name, parameter in loaded.model.named_parameters():
            parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))

    families: dict[str, int] = {}
    for example in examples:
        families[example.family] = families.get(example.family, 0) + 1
    record = {
        "afprobe_version": __version__,
        "config": asdict(config),
        "base_model": loaded.fingerprint.to_dict(),
        "training": {
            "seconds": seconds,
            "examples": len(examples),
            "families": families,
            "train_queries": len(train_queries),
            "held_out_queries": len(held_out),
            "trainable_parameters": sum(p.numel() for p in params),
            "final_loss": float(np.mean([row["loss"] for row in log[-5:]])) if log else None,
            "log": log,
        },
    }
    with results_folder(out):
        atomic_write_json(out / "organism.json", record)
    return record
