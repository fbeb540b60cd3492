"""tpa_jax: Two Parallel Adapters and residual adapters for frozen conformer speech encoders."""

__version__ = '0.1.0'
