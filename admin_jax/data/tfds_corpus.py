"""Translation pairs from a prepared TensorFlow Datasets builder (e.g. WMT14).

Lives in its own module because importing TensorFlow costs seconds and
gigabytes; only runs with `data.source = 'tfds'` pay for it. Data is never
downloaded here: with many processes that would race, and training machines
are often offline, so an unprepared dataset is a UserError saying how to build it.
"""

from typing import Iterator

from absl import logging

from admin_jax.errors import UserError

_READ_BATCH = 4096  # Sentences per tf.data batch; one-by-one iteration is ~10x slower.


def stream_pairs(name: str, data_dir: str, split: str, src_lang: str,
                 tgt_lang: str) -> Iterator[tuple[str, str]]:
  """The (src_lang, tgt_lang) sentence pairs of `split` of TFDS dataset `name`, read as consumed;
  the dataset is checked before the first."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises several types for unknown names/configs.
    raise UserError(f'Unknown TFDS dataset {name!r}: {_first_line(e)}') from e
  keys = builder.info.supervised_keys
  if keys is None or sorted(keys) != sorted((src_lang, tgt_lang)):
    raise UserError(f'TFDS dataset {name} has languages {keys}, but data.src_lang/tgt_lang '
                    f'are {src_lang!r}/{tgt_lang!r}')
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except Exception as e:  # Unprepared data and bad split names raise several types.
    if not builder.is_prepared():
      raise UserError(f'TFDS dataset {name} is not prepared in {builder.data_dir}: run '
                      f'`tfds build {name}` (with --data_dir={data_dir or "<default>"}) '
                      'first') from e
    raise UserError(f'TFDS dataset {name} has no split {split!r} '
                    f'(splits: {", ".join(builder.info.splits)}): {_first_line(e)}') from e
  return _read(tfds.as_numpy(ds.batch(_READ_BATCH)), f'TFDS {name}[{split}]', src_lang, tgt_lang)


def _read(batches, what: str, src_lang: str, tgt_lang: str) -> Iterator[tuple[str, str]]:
  count = 0
  for batch in batches:
    for s, t in zip(batch[src_lang], batch[tgt_lang]):
      count += 1
      yield s.decode('utf-8').strip(), t.decode('utf-8').strip()
  if not count:
    raise UserError(f'Empty corpus: {what} has no examples')
  logging.info('Read %d pairs from %s', count, what)


def _first_line(e: Exception) -> str:
  return str(e).strip().partition('\n')[0]
