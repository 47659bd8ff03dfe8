"""The flags translate and evaluate share: --checkpoint and the decoding overrides.

Defined here, not in translate.py, so that each entry point imports only the flags it uses:
evaluate then refuses translate's --input/--output as unknown flags instead of ignoring them.
"""

import sys

from absl import flags
import ml_collections

from admin_jax import cli
from admin_jax import distributed
from admin_jax import trained_run
from admin_jax.errors import UserError

CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest', f'Which weights: {trained_run.CHECKPOINT_FORMS}.')
BEAM_SIZE = flags.DEFINE_integer('beam_size', None, "Beam size; default: the config's eval.beam_size.",
                                 lower_bound=1)
LENGTH_PENALTY = flags.DEFINE_float('length_penalty', None,
                                    "Length penalty; default: the config's eval.length_penalty.")
BATCH_SIZE = flags.DEFINE_integer('batch_size', None,
                                  "Sentences per batch; default: the config's data.eval_batch_size.", lower_bound=1)

_DECODING_FLAGS = {('eval', 'beam_size'): BEAM_SIZE, ('eval', 'length_penalty'): LENGTH_PENALTY,
                   ('data', 'eval_batch_size'): BATCH_SIZE}


def _known_checkpoint(spec: str) -> bool:
  """Lets a mistyped --checkpoint fail while flags are parsed, before input is read or a model loaded."""
  try:
    trained_run.parse_checkpoint(spec)
  except UserError:
    return False
  return True


flags.register_validator('checkpoint', _known_checkpoint, f'expected {trained_run.CHECKPOINT_FORMS}')


def config_from_flags(workdir: str) -> ml_collections.ConfigDict:
  """--config if given, else the run's DIR/config.json; then the decoding flags on top."""
  config = cli.load_config() if flags.FLAGS['config'].present else trained_run.saved_config(workdir)
  for (section, key), flag in _DECODING_FLAGS.items():
    if flag.value is not None:
      config[section][key] = flag.value
  return config


def load_from_flags(workdir: str, config: ml_collections.ConfigDict) -> trained_run.Inference:
  """The model --checkpoint names, reported on stderr (stdout may carry translations)."""
  inference = trained_run.load_for_inference(workdir, CHECKPOINT.value, config)
  if distributed.is_lead():
    print(f'checkpoint {CHECKPOINT.value}: step{"s" * (len(inference.steps) > 1)} '
          f'{", ".join(map(str, inference.steps))}', file=sys.stderr)
  return inference
