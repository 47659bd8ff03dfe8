"""Parallel corpora as lists of (source, target) sentence pairs.

Everything downstream (tokenizer training, packing, BLEU) sees the same
in-memory pairs whichever source they came from, so a bad corpus is caught
here, once, with a message that names the file and line to fix.
"""

import gzip
import itertools
import lzma
from pathlib import Path
from typing import Iterator

import ml_collections

from admin_jax.data import synthetic
from admin_jax.errors import UserError

SPLITS = ('train', 'valid', 'test')
_OPENERS = {'.gz': gzip.open, '.xz': lzma.open}


def read_lines(path: str | Path) -> list[str]:
  """Returns the lines of a UTF-8 text file, transparently decompressing .gz/.xz.

  Lines are split on '\\n' only (not str.splitlines, which also breaks on
  U+2028 and friends and would misalign parallel files) and stripped.
  """
  path = Path(path)
  if not path.is_file():
    raise UserError(f'No such file: {path}')
  return list(_stream_lines(path))


def load_pairs(config: ml_collections.ConfigDict,
               split: str) -> list[tuple[str, str]]:
  """Returns the (source, target) pairs of `split` ('train', 'valid' or 'test')."""
  return list(stream_pairs(config, split))


def stream_pairs(config: ml_collections.ConfigDict, split: str) -> Iterator[tuple[str, str]]:
  """The pairs of `split` one after another: text files and TFDS are read as they are consumed, so
  a consumer that keeps less than the strings (tokenizer training's sample, token arrays) never
  holds the whole corpus as Python strings."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  data = config.data
  if data.source == 'synthetic':
    return iter(synthetic.load_split(split, data.synthetic_train_size, data.synthetic_eval_size))
  if data.source == 'text':
    return _text_pairs(data[split], data.src_lang, data.tgt_lang)
  if data.source == 'tfds':
    from admin_jax.data import tfds_corpus  # Keeps TensorFlow out of the other paths.
    return tfds_corpus.stream_pairs(data.tfds_name, data.tfds_data_dir, data[split],
                                    data.src_lang, data.tgt_lang)
  raise UserError(f"data.source must be 'synthetic', 'text' or 'tfds', got {data.source!r}")


def describe(config: ml_collections.ConfigDict, split: str) -> dict:
  """What identifies `split`'s pairs: the config keys that choose them and, for text files, each
  file's path, size and modification time, so that an edited file is a different corpus."""
  data = config.data
  keys = {'text': ('train', 'src_lang', 'tgt_lang'), 'tfds': ('tfds_name', 'tfds_data_dir', 'src_lang', 'tgt_lang'),
          'synthetic': ('synthetic_train_size', 'synthetic_eval_size')}[data.source]
  described = {'source': data.source, 'split': data[split] if data.source != 'synthetic' else split,
               **{k: data[k] for k in keys}}
  if data.source == 'text':
    for lang in (data.src_lang, data.tgt_lang):
      path = _find(data[split], lang)
      described[lang] = [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] if path else None
  return described


def _text_pairs(prefix: str, src_lang: str, tgt_lang: str) -> Iterator[tuple[str, str]]:
  """PREFIX.SRC and PREFIX.TGT (each possibly .gz/.xz), aligned line by line; the files are checked
  before the first pair, their alignment as they are read."""
  if not prefix:
    raise UserError('Empty corpus prefix: set data.train/valid/test to a path prefix')
  src_path, tgt_path = _find(prefix, src_lang), _find(prefix, tgt_lang)
  if src_path is None and tgt_path is None:
    raise UserError(f'No corpus files match prefix {prefix}: expected {prefix}.{src_lang} and '
                    f'{prefix}.{tgt_lang} (optionally .gz or .xz)')
  for path, lang in ((src_path, src_lang), (tgt_path, tgt_lang)):
    if path is None:
      raise UserError(f'Missing corpus file {prefix}.{lang} (nor .gz/.xz) for prefix {prefix}')
  return _aligned(src_path, tgt_path)


def _aligned(src_path: Path, tgt_path: Path) -> Iterator[tuple[str, str]]:
  src, tgt = _stream_lines(src_path), _stream_lines(tgt_path)
  count = 0
  for count, pair in enumerate(itertools.zip_longest(src, tgt), 1):
    if None in pair:
      src_count, tgt_count = (count - 1 + (pair[0] is not None) + sum(1 for _ in src),
                              count - 1 + (pair[1] is not None) + sum(1 for _ in tgt))
      raise UserError(f'Line counts differ: {src_path} has {src_count} lines, {tgt_path} has {tgt_count}')
    yield pair
  if not count:
    raise UserError(f'Empty corpus: {src_path} and {tgt_path} have no lines')


def _stream_lines(path: Path) -> Iterator[str]:
  """read_lines' lines one at a time; a bad byte is named by its line."""
  opener = _OPENERS.get(path.suffix, open)
  number = 0
  try:
    with opener(path, 'rb') as f:
      for number, line in enumerate(f, 1):
        yield line.decode('utf-8').strip()
  except (OSError, EOFError, lzma.LZMAError) as e:
    raise UserError(f'Cannot read {path}: {e}') from e
  except UnicodeDecodeError as e:
    raise UserError(f'{path}: invalid UTF-8 on line {number}') from e


def _find(prefix: str, lang: str) -> Path | None:
  """The first existing of PREFIX.LANG, PREFIX.LANG.gz, PREFIX.LANG.xz."""
  for suffix in ('', *_OPENERS):
    path = Path(f'{prefix}.{lang}{suffix}')
    if path.is_file():
      return path
  return None
