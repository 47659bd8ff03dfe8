"""Where training metrics go: DIR/metrics.jsonl, TensorBoard events and a loss-curve PNG."""

import json
import math
import os

import numpy as np


class MetricsWriter:
  """Writes from process 0 only; the other processes get a writer that does nothing."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tensorboard = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
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


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(workdir: str) -> str | None:
  """DIR/curves.png: training loss, and validation loss and BLEU where evaluated."""
  records = read_metrics(workdir)
  train = [r for r in records if 'loss' in r]
  if not train:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  valid = [r for r in records if 'valid_loss' in r]
  bleu = [r for r in records if 'valid_bleu' in r]
  fig, axes = plt.subplots(1, 2 if bleu else 1, figsize=(10 if bleu else 5, 3.5), squeeze=False)
  ax = axes[0, 0]
  ax.plot([r['step'] for r in train], [r['loss'] for r in train], label='train loss')
  if valid:
    ax.plot([r['step'] for r in valid], [r['valid_loss'] for r in valid], 'o-', label='valid loss')
  ax.set_xlabel('step')
  ax.set_ylabel('label-smoothed loss (nats/token)')
  ax.legend()
  if bleu:
    axes[0, 1].plot([r['step'] for r in bleu], [r['valid_bleu'] for r in bleu], 'o-')
    axes[0, 1].set_xlabel('step')
    axes[0, 1].set_ylabel('valid BLEU')
  fig.tight_layout()
  path = os.path.join(workdir, 'curves.png')
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
