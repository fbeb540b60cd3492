"""Tokenizers for CTC: id 0 is the blank, real tokens are 1..vocab_size-1.

SentencePiece models are trained from training transcripts and cached as a file in the workdir;
a character vocabulary is the alternative.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable, Protocol, Sequence

import sentencepiece as spm

from tpa_jax.errors import ConfigError

BLANK_ID = 0
SPM_TYPES = ('unigram', 'bpe')


class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def token_texts(self) -> list[str]: ...


class CharTokenizer:
  """One token per character of `alphabet` (id = position + 1); unknown characters are dropped."""

  def __init__(self, alphabet: str):
    if len(set(alphabet)) != len(alphabet) or not alphabet:
      raise ValueError(f'a character alphabet needs distinct characters, got {alphabet!r}')
    self.alphabet = alphabet
    self._ids = {c: i + 1 for i, c in enumerate(alphabet)}
    self.vocab_size = len(alphabet) + 1

  @classmethod
  def from_texts(cls, texts: Iterable[str]) -> 'CharTokenizer':
    return cls(''.join(sorted(set(''.join(texts)))))

  def encode(self, text: str) -> list[int]:
    return [self._ids[c] for c in text if c in self._ids]

  def decode(self, ids: Sequence[int]) -> str:
    return ''.join(self.alphabet[i - 1] for i in ids if 0 < i <= len(self.alphabet))

  def token_texts(self) -> list[str]:
    """The text of each id (the blank, id 0, is '')."""
    return [''] + list(self.alphabet)

  def serialize(self) -> bytes:
    return ('chars:' + self.alphabet).encode('utf-8')


class SentencePieceTokenizer:
  """A SentencePiece model whose pad piece (id 0) doubles as the CTC blank."""

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._proto = model_proto
    if self._sp.pad_id() != BLANK_ID:
      raise ValueError('a SentencePiece model for CTC needs pad_id=0 (the blank)')
    self.vocab_size = self._sp.get_piece_size()

  @classmethod
  def train(cls, texts: Iterable[str], *, vocab_size: int,
            model_type: str = 'unigram') -> 'SentencePieceTokenizer':
    if model_type not in SPM_TYPES:
      raise ConfigError(f'tokenizer.model_type={model_type!r}: accepted values are {SPM_TYPES}')
    texts = [t for t in texts if t.strip()]
    if not texts:
      raise ValueError('no non-empty transcripts to train the tokenizer on')
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=BLANK_ID, unk_id=1, bos_id=-1, eos_id=-1,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return cls(model.getvalue())

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids if i > 0])

  def token_texts(self) -> list[str]:
    """The text of each id, a word-initial piece starting with ' ' (the blank, id 0, is '')."""
    return [''] + [self._sp.id_to_piece(i).replace('\u2581', ' ')
                   for i in range(1, self.vocab_size)]

  def serialize(self) -> bytes:
    return self._proto


def deserialize(data: bytes) -> Tokenizer:
  if data.startswith(b'chars:'):
    return CharTokenizer(data[len(b'chars:'):].decode('utf-8'))
  return SentencePieceTokenizer(data)


def load_or_train(path: str, texts_fn, *, kind: str = 'sentencepiece', vocab_size: int = 256,
                  model_type: str = 'unigram') -> Tokenizer:
  """The tokenizer cached at `path`, or one trained from `texts_fn()` and written there."""
  if os.path.exists(path):
    with open(path, 'rb') as f:
      return deserialize(f.read())
  if kind == 'sentencepiece':
    tokenizer = SentencePieceTokenizer.train(texts_fn(), vocab_size=vocab_size,
                                             model_type=model_type)
  elif kind == 'chars':
    tokenizer = CharTokenizer.from_texts(texts_fn())
  else:
    raise ConfigError(f"tokenizer.kind={kind!r}: accepted values are ('sentencepiece', 'chars')")
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=os.path.dirname(path) or '.', delete=False) as f:
    f.write(tokenizer.serialize())
  os.replace(f.name, path)  # atomic: a half-written tokenizer is never read back
  return tokenizer
