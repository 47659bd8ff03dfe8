"""Training batches packed to a token budget, and padded batches for evaluation.

Training packs several sentence pairs into each row (grain's first-fit
packing) so that a batch spends its compute on tokens, not padding, and a fixed
[rows, max_len] shape means one compilation. A pair occupies one row on both
sides, with the same segment id, so the decoder's cross-attention can be
masked to its own source.
"""

from typing import Callable, Iterator

from absl import logging
import grain
import ml_collections
import numpy as np

from admin_jax.data import corpora
from admin_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from admin_jax.errors import UserError

Batch = dict[str, np.ndarray]
_FEATURES = ('inputs', 'targets')


class ShardStream:
  """Endless packed rows, epoch after epoch, from one data shard.

  Each epoch is its own grain pipeline: the global order is reshuffled with a
  seed derived from (seed, epoch), shard s takes every shard_count-th example
  of that order from the s-th on, and only then tokenizes, so no process
  tokenizes another's examples. The last batch of an epoch is padded
  with empty rows rather than mixed with the next epoch, so epochs stay exact.

  Pairs too long for max_len are filtered inside the pipeline; the iterator
  counts them as the shard's size minus the pairs it has packed (read back
  from the segment ids), which needs no side channel and survives a resume.
  """

  def __init__(self, make_epoch: Callable[[int], grain.DatasetIterator], *,
               shard_size: int, shard_index: int, shard_count: int):
    self._make_epoch = make_epoch
    self._shard_size = shard_size
    self._shard = (shard_index, shard_count)
    self._epoch = 0
    self._packed_in_epoch = 0  # Pairs yielded so far in this epoch.
    self._dropped = 0  # Pairs dropped for length in completed epochs.
    self._epoch_iter = make_epoch(0)

  @property
  def epoch(self) -> int:
    return self._epoch

  @property
  def shard(self) -> tuple[int, int]:
    """(index, count) of this stream's data shard."""
    return self._shard

  @property
  def num_dropped(self) -> int:
    """Pairs this shard dropped for being longer than max_len, over completed epochs."""
    return self._dropped

  def __iter__(self) -> 'ShardStream':
    return self

  def __next__(self) -> Batch:
    while (batch := next(self._epoch_iter, None)) is None:
      self._end_epoch()
    return self._count(batch)

  def one_epoch(self) -> Iterator[Batch]:
    """Yields the rest of the current epoch, then stops at the start of the next."""
    for batch in self._epoch_iter:
      yield self._count(batch)
    self._end_epoch()

  def get_state(self) -> dict:
    """A JSON-serialisable position: set_state() on a fresh iterator resumes exactly here."""
    return {'epoch': self._epoch, 'packed_in_epoch': self._packed_in_epoch,
            'dropped': self._dropped, 'shard': list(self._shard),
            'grain': self._epoch_iter.get_state()}

  def set_state(self, state: dict) -> None:
    if tuple(state['shard']) != self._shard:
      raise UserError(f'data iterator state is for shard {state["shard"][0]} of {state["shard"][1]}, '
                      f'not {self._shard[0]} of {self._shard[1]}: resume with the same data.shards')
    self._epoch_iter.close()
    self._epoch = state['epoch']
    self._packed_in_epoch = state['packed_in_epoch']
    self._dropped = state['dropped']
    self._epoch_iter = self._make_epoch(self._epoch)
    self._epoch_iter.set_state(state['grain'])

  def close(self) -> None:
    """Stops the prefetch threads."""
    self._epoch_iter.close()

  def _count(self, batch: Batch) -> Batch:
    # Segment ids run 1..k in a row, so a row's maximum is its number of pairs.
    self._packed_in_epoch += int(batch['inputs_segmentation'].max(axis=1).sum())
    return batch

  def _end_epoch(self) -> None:
    if not self._packed_in_epoch:  # Else __next__ would start empty epochs forever.
      raise UserError(f'No training pair fits data.max_len in data shard {self._shard[0]} '
                      f'({self._shard_size} pairs in its shard, all too long)')
    dropped = self._shard_size - self._packed_in_epoch
    logging.info('Epoch %d: dropped %d of %d training pairs longer than max_len '
                 '(shard %d of %d)', self._epoch, dropped, self._shard_size, *self._shard)
    self._dropped += dropped
    self._epoch += 1
    self._packed_in_epoch = 0
    self._epoch_iter.close()
    self._epoch_iter = self._make_epoch(self._epoch)


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

  `data.shards` (0: one per process) fixes how the data is split, independently of processes.
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
  rows = global_rows // shards
  pairs = corpora.load_pairs(config, 'train')
  source = grain.MapDataset.source(pairs)

  def tokenize(pair: tuple[str, str]) -> Batch:
    return {k: np.asarray(tokenizer.encode(text), np.int32) for k, text in zip(_FEATURES, pair)}

  def fits(example: Batch) -> bool:
    return len(example['inputs']) <= max_len and len(example['targets']) <= max_len

  def stream(shard: int) -> ShardStream:
    def make_epoch(epoch: int) -> grain.DatasetIterator:
      epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
      # Tokenizing in grain's read threads measured slower than in the one prefetch
      # thread below (per-element future bookkeeping); packing is the bottleneck anyway.
      ds = (source.shuffle(seed=epoch_seed)[shard::shards]
            .map(tokenize).filter(fits)
            .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
      ds = grain.experimental.FirstFitPackIterDataset(
          ds, length_struct={k: max_len for k in _FEATURES}, num_packing_bins=rows,
          seed=epoch_seed)
      ds = ds.batch(rows).map(lambda batch: _rename_and_pad(batch, rows))
      return iter(grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data.prefetch))

    return ShardStream(make_epoch, shard_size=len(range(shard, len(pairs), shards)),
                       shard_index=shard, shard_count=shards)

  per_process = shards // process_count
  return TrainIterator([stream(s) for s in range(process_index * per_process, (process_index + 1) * per_process)])


def _rename_and_pad(batch: Batch, rows: int) -> Batch:
  """Grain's packed names to the model's; an epoch's short last batch gets empty rows."""
  out = {}
  for k in _FEATURES:
    for suffix, grain_suffix in (('', ''), ('_segmentation', '_segment_ids'),
                                 ('_position', '_positions')):
      x = batch[k + grain_suffix].astype(np.int32)
      out[k + suffix] = np.pad(x, ((0, rows - len(x)), (0, 0)))
  return out


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
