"""Translation: `python -m admin_jax.translate --workdir=DIR [--checkpoint=latest|best|avg:N|STEP]
[--beam_size=K] [--length_penalty=X] [--batch_size=B] [--input=FILE] [--output=FILE]`.

Reads one source sentence per line (stdin, or FILE, which may be .gz/.xz) and writes one
detokenised translation per line, in input order (stdout, or FILE). The model, vocabulary and
decoding settings are the run's own (DIR/config.json, DIR/spm.model); `--config=FILE` replaces
that config, and the decoding flags override it. evaluate.py shares these flags.
"""

import sys

from absl import flags
import ml_collections

from admin_jax import cli
from admin_jax import distributed
from admin_jax import evaluation
from admin_jax import restore
from admin_jax.data import corpora
from admin_jax.errors import UserError

CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest', f'Which weights: {restore.CHECKPOINT_FORMS}.')
BEAM_SIZE = flags.DEFINE_integer('beam_size', None, "Beam size; default: the config's eval.beam_size.",
                                 lower_bound=1)
LENGTH_PENALTY = flags.DEFINE_float('length_penalty', None,
                                    "Length penalty; default: the config's eval.length_penalty.")
BATCH_SIZE = flags.DEFINE_integer('batch_size', None,
                                  "Sentences per batch; default: the config's data.eval_batch_size.", lower_bound=1)
INPUT = flags.DEFINE_string('input', None, 'Source sentences, one a line (.gz/.xz too); default: stdin.')
OUTPUT = flags.DEFINE_string('output', None, 'Where translations go, one a line; default: stdout.')

_DECODING_FLAGS = {('eval', 'beam_size'): BEAM_SIZE, ('eval', 'length_penalty'): LENGTH_PENALTY,
                   ('data', 'eval_batch_size'): BATCH_SIZE}


def _known_checkpoint(spec: str) -> bool:
  """Lets a mistyped --checkpoint fail while flags are parsed, before input is read or a model loaded."""
  try:
    restore.parse_checkpoint(spec)
  except UserError:
    return False
  return True


flags.register_validator('checkpoint', _known_checkpoint, f'expected {restore.CHECKPOINT_FORMS}')


def config_from_flags(workdir: str) -> ml_collections.ConfigDict:
  """--config if given, else the run's DIR/config.json; then the decoding flags on top."""
  config = cli.load_config() if flags.FLAGS['config'].present else restore.saved_config(workdir)
  for (section, key), flag in _DECODING_FLAGS.items():
    if flag.value is not None:
      config[section][key] = flag.value
  return config


def load_from_flags(workdir: str, config: ml_collections.ConfigDict) -> restore.Inference:
  """The model --checkpoint names, reported on stderr (stdout may carry translations)."""
  inference = restore.load_for_inference(workdir, CHECKPOINT.value, config)
  if distributed.is_lead():
    print(f'checkpoint {CHECKPOINT.value}: step{"s" * (len(inference.steps) > 1)} '
          f'{", ".join(map(str, inference.steps))}', file=sys.stderr)
  return inference


def _read_stdin() -> list[str]:
  """stdin's lines, split and stripped as corpora.read_lines splits a file."""
  data = sys.stdin.buffer.read()
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    raise UserError(f'stdin: invalid UTF-8 on line {line}') from e
  return [line.strip() for line in text.removesuffix('\n').split('\n')] if text else []


def _write(lines: list[str], path: str | None) -> None:
  text = ''.join(line + '\n' for line in lines)
  if path is None:
    sys.stdout.write(text)
    sys.stdout.flush()
  else:
    with open(path, 'w', encoding='utf-8') as f:
      f.write(text)


def main(argv):
  del argv
  workdir = cli.require_workdir()
  distributed.initialize()
  sources = corpora.read_lines(INPUT.value) if INPUT.value else _read_stdin()
  model = load_from_flags(workdir, config_from_flags(workdir))
  evaluator = evaluation.Evaluator(model.config, model.tokenizer, model.setup, model.mesh)
  translations = evaluator.translate(model.params, sources, progress=INPUT.value is not None)
  if distributed.is_lead():
    _write(translations, OUTPUT.value)


if __name__ == '__main__':
  cli.run(main)
