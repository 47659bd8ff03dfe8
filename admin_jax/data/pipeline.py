"""Training batches packed to a token budget, and padded batches for evaluation.

Training packs several sentence pairs into each row (admin_jax/data/packing.py) so that a batch
spends its compute on tokens, not padding, and a fixed [rows, max_len] shape means one
compilation. The corpus is tokenized once, at start (admin_jax/data/tokenized.py); packing
decisions take lengths only, in `data.workers` worker processes (Grain's `mp_prefetch`) or, with
none, in a thread of the training process.
"""

import math
from typing import Iterator

from absl import logging
import grain
import ml_collections
import numpy as np

from admin_jax.data import corpora
from admin_jax.data import packing
from admin_jax.data import tokenized
from admin_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from admin_jax.errors import UserError

Batch = packing.Batch
# Batches' worth of pairs packed together. Bigger windows pack tighter (the window's last batch
# is part empty, and sorting has more pairs to fill gaps with) but take longer to the first batch.
WINDOW_BATCHES = 64
_ENDLESS = 1 << 40  # windows in a stream's Grain dataset: far more than any run reads


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class WindowPacker:
  """Packs window g of a shard's endless sequence of windows, epoch after epoch: Grain maps it.

  Epoch e reshuffles the global order with a seed derived from (seed, e); shard s takes every
  shard_count-th pair of that order from the s-th on, and cuts its pairs into windows of
  `window_pairs`. Windows never cross an epoch, so epochs stay exact. It holds the lengths only,
  so worker processes receive it cheaply.
  """

  def __init__(self, lengths: dict[str, np.ndarray], *, seed: int, shard: int, shards: int, max_len: int,
               rows: int, window_pairs: int):
    self.lengths = lengths
    self.seed, self.shard, self.shards = seed, shard, shards
    self.max_len, self.rows, self.window_pairs = max_len, rows, window_pairs
    self.shard_size = len(range(shard, len(lengths[packing.FEATURES[0]]), shards))
    self.windows_per_epoch = math.ceil(self.shard_size / window_pairs)
    self._order = (-1, None)  # (epoch, this shard's pairs in that epoch's order): one epoch cached

  def __getstate__(self) -> dict:
    return {**self.__dict__, '_order': (-1, None)}  # the cached order stays out of the workers' pickle

  def __call__(self, index: int) -> tuple[int, int, packing.WindowLayout]:
    """(epoch, window within it, layout) of window `index` of the endless sequence."""
    epoch, window = divmod(index, self.windows_per_epoch)
    if self._order[0] != epoch:
      num_pairs = len(self.lengths[packing.FEATURES[0]])
      self._order = (epoch, np.random.default_rng(_epoch_seed(self.seed, epoch)).permutation(num_pairs)[
          self.shard::self.shards])
    pairs = self._order[1][window * self.window_pairs:(window + 1) * self.window_pairs]
    rng = np.random.default_rng([_epoch_seed(self.seed, epoch), window])
    return epoch, window, packing.pack_window(pairs, self.lengths, max_len=self.max_len, rows=self.rows, rng=rng)


class ShardStream:
  """Endless packed batches, epoch after epoch, from one data shard.

  The position is (epoch, window, batch within the window): a resume packs that window again
  and skips the batches already served, so the state is small and independent of the workers.
  The last batch of each window is topped up with empty rows rather than mixed with the next
  window, so epochs stay exact. Pairs too long for max_len are counted as they are packed.
  """

  def __init__(self, packer: WindowPacker, corpus: tokenized.TokenizedPairs, *, workers: int, prefetch: int):
    self._packer = packer
    self._corpus = corpus
    self._workers, self._prefetch = workers, prefetch
    self._epoch = 0
    self._packed_in_epoch = 0  # Pairs yielded so far in this epoch.
    self._dropped_in_epoch = 0  # Pairs dropped for length in this epoch's windows before the current one.
    self._dropped = 0  # Pairs dropped for length in completed epochs.
    self._window, self._batch = 0, 0  # the position of the next batch
    self._layout = None  # the current window's, once packing has started
    self._windows = None

  @property
  def epoch(self) -> int:
    """The epoch of the last batch yielded (0 before the first)."""
    return self._epoch

  @property
  def shard(self) -> tuple[int, int]:
    """(index, count) of this stream's data shard."""
    return self._packer.shard, self._packer.shards

  @property
  def num_dropped(self) -> int:
    """Pairs this shard dropped for being longer than max_len, over completed epochs."""
    return self._dropped

  def __iter__(self) -> 'ShardStream':
    return self

  def __next__(self) -> Batch:
    self._start()
    while self._batch >= self._layout.num_batches:
      self._load_next_window()
    return self._take()

  def one_epoch(self) -> Iterator[Batch]:
    """Yields the rest of the current epoch, then stops at the start of the next."""
    self._start()
    epoch = self._epoch
    while True:
      if self._batch < self._layout.num_batches:
        yield self._take()
        continue
      self._load_next_window()
      if self._epoch != epoch:
        return

  def get_state(self) -> dict:
    """A JSON-serialisable position: set_state() on a fresh iterator resumes exactly here."""
    return {'epoch': self._epoch, 'window': self._window, 'batch': self._batch,
            'packed_in_epoch': self._packed_in_epoch, 'dropped_in_epoch': self._dropped_in_epoch,
            'dropped': self._dropped, 'shard': list(self.shard)}

  def set_state(self, state: dict) -> None:
    if tuple(state['shard']) != self.shard:
      raise UserError(f'data iterator state is for shard {state["shard"][0]} of {state["shard"][1]}, '
                      f'not {self.shard[0]} of {self.shard[1]}: resume with the same data.shards')
    if 'window' not in state:  # saved by the pipeline before windows, which packed other batches
      logging.warning('The data iterator state is from an earlier input pipeline: epoch %d starts over', state['epoch'])
      state = {**state, 'window': 0, 'batch': 0, 'packed_in_epoch': 0, 'dropped_in_epoch': 0}
    if self._layout is None or (state['epoch'], state['window']) != (self._epoch, self._window):
      self.close()  # else the window is at hand and packing goes on
      self._layout = self._windows = None
    self._epoch, self._window, self._batch = state['epoch'], state['window'], state['batch']
    self._packed_in_epoch = state['packed_in_epoch']
    self._dropped_in_epoch = state['dropped_in_epoch']
    self._dropped = state['dropped']

  def close(self) -> None:
    """Stops the packing thread or worker processes."""
    if self._windows is not None:
      self._windows.close()

  def _start(self) -> None:
    """Starts packing at the current position (at the first batch, or after set_state) and loads its window."""
    if self._layout is not None:
      return
    windows = (grain.MapDataset.range(self._epoch * self._packer.windows_per_epoch + self._window, _ENDLESS)
               .map(self._packer).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    if self._workers:
      windows = windows.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers,
                                                                 per_worker_buffer_size=self._prefetch))
    else:
      windows = grain.experimental.ThreadPrefetchIterDataset(windows, prefetch_buffer_size=self._prefetch)
    self._windows = iter(windows)
    _, _, self._layout = next(self._windows)

  def _load_next_window(self) -> None:
    self._dropped_in_epoch += self._layout.dropped
    epoch, self._window, self._layout = next(self._windows)
    if epoch != self._epoch:
      self._end_epoch()
    self._batch = 0

  def _take(self) -> Batch:
    batch = packing.materialize(self._layout, self._batch, self._corpus.ids, self._corpus.offsets,
                                rows=self._packer.rows, max_len=self._packer.max_len)
    self._packed_in_epoch += int(self._layout.bounds[self._batch + 1] - self._layout.bounds[self._batch])
    self._batch += 1
    return batch

  def _end_epoch(self) -> None:
    if not self._packed_in_epoch:  # Else __next__ would start empty epochs forever.
      raise UserError(f'No training pair fits data.max_len in data shard {self.shard[0]} '
                      f'({self._packer.shard_size} pairs in its shard, all too long)')
    logging.info('Epoch %d: dropped %d of %d training pairs longer than max_len (shard %d of %d)',
                 self._epoch, self._dropped_in_epoch, self._packer.shard_size, *self.shard)
    self._dropped += self._dropped_in_epoch
    self._epoch += 1
    self._packed_in_epoch = self._dropped_in_epoch = 0


class TrainIterator:
  """This process's rows of every global batch: its data shards' rows, side by side.

  The global batch is the concatenation of `data.shards` shard streams, and each process
  serves a contiguous block of them. So the batches, and hence the losses, depend on the
  number of shards only, never on how many processes serve them: a run on one process and
  a run on several with the same `data.shards` see identical global batches.
  """

  def __init__(self, streams: list[ShardStream]):
    self._streams = streams

  @property
  def epoch(self) -> int:
    return min(s.epoch for s in self._streams)

  @property
  def num_dropped(self) -> int:
    """Pairs this process's shards dropped for being longer than max_len, over completed epochs."""
    return sum(s.num_dropped for s in self._streams)

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> Batch:
    return _concat_rows([next(s) for s in self._streams])

  def one_epoch(self) -> Iterator[Batch]:
    """The rest of the current epoch; shards that finish first contribute empty rows."""
    epochs = [list(s.one_epoch()) for s in self._streams]
    for step in range(max(map(len, epochs))):
      yield _concat_rows([e[step] if step < len(e) else _empty_like(e[0]) for e in epochs])

  def get_state(self) -> dict:
    return {'shards': [s.get_state() for s in self._streams]}

  def set_state(self, state: dict) -> None:
    """Restores this process's shards from a state holding them (and possibly other processes')."""
    by_shard = {tuple(s['shard']): s for s in state['shards']}
    for stream in self._streams:
      if stream.shard not in by_shard:
        saved = sorted(by_shard)
        raise UserError(f'the data iterator state has shards {[i for i, _ in saved]} of {saved[0][1]}, '
                        f'not shard {stream.shard[0]} of {stream.shard[1]}: resume with the same data.shards')
      stream.set_state(by_shard[stream.shard])

  def close(self) -> None:
    for s in self._streams:
      s.close()


def _concat_rows(batches: list[Batch]) -> Batch:
  return batches[0] if len(batches) == 1 else {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _empty_like(batch: Batch) -> Batch:
  return {k: np.zeros_like(v) for k, v in batch.items()}


def train_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *, seed: int,
                   process_index: int, process_count: int) -> TrainIterator:
  """This process's share of the packed training batches; `seed` must match across processes.

  `data.shards` (0: one per process) fixes how the data is split, independently of processes;
  `data.workers` packs in that many worker processes per shard stream.
  """
  data = config.data
  max_len = data.max_len
  shards = data.shards or process_count
  global_rows = data.tokens_per_batch // max_len
  if shards % process_count:
    raise UserError(f'data.shards={shards} must be a multiple of the {process_count} processes')
  if global_rows < 1 or global_rows % shards:
    raise UserError(f'data.tokens_per_batch // data.max_len = {data.tokens_per_batch} // '
                    f'{max_len} = {global_rows} rows per batch, which must be a positive '
                    f'multiple of the {shards} data shards (one per process unless data.shards is set)')
  if data.workers < 0 or data.prefetch < 1:
    raise UserError(f'data.workers must be >= 0 and data.prefetch >= 1, got {data.workers} and {data.prefetch}')
  rows = global_rows // shards
  corpus = tokenized.load_or_tokenize(lambda: corpora.stream_pairs(config, 'train'), tokenizer,
                                     cache_dir=data.token_cache, corpus=corpora.describe(config, 'train'))
  lengths = corpus.lengths()
  longer = np.maximum(*lengths.values())
  if not np.any(longer <= max_len):
    raise UserError(f'No training pair fits data.max_len={max_len} (the shortest has {longer.min()} tokens)')
  # Enough pairs to fill WINDOW_BATCHES batches, at the corpus's mean pair length.
  window_pairs = max(1, int(WINDOW_BATCHES * rows * max_len / longer[longer <= max_len].mean()))

  def stream(shard: int) -> ShardStream:
    packer = WindowPacker(lengths, seed=seed, shard=shard, shards=shards, max_len=max_len, rows=rows,
                          window_pairs=window_pairs)
    return ShardStream(packer, corpus, workers=data.workers, prefetch=data.prefetch)

  per_process = shards // process_count
  return TrainIterator([stream(s) for s in range(process_index * per_process, (process_index + 1) * per_process)])


def eval_batches(sources: list[str], tokenizer: Tokenizer, *, batch_size: int, max_len: int,
                 targets: list[str] | None = None) -> Iterator[tuple[Batch, np.ndarray]]:
  """Padded batches of every sentence, longest first, with each row's original index.

  Sorting by length keeps padding (and beam search over it) low; the indices
  (-1 for filler rows) let callers put results back in input order. Every
  batch has `batch_size` rows and a width rounded up to a power of two, so a
  jitted model compiles a handful of shapes rather than one per batch. Sources
  longer than max_len are truncated (keeping EOS) rather than skipped, since
  every sentence must get a translation.
  """
  if targets is not None and len(targets) != len(sources):
    raise UserError(f'{len(sources)} source sentences but {len(targets)} targets')
  features = {'inputs': sources} if targets is None else {'inputs': sources, 'targets': targets}
  ids = {k: [_truncate(tokenizer.encode(s), max_len) for s in texts]
         for k, texts in features.items()}
  order = sorted(range(len(sources)), key=lambda i: -len(ids['inputs'][i]))
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    indices = np.full(batch_size, -1, np.int32)
    indices[:len(chunk)] = chunk
    batch = {}
    for k, seqs in ids.items():
      rows = [seqs[i] if i >= 0 else [] for i in indices]
      width = min(max_len, _next_power_of_two(max(map(len, rows))))
      tokens = np.full((batch_size, width), PAD_ID, np.int32)
      for r, seq in enumerate(rows):
        tokens[r, :len(seq)] = seq
      batch[k] = tokens
      batch[k + '_segmentation'] = (tokens != PAD_ID).astype(np.int32)
      batch[k + '_position'] = np.where(tokens != PAD_ID, np.arange(width, dtype=np.int32), 0)
    yield batch, indices


def _truncate(ids: list[int], max_len: int) -> list[int]:
  return ids if len(ids) <= max_len else ids[:max_len - 1] + [EOS_ID]


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()
