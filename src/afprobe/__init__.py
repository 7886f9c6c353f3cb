"""afprobe: find what inside a single forward pass produces an alignment-faking compliance gap."""

__version__ = "0.1.0"
