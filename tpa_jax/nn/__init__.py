"""Flax NNX modules: conformer layers, adapters and task heads."""
