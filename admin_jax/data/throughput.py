"""Times the training input pipeline alone: `python -m admin_jax.bench --input --config=configs/X.py`.

It runs at the config's own shapes (`data.tokens_per_batch`, `data.max_len`) and `data.workers`,
on one process, with `data.spm_model` or --workdir's spm.model (trained there when absent).
Packing runs ahead of the consumer by up to `data.prefetch` windows per worker, so the windows
ready in those buffers are served first and timed not at all: the rate is the pipeline's steady
state, over the whole windows after them.
"""

import os
import tempfile
import time

import ml_collections
import numpy as np
from tqdm import tqdm

from admin_jax.data import pipeline
from admin_jax.data import tokenizer as tokenizer_lib


def measure(config: ml_collections.ConfigDict, workdir: str = '', timed_windows: int = 0) -> dict:
  """One JSON-ready record; `timed_windows` (0: three per worker) of a data shard are timed."""
  data = config.data
  parallel = max(1, data.workers)
  skipped_windows = (data.prefetch + 1) * parallel  # as many as can be packed before the first is served
  timed_windows = timed_windows or 3 * parallel
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = tokenizer_lib.load_or_train_tokenizer(config, workdir or tmp)
  start = time.perf_counter()
  batches = pipeline.train_iterator(config, tokenizer, seed=config.train.seed, process_index=0, process_count=1)
  first = next(batches)
  startup_seconds = time.perf_counter() - start
  windows_seen, position = 0, _window(batches)
  tokens = cells = timed = 0
  with tqdm(total=skipped_windows + timed_windows, unit='window', desc='input pipeline', leave=False) as progress:
    while windows_seen < skipped_windows + timed_windows:
      batch = next(batches)
      if _window(batches) != position:
        windows_seen, position = windows_seen + 1, _window(batches)
        progress.update(1)
        if windows_seen == skipped_windows:
          tokens = cells = timed = 0
          start = time.perf_counter()
      tokens += int(np.count_nonzero(batch['inputs']) + np.count_nonzero(batch['targets']))
      cells += batch['inputs'].size + batch['targets'].size
      timed += 1
  seconds = time.perf_counter() - start
  batches.close()
  return {'input_tokens_per_sec': tokens / seconds, 'padding_fraction': 1 - tokens / cells,
          'workers': data.workers, 'rows': first['inputs'].shape[0], 'max_len': first['inputs'].shape[1],
          'timed_batches': timed, 'timed_windows': timed_windows, 'startup_seconds': startup_seconds,
          'source': data.source, 'vocab_size': tokenizer.vocab_size, 'cpu_count': os.cpu_count(),
          'load_average_1min': os.getloadavg()[0]}


def _window(batches: pipeline.TrainIterator) -> tuple[int, int]:
  state = batches.get_state()['shards'][0]
  return state['epoch'], state['window']
