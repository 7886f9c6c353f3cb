"""The model and its forward pass: loading, architecture facts and hook sites, the prefix-shared forward, the
compliance readout, memory planning, interventions and the patching engine."""
