"""Packs sentence pairs into rows of max_len tokens, deciding on their lengths alone.

A window of consecutive pairs (of an epoch's shuffled order) is packed first-fit decreasing:
the longest pairs first, each into the first row where both its source and its target still
fit. Sorting first lets short pairs fill the gaps long ones leave, so rows come out fuller than
with first-fit in arrival order. The rows are then shuffled (long and short pairs mix across
batches) and cut into batches; the window's last batch is topped up with empty rows. A pair
occupies one row on both sides, with the same segment id, so the decoder's cross-attention can
be masked to its own source.

The decisions need only the lengths, so worker processes can make them without the tokens;
`materialize` then copies a batch's tokens into place with a few vectorised NumPy operations.
"""

import dataclasses

import numpy as np

Batch = dict[str, np.ndarray]
FEATURES = ('inputs', 'targets')


@dataclasses.dataclass(frozen=True)
class WindowLayout:
  """Where every packed pair of one window goes, batch after batch.

  Pairs are grouped by batch: batch b holds entries bounds[b]:bounds[b + 1].
  """
  pairs: np.ndarray  # index of the pair in the corpus
  rows: np.ndarray  # its row in its batch
  segments: np.ndarray  # its segment id in that row (1..k, left to right)
  columns: dict[str, np.ndarray]  # its first column, per feature
  bounds: np.ndarray
  dropped: int  # pairs of the window longer than max_len on either side

  @property
  def num_batches(self) -> int:
    return len(self.bounds) - 1


def pack_window(pairs: np.ndarray, lengths: dict[str, np.ndarray], *, max_len: int, rows: int,
                rng: np.random.Generator) -> WindowLayout:
  """Packs the corpus pairs `pairs` (indices into `lengths`) into batches of `rows` rows."""
  source, target = (lengths[k][pairs].astype(np.int64) for k in FEATURES)
  fits = (source <= max_len) & (target <= max_len)
  kept = np.flatnonzero(fits)
  longer, shorter = np.maximum(source[kept], target[kept]), np.minimum(source[kept], target[kept])
  order = kept[np.lexsort((-shorter, -longer))]  # longest first
  count = len(order)
  free = {k: np.full(count, max_len, np.int64) for k in FEATURES}
  free_source, free_target = free['inputs'], free['targets']
  row_of = np.empty(count, np.int64)
  start = {k: np.empty(count, np.int64) for k in FEATURES}
  segment = np.empty(count, np.int64)
  filled = np.zeros(count, np.int64)  # pairs per row
  open_rows = 0
  for j, (a, b) in enumerate(zip(source[order].tolist(), target[order].tolist())):
    candidates = (free_source[:open_rows] >= a) & (free_target[:open_rows] >= b)
    row = int(candidates.argmax()) if open_rows else 0
    if not open_rows or not candidates[row]:
      row = open_rows
      open_rows += 1
    row_of[j] = row
    start['inputs'][j] = max_len - free_source[row]
    start['targets'][j] = max_len - free_target[row]
    free_source[row] -= a
    free_target[row] -= b
    filled[row] += 1
    segment[j] = filled[row]
  position = np.empty(open_rows, np.int64)
  position[rng.permutation(open_rows)] = np.arange(open_rows)  # the rows, shuffled across the window's batches
  slot = position[row_of]
  by_batch = np.argsort(slot // rows, kind='stable')
  num_batches = -(-open_rows // rows)
  bounds = np.searchsorted((slot // rows)[by_batch], np.arange(num_batches + 1))
  as_int32 = lambda x: x[by_batch].astype(np.int32)  # noqa: E731
  return WindowLayout(pairs=pairs[order][by_batch].astype(np.int64), rows=as_int32(slot % rows),
                      segments=as_int32(segment), columns={k: as_int32(v) for k, v in start.items()},
                      bounds=bounds, dropped=int(len(pairs) - count))


def materialize(layout: WindowLayout, batch: int, ids: dict[str, np.ndarray], offsets: dict[str, np.ndarray], *,
                rows: int, max_len: int) -> Batch:
  """Batch `batch` of a window as the model takes it: tokens, segment ids and positions per feature."""
  lo, hi = layout.bounds[batch], layout.bounds[batch + 1]
  pairs, row_of, segment = layout.pairs[lo:hi], layout.rows[lo:hi], layout.segments[lo:hi]
  out = {}
  for k in FEATURES:
    first = offsets[k][pairs]
    length = offsets[k][pairs + 1] - first
    owner = np.repeat(np.arange(len(pairs)), length)  # the pair of each token
    within = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    cell = row_of[owner].astype(np.int64) * max_len + layout.columns[k][lo:hi][owner] + within
    for suffix, values in (('', ids[k][first[owner] + within]), ('_segmentation', segment[owner]),
                           ('_position', within)):
      flat = np.zeros(rows * max_len, np.int32)
      flat[cell] = values
      out[k + suffix] = flat.reshape(rows, max_len)
  return out
