"""Flax NNX modules: conformer layers, adapters and task heads, and `build`, which turns a
config into them."""
