"""Activations on disk: the store format, its reader and writer, the cache job that fills it, and merging parts."""
