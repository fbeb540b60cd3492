"""The embedded synthetic speech corpus as a TFDS builder (eSpeak NG voices, wordfreq text).

Domains are data (`speech_domains.json`, or a `SpeechDomain` built in code): languages, voices,
rate and pitch ranges, noise and split sizes. A new domain needs no code change:

    builder = SyntheticSpeech(config=SpeechDomain(name='my_domain', languages=('de',), ...),
                              data_dir=..., file_format='array_record')

Deterministic for a seed; the splits have disjoint sentences. Needs the `speech` extra.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os

import numpy as np
import tensorflow_datasets as tfds

from tpa_jax.data import synthesis
from tpa_jax.errors import ConfigError
from tpa_jax.data.text import SentenceGenerator

SPLITS = ('train', 'validation', 'test')
# Utterances synthesised in order by one fresh eSpeak NG process.
SHARD_SIZE = 1000
# 1.1.0: audio stored as raw int16 bytes (1.0.0 stored an int64 list: 3x the bytes on disk and
# ~100x slower to write). The audio itself is unchanged.
CORPUS_VERSION = '1.1.0'
_DOMAINS_FILE = os.path.join(os.path.dirname(__file__), 'speech_domains.json')


@dataclasses.dataclass(eq=False)
class SpeechDomain(tfds.core.BuilderConfig):
  """One domain of the synthetic corpus."""
  languages: tuple[str, ...] = ('en',)
  # language -> eSpeak NG voices ('en-us+m3': language code + variant).
  voices: dict = dataclasses.field(default_factory=dict)
  rate_wpm: tuple[int, int] = (140, 185)
  pitch: tuple[int, int] = (30, 70)
  # Additive white noise at this SNR (None: clean).
  snr_db: float | None = None
  # split -> number of utterances (spread evenly over the languages).
  sizes: dict = dataclasses.field(default_factory=lambda: {'train': 1000, 'validation': 100,
                                                           'test': 100})
  # Words per language, sentence lengths, and the seed that fixes everything.
  num_words: int = 2000
  min_words: int = 3
  max_words: int = 15
  seed: int = 0

  def __post_init__(self):
    missing = [lang for lang in self.languages if not self.voices.get(lang)]
    if missing:
      raise ValueError(f'domain {self.name!r}: no voices for language(s) {missing}')
    unknown = sorted(set(self.sizes) - set(SPLITS))
    if unknown:
      raise ValueError(f'domain {self.name!r}: unknown split(s) {unknown}; splits are {SPLITS}')


def load_domains(path: str = _DOMAINS_FILE, **overrides) -> list[SpeechDomain]:
  """The named domains of a JSON file, with field `overrides` applied to all of them."""
  with open(path) as f:
    spec = json.load(f)
  domains = []
  for name, fields in spec.items():
    fields = {**fields, **overrides}
    for key in ('languages', 'rate_wpm', 'pitch'):
      fields[key] = tuple(fields[key])
    domains.append(SpeechDomain(name=name, version=CORPUS_VERSION, **fields))
  return domains


# The fields that decide a domain's audio and text (a domain is identical when they are).
_DOMAIN_FIELDS = ('languages', 'voices', 'rate_wpm', 'pitch', 'snr_db', 'sizes', 'num_words',
                  'min_words', 'max_words', 'seed')


def all_domains(domains_file: str = '') -> dict[str, SpeechDomain]:
  """The built-in domains with those of a user's `domains_file` added. A domain of the file
  named like a built-in one is accepted when identical (the built-in one is used) and refused by
  name, with the differing fields, otherwise."""
  domains = {d.name: d for d in SyntheticSpeech.BUILDER_CONFIGS}
  if not domains_file:
    return domains
  try:
    extra = load_domains(domains_file)
  except (OSError, ValueError, TypeError, KeyError) as e:
    raise ConfigError(f'data.domains_file={domains_file!r} cannot be read: {e}') from e
  for domain in extra:
    built_in = domains.get(domain.name)
    if built_in is None:
      domains[domain.name] = domain
      continue
    differ = [f'{f}: built in {getattr(built_in, f)!r}, file {getattr(domain, f)!r}'
              for f in _DOMAIN_FIELDS if getattr(built_in, f) != getattr(domain, f)]
    if differ:
      raise ConfigError(f'data.domains_file={domains_file!r} redefines the built-in domain '
                        f'{domain.name!r} ({"; ".join(differ)}): give your domain another name')
  return domains


def plan_utterances(domain: SpeechDomain) -> dict[str, list[synthesis.Utterance]]:
  """The utterances of every split: sentences are distinct within and across splits."""
  plans = {split: [] for split in SPLITS}
  for li, lang in enumerate(domain.languages):
    generator = SentenceGenerator(lang, num_words=domain.num_words, min_words=domain.min_words,
                                  max_words=domain.max_words)
    rng = np.random.default_rng([domain.seed, li])
    seen: set[str] = set()
    # Test first, so a smaller train split never changes the test sentences.
    for split in ('test', 'validation', 'train'):
      n = domain.sizes.get(split, 0)
      count = n // len(domain.languages) + (li < n % len(domain.languages))
      for _ in range(count):
        text = generator.sample(rng)
        while text in seen:
          text = generator.sample(rng)
        seen.add(text)
        voices = domain.voices[lang]
        plans[split].append(synthesis.Utterance(
            key=f'{split}-{lang}-{len(plans[split]):06d}', text=text, language=lang,
            voice=voices[int(rng.integers(len(voices)))],
            rate_wpm=int(rng.integers(domain.rate_wpm[0], domain.rate_wpm[1] + 1)),
            pitch=int(rng.integers(domain.pitch[0], domain.pitch[1] + 1)),
            snr_db=domain.snr_db, seed=domain.seed))
  return plans


class PcmAudio(tfds.features.Audio):
  """TFDS's Audio feature stored as raw bytes (`encoding='bytes'`): Audio passes arrays through
  unencoded, which an int64 list accepts but a bytes field does not."""

  def encode_example(self, audio_or_path_or_fobj):
    if isinstance(audio_or_path_or_fobj, (np.ndarray, list)):
      return tfds.features.Tensor.encode_example(self, np.asarray(audio_or_path_or_fobj))
    return super().encode_example(audio_or_path_or_fobj)


class SyntheticSpeech(tfds.core.GeneratorBasedBuilder):
  """Synthetic read speech from eSpeak NG: 16 kHz int16 audio with transcripts."""

  VERSION = tfds.core.Version(CORPUS_VERSION)
  RELEASE_NOTES = {'1.0.0': 'First release.',
                   '1.1.0': 'Audio stored as raw int16 bytes instead of an int64 list.'}
  BUILDER_CONFIGS = load_domains()

  def _info(self) -> tfds.core.DatasetInfo:
    domain: SpeechDomain = self.builder_config
    return self.dataset_info_from_configs(
        description=domain.description,
        features=tfds.features.FeaturesDict({
            'audio': PcmAudio(shape=(None,), dtype=np.int16, encoding='bytes',
                              sample_rate=synthesis.SAMPLE_RATE_HZ),
            'transcript': tfds.features.Text(),
            'language': tfds.features.ClassLabel(names=list(domain.languages)),
            'voice': tfds.features.Text(),
            'rate_wpm': np.int32,
            'pitch': np.int32,
        }),
        supervised_keys=('audio', 'transcript'),
        # The plan is already in random order; keeping it skips TFDS's shuffle pass.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    plans = plan_utterances(self.builder_config)
    return {split: self._generate_examples(plans[split]) for split in SPLITS if plans[split]}

  def _generate_examples(self, utterances):
    # Fixed shards, each spoken in order by a fresh process (eSpeak NG keeps state between
    # utterances): the audio is the same on any machine, whatever its number of cores.
    shards = [utterances[i:i + SHARD_SIZE] for i in range(0, len(utterances), SHARD_SIZE)]
    workers = max(min(os.cpu_count() or 1, 8, len(shards)), 1)
    context = multiprocessing.get_context('spawn')  # no TensorFlow state in the workers
    with context.Pool(workers, maxtasksperchild=1) as pool:
      for shard, audios in zip(shards, pool.imap(synthesis.synthesize_shard, shards)):
        for utt, audio in zip(shard, audios):
          yield utt.key, {'audio': audio, 'transcript': utt.text, 'language': utt.language,
                          'voice': utt.voice, 'rate_wpm': utt.rate_wpm, 'pitch': utt.pitch}
