"""Transcript generator: sentences of frequency-weighted words from `wordfreq`'s word lists.

The word lists come from the `wordfreq` package (installed with the `speech` extra), so no text
is copied into this repository. Deterministic for a seed.
"""

from __future__ import annotations

import functools
import re

import numpy as np

# Letters kept per language; words with anything else (digits, apostrophes, foreign letters)
# are dropped so the transcripts and the synthesized speech agree.
ALPHABETS = {
    'en': 'abcdefghijklmnopqrstuvwxyz',
    'es': 'abcdefghijklmnopqrstuvwxyzáéíóúñü',
    'de': 'abcdefghijklmnopqrstuvwxyzäöüß',
    'fr': 'abcdefghijklmnopqrstuvwxyzàâæçéèêëîïôœùûüÿ',
    'it': 'abcdefghijklmnopqrstuvwxyzàèéìíîòóùú',
    'nl': 'abcdefghijklmnopqrstuvwxyzé',
    'pt': 'abcdefghijklmnopqrstuvwxyzáâãàçéêíóôõú',
    'sv': 'abcdefghijklmnopqrstuvwxyzåäö',
}


# Words of one or two letters are kept only if listed (where a list exists): the rest are mostly
# abbreviations ('uk', 'co') or letters that a synthesizer spells out.
SHORT_WORDS = {
    'en': {'a', 'i', 'to', 'of', 'in', 'is', 'it', 'on', 'be', 'as', 'at', 'he', 'by', 'my', 'or',
           'we', 'an', 'so', 'me', 'if', 'up', 'do', 'no', 'us', 'go', 'am', 'oh', 'hi'},
    'es': {'a', 'o', 'y', 'e', 'u', 'de', 'la', 'el', 'en', 'se', 'no', 'un', 'es', 'lo', 'me', 'su',
           'te', 'mi', 'si', 'ya', 'le', 'ha', 'he', 'tu', 'yo', 'al', 'da', 'va', 'ni', 'mí', 'sé',
           'tú', 'él', 'sí', 'ti', 'fe', 'ir', 've', 'os', 'da'},
}
_ROMAN = re.compile(r'x{0,3}(ix|iv|v?i{0,3})')


@functools.lru_cache(maxsize=None)
def word_list(language: str, num_words: int) -> tuple[tuple[str, ...], np.ndarray]:
  """The `num_words` most frequent words of `language` spelled in its alphabet, with their
  frequencies."""
  try:
    import wordfreq  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError('the transcript generator needs wordfreq: pip install "tpa_jax[speech]"') \
        from e
  if language not in ALPHABETS:
    raise ValueError(f'language {language!r} has no alphabet; known: {sorted(ALPHABETS)}')
  pattern = re.compile(f'[{ALPHABETS[language]}]+')
  # A spoken word has a vowel; 'mr', 'st' or 'tv' are abbreviations the synthesizer expands.
  vowel = re.compile('[aeiouyàáâãäåæèéêëìíîïòóôõöùúûüÿœ]')
  short = SHORT_WORDS.get(language)
  words = []
  for w in wordfreq.iter_wordlist(language):
    if not (pattern.fullmatch(w) and vowel.search(w)):
      continue
    if len(w) <= 2 and (w not in short if short is not None else len(w) == 1):
      continue
    if _ROMAN.fullmatch(w) and w not in ('i', 'x'):
      continue
    words.append(w)
    if len(words) == num_words:
      break
  if len(words) < num_words:
    raise ValueError(f'wordfreq has only {len(words)} usable {language} words, '
                     f'{num_words} were asked for')
  freqs = np.array([wordfreq.word_frequency(w, language) for w in words], np.float64)
  return tuple(words), freqs


class SentenceGenerator:
  """Random sentences of `min_words`..`max_words` words drawn with probability ∝ freq**alpha."""

  def __init__(self, language: str, *, num_words: int = 3000, alpha: float = 1.0,
               min_words: int = 3, max_words: int = 15):
    if not 1 <= min_words <= max_words:
      raise ValueError(f'sentence lengths {min_words}..{max_words} are not a valid range')
    self.words, freqs = word_list(language, num_words)
    weights = freqs ** alpha
    self.probs = weights / weights.sum()
    self.min_words, self.max_words = min_words, max_words

  def sample(self, rng: np.random.Generator) -> str:
    n = int(rng.integers(self.min_words, self.max_words + 1))
    return ' '.join(self.words[i] for i in rng.choice(len(self.words), n, p=self.probs))
