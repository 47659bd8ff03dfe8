"""Measures the training input pipeline alone, to tell whether it can keep up with the model.

  python -m admin_jax.data.benchmark                     # synthetic corpus
  python -m admin_jax.data.benchmark --text_prefix=/path/train --config.data.src_lang=de ...

Prints non-padding (source + target) tokens per second after the first batch,
so tokenizer training and pipeline start-up are not counted.
"""

from pathlib import Path
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from admin_jax.data import pipeline
from admin_jax.data import tokenizer

_CONFIG = config_flags.DEFINE_config_file(
    'config', str(Path(__file__).resolve().parents[2] / 'configs' / 'default.py'),
    'Config file; data.* is used.')
_TEXT_PREFIX = flags.DEFINE_string(
    'text_prefix', '', 'Benchmark this text corpus (PREFIX.src/PREFIX.tgt) instead of synthetic.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 50, 'Batches to time.')
_WORKDIR = flags.DEFINE_string(
    'workdir', '', 'Where to find or train spm.model; default a temporary directory.')


def main(argv):
  del argv
  config = _CONFIG.value
  if _TEXT_PREFIX.value:
    config.data.source, config.data.train = 'text', _TEXT_PREFIX.value
  else:
    config.data.source = 'synthetic'
  with tempfile.TemporaryDirectory() as tmp:
    tok = tokenizer.load_or_train_tokenizer(config, _WORKDIR.value or tmp)
  batches = pipeline.train_iterator(config, tok, seed=0, process_index=0, process_count=1)
  first = next(batches)
  tokens, start = 0, time.perf_counter()
  for _ in range(_NUM_BATCHES.value):
    batch = next(batches)
    tokens += int(np.count_nonzero(batch['inputs']) + np.count_nonzero(batch['targets']))
  seconds = time.perf_counter() - start
  batches.close()
  print(f'{config.data.source}: {_NUM_BATCHES.value} batches of {first["inputs"].shape}, '
        f'{tokens} tokens in {seconds:.2f}s: {tokens / seconds:,.0f} tokens/s '
        f'(non-pad source+target, vocab {tok.vocab_size})')


if __name__ == '__main__':
  app.run(main)
