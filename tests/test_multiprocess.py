"""A real two-process run over one 8-device mesh, against the same run in one process."""

import json
import subprocess

import portpicker
import pytest

from conftest import finish
from conftest import python
from conftest import spawn
from conftest import subprocess_env

RUN = ['--config=configs/demo.py', '--config.model.d_model=32', '--config.model.ffn_dim=64',
       '--config.model.num_encoder_layers=2', '--config.model.num_decoder_layers=2',
       '--config.data.synthetic_train_size=2000', '--config.data.synthetic_eval_size=7',
       '--config.data.eval_batch_size=4', '--config.data.tokens_per_batch=1024', '--config.data.max_len=32',
       '--config.data.vocab_size=300', '--config.data.shards=2', '--config.train.num_steps=6',
       '--config.train.warmup_steps=3', '--config.train.log_every_steps=1', '--config.checkpoint.every_steps=3',
       '--config.eval.every_steps=0']


def start(workdir, *extra, processes: int = 1) -> list[subprocess.Popen]:
  """The training job over 8 CPU devices in `processes` processes, started and not waited for."""
  command = [python(), '-m', 'admin_jax.train', f'--workdir={workdir}', *RUN, *extra]
  if processes > 1:
    address = f'localhost:{portpicker.pick_unused_port()}'
    commands = [[*command, f'--coordinator_address={address}', f'--num_processes={processes}', f'--process_id={i}']
                for i in range(processes)]
  else:
    commands = [command]
  return [spawn(c, subprocess_env(8 // processes)) for c in commands]


def records(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def last_per_step(workdir, key) -> dict[int, float]:
  return {r['step']: r[key] for r in records(workdir) if key in r}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  one, two = tmp_path_factory.mktemp('one_process'), tmp_path_factory.mktemp('two_processes')
  for result in [finish(child) for child in start(one) + start(two, processes=2)]:  # all three at once
    assert result.returncode == 0, result.stderr[-3000:]
  return one, two


def test_two_processes_log_the_losses_of_one(runs):
  one, two = runs
  losses_one, losses_two = last_per_step(one, 'loss'), last_per_step(two, 'loss')
  assert sorted(losses_one) == list(range(1, 7))
  for step, loss in losses_one.items():
    assert losses_two[step] == pytest.approx(loss, rel=1e-5), step


def test_uneven_evaluation_across_processes_gives_the_same_bleu(runs):
  one, two = runs  # 7 test sentences: 4 on one process, 3 on the other, in batches of 2 per process
  assert last_per_step(two, 'test_bleu')[6] == pytest.approx(last_per_step(one, 'test_bleu')[6], abs=1e-6)
  assert (two / 'eval' / 'test.hyp').read_text() == (one / 'eval' / 'test.hyp').read_text()


def test_two_process_checkpoint_resumes_in_one_process(runs):
  _, two = runs
  result = finish(*start(two, '--config.train.num_steps=8'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from' in result.stdout and f'{two}/checkpoints/6' in result.stdout
  assert sorted(last_per_step(two, 'loss')) == list(range(1, 9))
