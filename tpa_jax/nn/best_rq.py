"""BEST-RQ's model pieces (Chiu et al. 2022, arXiv 2202.01855): self-supervised targets from a random-projection
quantizer that never trains, masked spans replaced by noise, and a loss over masked frames.

- Targets: input features stacked to the encoder's frame rate (`stack` feature frames per
  encoder frame) are projected by a fixed random matrix, L2-normalised, and matched to the
  nearest entry of a fixed, L2-normalised random codebook: one target per codebook per frame.
  A frame's target depends on its own features only, so padding never changes it.
- Masking: each valid encoder frame starts a masked span with probability `mask_prob`; a span
  covers `mask_span` encoder frames; the feature frames under masked encoder frames are
  replaced by Gaussian noise (`noise_std`).
- Heads: a softmax head per codebook on the encoder output. The loss (cross-entropy at masked
  valid frames, `train.losses.best_rq_loss`) is the train step's; the config fields are
  `tpa_jax.config.ssl.ssl_fields()`, and the pre-training run is `tpa_jax.ssl.pretrain`.

The projection and codebooks are `FixedArray`s (nn/params.py): saved with the run, matched by no
trainable filter (they are not Params), so they get no gradient and no optimizer state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tpa_jax.audio.featurizer import output_frames
from tpa_jax.errors import ConfigError
from tpa_jax.nn.layers import Dense
from tpa_jax.nn.params import FixedArray, HeadParam



def frontend_stack(model_config) -> int:
  """Feature frames per encoder frame of the frontend of `model_config`."""
  f = model_config.frontend
  return f.stack if f.kind == 'stacked' else f.stride ** f.num_layers


@dataclasses.dataclass(frozen=True)
class Settings:
  codebook_size: int
  code_dim: int
  num_codebooks: int
  stack: int
  mask_prob: float
  mask_span: int
  noise_std: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *,
                  shortest_frames: int | None = None) -> 'Settings':
    """Checks `config.ssl` against the model (and the shortest bucket's encoder frames) and
    names any field that is not accepted, before anything compiles."""
    s, expected = config.ssl, frontend_stack(config.model)
    stack = s.stack or expected
    if stack != expected:
      raise ConfigError(f'ssl.stack={s.stack}: targets must come one per encoder frame; the '
                        f'{config.model.frontend.kind} frontend stacks {expected} feature frames '
                        f'per encoder frame (accepted: 0 or {expected})')
    if not (isinstance(s.codebook_size, int) and s.codebook_size >= 2):
      raise ConfigError(f'ssl.codebook_size={s.codebook_size!r}: an integer >= 2 is accepted')
    for name in ('code_dim', 'num_codebooks', 'mask_span'):
      if not (isinstance(s[name], int) and s[name] >= 1):
        raise ConfigError(f'ssl.{name}={s[name]!r}: a positive integer is accepted')
    if not 0 < s.mask_prob < 1:
      raise ConfigError(f'ssl.mask_prob={s.mask_prob!r}: a probability in (0, 1) is accepted')
    if not s.noise_std >= 0:
      raise ConfigError(f'ssl.noise_std={s.noise_std!r}: a number >= 0 is accepted')
    if shortest_frames is not None and s.mask_span > shortest_frames:
      raise ConfigError(f'ssl.mask_span={s.mask_span} encoder frames is longer than the shortest '
                        f'bucket ({shortest_frames} encoder frames); accepted: 1 .. '
                        f'{shortest_frames}')
    return cls(s.codebook_size, s.code_dim, s.num_codebooks, stack, float(s.mask_prob),
               s.mask_span, float(s.noise_std))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Named errors for a pre-training config, before data is prepared or anything compiles: the
  data must be audio, and `config.ssl` must fit the model and the shortest bucket."""
  if 'ssl' not in config:
    raise ConfigError("head.kind='best_rq' needs the config's ssl section "
                      '(tpa_jax.config.ssl.ssl_fields(), as configs/pretrain.py has)')
  if config.data.name == 'random':
    raise ConfigError("data.name='random': BEST-RQ pre-trains on audio, and the random task holds "
                      'synthetic features without audio; accepted: a TFDS speech dataset '
                      "('synthetic_speech/<domain>' or 'librispeech')")
  shortest = min(config.data.bucket_seconds)
  frames = output_frames(config)(int(round(shortest * config.features.sample_rate_hz)))
  Settings.from_config(config, shortest_frames=frames)


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


class RandomProjectionQuantizer(nnx.Module):
  """Stacked features -> one target per codebook per frame; fixed at creation."""

  def __init__(self, input_dim: int, settings: Settings, *, rngs: nnx.Rngs):
    s = settings
    k_proj, k_code = jax.random.split(rngs.params())
    fan_in = s.stack * input_dim
    # Xavier-normal projection (the paper's initialisation), a standard-normal codebook.
    std = (2.0 / (fan_in + s.code_dim)) ** 0.5
    self.stack = s.stack
    self.projection = FixedArray(
        std * jax.random.normal(k_proj, (s.num_codebooks, fan_in, s.code_dim), jnp.float32))
    self.codebooks = FixedArray(_l2_normalize(jax.random.normal(
        k_code, (s.num_codebooks, s.codebook_size, s.code_dim), jnp.float32)))

  def stacked(self, features_btf: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, T // stack, stack * F] frames and their mask (valid iff every stacked frame is)."""
    b, t, f = features_btf.shape
    n = t // self.stack
    x = features_btf[:, :n * self.stack].reshape(b, n, self.stack * f)
    m = mask_bt[:, :n * self.stack].reshape(b, n, self.stack).all(-1)
    return x, m

  def __call__(self, features_btf: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets [B, T // stack, num_codebooks] int32, their mask)."""
    x, m = self.stacked(features_btf.astype(jnp.float32), mask_bt)
    projected = _l2_normalize(jnp.einsum('btf,nfd->btnd', x, self.projection[...],
                                         precision=jax.lax.Precision.HIGHEST))
    # Nearest normalised codeword = largest inner product (both sides have unit norm).
    scores = jnp.einsum('btnd,ncd->btnc', projected, self.codebooks[...],
                        precision=jax.lax.Precision.HIGHEST)
    return jnp.argmax(scores, -1).astype(jnp.int32), m


def span_mask(key: jax.Array, valid_bt: jax.Array, prob: float, span: int) -> jax.Array:
  """[B, T] bool: frames covered by spans of `span` frames that start at valid frames with
  probability `prob` (at least one span per utterance with a valid frame)."""
  b, t = valid_bt.shape
  k_start, k_force = jax.random.split(key)
  starts = jax.random.bernoulli(k_start, prob, (b, t)) & valid_bt
  # An utterance that drew no start gets one at a random valid frame: every example trains.
  lengths = valid_bt.sum(-1)
  forced = (jax.random.uniform(k_force, (b,)) * jnp.maximum(lengths, 1)).astype(jnp.int32)
  none = ~starts.any(-1) & (lengths > 0)
  starts = starts | (none[:, None] & (jnp.arange(t)[None, :] == forced[:, None]))
  # Frame t is masked if a span started in [t - span + 1, t].
  covered = jax.lax.reduce_window(starts.astype(jnp.int32), 0, jax.lax.add, (1, span), (1, 1),
                                  [(0, 0), (span - 1, 0)])
  return (covered > 0) & valid_bt


def mask_features(key: jax.Array, features_btf: jax.Array, masked_bt: jax.Array, stack: int,
                  noise_std: float) -> jax.Array:
  """Features with the `stack` feature frames under each masked encoder frame replaced by
  Gaussian noise."""
  b, t, f = features_btf.shape
  per_frame = jnp.repeat(masked_bt, stack, axis=1)
  per_frame = jnp.pad(per_frame, ((0, 0), (0, t - per_frame.shape[1])))[:, :t]
  noise = noise_std * jax.random.normal(key, features_btf.shape, jnp.float32)
  return jnp.where(per_frame[..., None], noise.astype(features_btf.dtype), features_btf)


class PredictionHeads(nnx.Module):
  """A softmax head per codebook on the encoder output: logits [B, T, N, codebook_size]."""

  def __init__(self, dim: int, settings: Settings, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_codebooks, self.codebook_size = settings.num_codebooks, settings.codebook_size
    self.proj = Dense(dim, (settings.num_codebooks, settings.codebook_size),
                      axes=('embed', None, 'vocab'), dtype=dtype, param_dtype=jnp.float32,
                      param_type=HeadParam, out_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    return self.proj(x_btd)



class BestRQHead(nnx.Module):
  """The pre-training head of a BEST-RQ run: the fixed quantizer (targets from the input
  features) and the prediction heads (logits from the encoder output). It takes a task head's
  place in the SpeechModel, so the train step, checkpoints and the planner treat a pre-training
  run as any other run with every weight trainable."""

  def __init__(self, dim: int, input_dim: int, settings: Settings, *, dtype=jnp.float32,
               rngs: nnx.Rngs, quantizer_rngs: nnx.Rngs):
    self.settings = settings
    self.quantizer = RandomProjectionQuantizer(input_dim, settings, rngs=quantizer_rngs)
    self.heads = PredictionHeads(dim, settings, dtype=dtype, rngs=rngs)

  def __call__(self, x_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
    del mask_bt  # the loss weighs frames
    return self.heads(x_btd)

  def prepare(self, key: jax.Array, features_btf: jax.Array, mask_bt: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(masked features, {'ssl_targets', 'ssl_masked', 'ssl_valid'}): targets from the clean features, then
    spans of encoder frames drawn over the valid ones and their features replaced by noise."""
    s = self.settings
    targets, valid = self.quantizer(features_btf, mask_bt)
    k_mask, k_noise = jax.random.split(key)
    masked = span_mask(k_mask, valid, s.mask_prob, s.mask_span)
    features = mask_features(k_noise, features_btf, masked, s.stack, s.noise_std)
    return features, {'ssl_targets': jax.lax.stop_gradient(targets), 'ssl_masked': masked,
                      'ssl_valid': valid}
