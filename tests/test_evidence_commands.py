"""The two prepared GPU commands (the depth experiment and the speed table) run end to end on the CPU
at their smallest scale and write every file they promise; the depth experiment's verdicts on a curve
and its tokenized BLEU."""

import json
import math

import numpy as np
import pytest
from sacrebleu.metrics import BLEU

from admin_jax import score
from conftest import finish
from conftest import python
from conftest import spawn
from conftest import subprocess_env
from scripts import depth_experiment


@pytest.fixture(scope='module')
def smoke_runs(tmp_path_factory) -> dict:
  """Both commands' smoke runs, started together (each mostly compiles on one core): name -> (result, OUT)."""
  depth, speed = tmp_path_factory.mktemp('depth'), tmp_path_factory.mktemp('speed')
  commands = {'depth': (['-m', 'scripts.depth_experiment', f'--out={depth}', '--scale=smoke', '--jobs=2'], depth),
              'speed': (['-m', 'benchmarks.speed_table', f'--out={speed}', '--smoke', '--steps=2'], speed)}
  children = {name: spawn([python(), *command], subprocess_env()) for name, (command, _) in commands.items()}
  return {name: (finish(child), commands[name][1]) for name, child in children.items()}


def read_lines(path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_depth_smoke_writes_a_line_per_run_the_table_and_the_curves(smoke_runs):
  result, out = smoke_runs['depth']
  assert result.returncode == 0, result.stderr[-3000:]
  records = read_lines(out / 'results.jsonl')
  runs = {(r['layers'], r['residual']) for r in records}
  assert runs == set(depth_experiment.SCALES['smoke'].runs) and len(records) == len(runs)
  table = (out / 'results.md').read_text()
  for r in records:
    assert r['status'] == 'finished' and r['last_step'] == depth_experiment.SCALES['smoke'].steps
    assert [step for step, _ in r['losses']] == [1, 2, 3, 4] and all(math.isfinite(v) for _, v in r['losses'])
    assert 0 <= r['test_bleu'] <= 100 and 0 <= r['test_tokenized_bleu'] <= 100
    assert 'tok:13a' in r['test_bleu_signature'] and 'tok:none' in r['tokenized_bleu_signature']
    assert r['compile_seconds'] > 0 and r['diverged_step'] is None
    assert f'| {r["layers"]}L-{r["layers"]}L {r["residual"]} | {r["test_bleu"]:.2f} |' in table
    assert (out / 'runs' / r['run'] / 'eval' / 'test.hyp').exists()
  assert table.startswith('Scale smoke, 4 updates per run')
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  assert matplotlib.image.imread(out / 'curves.png').shape[:2] == (420, 1200)  # one panel per depth, 120 dpi


def test_depth_experiment_skips_finished_runs_when_started_again(smoke_runs):
  _, out = smoke_runs['depth']
  lines = (out / 'results.jsonl').read_text()
  again = finish(spawn([python(), '-m', 'scripts.depth_experiment', f'--out={out}', '--scale=smoke'], subprocess_env()))
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'start ' not in again.stdout and (out / 'results.jsonl').read_text() == lines
  assert '| 2L-2L admin |' in again.stdout  # the table, printed


def test_depth_experiment_without_the_corpus_is_one_line(tmp_path):
  result = finish(spawn([python(), '-m', 'scripts.depth_experiment', f'--out={tmp_path}', '--scale=gpu',
                         f'--data={tmp_path}/none'], subprocess_env()))
  assert result.returncode == 1 and result.stderr.strip().splitlines() == [
      f'error: no Multi30k corpus at {tmp_path}/none: train.en, train.de, val.en, val.de, test_2016_flickr.en, '
      'test_2016_flickr.de[.xz] missing']


def test_speed_smoke_writes_each_run_and_the_decode(smoke_runs):
  result, out = smoke_runs['speed']
  assert result.returncode == 0, result.stderr[-3000:]
  records = read_lines(out / 'speed.jsonl')
  assert [r['run'] for r in records] == ['base6', 'big6', 'big18_scanned', 'profile_decode', 'big18_unrolled']
  assert [r for r in records if 'error' in r] == []
  table = (out / 'speed.md').read_text()
  for r in records:
    if 'tokens_per_sec' in r:
      assert r['config'] == 'configs/bench/tiny.py' and r['prng_impl'] == 'rbg' and r['stream_dtype'] == 'bfloat16'
      assert min(r['tokens_per_sec'], r['mfu'], r['matmul_peak_tflops'], r['compile_seconds'],
                 r['peak_memory_bytes']) > 0
      assert r['scan_layers'] == (r['run'] == 'big18_scanned')
      assert f'| {r["run"]} | configs/bench/tiny.py | cpu | {r["tokens_per_sec"] / 1e3:.1f}k |' in table
      assert f'=== {r["run"]}: python -m admin_jax.bench' in (out / 'runs.log').read_text()
  scanned = records[2]
  assert scanned['remat'] == 'dots' and scanned['unrolled_encoder_layers'] == 1
  decode = records[3]
  assert decode['sentences'] == 8 and decode['beam_size'] == 4  # the smoke's synthetic test split
  assert decode['sentences_per_sec'] == pytest.approx(decode['sentences'] / decode['decode_seconds'])
  assert decode['profile_seconds'] >= decode['profile_compile_seconds'] > 0 and decode['omega_max'] > 1
  assert f'{decode["sentences_per_sec"]:.1f} sentences/s' in table


def test_tokenized_bleu_splits_hyphens_as_moses_does():
  """Moses with aggressive hyphen splitting, then BLEU on the tokens as given, against hand-tokenized text
  scored by sacreBLEU; 13a, which keeps the hyphenated words whole, scores otherwise."""
  hypothesis, reference = 'Ein gut-gelaunter Mann steht vor dem Haus.', 'Ein gut-aussehender Mann steht vor dem Haus.'
  by_hand = BLEU(tokenize='none').corpus_score(['Ein gut @-@ gelaunter Mann steht vor dem Haus .'],
                                               [['Ein gut @-@ aussehender Mann steht vor dem Haus .']]).score
  scores = score.corpus_scores([hypothesis], [reference], tgt_lang='de', lowercase=False, pretokenized=False)
  assert scores['tokenized_bleu'] == pytest.approx(by_hand, abs=1e-9)
  assert by_hand != pytest.approx(BLEU(tokenize='13a').corpus_score([hypothesis], [[reference]]).score, abs=1)


def _curve(losses) -> list[tuple[int, float]]:
  return [(100 * (i + 1), float(v)) for i, v in enumerate(losses)]


def test_a_falling_loss_neither_stalls_nor_diverges():
  falling = _curve(8 * np.exp(-np.arange(20) / 10) + 2)
  assert depth_experiment.stalled_since(falling) is None and depth_experiment.diverged_at(falling) is None


def test_a_loss_stuck_from_step_500_stalls_there():
  stuck = _curve([8, 7.5, 7.2, 7.0, 6.7, 6.69, 6.65, 6.7, 6.6, 6.62, 6.58, 6.6, 6.61, 6.59, 6.6, 6.6, 6.6, 6.6])
  assert depth_experiment.stalled_since(stuck) == 500 and depth_experiment.diverged_at(stuck) is None


@pytest.mark.parametrize('bad, step', [(math.nan, 700), (9.5, 700)], ids=['not_finite', 'blown_up'])
def test_a_loss_that_turns_non_finite_or_blows_up_diverges_there(bad, step):
  curve = _curve([8, 7, 6, 5.5, 5.2, 5.0, bad, 5.5])
  assert depth_experiment.diverged_at(curve) == step
