"""CTC decoders: best path, and the lexicon beam search checked against exhaustive search."""

import itertools
import math

import ml_collections
import numpy as np
import pytest

from tpa_jax.data import tokenizer as tokenizer_lib
from tpa_jax.eval import decoding

TOKENS = ['', ' ', 'a', 'b']  # blank, space, two letters


def peaked(ids, num_tokens, *, off=-9.0, extra=()):
  """Log-probabilities [T, V] putting almost all mass on `ids[t]`; `extra` lists (t, id, logp)."""
  lp = np.full((len(ids), num_tokens), off)
  lp[np.arange(len(ids)), ids] = 0.0
  for t, i, v in extra:
    lp[t, i] = v
  return lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)


def exhaustive(log_probs, lm, alpha, beta):
  """Every lexicon transcript's score: log sum over the alignments spelling it + LM score."""
  totals = {}
  for path in itertools.product(range(len(TOKENS)), repeat=len(log_probs)):
    text = ''.join(TOKENS[i] for i in decoding.collapse(path))
    words = tuple(text.split())
    if any(w not in lm for w in words):
      continue
    lp = sum(log_probs[t, i] for t, i in enumerate(path))
    totals[words] = np.logaddexp(totals.get(words, -np.inf), lp)
  return {' '.join(w): a + sum(alpha * lm.log_prob[x] + beta for x in w)
          for w, a in totals.items()}


def test_collapse_and_best_path():
  assert decoding.collapse([0, 2, 2, 0, 2, 3, 3, 0]) == [2, 2, 3]
  lp = peaked([2, 2, 0, 2, 1, 3], 4)
  assert decoding.best_path(lp) == [2, 2, 1, 3]


@pytest.mark.parametrize('seed', range(6))
def test_lexicon_search_without_pruning_is_exact(seed):
  rng = np.random.default_rng(seed)
  lm = decoding.WordLM({'a': 5, 'ab': 2, 'b': 1, 'ba': 3, 'bb': 2, 'abba': 1, 'aa': 1})
  log_probs = rng.normal(size=(7, 4)) * 2.0
  log_probs -= np.logaddexp.reduce(log_probs, axis=1, keepdims=True)
  alpha, beta = 0.7, 0.3
  decoder = decoding.LexiconDecoder(TOKENS, lm, alpha=alpha, beta=beta, beam_width=10_000,
                                    token_min_log_prob=-np.inf, blank_skip_log_prob=np.inf)
  expected = exhaustive(log_probs, lm, alpha, beta)
  found = dict(decoder.hypotheses(log_probs))
  assert found.keys() == expected.keys()
  np.testing.assert_allclose([found[k] for k in expected], list(expected.values()), rtol=1e-9)
  assert decoder.decode(log_probs) == max(expected, key=expected.get)


def test_lexicon_corrects_a_misspelling_that_best_path_makes():
  chars = tokenizer_lib.CharTokenizer(' dlorw')
  ids = chars.encode('wrld')
  # 'o' is the second choice (log 0.2) at the frame between 'w' and 'r'.
  lp = peaked([ids[0], 0, ids[1], ids[2], ids[3]], chars.vocab_size,
              extra=[(1, chars.encode('o')[0], math.log(0.2))])
  assert chars.decode(decoding.best_path(lp)) == 'wrld'
  lm = decoding.WordLM({'world': 3, 'word': 1})
  assert decoding.LexiconDecoder(chars.token_texts(), lm).decode(lp) == 'world'


@pytest.mark.parametrize('counts,expected', [({'a': 10, 'b': 1}, 'a'), ({'a': 1, 'b': 10}, 'b')])
def test_word_prior_breaks_an_acoustic_tie(counts, expected):
  lp = np.log(np.array([[0.02, 0.02, 0.48, 0.48]]))
  decoder = decoding.LexiconDecoder(TOKENS, decoding.WordLM(counts))
  assert decoder.decode(lp) == expected


def test_sentencepiece_pieces_spell_words_through_the_lexicon():
  texts = ['the cat sat on the mat', 'a dog ran to the cat', 'the mat is red'] * 20
  sp = tokenizer_lib.SentencePieceTokenizer.train(texts, vocab_size=30)
  pieces = sp.token_texts()
  assert len(pieces) == sp.vocab_size and pieces[0] == ''
  ids = sp.encode('the dog sat')
  assert ''.join(pieces[i] for i in ids).strip() == 'the dog sat'
  path = [x for i in ids for x in (i, 0)]  # each piece then a blank
  decoder = decoding.LexiconDecoder(pieces, decoding.WordLM.from_texts(texts))
  assert decoder.decode(peaked(path, sp.vocab_size)) == 'the dog sat'


def test_repeated_letters_need_a_blank_between_them():
  lm = decoding.WordLM({'ab': 1, 'abb': 1})
  decoder = decoding.LexiconDecoder(TOKENS, lm, alpha=0.0, beta=0.0)
  assert decoder.decode(peaked([2, 3, 3], 4)) == 'ab'
  assert decoder.decode(peaked([2, 3, 0, 3], 4)) == 'abb'


def test_bad_input_is_named():
  lm = decoding.WordLM({'a': 1})
  with pytest.raises(ValueError, match=r'log_probs must be \[frames, 4\]'):
    decoding.LexiconDecoder(TOKENS, lm).decode(np.zeros((3, 5)))
  with pytest.raises(ValueError, match='spaces'):
    decoding.WordLM({'a b': 1})
  with pytest.raises(ValueError, match='at least one word'):
    decoding.WordLM.from_texts(['', ' '])
  config = ml_collections.ConfigDict(dict(kind='beam'))
  with pytest.raises(ValueError, match="decoding.kind='beam'.*'greedy', 'lexicon'"):
    decoding.make_decoder(config, None, lambda: [])


def test_make_decoder_reads_the_lexicon_only_when_needed():
  from tpa_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config().decoding
  assert decoding.make_decoder(c, None, lambda: pytest.fail('greedy needs no texts')) is None
  c.kind = 'lexicon'
  decoder = decoding.make_decoder(c, tokenizer_lib.CharTokenizer(' ab'), lambda: ['ab a', 'b'])
  assert sorted(decoder.lm.log_prob) == ['a', 'ab', 'b'] and decoder.beam_width == c.beam_width
