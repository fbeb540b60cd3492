"""The speech data path: transcripts, eSpeak NG synthesis, the TFDS corpus, tokenizers, the grain
pipeline (buckets, determinism, saved position, process shards, skipped input), mixtures of
datasets for pre-training, and LibriSpeech through TFDS's own builder under
`tfds.testing.mock_data`."""

import dataclasses
import json
import multiprocessing
import os

import numpy as np
import pytest
import scipy.signal
import tensorflow_datasets as tfds

from tpa_jax import config as config_lib
from tpa_jax.data import datasets, pipeline, speech_corpus, synthesis
from tpa_jax.data import pcm as audio_lib
from tpa_jax.data import tokenizer as tokenizer_lib
from tpa_jax.data.text import SentenceGenerator
from tpa_jax.eval import decoding
from tpa_jax.eval import scoring


def small_domain(**fields):
  base = dict(name='unit', version=speech_corpus.CORPUS_VERSION, languages=('en', 'es'),
              voices={'en': ['en-us+m3', 'en+f2'], 'es': ['es+m1']},
              sizes={'train': 10, 'validation': 2, 'test': 4}, min_words=3, max_words=5)
  return speech_corpus.SpeechDomain(**{**base, **fields})


# -- transcripts and synthesis -------------------------------------------------------------------

def test_sentences_use_2000_words_and_3_to_15_words():
  gen = SentenceGenerator('en', num_words=2000)
  assert len(set(gen.words)) == 2000
  rng = np.random.default_rng(0)
  sentences = [gen.sample(rng) for _ in range(300)]
  lengths = [len(s.split()) for s in sentences]
  assert min(lengths) == 3 and max(lengths) == 15
  assert all(set(s) <= set('abcdefghijklmnopqrstuvwxyz ') for s in sentences)
  again = np.random.default_rng(0)
  assert sentences[:20] == [gen.sample(again) for _ in range(20)]


def test_plan_is_deterministic_with_disjoint_splits():
  domain = small_domain()
  plan = speech_corpus.plan_utterances(domain)
  assert {k: len(v) for k, v in plan.items()} == {'train': 10, 'validation': 2, 'test': 4}
  texts = {split: {u.text for u in utts} for split, utts in plan.items()}
  assert not texts['train'] & texts['test'] and not texts['train'] & texts['validation']
  assert not texts['test'] & texts['validation']
  assert plan == speech_corpus.plan_utterances(domain)
  # A bigger training split leaves the test sentences as they were.
  bigger = speech_corpus.plan_utterances(small_domain(sizes={'train': 30, 'validation': 2,
                                                             'test': 4}))
  assert bigger['test'] == plan['test']
  assert {u.language for u in plan['train']} == {'en', 'es'}


def fresh_process_synthesis(utterances):
  """A shard spoken by a new eSpeak NG process, as the corpus builder does."""
  with multiprocessing.get_context('spawn').Pool(1) as pool:
    return pool.apply(synthesis.synthesize_shard, (utterances,))


def test_espeak_synthesis_is_deterministic_16khz_speech():
  utt = synthesis.Utterance(key='k', text='hello world', language='en', voice='en-us+m3',
                            rate_wpm=160, pitch=50, snr_db=None, seed=0)
  other = dataclasses.replace(utt, text='good morning', voice='es+f2')
  audio, _ = fresh_process_synthesis([utt, other])
  assert audio.dtype == np.int16 and 0.4 * 16000 < audio.size < 2.5 * 16000
  assert np.abs(audio).max() > 1000
  np.testing.assert_array_equal(audio, fresh_process_synthesis([utt, other])[0])
  noisy = synthesis.synthesize(dataclasses.replace(utt, snr_db=10.0))
  noise = noisy.astype(np.float64) - audio
  snr = 10 * np.log10(np.mean(audio.astype(np.float64) ** 2) / np.mean(noise ** 2))
  assert 9.0 < snr < 11.0
  with pytest.raises(ValueError, match="no voice 'xx-nowhere'"):
    synthesis.synthesize(dataclasses.replace(utt, voice='xx-nowhere'))


def test_resampling_equals_scipy_default_filter():
  # The low-pass filter is designed once per rate pair; the output must stay what
  # resample_poly's own filter gives (the corpus audio depends on it).
  rng = np.random.default_rng(0)
  for n in (1, 7, 22050, 70001):
    x = rng.normal(size=n)
    expected = scipy.signal.resample_poly(x, 320, 441).astype(np.float32)
    np.testing.assert_array_equal(audio_lib.resample(x, 22050, 16000), expected)
  np.testing.assert_array_equal(audio_lib.resample(x, 8000, 16000),
                                scipy.signal.resample_poly(x, 2, 1).astype(np.float32))


def test_domains_are_data_and_bad_domains_are_named(tmp_path):
  names = [d.name for d in speech_corpus.load_domains()]
  assert names == ['source', 'target_lang', 'target_acoustic', 'lang_id']
  lang_id = speech_corpus.load_domains()[-1]
  assert len(lang_id.languages) >= 4
  with pytest.raises(ValueError, match=r"no voices for language\(s\) \['de'\]"):
    small_domain(languages=('en', 'de'))
  with pytest.raises(ValueError, match=r"unknown split\(s\) \['dev'\]"):
    small_domain(sizes={'dev': 3})


UNIT_DOMAIN = {'unit': dict(
    description='two languages, three voices', languages=['en', 'es'],
    voices={'en': ['en-us+m3', 'en+f2'], 'es': ['es+m1']}, rate_wpm=[140, 185], pitch=[30, 70],
    snr_db=None, sizes={'train': 10, 'validation': 2, 'test': 4}, min_words=3, max_words=5),
    # A second domain of the same file: a mixture's other part.
    'unit_es': dict(
        description='Spanish, one voice', languages=['es'], voices={'es': ['es+f2']},
        rate_wpm=[140, 185], pitch=[30, 70], snr_db=None,
        sizes={'train': 6, 'validation': 2, 'test': 2}, min_words=3, max_words=5)}


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """A small two-language domain, defined in a JSON file (no code), prepared by the real TFDS
  builder in array_record."""
  root = tmp_path_factory.mktemp('corpus')
  domains_file = str(root / 'domains.json')
  with open(domains_file, 'w') as f:
    json.dump(UNIT_DOMAIN, f)
  builder = datasets.open_builder('synthetic_speech/unit', str(root / 'data'), domains_file)
  builder.download_and_prepare()
  builder.domains_file, builder.root = domains_file, str(root)
  return builder


def test_corpus_builder_writes_array_record_with_the_features(corpus):
  files = os.listdir(corpus.data_dir)
  assert any('train.array_record' in f for f in files), files
  source = corpus.as_data_source(split='train')
  assert len(source) == 10
  ex = source[0]
  assert ex['audio'].dtype == np.int16 and ex['audio'].ndim == 1
  assert corpus.info.features['audio'].sample_rate == 16000
  assert set(ex) >= {'audio', 'transcript', 'language', 'voice'}
  plan = speech_corpus.plan_utterances(corpus.builder_config)['train']
  assert [x['transcript'].decode() for x in source] == [u.text for u in plan]
  np.testing.assert_array_equal(ex['audio'], fresh_process_synthesis(plan[:1])[0])
  assert corpus.info.features['language'].names == ['en', 'es']


# -- tokenizers ----------------------------------------------------------------------------------

def test_char_tokenizer_round_trip_and_blank():
  tok = tokenizer_lib.CharTokenizer.from_texts(['hola señor', 'adiós'])
  ids = tok.encode('hola adiós')
  assert 0 not in ids and tok.decode(ids) == 'hola adiós'
  assert tok.vocab_size == len(set('hola señoradiós')) + 1
  assert tokenizer_lib.deserialize(tok.serialize()).alphabet == tok.alphabet


def test_sentencepiece_is_trained_cached_and_uses_pad_as_blank(tmp_path):
  texts = [SentenceGenerator('en', num_words=2000).sample(np.random.default_rng(i))
           for i in range(300)]
  calls = []

  def texts_fn():
    calls.append(1)
    return texts
  path = str(tmp_path / 'tok' / 'en.model')
  tok = tokenizer_lib.load_or_train(path, texts_fn, kind='sentencepiece', vocab_size=64)
  again = tokenizer_lib.load_or_train(path, texts_fn, kind='sentencepiece', vocab_size=64)
  assert len(calls) == 1 and again.serialize() == tok.serialize()
  ids = tok.encode(texts[0])
  assert 0 not in ids and tok.decode(ids) == texts[0]
  assert tok.vocab_size <= 64
  with pytest.raises(ValueError, match="tokenizer.kind='words'"):
    tokenizer_lib.load_or_train(str(tmp_path / 'x'), texts_fn, kind='words')


# -- the pipeline --------------------------------------------------------------------------------

def open_data(corpus, **data_fields):
  c = config_lib.base_config()
  c.data.update(dict(name='synthetic_speech/unit', domains_file=corpus.domains_file,
                     bucket_seconds=(2.0, 4.0), batch_seconds=8.0, eval_batch_size=4,
                     **data_fields))
  return datasets.SpeechData.open(c.data, workdir=corpus.root, task='ctc',
                                  frames=lambda n: max((n - 400) // 160 + 1, 0) // 2)


def batches(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)]


def test_loader_has_fixed_shapes_and_is_deterministic(corpus):
  data = open_data(corpus)
  tok = data.tokenizer(config_lib.base_config().tokenizer, corpus.root)
  loader = data.train_loader(tok, seed=3, num_batches=12)
  got = batches(loader, 12)
  shapes = {(b['audio'].shape, b['labels'].shape) for b in got}
  allowed = {((bk.batch_size, bk.max_samples), (bk.batch_size, data.label_capacity(bk)))
             for bk in data.buckets}
  assert shapes <= allowed
  for b in got:
    assert b['audio'].dtype == np.int16 and (b['audio_lengths'] > 0).all()
    assert (b['label_mask'] == (b['labels'] > 0)).all()
  same = batches(data.train_loader(tok, seed=3, num_batches=12), 12)
  for a, b in zip(got, same):
    np.testing.assert_array_equal(a['audio'], b['audio'])
  other = batches(data.train_loader(tok, seed=4, num_batches=12), 12)
  assert any(not np.array_equal(a['labels'], b['labels']) for a, b in zip(got, other)
             if a['labels'].shape == b['labels'].shape) or len(got) == 0


def test_iterator_position_is_saved_and_restored(corpus):
  data = open_data(corpus)
  tok = data.tokenizer(config_lib.base_config().tokenizer, corpus.root)
  loader = data.train_loader(tok, seed=0, num_batches=10)
  it = iter(loader)
  for _ in range(4):
    next(it)
  state = it.get_state()
  rest = [next(it) for _ in range(3)]
  resumed = iter(loader)
  resumed.set_state(state)
  for a in rest:
    b = next(resumed)
    np.testing.assert_array_equal(a['audio'], b['audio'])
    np.testing.assert_array_equal(a['labels'], b['labels'])


def test_each_process_reads_its_own_rows(corpus):
  data = open_data(corpus)
  index = data.index('train')
  collate = lambda examples, n: {'n': len(examples)}
  whole = pipeline.BatchLoader(corpus.as_data_source(split='train'), index, data.buckets,
                               collate, seed=0, num_batches=6)
  parts = [pipeline.BatchLoader(corpus.as_data_source(split='train'), index, data.buckets,
                                collate, seed=0, num_batches=6, process_index=p,
                                process_count=2) for p in range(2)]
  for step in range(6):
    rows = np.concatenate([p.local_indices(step) for p in parts])
    np.testing.assert_array_equal(rows, whole.global_indices(step))
    assert not set(parts[0].local_indices(step)) & set(parts[1].local_indices(step))


def test_bad_examples_are_skipped_and_counted():
  good = np.full(3000, 2000, np.int16)
  source = [
      {'audio': good, 'text': 'fine'},
      {'audio': np.zeros(0, np.int16), 'text': 'empty'},
      {'audio': np.full(3000, np.nan, np.float32), 'text': 'nan'},
      {'audio': np.zeros(3000, np.int16), 'text': 'silent'},
      {'audio': np.full(99999, 2000, np.int16), 'text': 'long'},
      {'audio': good, 'text': '   '},
      {'audio': good, 'text': 'x' * 500},
  ]
  index = pipeline.scan_split(source, audio_key='audio', max_samples=16000,
                              text_fn=lambda ex: ex['text'], num_tokens=len,
                              max_tokens=lambda n: n // 160)
  assert index.keep.tolist() == [True] + [False] * 6
  assert index.skipped == {'empty_audio': 1, 'non_finite_audio': 1, 'silent_audio': 1,
                           'too_long': 1, 'empty_transcript': 1, 'too_many_tokens': 1}


def test_a_mixture_reads_the_audio_of_each_dataset_in_turn_for_pretraining_only(corpus):
  names = ('synthetic_speech/unit', 'synthetic_speech/unit_es')
  c = config_lib.base_config()
  c.data.update(dict(name='+'.join(names), domains_file=corpus.domains_file,
                     bucket_seconds=(2.0, 4.0), batch_seconds=8.0, eval_batch_size=4))
  open_mixture = lambda task: datasets.SpeechData.open(
      c.data, workdir=corpus.root, task=task, frames=lambda n: max((n - 400) // 160 + 1, 0) // 2)
  data = open_mixture('best_rq')
  data.prepare()  # prepares the second part; the first is already there
  parts = [datasets.open_builder(n, os.path.join(corpus.root, 'data'), corpus.domains_file)
           .as_data_source(split='train') for n in names]
  mixed = data.source('train')
  assert [len(p) for p in parts] == [10, 6] and len(mixed) == 16
  want = [ex['audio'] for p in parts for ex in p]
  for i, audio in enumerate(want):
    assert set(mixed[i]) == {'audio'}
    np.testing.assert_array_equal(mixed[i]['audio'], audio)
  with pytest.raises(IndexError):
    mixed[16]
  # Training batches draw on both parts, audio only.
  loader = data.train_loader(None, seed=0, num_batches=6)
  rows = np.concatenate([loader.global_indices(s) for s in range(6)])
  assert (rows < 10).any() and (rows >= 10).any()
  assert set(next(iter(loader))) == {'audio', 'audio_lengths'}
  # The description (what a pre-trained base's cache key holds) names every part's content.
  described = datasets.dataset_description(data)
  assert all(repr(b.builder_config) in described for b in data.builder.parts)
  assert described != datasets.builder_description(data.builder.parts[0])
  with pytest.raises(ValueError, match=r"mixture of datasets.*head.kind='ctc' needs one"):
    open_mixture('ctc')
  with pytest.raises(ValueError, match="has splits.*'dev' is not one of them"):
    data.source('dev')
  with pytest.raises(ValueError, match='distinct dataset names'):
    datasets.open_builder('synthetic_speech/unit+synthetic_speech/unit', corpus.root,
                          corpus.domains_file)
  with pytest.raises(ValueError, match="synthetic corpus has domains"):
    datasets.open_builder('synthetic_speech/unit+synthetic_speech/nope', corpus.root,
                          corpus.domains_file)


def test_eval_batches_cover_every_usable_example_once(corpus):
  data = open_data(corpus)
  seen = []
  for batch, texts in data.eval_batches('test'):
    assert batch['audio'].shape[0] == 4
    assert int(batch['weight'].sum()) == len(texts)
    seen += texts
  source = corpus.as_data_source(split='test')
  assert sorted(seen) == sorted(x['transcript'].decode() for x in source)


def test_eval_batches_as_trained_hold_the_utterances_training_reads_uncut(corpus):
  # 12 tokens a second: a 2 s bucket holds 24 labels, and the longer characters-level
  # transcripts of this domain do not fit theirs.
  data = open_data(corpus, max_tokens_per_second=12.0)
  tok = data.tokenizer(config_lib.base_config().tokenizer, corpus.root)

  def fits(ex):  # the rule written out: one frame per label and a blank between repeats
    ids = tok.encode(ex['transcript'].decode())
    need = len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))
    n = np.asarray(ex['audio']).size
    return need <= min(data.frames(n), data.label_capacity(data.bucket_for(n)))
  source = corpus.as_data_source(split='train')
  expected = sorted(x['transcript'].decode() for x in source if fits(x))
  assert 0 < len(expected) < len(source)  # the rule drops some, not all
  seen = []
  for batch, texts in data.eval_batches('train', tok, as_trained=True):
    n = int(batch['weight'].sum())
    for ids, mask, text in zip(batch['labels'][:n], batch['label_mask'][:n], texts):
      assert list(ids[mask]) == tok.encode(text)  # no label is cut
    seen += texts
  assert sorted(seen) == expected
  # Without it every usable utterance is read, whatever its labels.
  assert sum(len(t) for _, t in data.eval_batches('train', tok)) == len(source)


# -- LibriSpeech through TFDS's own builder (mocked: nothing is downloaded) ----------------------

def test_librispeech_reads_through_the_tfds_builder(tmp_path):
  c = config_lib.base_config()
  c.data.update(dict(name='librispeech', data_dir=str(tmp_path), bucket_seconds=(0.01,),
                     batch_seconds=0.04, eval_batch_size=4))
  with tfds.testing.mock_data(num_examples=6):
    data = datasets.SpeechData.open(c.data, workdir=str(tmp_path), task='ctc',
                                    frames=lambda n: n // 2)
    assert data.spec.audio_key == 'speech' and data.builder.name == 'librispeech'
    source = data.source('test_clean')
    raw = [source[i]['text'] for i in range(len(source))]
    got = []
    for batch, texts in data.eval_batches('test_clean'):
      assert batch['audio'].dtype == np.int16
      got += texts
    assert sorted(got) == sorted(t.strip().lower() for t in raw)
    # Mock transcripts are longer than 47 samples of audio can carry: counted, not trained on.
    tok = tokenizer_lib.CharTokenizer('abcdefghijklmnopqrstuvwxyz ')
    index = data.index('test_clean', tok)
    assert index.skipped.get('too_many_tokens', 0) == len(source) - int(index.keep.sum())
  with pytest.raises(ValueError, match='no utterance labels'):
    datasets.SpeechData.open(c.data, workdir=str(tmp_path), task='classification',
                             frames=lambda n: n)


# -- decoding and metrics ------------------------------------------------------------------------

def test_greedy_ctc_merges_repeats_then_drops_blanks():
  ids = np.array([[1, 1, 0, 1, 2, 2, 0, 0, 3, 3]])
  mask = np.array([[True] * 8 + [False] * 2])
  assert [decoding.collapse(i[m]) for i, m in zip(ids, mask)] == [[1, 1, 2]]


def test_error_rates():
  rates = scoring.error_rates(['a b c d', 'e f'], ['a x c', ''])
  assert rates['wer'] == pytest.approx(4 / 6)  # 1 sub + 1 del, then 2 del
  assert scoring.error_rates(['abc'], ['abc']) == {'wer': 0.0, 'cer': 0.0}
  with pytest.raises(ValueError, match='as many hypotheses'):
    scoring.error_rates(['a'], [])


def test_classification_batches_carry_the_language(corpus):
  c = config_lib.base_config()
  c.data.update(dict(name='synthetic_speech/unit', domains_file=corpus.domains_file,
                     bucket_seconds=(2.0, 4.0), batch_seconds=8.0, eval_batch_size=4))
  data = datasets.SpeechData.open(c.data, workdir=corpus.root, task='classification',
                                  frames=lambda n: n // 640)
  assert data.num_classes == 2
  source = corpus.as_data_source(split='train')
  loader = data.train_loader(None, seed=0, num_batches=4)
  for step, batch in zip(range(4), loader):
    rows = loader.local_indices(step)
    assert batch['labels'].tolist() == [int(source[int(r)]['language']) for r in rows]
    assert 'label_mask' not in batch
