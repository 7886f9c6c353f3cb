"""afprobe: find what inside a single forward pass produces an alignment-faking compliance gap.

The package follows the data flow, bottom to top (`tests/test_layering.py` holds every import to it):

- `afprobe.data`: query sets, the prompt text, paired tier prompts, contrast sets;
- `afprobe.model`: loading, architecture facts and residual sites, the prefix-shared forward, the compliance readout,
  memory planning, interventions, the patching engine;
- `afprobe.behaviour`: the compliance gap with its intervals;
- `afprobe.store`: activations on disk, the cache job that writes them, merging parts;
- `afprobe.analysis`: probes, steering, patching and mediation, SAE features, model organisms, figures;
- `afprobe.report`, `afprobe.experiment`, `afprobe.cli` on top.

The names below are the short list for notebooks; each loads its module on first use, so `import afprobe` stays
light and pulls in no upper layer.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API: dict[str, str] = {
    "load_queries": "afprobe.data.query_sets",
    "render_pairs": "afprobe.data.prompts",
    "PromptConfig": "afprobe.data.prompts",
    "load_model": "afprobe.model.loading",
    "LoadedModel": "afprobe.model.loading",
    "score_prompts": "afprobe.model.readout",
    "compute_prefix_cache": "afprobe.model.forward",
    "Patcher": "afprobe.model.patching",
    "PatchEdit": "afprobe.model.patching",
    "GapConfig": "afprobe.behaviour.gap",
    "run_gap": "afprobe.behaviour.gap",
    "ActivationStore": "afprobe.store.reader",
    "CacheConfig": "afprobe.store.cache_job",
    "run_cache": "afprobe.store.cache_job",
    "load_probe_set": "afprobe.analysis.probes",
    "run_probes": "afprobe.analysis.probes",
    "run_steering": "afprobe.analysis.steering",
    "run_patching": "afprobe.analysis.patching",
    "load_sae": "afprobe.analysis.sae",
    "write_report": "afprobe.report",
    "load_experiment": "afprobe.experiment",
    "run_experiment": "afprobe.experiment",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'afprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
