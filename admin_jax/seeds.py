"""Several training seeds sharing one profile: `python -m admin_jax.seeds --config=... --workdir=DIR
[--seeds=1111,2222,3333,4444,5555] [--checkpoint=avg:10]`.

As the authors run IWSLT14: omega is profiled once, with the first seed, in DIR/profile (Admin only;
admin.profile_path, if set, is used instead), and every seed trains from that profile and that
SentencePiece model in DIR/seed_SEED (a stopped seed resumes; a finished one is only scored again).
Each seed is then scored on the test split at --checkpoint (the paper: the average of the last 10
epochs), and DIR/seeds.json gets every seed's figures with their mean and sample standard deviation
(ddof=1), which are also printed, the paper's figure (tokenized BLEU) first.
"""

import copy
import json

from absl import flags
from etils import epath
import ml_collections
import numpy as np

from admin_jax import cli
from admin_jax import distributed
from admin_jax import corpus_eval
from admin_jax import files
from admin_jax import profile_omega
from admin_jax import omega_init
from admin_jax import trained_run
from admin_jax import train
from admin_jax.data import tokenizer as tokenizer_lib
from admin_jax.errors import UserError

SEEDS = flags.DEFINE_list('seeds', ['1111', '2222', '3333', '4444', '5555'],
                          'Training seeds, comma-separated; the first also seeds the profile.')
CHECKPOINT = flags.DEFINE_string('checkpoint', 'avg:10', f'Which weights each seed is scored with: '
                                 f'{trained_run.CHECKPOINT_FORMS}.')
SEEDS_JSON = 'seeds.json'
FIGURES = {'tokenized_bleu': 'tokenized BLEU', 'bleu': 'sacreBLEU', 'compound_split_bleu': 'compound-split BLEU',
           'chrf': 'chrF2'}


def parse_seeds(values: list[str]) -> list[int]:
  if not values or not all(v.strip().isdigit() for v in values):
    raise UserError(f'--seeds={",".join(values)}: expected non-negative integers, comma-separated')
  seeds = [int(v) for v in values]
  if len(set(seeds)) != len(seeds):
    raise UserError(f'--seeds={",".join(values)} repeats a seed')
  return seeds


def shared_profile(config: ml_collections.ConfigDict, workdir: str, seed: int) -> ml_collections.ConfigDict:
  """The config every seed trains with: the profile of `seed` (made in DIR/profile unless there) and its
  SentencePiece model."""
  config = copy.deepcopy(config)
  folder = epath.Path(workdir) / 'profile'
  if config.model.residual == 'admin' and not config.admin.profile_path:
    if not (folder / omega_init.OMEGA_JSON).exists():
      first = copy.deepcopy(config)
      first.train.seed = seed
      profile_omega.profile_workdir(first, str(folder))
    config.admin.profile_path = str(folder / omega_init.OMEGA_JSON)
  if not config.data.spm_model:
    tokenizer_lib.load_or_train_tokenizer(config, str(folder))  # the profile's, else one trained there
    config.data.spm_model = str(folder / tokenizer_lib.MODEL_NAME)
  return config


def summarize(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
  """Mean and sample standard deviation (ddof=1; 0 for one seed) of each figure over the seeds."""
  out = {}
  for figure in FIGURES:
    values = np.asarray([scores[figure] for scores in per_seed.values()], np.float64)
    out[figure] = {'mean': float(values.mean()), 'std': float(values.std(ddof=1)) if len(values) > 1 else 0.0}
  return out


def main(argv):
  del argv
  config = cli.load_config()
  workdir = cli.require_workdir()
  distributed.initialize()
  seeds = parse_seeds(SEEDS.value)
  trained_run.parse_checkpoint(CHECKPOINT.value)
  config = shared_profile(config, workdir, seeds[0])
  per_seed = {}
  for seed in seeds:
    run_config = copy.deepcopy(config)
    run_config.train.seed = seed
    run_dir = str(epath.Path(workdir) / f'seed_{seed}')
    train.train_and_evaluate(run_config, run_dir)
    model = trained_run.load_for_inference(run_dir, CHECKPOINT.value)
    evaluator = corpus_eval.Evaluator(model.config, model.tokenizer, model.setup, model.mesh)
    scores = evaluator.test(model.params, run_dir)
    per_seed[seed] = {figure: float(scores[f'test_{figure}']) for figure in FIGURES}
  summary = summarize(per_seed)
  if distributed.is_lead():
    record = {'checkpoint': CHECKPOINT.value, 'seeds': per_seed, 'summary': summary,
              'profile': config.admin.profile_path, 'signature': scores['test_bleu_signature']}
    files.write_text(epath.Path(workdir) / SEEDS_JSON, json.dumps(record, indent=2))
    for figure, label in FIGURES.items():
      print(f'{label}: {summary[figure]["mean"]:.2f} +- {summary[figure]["std"]:.2f} over {len(seeds)} seeds '
            f'({", ".join(f"{per_seed[s][figure]:.2f}" for s in seeds)})')
    print(f'wrote {epath.Path(workdir) / SEEDS_JSON}')


if __name__ == '__main__':
  cli.run(main)
