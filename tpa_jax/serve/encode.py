"""Hidden states of a base encoder for one audio file (`launch/encode.py`): its own front end
(the features config saved with a converted base), frontend and blocks, no head."""

from __future__ import annotations

import wave

import jax
import ml_collections
import numpy as np
from flax import nnx

from tpa_jax import checkpoint, sharding
from tpa_jax.audio.featurizer import Featurizer
from tpa_jax.nn import build


def read_wav(path: str, sample_rate_hz: int) -> np.ndarray:
  """The int16 samples of a 16-bit PCM WAV file (its first channel), which must be at
  `sample_rate_hz`."""
  try:
    with wave.open(path, 'rb') as f:
      width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
      data = f.readframes(f.getnframes())
  except FileNotFoundError as e:
    raise ValueError(f'{path}: no such file; pass a 16-bit PCM WAV file as --audio') from e
  except (wave.Error, EOFError) as e:
    raise ValueError(f'{path} is not a PCM WAV file ({e}); convert it first, e.g. '
                     f'`sox in.flac -b 16 -r {sample_rate_hz} out.wav`') from e
  if width != 2:
    raise ValueError(f'{path} has {8 * width}-bit samples; 16-bit PCM is accepted (e.g. '
                     f'`sox in.wav -b 16 out.wav`)')
  if rate != sample_rate_hz:
    raise ValueError(f'{path} is sampled at {rate} Hz; the base expects {sample_rate_hz} Hz '
                     f'(e.g. `sox in.wav -r {sample_rate_hz} out.wav`)')
  return np.frombuffer(data, '<i2').reshape(-1, channels)[:, 0].copy()


def load_encoder(config: ml_collections.ConfigDict, base_path: str,
                 mesh: jax.sharding.Mesh) -> nnx.Module:
  """The encoder described by `config.model` with the weights of the base at `base_path`,
  restored straight into its shardings on `mesh` (no random init first)."""
  graphdef, abstract = sharding.abstract_model(lambda: build.build_model(config, seed=0), mesh)
  model = nnx.merge(graphdef, abstract)
  nnx.update(model.encoder, checkpoint.restore_state(base_path, checkpoint.base_state(model)))
  return model.encoder


def encode_audio(config: ml_collections.ConfigDict, base_path: str,
                 audio: np.ndarray) -> np.ndarray:
  """The last hidden state [frames, dim] (float32, valid frames only) of the base at
  `base_path` (described by `config.model` and `config.features`) on one utterance."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.adapter.placement = 'none'
  featurizer = Featurizer.from_config(config.features)
  if featurizer.frames(len(audio)) < 1:
    raise ValueError(f'the audio has {len(audio)} samples, fewer than one feature frame '
                     f'({featurizer.window} samples)')
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  encoder = load_encoder(config, base_path, mesh)
  with jax.set_mesh(mesh):
    feats, mask = jax.jit(featurizer)(audio[None], np.array([len(audio)], np.int32))
    hidden, out_mask = nnx.jit(lambda e, f, k: e(f, k))(encoder, feats, mask)
  return np.asarray(hidden[0], np.float32)[np.asarray(out_mask[0])]
