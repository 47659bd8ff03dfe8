"""Translation: `python -m admin_jax.translate --workdir=DIR [--checkpoint=latest|best|avg:N|STEP]
[--beam_size=K] [--length_penalty=X] [--batch_size=B] [--input=FILE] [--output=FILE]`.

Reads one source sentence per line (stdin, or FILE, which may be .gz/.xz) and writes one
detokenised translation per line, in input order (stdout, or FILE). The model and decoding
settings are the run's own (DIR/config.json), the vocabulary the checkpoint's own (see
restore.load_for_inference); `--config=FILE` replaces that config, and the decoding flags override
it. evaluate.py shares all flags but --input and --output (inference_flags.py).
"""

import sys

from absl import flags

from admin_jax import cli
from admin_jax import distributed
from admin_jax import corpus_eval
from admin_jax import inference_flags
from admin_jax.data import corpora
from admin_jax.errors import UserError

INPUT = flags.DEFINE_string('input', None, 'Source sentences, one a line (.gz/.xz too); default: stdin.')
OUTPUT = flags.DEFINE_string('output', None, 'Where translations go, one a line; default: stdout.')
flags.adopt_module_key_flags(inference_flags)  # --help lists the shared flags too


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
  model = inference_flags.load_from_flags(workdir, inference_flags.config_from_flags(workdir))
  evaluator = corpus_eval.Evaluator(model.config, model.tokenizer, model.setup, model.mesh)
  translations = evaluator.translate(model.params, sources, progress=INPUT.value is not None)
  if distributed.is_lead():
    _write(translations, OUTPUT.value)


if __name__ == '__main__':
  cli.run(main)
