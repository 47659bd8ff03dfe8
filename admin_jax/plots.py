"""Every figure the project draws, one function per PNG: the analysis figures, omega and
the training curves.

Uses matplotlib's object API (no pyplot), so it needs no display, keeps no global figure state,
and can be called from training or profiling code as well as from the analysis commands.
PNGs are rendered in memory and written through `admin_jax.files`, so `path` may be a bucket.
"""

import io
from collections.abc import Mapping, Sequence

from etils import epath
from matplotlib.figure import Figure
import numpy as np

from admin_jax import files


def _save(fig: Figure, path: epath.PathLike) -> None:
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=120)
  files.write_bytes(path, png.getvalue())


def plot_training_curves(records: Sequence[Mapping[str, float]], path: epath.PathLike) -> None:
  """Training loss, validation loss and, where evaluated, validation BLEU vs step (metrics.jsonl records)."""
  train = [r for r in records if 'loss' in r]
  valid = [r for r in records if 'valid_loss' in r]
  bleu = [r for r in records if 'valid_bleu' in r]
  fig = Figure(figsize=(10 if bleu else 5, 3.5))
  axes = fig.subplots(1, 2 if bleu else 1, squeeze=False)[0]
  axes[0].plot([r['step'] for r in train], [r['loss'] for r in train], label='train loss')
  if valid:
    axes[0].plot([r['step'] for r in valid], [r['valid_loss'] for r in valid], 'o-', label='valid loss')
  axes[0].set_xlabel('step')
  axes[0].set_ylabel('label-smoothed loss (nats/token)')
  axes[0].legend()
  if bleu:
    axes[1].plot([r['step'] for r in bleu], [r['valid_bleu'] for r in bleu], 'o-')
    axes[1].set_xlabel('step')
    axes[1].set_ylabel('valid BLEU')
  _save(fig, path)


def plot_omegas(omegas: Mapping[str, Sequence[float]], path: epath.PathLike) -> None:
  """omega vs sublayer index (1-based, forward order), one line per stack."""
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for stack, values in omegas.items():
    ax.plot(np.arange(1, len(values) + 1), values, marker='.', label=stack)
  ax.set_xlabel('sublayer')
  ax.set_ylabel('omega')
  ax.set_title('Admin omega per sublayer')
  ax.grid(alpha=0.3)
  ax.legend()
  _save(fig, path)


def plot_output_change(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: epath.PathLike) -> None:
  """Output change vs number of encoder sublayers, one line per residual (the paper's figure)."""
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for residual, (sublayers, change) in curves.items():
    ax.plot(sublayers, change, marker='o', label=residual)
  ax.set_xlabel('encoder sublayers')
  ax.set_ylabel(r'$|F(x, W) - F(x, W^*)|_2^2$')
  ax.set_title('Output change at initialisation')
  ax.grid(alpha=0.3)
  ax.legend()
  _save(fig, path)


def plot_grad_norms(norms: Mapping[str, Mapping[str, Sequence[float]]], path: epath.PathLike) -> None:
  """Gradient norm per sublayer (log scale), one panel per stack, one line per model."""
  stacks = ('encoder', 'decoder')
  fig = Figure(figsize=(10, 4))
  axes = fig.subplots(1, len(stacks))
  for ax, stack in zip(axes, stacks):
    for label, per_stack in norms.items():
      values = per_stack[stack]
      ax.plot(np.arange(1, len(values) + 1), values, marker='.', label=label)
    ax.set_yscale('log')
    ax.set_xlabel(f'{stack} sublayer')
    ax.set_ylabel(r'$\|\partial L / \partial x_k\|$')
    ax.set_title(stack)
    ax.grid(alpha=0.3)
    ax.legend()
  _save(fig, path)


def plot_dependency(betas: Mapping[str, np.ndarray], path: epath.PathLike) -> None:
  """Heatmaps of beta_{i,j}: rows x_1..x_N, columns a_1..a_N (the embedding column left out)."""
  fig = Figure(figsize=(4.5 * len(betas), 4))
  axes = np.atleast_1d(fig.subplots(1, len(betas)))
  for ax, (label, beta) in zip(axes, betas.items()):
    n = beta.shape[0]
    branches = np.ma.masked_where(np.triu(np.ones((n, n), bool), 1), beta[:, 1:])
    image = ax.imshow(branches, cmap='viridis', vmin=0.0, vmax=1.0,
                      extent=(0.5, n + 0.5, n + 0.5, 0.5))
    ax.set_xlabel('branch $a_j$')
    ax.set_ylabel('sublayer output $x_i$')
    ax.set_title(label)
    fig.colorbar(image, ax=ax, shrink=0.8)
  _save(fig, path)
