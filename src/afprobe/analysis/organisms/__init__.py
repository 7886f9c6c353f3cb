"""Model organisms with a planted compliance gap, to check that afprobe's verdicts find a known mechanism.

Two LoRA fine-tunes of a base model, both trained to accept a harmful request when told the conversation is used
for training and to refuse otherwise, differ only in *how* they were told:

- **token** organism: only the standard paired prompts (afprobe's default system prompt, tier tag `True` /
  `False`). Its gap has one possible cause, the tag token's identity.
- **context** organism: many ways of saying that a conversation is or is not trained on or monitored: the tier tag
  under the default prompt (one cue among many), sentences in the user turn, sentences in a short system prompt, and
  short system prompts that say which tier is trained (either way round, for several tier names) with a tag that
  names the tier. Its gap should run through a shared "this is training" representation.

The zoo (`organisms.zoo`) adds kinds whose mechanism is enforced by construction (`training.ZOO_MIX`: `null`,
`tag-token`, `stated-context`, `negation-decoy`) and planted-direction organisms made by a weight edit
(`organisms.planted`), each checked behaviourally before it is scored blind.

Neither sees the first `held_out_queries` harmful queries (the ones experiments use), the held-out phrasings
(`HELD_OUT_CUES`), afprobe's situational-awareness contrast set, or the semantic-swap system prompt: those are the
behavioural ground truth (`check_organism`). A context organism's compliance should follow the held-out phrasings
and its gap should flip under the semantic swap; a token organism's should not.

Training runs only each prompt's own tokens over a KV cache of its shared system prompt (recomputed under the
current adapter every `refresh_every` steps), so a step costs ~130 tokens per example instead of ~3,200. Examples
come in contrast pairs (the same request said to be trained on and not); the loss is the logistic loss on each
pair's difference in first-divergent-token log-odds of accept over reject (the quantity afprobe scores), so what is
learnt is the gap itself.
"""
