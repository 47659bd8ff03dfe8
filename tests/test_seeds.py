"""The seeds job: one profile shared by every seed, each seed scored, mean and spread reported."""

import json
import subprocess

import numpy as np
import pytest

from conftest import REPO
from conftest import python
from conftest import subprocess_env

TINY = ('--config=configs/demo.py', '--config.train.num_steps=3', '--config.checkpoint.every_steps=3',
        '--config.eval.every_steps=-1', '--config.eval.beam_size=1', '--config.model.d_model=16',
        '--config.model.ffn_dim=32', '--config.model.num_encoder_layers=1', '--config.model.num_decoder_layers=1',
        '--config.data.vocab_size=200', '--config.data.max_len=32', '--config.data.tokens_per_batch=256',
        '--config.data.synthetic_train_size=300', '--config.data.synthetic_eval_size=8',
        '--config.data.eval_batch_size=4', '--config.admin.profile_tokens=64')


def test_seeds_share_one_profile_and_report_mean_and_sample_std(tmp_path):
  env = dict(subprocess_env(), JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  out = subprocess.run([python(), '-m', 'admin_jax.seeds', f'--workdir={tmp_path / "runs"}', *TINY,
                        '--seeds=7,8', '--checkpoint=latest'], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  runs = tmp_path / 'runs'
  profile = runs / 'profile' / 'omega.json'
  assert json.loads(profile.read_text())['batch']['inputs_shape'] == [2, 32]  # profiled once, on 64 tokens
  assert out.stdout.count(f'omega from {profile} (not profiling again)') == 2
  record = json.loads((runs / 'seeds.json').read_text())
  assert sorted(record['seeds']) == ['7', '8']
  losses = [json.loads((runs / f'seed_{s}' / 'metrics.jsonl').read_text().splitlines()[1])['loss']
                  for s in (7, 8)]
  assert losses[0] != losses[1]  # the seeds train differently
  for figure, summary in record['summary'].items():
    values = [record['seeds'][s][figure] for s in ('7', '8')]
    assert summary['mean'] == pytest.approx(np.mean(values), rel=1e-12)
    assert summary['std'] == pytest.approx(abs(values[0] - values[1]) / np.sqrt(2), rel=1e-12)  # ddof=1
  assert 'tokenized BLEU: ' in out.stdout.splitlines()[-5]
