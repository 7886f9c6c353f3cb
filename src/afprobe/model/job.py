"""What every job over paired prompts needs: the model, the queries and how prompts are rendered."""

from __future__ import annotations

from dataclasses import dataclass

from afprobe.data.prompts import PromptConfig, Query
from afprobe.data.query_sets import load_queries
from afprobe.model.loading import DEFAULT_MODEL, LoadedModel, load_model


@dataclass
class PairedPromptJob:
    """What every job over paired prompts needs: the model, the queries and how the prompts are rendered."""

    model: str = DEFAULT_MODEL
    adapter: str | None = None
    dataset: str = "harmful"
    column: str | None = None
    n: int | None = None
    split: str = "all"  # all | fit | evaluate (`afprobe.data.splits`): which queries, before `n`
    variant: str = "default"
    developer: str = "Anthropic"
    system_prompt_file: str | None = None
    format: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int | None = None
    device_map: str | None = None  # "auto": layers spread over all visible GPUs (models larger than one card)

    def prompt_config(self) -> PromptConfig:
        return PromptConfig(
            variant=self.variant,
            developer=self.developer,
            system_prompt_file=self.system_prompt_file,
            format=self.format,  # type: ignore[arg-type]
        )

    def queries(self) -> list[Query]:
        """The job's queries: the dataset, its `split`, the first `n`."""
        return load_queries(self.dataset, column=self.column, n=self.n, split=self.split)

    def load(self) -> LoadedModel:
        return load_model(
            self.model, adapter=self.adapter, device=self.device, dtype=self.dtype, device_map=self.device_map
        )
