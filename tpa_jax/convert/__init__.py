"""Converters of public pre-trained encoders into tpa_jax bases (`launch/convert.py`).

`convert(source, input_dir, output_dir)` reads a Hugging Face model directory and writes a base
directory (`encoder/` checkpoint + `encoder.json` configs) that `config.base.path` and
`launch/encode.py` take.
"""

from __future__ import annotations

from typing import Callable

from tpa_jax.convert import fastconformer, w2v_bert
from tpa_jax.convert.common import ConversionError, apply_base_config, base_path, default_config

# --source values and their converters.
SOURCES: dict[str, Callable[[str, str], dict]] = {
    w2v_bert.SOURCE: w2v_bert.convert,
    fastconformer.SOURCE: fastconformer.convert,
}


def convert(source: str, input_dir: str, output_dir: str) -> dict:
  """Converts `input_dir` (a `source` checkpoint) into a base in `output_dir`; a summary."""
  if source not in SOURCES:
    raise ConversionError(f'--source={source!r}: accepted values are {sorted(SOURCES)}')
  return SOURCES[source](input_dir, output_dir)


__all__ = ['ConversionError', 'SOURCES', 'apply_base_config', 'base_path', 'convert',
           'default_config']
