"""Loads and runs a tpa_jax serving bundle with jax, numpy and safetensors only.

A bundle (written by `launch/export.py --kind=serving`) is a directory holding
`function.jaxexport` (features -> logits, serialised with `jax.export`), `weights.safetensors`
and `manifest.json`. This file imports nothing from tpa_jax, so it can be copied on its own
next to a server:

  python serving_loader.py BUNDLE FEATURES.npy [MASK.npy] OUT.npy

FEATURES is float32 [batch, frames, mel bins]; MASK is bool [batch, frames] (all true if
omitted); OUT receives float32 logits [batch, output frames, vocabulary].
"""

import json
import os
import sys

import jax
import numpy as np
from safetensors.numpy import load_file


class Bundle:
  """A loaded serving bundle: `bundle(features, mask) -> (logits, output mask)`."""

  def __init__(self, path: str):
    with open(os.path.join(path, 'manifest.json')) as f:
      self.manifest = json.load(f)
    with open(os.path.join(path, 'function.jaxexport'), 'rb') as f:
      self.function = jax.export.deserialize(bytearray(f.read()))
    self.weights = {k: jax.numpy.asarray(v)
                    for k, v in load_file(os.path.join(path, 'weights.safetensors')).items()}

  def __call__(self, features, mask=None):
    features = np.asarray(features, np.float32)
    if mask is None:
      mask = np.ones(features.shape[:2], bool)
    return self.function.call(self.weights, features, np.asarray(mask, bool))


def main(argv):
  if len(argv) not in (4, 5):
    raise SystemExit(__doc__)
  bundle = Bundle(argv[1])
  features = np.load(argv[2])
  mask = np.load(argv[3]) if len(argv) == 5 else None
  logits, _ = bundle(features, mask)
  np.save(argv[-1], np.asarray(logits))


if __name__ == '__main__':
  main(sys.argv)
