"""Peak host memory of reading a training corpus, per pair, to size hosts for large corpora.

  python benchmarks/input_memory.py --config=configs/default.py --config.data.source=text \
      --config.data.train=/path/train --stage=tokens --spm_model=/path/spm.model

Each stage runs in its own process, so its peak resident memory is its own: `strings` holds
the corpus as Python string pairs (what the pipeline held before it tokenized once into arrays),
`tokens` reads it into the pipeline's token arrays (admin_jax/data/tokenized.py), `spm` trains
the SentencePiece model on a sample of `data.spm_max_sentences` sentences. Prints one JSON line:
the peak over the interpreter's own baseline, and per pair. Run it on two sizes of a corpus: the
difference per pair is the cost a larger corpus adds, without the fixed part (the model, a chunk).
"""

import json
import resource
import sys

from absl import flags

from admin_jax import cli
from admin_jax.data import corpora
from admin_jax.data import tokenized
from admin_jax.data import tokenizer as tokenizer_lib

_STAGE = flags.DEFINE_enum('stage', 'tokens', ['strings', 'tokens', 'spm'], 'What to hold in memory.')
_SPM_MODEL = flags.DEFINE_string('spm_model', '', 'SentencePiece model for --stage=tokens.')


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
    print(f'token arrays: {corpus.nbytes / pairs:.0f} bytes per pair held', file=sys.stderr)
  else:
    pairs = sum(1 for _ in corpora.stream_pairs(config, 'train'))
    tokenizer_lib._train(config)  # pylint: disable=protected-access
  peak = _peak_bytes() - baseline
  print(json.dumps({'stage': _STAGE.value, 'pairs': pairs, 'peak_over_baseline_bytes': peak,
                    'bytes_per_pair': peak / pairs}))


if __name__ == '__main__':
  cli.run(main)
