"""Input pipeline: corpora, tokenizer, packing, sharding, resumption, eval batches."""

import collections
import gzip
import json
import lzma
from pathlib import Path
import time

from absl import flags
import grain
import numpy as np
import pytest

from admin_jax.data import corpora
from admin_jax.data import packing
from admin_jax.data import pipeline
from admin_jax.data import synthetic
from admin_jax.data import tokenized
from admin_jax.data import tokenizer
from admin_jax.data.tokenizer import EOS_ID, PAD_ID
from admin_jax.errors import UserError
from configs import default

SHARED_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'
MULTI30K = SHARED_DATA / 'multi30k'


def _synthetic_config(**data):
  config = default.get_config()
  config.data.update(dict(source='synthetic', synthetic_train_size=1000, synthetic_eval_size=50,
                          vocab_size=1000, max_len=64, tokens_per_batch=64 * 16, prefetch=2))
  config.data.update(data)
  return config


def _multi30k_config(**data):
  if not MULTI30K.is_dir():
    pytest.skip(f'shared corpora not found at {SHARED_DATA}')
  config = default.get_config()
  config.data.update(dict(source='text', train=str(MULTI30K / 'train'),
                          valid=str(MULTI30K / 'val'), test=str(MULTI30K / 'test_2016_flickr'),
                          vocab_size=8000, max_len=128, tokens_per_batch=128 * 256))
  config.data.update(data)
  return config


@pytest.fixture(scope='module')
def synthetic_tokenizer(tmp_path_factory):
  return tokenizer.load_or_train_tokenizer(_synthetic_config(), str(tmp_path_factory.mktemp('syn')))


@pytest.fixture(scope='module')
def multi30k_tokenizer(tmp_path_factory):
  config = _multi30k_config()
  start = time.time()
  tok = tokenizer.load_or_train_tokenizer(config, str(tmp_path_factory.mktemp('m30k')))
  print(f'SentencePiece (vocab {tok.vocab_size}) trained on Multi30k in {time.time() - start:.1f}s')
  return tok


def _iterator(config, tok, seed=0, process_index=0, process_count=1):
  return pipeline.train_iterator(config, tok, seed=seed, process_index=process_index,
                                 process_count=process_count)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _segments(batch, feature):
  """Token-id tuples of every packed sentence of `feature`, keyed by (row, segment)."""
  out = {}
  for r, (tokens, segs) in enumerate(zip(batch[feature], batch[feature + '_segmentation'])):
    for s in np.unique(segs[segs > 0]):
      out[r, s] = tuple(tokens[segs == s].tolist())
  return out


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# Corpora.


def _write(path, text, opener=open):
  with opener(path, 'wb') as f:
    f.write(text.encode('utf-8') if isinstance(text, str) else text)


def test_text_corpus_reads_plain_gz_and_xz(tmp_path):
  _write(tmp_path / 'a.en', 'hello world\nsecond line\n')
  _write(tmp_path / 'a.de.gz', 'hallo welt\nzweite zeile\n', gzip.open)
  _write(tmp_path / 'b.en.xz', 'x\u2028y\n', lzma.open)  # U+2028 must not split the line.
  _write(tmp_path / 'b.de', 'z\n')
  config = default.get_config()
  config.data.update(dict(source='text', train=str(tmp_path / 'a'), valid=str(tmp_path / 'b')))
  assert corpora.load_pairs(config, 'train') == [('hello world', 'hallo welt'),
                                                 ('second line', 'zweite zeile')]
  assert corpora.load_pairs(config, 'valid') == [('x\u2028y', 'z')]
  assert corpora.read_lines(tmp_path / 'a.de.gz') == ['hallo welt', 'zweite zeile']


@pytest.mark.parametrize('files, expected', [
    ({'c.en': 'a\n'}, r'Missing corpus file .*c\.de'),
    ({'c.en': 'a\nb\n', 'c.de.xz': 'a\n'}, r'c\.en has 2 lines, .*c\.de\.xz has 1'),
    ({'c.en': '', 'c.de': ''}, r'Empty corpus: .*c\.en and .*c\.de'),
    ({'c.en': 'ok\nok\n\xff bad\n', 'c.de': 'a\nb\nc\n'}, r'c\.en: invalid UTF-8 on line 3'),
    ({'other.en': 'a\n'}, r'No corpus files match prefix .*c: expected .*c\.en and .*c\.de'),
])
def test_bad_text_corpus_is_a_user_error(tmp_path, files, expected):
  for name, text in files.items():
    data = text.encode('latin-1') if '\xff' in text else text.encode('utf-8')
    _write(tmp_path / name, data, lzma.open if name.endswith('.xz') else open)
  config = default.get_config()
  config.data.update(dict(source='text', train=str(tmp_path / 'c')))
  with pytest.raises(UserError, match=expected) as e:
    corpora.load_pairs(config, 'train')
  assert '\n' not in str(e.value)


def test_read_lines_missing_file_names_it(tmp_path):
  with pytest.raises(UserError, match=r'No such file: .*nope\.txt'):
    corpora.read_lines(tmp_path / 'nope.txt')


def test_synthetic_corpus_is_deterministic_and_splits_are_disjoint():
  config = _synthetic_config()
  splits = {s: corpora.load_pairs(config, s) for s in corpora.SPLITS}
  synthetic._splits.cache_clear()  # Regenerate from scratch, not from the cache.
  assert {s: corpora.load_pairs(config, s) for s in corpora.SPLITS} == splits
  assert [len(splits[s]) for s in corpora.SPLITS] == [1000, 50, 50]
  sources = [set(src for src, _ in splits[s]) for s in corpora.SPLITS]
  assert all(not (a & b) for i, a in enumerate(sources) for b in sources[i + 1:])
  assert sum(map(len, sources)) == 1100  # No duplicates within a split either.
  pairs = splits['train']
  assert all(3 <= len(src.split()) <= 20 for src, _ in pairs)
  assert not any(src == tgt for src, tgt in pairs)
  # SVO -> SOV: the source verb (-r) is rarely last, the target verb (-m/-mi) always is.
  assert sum(src.split()[-1].endswith('r') for src, _ in pairs) < 0.1 * len(pairs)
  assert all(tgt.split()[-1].endswith(('m', 'mi')) for _, tgt in pairs)
  # Agreement: target determiners carry gender/number suffixes absent from the source.
  assert {w[2:] for _, tgt in pairs for w in tgt.split()[:1]} <= {'la', 'las', 'ri', 'ris',
                                                                  'mo', 'mos'}


def test_synthetic_generation_is_fast():
  synthetic._splits.cache_clear()
  start = time.time()
  synthetic.load_split('train', 20000, 500)
  assert time.time() - start < 2


# Tokenizer.


def test_tokenizer_round_trips_multi30k(multi30k_tokenizer):
  lines = corpora.read_lines(MULTI30K / 'val.de.xz') + corpora.read_lines(MULTI30K / 'val.en.xz')
  normal = [s for s in lines if ' '.join(s.split()) == s]  # SentencePiece folds repeated spaces.
  assert len(normal) > 0.95 * len(lines)
  for s in normal:
    ids = multi30k_tokenizer.encode(s)
    assert ids[-1] == EOS_ID and PAD_ID not in ids
    assert multi30k_tokenizer.decode(ids + [PAD_ID, 5, 6]) == s


def test_pretokenized_tokenizer_keeps_bpe_units(tmp_path):
  bpe = SHARED_DATA / 'iwslt14-de-en' / 'bpe10k'
  if not bpe.is_dir():
    pytest.skip(f'shared corpora not found at {SHARED_DATA}')
  config = default.get_config()
  config.data.update(dict(source='text', train=str(bpe / 'valid'), src_lang='de', tgt_lang='en',
                          pretokenized=True, vocab_size=32000))
  tok = tokenizer.load_or_train_tokenizer(config, str(tmp_path))
  lines = corpora.read_lines(bpe / 'test.en.xz')[:500]
  for s in lines:
    ids = tok.encode(s)
    if 2 not in ids:  # Units never seen in training become UNK.
      assert tok.decode(ids) == s
      assert len(ids) == len(s.split()) + 1  # One id per BPE unit.


def test_tokenizer_training_names_a_misaligned_corpus(tmp_path):
  """SentencePiece reads the corpus as a stream; a bad file is still the corpus's one-line error."""
  _write(tmp_path / 'c.en', 'a b\nc d\ne\n')
  _write(tmp_path / 'c.de', 'x\ny\n')
  config = default.get_config()
  config.data.update(dict(source='text', train=str(tmp_path / 'c'), vocab_size=100))
  with pytest.raises(UserError, match=r'^Line counts differ: .*c\.en has 3 lines, .*c\.de has 2$'):
    tokenizer.load_or_train_tokenizer(config, str(tmp_path / 'workdir'))


def test_tokenizer_is_reused_from_workdir(tmp_path, synthetic_tokenizer):
  config = _synthetic_config()
  first = tokenizer.load_or_train_tokenizer(config, str(tmp_path))
  config.data.vocab_size = 500  # Ignored on resume: the workdir's model wins.
  again = tokenizer.load_or_train_tokenizer(config, str(tmp_path))
  assert again.vocab_size == first.vocab_size == synthetic_tokenizer.vocab_size
  assert [p.name for p in tmp_path.iterdir()] == ['spm.model']  # No temporary file left.


# Training batches.


def test_one_epoch_over_two_processes_yields_every_pair_once(synthetic_tokenizer):
  config = _synthetic_config()
  expected = collections.Counter(
      (tuple(synthetic_tokenizer.encode(s)), tuple(synthetic_tokenizer.encode(t)))
      for s, t in corpora.load_pairs(config, 'train'))
  seen = collections.Counter()
  for index in range(2):
    it = _iterator(config, synthetic_tokenizer, process_index=index, process_count=2)
    for batch in it.one_epoch():
      assert batch['inputs'].shape == (8, 64)  # 16 global rows over 2 processes.
      inputs, targets = _segments(batch, 'inputs'), _segments(batch, 'targets')
      assert inputs.keys() == targets.keys()
      seen.update((inputs[k], targets[k]) for k in inputs)
    assert it.num_dropped == 0 and it.epoch == 1
    it.close()
  assert seen == expected


def test_too_long_pairs_are_dropped_and_counted(synthetic_tokenizer):
  config = _synthetic_config(max_len=16)
  pairs = corpora.load_pairs(config, 'train')
  too_long = sum(max(len(synthetic_tokenizer.encode(s)), len(synthetic_tokenizer.encode(t))) > 16
                 for s, t in pairs)
  assert 0 < too_long < len(pairs)
  it = _iterator(config, synthetic_tokenizer)
  packed = sum(int(b['inputs_segmentation'].max(axis=1).sum()) for b in it.one_epoch())
  assert it.num_dropped == too_long and packed == len(pairs) - too_long
  it.close()


def test_no_pair_fitting_is_a_user_error(synthetic_tokenizer):
  with pytest.raises(UserError, match='No training pair fits data.max_len'):
    next(_iterator(_synthetic_config(max_len=3), synthetic_tokenizer))


def test_packed_batch_invariants(synthetic_tokenizer):
  it = _iterator(_synthetic_config(), synthetic_tokenizer)
  for batch in _take(it, 3):
    assert all(v.dtype == np.int32 and v.shape == (16, 64) for v in batch.values())
    for feature in ('inputs', 'targets'):
      tokens, segs, pos = (batch[feature + s] for s in ('', '_segmentation', '_position'))
      assert np.all((tokens == PAD_ID) == (segs == 0)) and np.all(pos[segs == 0] == 0)
      for row in range(len(tokens)):
        ids = np.unique(segs[row][segs[row] > 0])
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
        for s in ids:
          where = np.flatnonzero(segs[row] == s)
          np.testing.assert_array_equal(where, np.arange(where[0], where[-1] + 1))
          np.testing.assert_array_equal(pos[row, where], np.arange(len(where)))
          assert tokens[row, where[-1]] == EOS_ID and EOS_ID not in tokens[row, where[:-1]]
    np.testing.assert_array_equal(batch['inputs_segmentation'].max(axis=1),
                                  batch['targets_segmentation'].max(axis=1))
  it.close()


def test_same_seed_same_batches_other_seed_other_order(synthetic_tokenizer):
  config = _synthetic_config()
  a, b, c = (_iterator(config, synthetic_tokenizer, seed=s) for s in (7, 7, 8))
  first = _take(a, 3)
  _assert_batches_equal(first, _take(b, 3))
  assert not np.array_equal(first[0]['inputs'], next(c)['inputs'])
  for _ in a.one_epoch():  # Each epoch is reshuffled.
    pass
  assert not np.array_equal(first[0]['inputs'], next(a)['inputs'])
  for it in (a, b, c):
    it.close()


@pytest.mark.parametrize('k', [2, 5, 9])  # 5 batches per epoch: within, at and past its end.
def test_resume_from_state_continues_identically(synthetic_tokenizer, k):
  config = _synthetic_config(synthetic_train_size=300)  # A few batches per epoch.
  it = _iterator(config, synthetic_tokenizer, seed=3)
  _take(it, k)
  assert it.epoch == (k - 1) // 5
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 6)
  resumed = _iterator(config, synthetic_tokenizer, seed=3)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 6), expected)
  assert resumed.epoch == it.epoch and resumed.num_dropped == it.num_dropped
  it.close()
  resumed.close()


def test_workers_give_the_same_batches_and_resume_exactly(synthetic_tokenizer):
  """data.workers packs in Grain worker processes: the same batches as without, for 3 epochs, and a
  resume with workers from a state saved mid-epoch gives the same next batches."""
  flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags; jobs parse them in cli.run
  config = _synthetic_config(synthetic_train_size=300)
  reference = _iterator(config, synthetic_tokenizer, seed=3)
  expected = [b for _ in range(3) for b in reference.one_epoch()]
  per_epoch = len(expected) // 3
  reference.close()
  config.data.workers = 2
  with_workers = _iterator(config, synthetic_tokenizer, seed=3)
  served = _take(with_workers, per_epoch + 2)  # mid-epoch 1
  state = json.loads(json.dumps(with_workers.get_state()))
  served += _take(with_workers, 2 * per_epoch - 2)
  _assert_batches_equal(served, expected)
  assert with_workers.epoch == 2
  with_workers.close()
  resumed = _iterator(config, synthetic_tokenizer, seed=3)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, per_epoch), expected[per_epoch + 2:2 * per_epoch + 2])
  assert resumed.epoch == 2
  resumed.close()


def test_token_cache_is_written_once_and_read_back(synthetic_tokenizer, tmp_path, monkeypatch):
  cache = tmp_path / 'cache'
  config = _synthetic_config(synthetic_train_size=300, token_cache=str(cache))
  first = _iterator(config, synthetic_tokenizer, seed=3)
  expected = _take(first, 4)
  first.close()
  assert [p.name.startswith('tokens-') for p in cache.iterdir()] == [True]
  monkeypatch.setattr(tokenized, 'tokenize_pairs', lambda *args: pytest.fail('tokenized again'))
  again = _iterator(config, synthetic_tokenizer, seed=3)
  _assert_batches_equal(_take(again, 4), expected)
  again.close()
  monkeypatch.undo()
  config.data.synthetic_train_size = 301  # another corpus: other arrays, beside the first
  _iterator(config, synthetic_tokenizer, seed=3).close()
  assert len(list(cache.iterdir())) == 2


def test_an_edited_text_corpus_is_another_corpus_for_the_cache(tmp_path):
  _write(tmp_path / 'a.en', 'hello world\n')
  _write(tmp_path / 'a.de', 'hallo welt\n')
  config = default.get_config()
  config.data.update(dict(source='text', train=str(tmp_path / 'a')))
  before = corpora.describe(config, 'train')
  _write(tmp_path / 'a.de', 'hallo, welt\n')
  assert corpora.describe(config, 'train') != before


def test_a_state_from_the_pipeline_before_windows_starts_its_epoch_over(synthetic_tokenizer):
  config = _synthetic_config(synthetic_train_size=300)
  fresh = _iterator(config, synthetic_tokenizer, seed=3)
  list(fresh.one_epoch())
  expected = next(fresh)
  fresh.close()
  resumed = _iterator(config, synthetic_tokenizer, seed=3)
  resumed.set_state({'shards': [{'epoch': 1, 'packed_in_epoch': 40, 'dropped': 0, 'shard': [0, 1], 'grain': {}}]})
  _assert_batches_equal([next(resumed)], [expected])
  assert resumed.epoch == 1
  resumed.close()


def test_rows_must_divide_over_processes(synthetic_tokenizer):
  with pytest.raises(UserError, match='multiple of the 3 data shards'):
    _iterator(_synthetic_config(), synthetic_tokenizer, process_count=3)


def _grain_first_fit_padding(token_pairs, rows, max_len):
  """The padding fraction of Grain's FirstFitPackIterDataset over `rows` bins (the packer before
  admin_jax/data/packing.py) on the same pairs in the same order, every batch counted."""
  examples = [{k: np.asarray(ids, np.int32) for k, ids in zip(packing.FEATURES, pair)} for pair in token_pairs]
  packed = grain.experimental.FirstFitPackIterDataset(
      grain.MapDataset.source(examples).to_iter_dataset(), length_struct={k: max_len for k in packing.FEATURES},
      num_packing_bins=rows, seed=0)
  batches = list(packed.batch(rows))
  tokens = sum(len(ids) for pair in token_pairs for ids in pair)
  return 1 - tokens / (2 * rows * max_len * len(batches))


def test_packing_keeps_every_pair_whole_and_pads_less_than_first_fit(multi30k_tokenizer):
  """Every pair of a window lands whole in one row on both sides, within max_len, and the padding is
  no more than Grain's first-fit packer's on the same pairs (the window's last batch counted)."""
  rows, max_len, count = 64, 64, 4000
  pairs = corpora.load_pairs(_multi30k_config(), 'train')[:count]
  corpus = tokenized.tokenize_pairs(pairs, multi30k_tokenizer)
  lengths = corpus.lengths()
  order = np.random.default_rng(0).permutation(count)
  layout = packing.pack_window(order, lengths, max_len=max_len, rows=rows, rng=np.random.default_rng(1))
  fits = (lengths['inputs'] <= max_len) & (lengths['targets'] <= max_len)
  assert layout.dropped == count - fits.sum() and sorted(layout.pairs) == sorted(np.flatnonzero(fits))
  expected = {k: {i: tuple(multi30k_tokenizer.encode(pairs[i][side])) for i in np.flatnonzero(fits)}
              for side, k in enumerate(packing.FEATURES)}
  seen = 0
  for b in range(layout.num_batches):
    batch = packing.materialize(layout, b, corpus.ids, corpus.offsets, rows=rows, max_len=max_len)
    lo, hi = layout.bounds[b], layout.bounds[b + 1]
    for i, row, segment in zip(layout.pairs[lo:hi], layout.rows[lo:hi], layout.segments[lo:hi]):
      for k in packing.FEATURES:
        assert tuple(batch[k][row][batch[k + '_segmentation'][row] == segment]) == expected[k][i]
    seen += hi - lo
  assert seen == fits.sum()
  ours = 1 - sum(lengths[k][layout.pairs].sum() for k in packing.FEATURES) / (2 * rows * max_len * layout.num_batches)
  grains = _grain_first_fit_padding([(expected['inputs'][i], expected['targets'][i]) for i in order if fits[i]],
                                    rows, max_len)
  print(f'padding of {fits.sum()} Multi30k pairs in [{rows}, {max_len}] batches: {ours:.1%} first-fit '
        f'decreasing over the window, {grains:.1%} Grain\'s first-fit over {rows} bins')
  assert ours <= grains


def test_packing_multi30k_is_dense(multi30k_tokenizer):
  it = _iterator(_multi30k_config(), multi30k_tokenizer)
  batches = list(it.one_epoch())
  it.close()
  def density(bs):
    return sum(np.count_nonzero(b['inputs']) + np.count_nonzero(b['targets']) for b in bs) / (
        2 * sum(b['inputs'].size for b in bs))
  full, whole = density(batches[:-1]), density(batches)
  print(f'Multi30k packing: {full:.1%} non-padding in full batches, {whole:.1%} over the epoch '
        f'({len(batches)} batches of {batches[0]["inputs"].shape})')
  assert full >= 0.9


# Eval batches.


def test_eval_batches_cover_every_sentence_once(synthetic_tokenizer):
  pairs = corpora.load_pairs(_synthetic_config(), 'valid')[:45]
  sources, targets = [s for s, _ in pairs], [t for _, t in pairs]
  sources[3] = ' '.join([sources[3]] * 20)  # Longer than max_len: truncated, EOS kept.
  seen = []
  for batch, indices in pipeline.eval_batches(sources, synthetic_tokenizer, batch_size=8,
                                              max_len=64, targets=targets):
    assert indices.shape == (8,) and set(batch) == {
        'inputs', 'inputs_segmentation', 'inputs_position',
        'targets', 'targets_segmentation', 'targets_position'}
    for row, i in enumerate(indices):
      if i < 0:
        assert not batch['inputs'][row].any() and not batch['targets'][row].any()
        continue
      seen.append(i)
      ids = [t for t in batch['inputs'][row].tolist() if t != PAD_ID]
      expected = synthetic_tokenizer.encode(sources[i])
      assert ids == (expected if len(expected) <= 64 else expected[:63] + [EOS_ID])
      assert synthetic_tokenizer.decode(batch['targets'][row]) == targets[i]
      n = len(ids)
      np.testing.assert_array_equal(batch['inputs_position'][row, :n], np.arange(n))
      assert batch['inputs_segmentation'][row].sum() == n
  assert sorted(seen) == list(range(45))
  assert list(indices[5:]) == [-1, -1, -1]  # 45 = 5 * 8 + 5: the last batch is padded.


# TFDS.


def test_tfds_source_reads_supervised_pairs():
  tfds = pytest.importorskip('tensorflow_datasets')
  config = default.get_config()  # wmt14_translate/de-en, en -> de.
  with tfds.testing.mock_data(num_examples=7):
    pairs = corpora.load_pairs(config, 'valid')
    assert len(pairs) == 7 and all(isinstance(s, str) and isinstance(t, str) for s, t in pairs)
    config.data.src_lang = 'fr'
    with pytest.raises(UserError, match=r"has languages \('de', 'en'\).*'fr'/'de'"):
      corpora.load_pairs(config, 'valid')


def test_tfds_unprepared_dataset_is_a_user_error(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  config = default.get_config()
  config.data.tfds_data_dir = str(tmp_path)
  with pytest.raises(UserError, match='is not prepared'):
    corpora.load_pairs(config, 'train')


def test_bench_input_prints_the_pipeline_rate_at_the_config_shapes(tmp_path):
  import subprocess
  import sys
  repo = Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, '-m', 'admin_jax.bench', '--input', '--config=configs/demo.py',
                        f'--workdir={tmp_path}', '--config.data.synthetic_train_size=2000',
                        '--config.data.vocab_size=300', '--config.data.tokens_per_batch=512',
                        '--config.data.max_len=32', '--config.data.prefetch=1'],
                       cwd=repo, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  record = json.loads(out.stdout.strip().splitlines()[-1])
  assert (record['rows'], record['max_len'], record['workers']) == (16, 32, 0)
  assert record['input_tokens_per_sec'] > 0 and 0 <= record['padding_fraction'] < 0.5
  assert record['timed_batches'] > 0
