"""What the analysis commands share: flags, the model settings read from --config, the output folder.

The model commands read the usual `--config=configs/<name>.py [--config.model.KEY=V ...]`
(size, vocabulary) and compare the residual variants named by `--residuals` on one fixed
random batch.
"""

from absl import flags
import numpy as np

from admin_jax import cli
from admin_jax.analysis import probe
from admin_jax.errors import UserError
from admin_jax.model import TransformerConfig
from admin_jax.model.residual import RESIDUALS

RESIDUAL_LIST = flags.DEFINE_list('residuals', ['post_ln', 'pre_ln', 'admin'],
                                  f'Residual variants to compare, from {", ".join(RESIDUALS)}.')
SEED = flags.DEFINE_integer('seed', 0, 'Seed of the model initialisation and of the random batch.')
SENTENCES = flags.DEFINE_integer('sentences', 8, 'Sentences in the random batch.', lower_bound=1)
LENGTH = flags.DEFINE_integer('length', 32, 'Tokens per sentence of the random batch.', lower_bound=2)


def output_dir() -> str:
  """--out; the first file written creates it (admin_jax.files)."""
  if not cli.OUT.value:
    raise UserError('--out is required')
  return cli.OUT.value


def residuals() -> list[str]:
  """--residuals, checked against the known variants."""
  if not RESIDUAL_LIST.value:
    raise UserError('--residuals is empty')
  for residual in RESIDUAL_LIST.value:
    if residual not in RESIDUALS:
      raise UserError(f"--residuals: unknown residual {residual!r}; expected one of {', '.join(RESIDUALS)}")
  return list(RESIDUAL_LIST.value)


def model_config() -> TransformerConfig:
  """The --config model as a probe config (float32, no dropout)."""
  config = cli.load_config()
  if config.data.vocab_size <= probe.FIRST_WORD_ID:
    raise UserError(f'config data.vocab_size={config.data.vocab_size} leaves no word ids')
  return probe.probe_config(TransformerConfig.from_config(config, vocab_size=config.data.vocab_size))


def batch(cfg: TransformerConfig) -> dict[str, np.ndarray]:
  """The random batch of --sentences x --length tokens drawn with --seed."""
  return probe.random_batch(cfg.vocab_size, SENTENCES.value, LENGTH.value, SEED.value)

