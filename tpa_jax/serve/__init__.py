"""Serving: adapter exports of runs and serving bundles (`launch/export.py`), the adapter bank and
many tasks over one base (`launch/transcribe.py`), the server's core (`launch/serve.py`), the
standalone bundle loader (jax, numpy and safetensors only) and encoding audio with a base."""
