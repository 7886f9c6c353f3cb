"""Analyses over stores and models: probes and directions, steering, patching and mediation, SAE features, model
organisms, and the figures each writes."""
