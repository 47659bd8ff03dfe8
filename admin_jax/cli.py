"""What every job shares: absl flags, the ml_collections config, and one-line errors.

Each job is `python -m admin_jax.<job> --config=configs/<name>.py[:arg] --workdir=DIR
[--config.section.key=value ...]`. The config file and every override are checked here against
the config's own keys and types while flags are parsed, before any work: a mistyped key, a value
of the wrong type or a config file that does not load is one line naming it.
"""

import difflib
import importlib.machinery
import importlib.util
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
from admin_jax.model.residual import RESIDUALS
from configs import default

CONFIG_JSON = 'config.json'

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Python config file, optionally with `:arg` for its get_config.', lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and the resolved config.')
# One definition for the jobs that write elsewhere (absl refuses a flag defined twice in a process).
OUT = flags.DEFINE_string('out', None, 'Directory a job writes besides a workdir: an analysis\'s CSV and PNG '
                          '(created if missing; may be a bucket), an exported model (must not exist).')

CHOICES = {
    'model.residual': RESIDUALS,
    'perf.dtype': ('float32', 'bfloat16', 'float16'),
    'perf.stream_dtype': ('float32', 'bfloat16'),  # perf.dtype=float16 keeps one of these streams
    'perf.remat': ('none', 'full', 'dots'),
    'perf.attention_impl': ('xla', 'cudnn', 'flash'),
    'perf.layer_norm_impl': ('xla', 'pallas'),
    'data.source': ('synthetic', 'text', 'tfds'),
    'data.spm_model_type': ('bpe', 'unigram'),
    'train.optimizer': ('radam', 'adam', 'adamw'),
    'train.prng_impl': ('threefry2x32', 'rbg', 'unsafe_rbg'),
}
# Numeric keys by the values a run can use (the *_every_steps keys give 0 and -1 meanings of their own).
POSITIVE = ('model.num_encoder_layers', 'model.num_decoder_layers', 'model.d_model', 'model.ffn_dim',
            'model.num_heads', 'data.vocab_size', 'data.max_len', 'data.tokens_per_batch', 'data.eval_batch_size',
            'train.num_steps', 'train.lr', 'train.eps', 'train.grad_accum', 'train.max_bad_steps', 'checkpoint.keep',
            'eval.beam_size', 'train.loss_scale_window', 'train.loss_scale_threshold')
NON_NEGATIVE = ('perf.unrolled_encoder_layers', 'perf.unrolled_decoder_layers', 'data.shards',
                'train.warmup_init_lr', 'train.warmup_steps', 'train.weight_decay', 'train.clip_norm',
                'train.loss_chunk_tokens', 'train.trace_steps', 'train.trace_first_step', 'eval.max_sentences',
                'admin.profile_tokens', 'train.num_epochs', 'checkpoint.every_epochs')
FRACTIONS = ('model.dropout', 'model.attention_dropout', 'model.activation_dropout', 'train.label_smoothing',
             'train.b1', 'train.b2')  # in [0, 1)

# Keys that have moved since a config.json could hold them: how the model is computed left `model` for `perf`.
# Old workdirs read with them in their new place; an override of an old name is told the new one.
MOVED = {f'model.{key}': f'perf.{key}' for key in default.get_config().perf}


def _config_argument(argv: list[str]) -> str | None:
  """The --config value as given (`path[:arg]`; the last one, as absl takes it), or None."""
  argument = None
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      argument = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      argument = argv[i + 1]
  return argument


def _overrides(argv: list[str]) -> list[tuple[str, str]]:
  """(key, value) of each `--config.KEY=VALUE`, `--config.KEY VALUE`, `--config.KEY` or `--noconfig.KEY`."""
  found = []
  for i, arg in enumerate(argv):
    match = re.fullmatch(r'--(no)?config\.([\w.]+)(?:=(.*))?', arg, re.DOTALL)
    if not match:
      continue
    negated, key, value = match.groups()
    if value is None:
      following = argv[i + 1] if i + 1 < len(argv) else None
      value = ('false' if negated else following if following is not None and not following.startswith('--')
               else 'true')
    found.append((key, value))
  return found


def load_config_file(argument: str) -> ml_collections.ConfigDict:
  """Runs a config file's get_config (`path[:arg]`), as ml_collections does, with its errors as they are."""
  path, has_arg, config_arg = argument.partition(':')
  try:
    loader = importlib.machinery.SourceFileLoader('admin_jax_config_file', path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    config = module.get_config(*([config_arg] if has_arg else []))
  except OSError as error:
    raise UserError(f'--config={argument}: {error}') from None
  except Exception as error:  # whatever the config file itself raised  # pylint: disable=broad-except
    raise UserError(f'--config={argument}: {type(error).__name__}: {error}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f'--config={argument}: get_config() returned {type(config).__name__}, '
                    'not an ml_collections.ConfigDict')
  return config


_BOOLEANS = {'true': True, '1': True, 'false': False, '0': False}


def check_overrides(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]) -> None:
  """Refuses an override whose key the config lacks or whose value is not of the key's type."""
  known = _flat_keys(config)
  for key, value in overrides:
    if key not in known:
      close = [MOVED[key]] if key in MOVED else difflib.get_close_matches(key, known, n=1)
      hint = f' (did you mean "{close[0]}"?)' if close else ''
      raise UserError(f"unknown config key '{key}'{hint}")
    wanted = type(known[key])
    if wanted is bool and value.lower() not in _BOOLEANS:
      raise UserError(f'config {key}={value!r}: expected true or false')
    if wanted in (int, float):
      try:
        wanted(value)
      except ValueError:
        raise UserError(f'config {key}={value!r}: expected {"an integer" if wanted is int else "a number"}') from None


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, object]:
  """{'section.key': value} of every leaf of a config."""
  flat = {}
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(_flat_keys(value, f'{prefix}{name}.'))
    else:
      flat[f'{prefix}{name}'] = value
  return flat


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parse, after the config file and its overrides are checked here, so that every mistake in
  them is one line of this module's words rather than a rewording of ml_collections' messages."""
  try:
    if (argument := _config_argument(argv)) is not None:
      check_overrides(load_config_file(argument), _overrides(argv))
    return flags.FLAGS(argv)
  except UserError as error:
    _exit(str(error))
  except (flags.Error, ValueError, TypeError, AttributeError, KeyError) as error:
    _exit(_first_line(error))


def _first_line(error: BaseException) -> str:
  return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _exit(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _value(config: ml_collections.ConfigDict, key: str):
  section, name = key.split('.')
  return config[section][name]


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses values no job can run with, naming the key."""
  for key, allowed in CHOICES.items():
    if (value := _value(config, key)) not in allowed:
      raise UserError(f"config {key}={value!r} is not one of {', '.join(allowed)}")
  for keys, holds, wanted in ((POSITIVE, lambda v: v > 0, 'positive'), (NON_NEGATIVE, lambda v: v >= 0, 'non-negative'),
                              (FRACTIONS, lambda v: 0 <= v < 1, 'in [0, 1)')):
    for key in keys:
      if not holds(value := _value(config, key)):
        raise UserError(f'config {key} must be {wanted}, got {value}')
  if config.model.d_model % config.model.num_heads:
    raise UserError(f'config model.d_model={config.model.d_model} is not divisible by '
                    f'model.num_heads={config.model.num_heads}')
  if config.perf.attention_impl == 'cudnn' and config.model.attention_dropout:
    raise UserError("config perf.attention_impl='cudnn' needs model.attention_dropout=0 "
                    '(jax.nn.dot_product_attention has no dropout)')
  for key in ('unrolled_encoder_layers', 'unrolled_decoder_layers'):
    if config.perf[key] and not config.perf.scan_layers:
      raise UserError(f'config perf.{key} counts the layers run before a scan: it needs '
                      'perf.scan_layers=True (without it every layer is unrolled)')
  if config.model.d_model % 2:
    raise UserError('config model.d_model must be even (sinusoidal positions)')
  if config.data.tokens_per_batch < config.data.max_len:
    raise UserError(f'config data.tokens_per_batch={config.data.tokens_per_batch} is less than one row of '
                    f'data.max_len={config.data.max_len} tokens')
  profile_tokens = config.admin.profile_tokens
  if profile_tokens and not config.data.max_len <= profile_tokens <= config.data.tokens_per_batch:
    raise UserError(f'config admin.profile_tokens={config.admin.profile_tokens} must be 0 (the whole batch) or '
                    f'between data.max_len={config.data.max_len} (one packed row) and '
                    f'data.tokens_per_batch={config.data.tokens_per_batch}')
  if config.perf.layer_norm_impl == 'pallas' and config.model.d_model & (config.model.d_model - 1):
    raise UserError(f"config perf.layer_norm_impl='pallas' needs a power-of-two model.d_model "
                    f'(a Triton block), got {config.model.d_model}')


def load_config() -> ml_collections.ConfigDict:
  """The parsed config, validated; a config file that failed to load becomes a UserError."""
  if flags.FLAGS['config'].present == 0 and _CONFIG.value is None:
    raise UserError('--config is required, e.g. --config=configs/demo.py')
  config = _CONFIG.value
  validate(config)
  return config


def require_workdir() -> str:
  if not WORKDIR.value:
    raise UserError('--workdir is required')
  return WORKDIR.value


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes DIR/config.json, the exact config a run used, for people and for resume checks."""
  files.write_text(epath.Path(workdir) / CONFIG_JSON, json.dumps(config.to_dict(), indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config a run wrote to DIR/config.json (None where there is none), over this version's
  defaults: a key added since the run takes its default, which is what the run did before the key
  existed, and a key that moved since is read in its new place. A damaged file, or keys this
  version does not know, are refused in one line."""
  path = epath.Path(workdir) / CONFIG_JSON
  if not path.exists():
    return None
  try:
    saved = json.loads(path.read_text())
  except ValueError as error:  # what json and UTF-8 decoding raise
    raise UserError(f'{path} is damaged: {error}') from None
  if not isinstance(saved, dict) or not all(isinstance(section, dict) for section in saved.values()):
    raise UserError(f'{path} is damaged: not a config of sections of keys')
  _move_keys(saved)
  config = default.get_config()
  unknown = [f'{name}.{key}' for name, section in saved.items() for key in section
             if name not in config or key not in config[name]]
  if unknown:
    raise UserError(f'{path} has keys this version does not know: {", ".join(unknown)}')
  config.lock()
  try:
    config.update(saved)
  except TypeError as error:
    raise UserError(f'{path}: {_first_line(error)}') from None
  return config


def _move_keys(saved: dict) -> None:
  """Puts the keys of a config.json that MOVED since it was written in their place today."""
  for old, new in MOVED.items():
    (old_section, old_key), (new_section, new_key) = old.split('.'), new.split('.')
    if old_key in saved.get(old_section, {}):
      saved.setdefault(new_section, {})[new_key] = saved[old_section].pop(old_key)


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
