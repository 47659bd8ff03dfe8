"""Where training metrics go: DIR/metrics.jsonl, TensorBoard events and a loss-curve PNG.

DIR may be a bucket (gs://...): every file goes through `admin_jax.files` and etils.epath,
TensorBoard events included (see `_EpathEventFile`).
"""

import io
import json
import math

from absl import logging
from etils import epath
import numpy as np

from admin_jax import files
from admin_jax import plots

METRICS_JSONL = 'metrics.jsonl'


class MetricsWriter:
  """Writes from process 0 only; the other processes get a writer that does nothing.

  Object stores cannot append, so the writer keeps the file's text, a resumed run's earlier
  records first, and rewrites the whole (small) file at each write.
  """

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.path = epath.Path(workdir) / METRICS_JSONL
    self._text = ''
    self._tensorboard = None
    if enabled:
      self._text = self.path.read_text() if self.path.exists() else ''
      self._tensorboard = _summary_writer(epath.Path(workdir) / 'tensorboard')

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._text += json.dumps(record) + '\n'
    files.write_text(self.path, self._text)
    for key, value in record.items():
      if key != 'step' and isinstance(value, (int, float)) and math.isfinite(value):
        self._tensorboard.add_scalar(key, value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _plain(value):
  """Arrays and NumPy scalars as Python numbers, so that json can write them."""
  return np.asarray(value).item() if hasattr(value, 'shape') or isinstance(value, np.generic) else value


def _summary_writer(logdir: epath.Path):
  """A tensorboardX SummaryWriter; for a bucket, one that writes through etils.epath.

  tensorboardX's own gs:// writer needs google-cloud-storage and fails without it; epath
  reaches every store that the workdir's other files and orbax's checkpoints reach.
  """
  from tensorboardX import SummaryWriter
  from tensorboardX import record_writer

  if files.is_remote(logdir):
    record_writer.register_writer_factory(str(logdir).partition(':')[0], _EpathEventFiles())
  return SummaryWriter(str(logdir))


class _EpathEventFiles:
  """tensorboardX's writer-factory interface (`open`, `directory_check`) over etils.epath."""

  def open(self, path: str) -> '_EpathEventFile':
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores need no folders


class _EpathEventFile:
  """An event file kept in memory and uploaded whole at each flush, as tensorboardX does for gs://."""

  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    files.write_bytes(self.path, self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


def read_metrics(workdir: str) -> list[dict]:
  """DIR/metrics.jsonl's records. A line that holds no record (edited by hand, cut short by a full
  disk) is skipped with a warning naming it: the plots are not worth a finished run's exit status."""
  path = epath.Path(workdir) / METRICS_JSONL
  if not path.exists():
    return []
  records, damaged = [], []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if isinstance(record, dict):
      records.append(record)
    else:
      damaged.append(number)
  if damaged:
    logging.warning('%s: skipped line%s %s, holding no record', path, 's' if len(damaged) > 1 else '',
                    ', '.join(map(str, damaged)))
  return records


def plot_training_curves(workdir: str) -> str | None:
  """DIR/curves.png: training loss, and validation loss and BLEU where evaluated."""
  records = read_metrics(workdir)
  if not any('loss' in r for r in records):
    return None
  path = str(epath.Path(workdir) / 'curves.png')
  plots.plot_training_curves(records, path)
  return path
