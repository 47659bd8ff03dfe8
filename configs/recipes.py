"""Shared pieces of the paper's recipes (the authors' scripts): argument parsing and common settings."""

import ml_collections

from admin_jax.model.residual import RESIDUALS
from configs import default

NO_UPDATE_LIMIT = 10 ** 9  # train.num_steps of a recipe that the authors stop by epochs only


def parse_arg(arg: str | None, default_layers: int, default_residual: str = 'admin') -> tuple[int, str]:
  """`'18'`, `'18,post_ln'`, `'post_ln'` or None -> (encoder layers, residual)."""
  layers, residual = default_layers, default_residual
  for part in (arg or '').split(','):
    part = part.strip()
    if not part:
      continue
    if part.isdigit():
      layers = int(part)
    elif part in RESIDUALS:
      residual = part
    else:
      raise ValueError(f'config argument {part!r}: expected a layer count or one of {", ".join(RESIDUALS)}')
  return layers, residual


def paper_config(residual: str) -> ml_collections.ConfigDict:
  """The default config with `residual` and the settings every recipe shares: RAdam (0.9, 0.98),
  warmup from 1e-7, smoothing 0.1, no clipping, fairseq's decode length, a checkpoint per epoch."""
  config = default.get_config()
  config.model.residual = residual
  config.train.optimizer = 'radam'
  config.train.b1, config.train.b2, config.train.eps = 0.9, 0.98, 1e-8
  config.train.warmup_init_lr = 1e-7
  config.train.label_smoothing = 0.1
  config.train.clip_norm = 0.0
  config.train.seed = 1111
  config.model.share_embeddings = True
  config.model.attention_dropout = 0.1
  config.model.activation_dropout = 0.1
  config.eval.max_len_a, config.eval.max_len_b = 0.0, 200  # fairseq-generate's defaults, in every paper evaluation
  config.checkpoint.every_epochs = 1  # the authors average the checkpoints of the last 10 epochs
  return config
