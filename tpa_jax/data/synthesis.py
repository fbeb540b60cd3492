"""Utterance specs and their synthesis: text + voice + rate + pitch (+ noise) -> 16 kHz int16.

Light on imports (NumPy and eSpeak NG only) so worker processes start fast.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from tpa_jax.data import pcm
from tpa_jax.data.espeak import Espeak

SAMPLE_RATE_HZ = 16000


@dataclasses.dataclass(frozen=True)
class Utterance:
  """Everything that determines one synthetic utterance."""
  key: str
  text: str
  language: str
  voice: str
  rate_wpm: int
  pitch: int
  snr_db: float | None
  seed: int


def noise_seed(key: str, seed: int) -> int:
  return zlib.crc32(f'{seed}:{key}'.encode())


def synthesize(utt: Utterance) -> np.ndarray:
  """16 kHz int16 audio of `utt`, trimmed of leading and trailing silence."""
  engine = Espeak.get()
  raw = engine.synthesize(utt.text, voice=utt.voice, rate_wpm=utt.rate_wpm, pitch=utt.pitch)
  audio = pcm.resample(raw.astype(np.float32) / 32768.0, engine.sample_rate,
                             SAMPLE_RATE_HZ)
  audio = pcm.trim_silence(audio, margin=SAMPLE_RATE_HZ // 20)
  if utt.snr_db is not None:
    audio = pcm.add_noise(audio, utt.snr_db, np.random.default_rng(noise_seed(utt.key,
                                                                                     utt.seed)))
  return pcm.to_int16(audio)


def synthesize_shard(utterances: list[Utterance]) -> list[np.ndarray]:
  """The audio of `utterances`, synthesized in order by one engine.

  eSpeak NG carries state from one utterance to the next (its output depends on what it spoke
  before, not on a seed), so a corpus is deterministic only if every shard is spoken in order by
  a fresh engine: run each shard in a new process.
  """
  return [synthesize(u) for u in utterances]
