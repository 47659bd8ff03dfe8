"""Scoring a split: `python -m admin_jax.evaluate --workdir=DIR [--split=test]
[--checkpoint=latest|best|avg:N|STEP] [--beam_size=K] [--length_penalty=X] [--batch_size=B]`.

Translates the whole split of the run's corpus and prints, each with its signature, sacreBLEU,
chrF, tokenized BLEU (Moses `-a` tokens, what the paper's tables report) and compound-split BLEU:
the figures of `python -m admin_jax.score` (score.py says which is which). Hypotheses and scores go to
DIR/eval/<split>.hyp and DIR/eval/<split>.scores, replacing those of an earlier evaluation.
Shares translate.py's checkpoint and decoding flags (inference_flags.py), not --input/--output.
"""

from absl import flags

from admin_jax import cli
from admin_jax import distributed
from admin_jax import corpus_eval
from admin_jax import inference_flags

SPLIT = flags.DEFINE_enum('split', 'test', ['valid', 'test'], 'Which split of the run\'s corpus to score.')
flags.adopt_module_key_flags(inference_flags)  # --help lists the shared flags too

_LABELS = {'bleu': 'sacreBLEU', 'chrf': 'chrF2', 'tokenized_bleu': 'tokenized BLEU (paper tables)',
           'compound_split_bleu': 'compound-split BLEU'}


def main(argv):
  del argv
  workdir = cli.require_workdir()
  distributed.initialize()
  config = inference_flags.config_from_flags(workdir)
  config.eval.max_sentences = 0  # the whole valid split, not training's quick subset
  model = inference_flags.load_from_flags(workdir, config)
  evaluator = corpus_eval.Evaluator(model.config, model.tokenizer, model.setup, model.mesh)
  split = SPLIT.value
  scores = evaluator.test(model.params, workdir, split)
  if distributed.is_lead():
    for name, label in _LABELS.items():
      if f'{split}_{name}' in scores:
        print(f'{label} = {scores[f"{split}_{name}"]:.2f} ({scores[f"{split}_{name}_signature"]})')
    print(f'wrote {workdir}/eval/{split}.hyp and {split}.scores')


if __name__ == '__main__':
  cli.run(main)
