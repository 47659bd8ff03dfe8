"""Peak host memory of reading a training corpus, per pair, to size hosts for large corpora.

  python benchmarks/input_memory.py --config=configs/default.py --config.data.source=text \
      --config.data.train=/path/train --stage=tokens --spm_model=/path/spm.model

Each stage runs in its own process, so its peak resident memory is its own: `strings` holds
the corpus as Python string pairs (what the pipeline held before it tokenized once into arrays),
`tokens` reads it into the pipeline's token arrays (admin_jax/data/tokenized.py), `spm` trains
the SentencePiece model on a sample of `data.spm_max_sentences` sentences. Prints one JSON line:
the peak over the interpreter's own baseline, per pair, and that per-pair cost times
--extrapolate_pairs (WMT14 En-Fr's 36M by default), an extrapolation, stated as such.
"""

import json
import resource

from absl import app
from absl import flags

from admin_jax import cli
from admin_jax.data import corpora
from admin_jax.data import tokenized
from admin_jax.data import tokenizer as tokenizer_lib

_STAGE = flags.DEFINE_enum('stage', 'tokens', ['strings', 'tokens', 'spm'], 'What to hold in memory.')
_SPM_MODEL = flags.DEFINE_string('spm_model', '', 'SentencePiece model for --stage=tokens.')
_EXTRAPOLATE_PAIRS = flags.DEFINE_integer('extrapolate_pairs', 36_000_000, 'Pairs to extrapolate the cost to.')


def _peak_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv):
  del argv
  config = cli.load_config()
  baseline = _peak_bytes()
  if _STAGE.value == 'strings':
    held = corpora.load_pairs(config, 'train')
    pairs = len(held)
  elif _STAGE.value == 'tokens':
    corpus = tokenized.tokenize_pairs(corpora.stream_pairs(config, 'train'),
                                      tokenizer_lib.Tokenizer.load(_SPM_MODEL.value))
    pairs = len(corpus)
  else:
    pairs = sum(1 for _ in corpora.stream_pairs(config, 'train'))
    tokenizer_lib._train(config)  # pylint: disable=protected-access
  per_pair = (_peak_bytes() - baseline) / pairs
  print(json.dumps({'stage': _STAGE.value, 'pairs': pairs, 'peak_over_baseline_bytes': _peak_bytes() - baseline,
                    'bytes_per_pair': per_pair, 'extrapolated_pairs': _EXTRAPOLATE_PAIRS.value,
                    'extrapolated_gib': per_pair * _EXTRAPOLATE_PAIRS.value / 2 ** 30}))


if __name__ == '__main__':
  cli.run(main)
