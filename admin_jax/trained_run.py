"""Loading a trained model from a workdir, for translate, evaluate and average.

A training workdir holds all that inference needs: config.json (the run's resolved config) and
checkpoints/, each of which carries the SentencePiece model it was trained with (older ones
without it use DIR/spm.model). A checkpoint is named as `latest`, `best` (by validation BLEU), a
step number, or `avg:N`: the mean parameters of the checkpoints of the last N epochs (a run that
saves per epoch) or else of the last N checkpoints, which is how the paper evaluates (N=10).
Only the parameters are read (an orbax partial restore), never the optimizer moments, and
averaging reads one checkpoint at a time into a float32 sum, so memory stays at about two copies
of the parameters whatever N is.
"""

import functools
from typing import Any, NamedTuple

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections

from admin_jax import checkpoint as checkpoint_lib
from admin_jax import cli
from admin_jax import optim
from admin_jax import sharding
from admin_jax import train_step as train_step_lib
from admin_jax.data import tokenizer as tokenizer_lib
from admin_jax.data.tokenizer import Tokenizer
from admin_jax.errors import UserError
from admin_jax.model import TransformerConfig

CHECKPOINT_FORMS = "latest, best, avg:N (mean of the last N epochs' or checkpoints) or a step number"


class Inference(NamedTuple):
  """A model ready to translate: `params` come from the checkpoints of `steps` (averaged if several)."""
  config: ml_collections.ConfigDict
  tokenizer: Tokenizer
  setup: train_step_lib.Setup
  params: Any
  mesh: jax.sharding.Mesh
  steps: list[int]


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run in `workdir` trained with (DIR/config.json), validated."""
  config = cli.read_config(workdir)
  if config is None:
    raise UserError(f'{epath.Path(workdir) / cli.CONFIG_JSON} not found: --workdir must be a training workdir')
  cli.validate(config)
  return config


def parse_checkpoint(spec: str) -> tuple[str, int]:
  """('latest', 0), ('best', 0), ('step', STEP) or ('avg', N) for a --checkpoint value."""
  if spec in ('latest', 'best'):
    return spec, 0
  if spec.isdigit():
    return 'step', int(spec)
  count = spec.removeprefix('avg:')
  if spec.startswith('avg:') and count.isdigit() and int(count) > 0:
    return 'avg', int(count)
  raise UserError(f'unknown --checkpoint={spec}: expected {CHECKPOINT_FORMS}')


def open_checkpoints(workdir: str, config: ml_collections.ConfigDict) -> checkpoint_lib.Checkpoints:
  """The workdir's checkpoints, refusing a workdir that has none."""
  checkpoints = checkpoint_lib.Checkpoints(workdir, keep=config.checkpoint.keep,
                                           every_steps=config.checkpoint.every_steps)
  if not checkpoints.steps():
    raise UserError(f'no checkpoints in {checkpoints.directory}')
  return checkpoints


def resolve_steps(checkpoints: checkpoint_lib.Checkpoints, spec: str) -> list[int]:
  """The checkpoint steps a --checkpoint value names, oldest first."""
  kind, number = parse_checkpoint(spec)
  steps = checkpoints.steps()
  if kind == 'latest':
    return steps[-1:]
  if kind == 'best':
    best = checkpoints.best_step()
    if best is None:
      raise UserError(f'no checkpoint in {checkpoints.directory} has a validation BLEU; '
                      'use --checkpoint=latest or a step')
    return [best]
  if kind == 'step':
    if number not in steps:
      raise UserError(f'no checkpoint for step {number} in {checkpoints.directory}; steps: {steps}')
    return [number]
  return averaged_steps(checkpoints, number)


def averaged_steps(checkpoints: checkpoint_lib.Checkpoints, count: int) -> list[int]:
  """The checkpoints `avg:count` averages, oldest first: those of the last `count` epochs in a run that
  saves per epoch (checkpoint.every_epochs, as the authors average epochs 81-90 of IWSLT14), else the
  last `count` checkpoints."""
  by_epoch = checkpoints.epoch_steps()
  if by_epoch:
    if count > len(by_epoch):
      raise UserError(f'avg:{count} needs {count} epoch checkpoints, {checkpoints.directory} has '
                      f'{len(by_epoch)}: epochs {sorted(by_epoch.values())}')
    return sorted(sorted(by_epoch, key=by_epoch.get)[-count:])
  steps = checkpoints.steps()
  if count > len(steps):
    raise UserError(f'avg:{count} needs {count} checkpoints, {checkpoints.directory} has '
                    f'{len(steps)}: {steps}')
  return steps[-count:]


def model_setup(config: ml_collections.ConfigDict, vocab_size: int,
                mesh: jax.sharding.Mesh) -> tuple[train_step_lib.Setup, Any]:
  """The model's Setup and its parameters' shapes with target shardings, to restore into."""
  model_cfg = TransformerConfig.from_config(config, vocab_size)
  tx, schedule = optim.make_optimizer(config.train)
  setup, abstract = train_step_lib.abstract_train_state(model_cfg, tx, schedule, mesh, config.train.seed)
  return setup, checkpoint_lib.abstract_like(abstract.params, setup.state_shardings.params)


@functools.partial(jax.jit, donate_argnums=0)  # the running sum is updated in place
def _add(total: Any, params: Any) -> Any:
  return jax.tree.map(lambda t, p: t + p.astype(jnp.float32), total, params)


def average_params(checkpoints: checkpoint_lib.Checkpoints, steps: list[int], abstract_params: Any) -> Any:
  """The mean parameters of checkpoints `steps`, summed in float32, one checkpoint in memory at a time.

  `steps` may repeat a step (its weight grows) or hold one step (its parameters, unchanged).
  """
  total = jax.tree.map(lambda p: p.astype(jnp.float32), checkpoints.restore_params(steps[0], abstract_params))
  for step in steps[1:]:
    total = _add(total, checkpoints.restore_params(step, abstract_params))
  return jax.tree.map(lambda t, a: (t / len(steps)).astype(a.dtype), total, abstract_params)


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """The run's SentencePiece model: data.spm_model if the run was given one, else DIR/spm.model.

  Never trains one (unlike tokenizer.load_or_train_tokenizer): a new vocabulary would not match
  the checkpoint.
  """
  return Tokenizer.load(config.data.spm_model or epath.Path(workdir) / tokenizer_lib.MODEL_NAME)


def checkpoint_tokenizer(checkpoints: checkpoint_lib.Checkpoints, step: int,
                         config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """The SentencePiece model checkpoint `step` was trained with, read from its meta.

  So a checkpoint translates with its own vocabulary even where DIR/spm.model was since deleted or
  replaced. A checkpoint whose meta lacks it (older ones, average.py's) falls back to `load_tokenizer`.
  """
  tokenizer = checkpoint_lib.tokenizer_from_meta(checkpoints.restore_meta(step))
  return load_tokenizer(config, workdir) if tokenizer is None else tokenizer


def load_for_inference(workdir: str, checkpoint: str = 'latest',
                       config: ml_collections.ConfigDict | None = None) -> Inference:
  """The model of `workdir` at `checkpoint` (see CHECKPOINT_FORMS), on a mesh over all devices.

  `config` defaults to the run's own (DIR/config.json); pass one to change decoding settings.
  """
  parse_checkpoint(checkpoint)  # a bad value fails before anything is loaded
  config = saved_config(workdir) if config is None else config
  checkpoints = open_checkpoints(workdir, config)
  steps = resolve_steps(checkpoints, checkpoint)
  # avg:N takes the newest step's: a run's checkpoints share one (train refuses to resume with another).
  tokenizer = checkpoint_tokenizer(checkpoints, steps[-1], config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  setup, abstract_params = model_setup(config, tokenizer.vocab_size, mesh)
  params = average_params(checkpoints, steps, abstract_params)  # of one step: that step's, exactly
  return Inference(config, tokenizer, setup, params, mesh, steps)
