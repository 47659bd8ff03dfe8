"""What every job shares: absl flags, the ml_collections config, and one-line errors.

Each job is `python -m admin_jax.<job> --config=configs/<name>.py[:arg] --workdir=DIR
[--config.section.key=value ...]`. Config keys are locked: a mistyped override is refused
while flags are parsed, before any work, with one line naming the key.
"""

import json
import re
import sys
from collections.abc import Callable

from absl import app
from absl import flags
from absl import logging
from etils import epath
import ml_collections
from ml_collections import config_flags

from admin_jax import files
from admin_jax.errors import UserError

CONFIG_JSON = 'config.json'

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Python config file, optionally with `:arg` for its get_config.', lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and the resolved config.')

CHOICES = {
    'model.residual': ('post_ln', 'pre_ln', 'admin', 'admin_logn', 'deepnorm'),
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'model.stream_dtype': ('float32', 'bfloat16'),  # float16 gradients would underflow without loss scaling
    'model.remat': ('none', 'full', 'dots'),
    'model.attention_impl': ('xla', 'cudnn', 'flash'),
    'model.layer_norm_impl': ('xla', 'pallas'),
    'data.source': ('synthetic', 'text', 'tfds'),
    'data.spm_model_type': ('bpe', 'unigram'),
    'train.optimizer': ('radam', 'adam', 'adamw'),
    'train.prng_impl': ('threefry2x32', 'rbg', 'unsafe_rbg'),
}


def _one_line(error: BaseException) -> str:
  text = str(error).strip().strip('"\'')
  text = text.replace('\\n', '\n').replace("\\'", "'")
  return ' '.join(line.strip() for line in text.splitlines() if line.strip())


def _unknown_key_message(argv: list[str], error: BaseException) -> str:
  """Names the override whose key does not exist, with ml_collections' suggestion."""
  text = str(error)
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  missing = suggestion.group(2) if suggestion else next(iter(re.findall(r"(\w+)", text)), None)
  for arg in argv:
    match = re.match(r'--config\.([\w.]+)', arg)
    if match and missing in match.group(1).split('.'):
      hint = f' (did you mean "{suggestion.group(1)}"?)' if suggestion else ''
      return f"unknown config key '{match.group(1)}'{hint}"
  return f'bad config override: {_one_line(error)}'


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    _exit(_unknown_key_message(argv, error))
  except (flags.Error, ValueError, TypeError) as error:
    _exit(_one_line(error))


def _exit(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses values no job can run with, naming the key."""
  for key, allowed in CHOICES.items():
    section, name = key.split('.')
    value = config[section][name]
    if value not in allowed:
      raise UserError(f"config {key}={value!r} is not one of {', '.join(allowed)}")
  for key in ('num_encoder_layers', 'num_decoder_layers', 'd_model', 'ffn_dim', 'num_heads'):
    if config.model[key] < 1:
      raise UserError(f'config model.{key} must be positive, got {config.model[key]}')
  if config.model.d_model % config.model.num_heads:
    raise UserError(f'config model.d_model={config.model.d_model} is not divisible by '
                    f'model.num_heads={config.model.num_heads}')
  if config.model.attention_impl == 'cudnn' and config.model.attention_dropout:
    raise UserError("config model.attention_impl='cudnn' needs model.attention_dropout=0 "
                    '(jax.nn.dot_product_attention has no dropout)')
  for key in ('unrolled_encoder_layers', 'unrolled_decoder_layers'):
    if config.model[key] < 0:
      raise UserError(f'config model.{key} must not be negative, got {config.model[key]}')
    if config.model[key] and not config.model.scan_layers:
      raise UserError(f'config model.{key} counts the layers run before a scan: it needs '
                      'model.scan_layers=True (without it every layer is unrolled)')
  if config.model.d_model % 2:
    raise UserError('config model.d_model must be even (sinusoidal positions)')
  if config.model.layer_norm_impl == 'pallas' and config.model.d_model & (config.model.d_model - 1):
    raise UserError(f"config model.layer_norm_impl='pallas' needs a power-of-two model.d_model "
                    f'(a Triton block), got {config.model.d_model}')


def load_config() -> ml_collections.ConfigDict:
  """The parsed config, validated; a config file that failed to load becomes a UserError."""
  if flags.FLAGS['config'].present == 0 and _CONFIG.value is None:
    raise UserError('--config is required, e.g. --config=configs/demo.py')
  try:
    config = _CONFIG.value
  except (OSError, ImportError, SyntaxError) as error:
    raise UserError(_one_line(error)) from None
  validate(config)
  return config


def require_workdir() -> str:
  if not WORKDIR.value:
    raise UserError('--workdir is required')
  return WORKDIR.value


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes DIR/config.json, the exact config a run used, for people and for resume checks."""
  files.write_text(epath.Path(workdir) / CONFIG_JSON, json.dumps(config.to_dict(), indent=2, sort_keys=True))


def quiet_logging() -> None:
  """Keeps absl and orbax INFO lines off the console, which then shows progress bars and the
  jobs' own lines; an explicit --verbosity still wins."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def run(main: Callable[[list[str]], None]) -> None:
  """app.run with quiet logging, and config errors and UserError turned into one line on stderr and exit code 2."""

  def guarded(argv: list[str]) -> None:
    quiet_logging()
    try:
      main(argv)
    except UserError as error:
      _exit(str(error))

  app.run(guarded, flags_parser=_parse_flags)
