"""CTC decoding on the host: best path, and prefix beam search over a lexicon with a word LM.

The lexicon decoder is the classic closed-vocabulary CTC decoder: a prefix beam search over
token sequences whose text must spell words of a lexicon, each completed word scored by
`alpha * log P(word) + beta` under a unigram language model estimated (add-k smoothed) from the
training transcripts. Hypotheses are merged by their text and last token, so the beam holds
distinct transcripts. Any tokenizer whose tokens map to text works (`token_texts()`:
characters, or SentencePiece pieces with their word-boundary marker turned into a space).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Iterable, Sequence

import numpy as np

from tpa_jax.errors import ConfigError

NEG_INF = -1e30


def _logaddexp(a: float, b: float) -> float:
  if a < b:
    a, b = b, a
  if b <= NEG_INF:
    return a
  return a + math.log1p(math.exp(b - a))


def collapse(ids: Sequence[int] | np.ndarray, blank_id: int = 0) -> list[int]:
  """CTC's many-to-one map: merge repeated ids, then drop blanks."""
  ids = np.asarray(ids)
  keep = np.ones(ids.shape, bool)
  keep[1:] = ids[1:] != ids[:-1]
  return [int(i) for i in ids[keep & (ids != blank_id)]]


def best_path(log_probs: np.ndarray, blank_id: int = 0) -> list[int]:
  """Greedy CTC decoding of one utterance [T, V]: the collapsed per-frame argmax."""
  return collapse(np.asarray(log_probs).argmax(-1), blank_id)


class WordLM:
  """A unigram word model over a closed lexicon: log P(w) = log((n_w + k) / (N + k |V|))."""

  def __init__(self, counts: dict[str, int], smoothing: float = 0.5):
    counts = {w: int(n) for w, n in counts.items() if w and n > 0}
    if not counts:
      raise ValueError('a word LM needs at least one word with a positive count')
    if any(' ' in w for w in counts):
      raise ValueError(f'lexicon words must not contain spaces: '
                       f'{sorted(w for w in counts if " " in w)[:5]}')
    total = sum(counts.values())
    norm = math.log(total + smoothing * len(counts))
    self.log_prob = {w: math.log(n + smoothing) - norm for w, n in counts.items()}
    self.prefixes = {w[:i] for w in counts for i in range(len(w) + 1)}

  @classmethod
  def from_texts(cls, texts: Iterable[str], smoothing: float = 0.5) -> 'WordLM':
    return cls(collections.Counter(w for t in texts for w in t.split()), smoothing)

  def __len__(self) -> int:
    return len(self.log_prob)

  def __contains__(self, word: str) -> bool:
    return word in self.log_prob


@dataclasses.dataclass(frozen=True)
class LexiconDecoder:
  """Prefix beam search constrained to `lm`'s words.

  alpha: LM weight; beta: bonus per word (balances deletions against insertions); beam_width:
  hypotheses kept per frame; token_min_log_prob: tokens less likely than this at a frame are not
  extended; blank_skip_log_prob: frames whose blank log-probability exceeds this only extend by
  blank (most frames of a CTC model are such frames).
  """
  tokens: Sequence[str]
  lm: WordLM
  alpha: float = 0.5
  beta: float = 1.0
  beam_width: int = 32
  token_min_log_prob: float = -8.0
  blank_skip_log_prob: float = math.log(0.999)
  blank_id: int = 0
  _extend_cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False,
                                          compare=False)

  def __post_init__(self):
    if self.beam_width < 1:
      raise ValueError(f'beam_width must be >= 1, got {self.beam_width}')

  def _extend(self, partial: str, token: int):
    """(completed words, new partial word) after appending `token`'s text, or None if the
    text leaves the lexicon."""
    key = (partial, token)
    cache = self._extend_cache
    if key not in cache:
      words, out = [], None
      for ch in self.tokens[token]:
        if ch == ' ':
          if partial:
            if partial not in self.lm:
              break
            words.append(partial)
            partial = ''
        else:
          partial += ch
          if partial not in self.lm.prefixes:
            break
      else:
        out = (tuple(words), partial)
      cache[key] = out
    return cache[key]

  def _word_score(self, word: str) -> float:
    return self.alpha * self.lm.log_prob[word] + self.beta

  def decode(self, log_probs: np.ndarray) -> str:
    """The best transcript for one utterance's log-probabilities [T, V] (valid frames only)."""
    best = self.hypotheses(log_probs)
    return best[0][0] if best else ''

  def hypotheses(self, log_probs: np.ndarray) -> list[tuple[str, float]]:
    """(transcript, score) of the beam's distinct transcripts, best first; the score is
    log P(transcript | audio) summed over its alignments, plus the LM score of its words."""
    log_probs = np.asarray(log_probs, np.float64)
    if log_probs.ndim != 2 or log_probs.shape[1] != len(self.tokens):
      raise ValueError(f'log_probs must be [frames, {len(self.tokens)}] (one column per token), '
                       f'got shape {log_probs.shape}')
    blank = self.blank_id
    # key: (completed words, partial word, last token) -> [log p ending in blank,
    # log p ending in a token, LM score of the completed words]
    beams = {((), '', -1): [0.0, NEG_INF, 0.0]}
    for row in log_probs:
      if row[blank] > self.blank_skip_log_prob:
        for entry in beams.values():
          entry[0], entry[1] = _logaddexp(entry[0], entry[1]) + row[blank], NEG_INF
        continue
      candidates = [c for c in np.flatnonzero(row > self.token_min_log_prob) if c != blank]
      nxt: dict = {}

      def add(key, blank_lp, token_lp, lm_score):
        entry = nxt.get(key)
        if entry is None:
          nxt[key] = [blank_lp, token_lp, lm_score]
        else:
          entry[0] = _logaddexp(entry[0], blank_lp)
          entry[1] = _logaddexp(entry[1], token_lp)

      for key, (p_blank, p_token, lm_score) in beams.items():
        words, partial, last = key
        total = _logaddexp(p_blank, p_token)
        add(key, total + row[blank], NEG_INF, lm_score)
        if last >= 0:  # the last token again, without a blank in between, collapses into it
          add(key, NEG_INF, p_token + row[last], lm_score)
        for c in candidates:
          step = self._extend(partial, int(c))
          if step is None:
            continue
          new_words, new_partial = step
          # A token after the same token needs a blank in between to count twice.
          source = p_blank if c == last else total
          if source <= NEG_INF:  # (no path ends in a blank yet)
            continue
          add((words + new_words, new_partial, int(c)), NEG_INF, source + row[c],
              lm_score + sum(self._word_score(w) for w in new_words))
      beams = dict(sorted(nxt.items(), key=lambda kv: -(_logaddexp(kv[1][0], kv[1][1])
                                                        + kv[1][2]))[:self.beam_width])
    # Hypotheses that differ only in how the last word ended are one transcript: sum them.
    finals: dict = {}
    for (words, partial, _), (p_blank, p_token, lm_score) in beams.items():
      if partial:
        if partial not in self.lm:
          continue
        words, lm_score = words + (partial,), lm_score + self._word_score(partial)
      acoustic = _logaddexp(p_blank, p_token)
      if words in finals:
        acoustic = _logaddexp(finals[words][0], acoustic)
      finals[words] = (acoustic, lm_score)
    return sorted(((' '.join(w), a + lm) for w, (a, lm) in finals.items()), key=lambda h: -h[1])


def make_decoder(config, tokenizer, train_texts: Callable[[], Iterable[str]]
                 ) -> LexiconDecoder | None:
  """The decoder `config` (a `decoding` config section) names for a CTC model whose tokens come
  from `tokenizer`: None for best path ('greedy'), or a lexicon decoder over the words of
  `train_texts` (called only then)."""
  settings = lexicon_settings(config, train_texts)
  return None if settings is None else lexicon_decoder(settings, tokenizer)


def lexicon_settings(config, train_texts: Callable[[], Iterable[str]]) -> dict | None:
  """What a lexicon decoder is made of, as plain data (adapter exports carry it): the word
  counts of `train_texts` and the search settings of `config`; None for best path."""
  if config.kind == 'greedy':
    return None
  if config.kind != 'lexicon':
    raise ConfigError(f"decoding.kind={config.kind!r}: accepted values are 'greedy', 'lexicon'")
  counts = collections.Counter(w for t in train_texts() for w in t.split())
  return {'word_counts': dict(sorted(counts.items())), 'lm_smoothing': config.lm_smoothing,
          'alpha': config.alpha, 'beta': config.beta, 'beam_width': config.beam_width,
          'token_min_log_prob': config.token_min_log_prob}


def lexicon_decoder(settings: dict, tokenizer) -> LexiconDecoder:
  """The lexicon decoder of `lexicon_settings`' output, over `tokenizer`'s tokens."""
  return LexiconDecoder(tokenizer.token_texts(),
                        WordLM(settings['word_counts'], settings['lm_smoothing']),
                        alpha=settings['alpha'], beta=settings['beta'],
                        beam_width=settings['beam_width'],
                        token_min_log_prob=settings['token_min_log_prob'])
