"""The training benchmark runs end to end, and the optimisations it times change no result."""

import csv
import json
import math
import subprocess

import jax
import numpy as np
import pytest

from admin_jax import bench
from admin_jax.errors import UserError
from benchmarks import traffic
from configs.bench import tiny
from conftest import REPO
from conftest import finish
from conftest import python
from conftest import spawn
from conftest import subprocess_env

TINY = tiny.get_config()


def test_tiny_config_prints_one_json_line_with_every_field(tmp_path):
  command = [python(), '-m', 'admin_jax.bench', '--config=configs/bench/tiny.py', '--steps=3', '--warmup_steps=1',
             '--config.train.loss_chunk_tokens=64', '--config.train.prng_impl=rbg', '--config.train.grad_accum=2',
             f'--trace_dir={tmp_path}']
  result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, result.stdout
  record = json.loads(lines[0])
  expected = {'config', 'overrides', 'device', 'n_devices', 'tokens_per_sec', 'step_ms', 'model_tflops_per_sec',
              'mfu', 'matmul_peak_tflops', 'datasheet_peak_tflops', 'compile_seconds', 'peak_memory_bytes',
              'peak_memory_source', 'params', 'vocab_size', 'seq_len', 'batch', 'grad_accum', 'steps',
              'warmup_steps', 'jax', 'step_ms_min', 'compiled_temp_bytes', 'prng_impl', 'loss_chunk_tokens',
              *TINY.model, *TINY.perf}  # every model and perf key: what ran
  assert expected <= set(record), expected - set(record)
  measured = {k: v for k, v in record.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in TINY.perf}
  assert {k: v for k, v in measured.items() if not (math.isfinite(v) and v > 0)} == {}
  assert record['config'] == 'configs/bench/tiny.py' and record['device'] == 'cpu' and record['steps'] == 3
  assert record['overrides'] == {'train.loss_chunk_tokens': 64, 'train.prng_impl': 'rbg', 'train.grad_accum': 2}
  assert record['loss_chunk_tokens'] == 64 and record['prng_impl'] == 'rbg' and record['grad_accum'] == 2
  assert {key: record[key] for key in TINY.perf} == TINY.perf.to_dict()
  # The trace: the optimised program, and a per-op table (device timelines only: empty on a CPU).
  assert 'ENTRY' in (tmp_path / 'hlo.txt').read_text()
  assert (tmp_path / 'ops.csv').read_text().splitlines()[0] == 'line,op,count,total_us,percent_of_line'
  totals = traffic.write_table(str(tmp_path / 'hlo.txt'))  # the toolbox reads what bench wrote
  with (tmp_path / 'traffic.csv').open() as f:
    rows = list(csv.DictReader(f))
  assert rows and sum(int(row['bytes']) for row in rows) == totals['traffic_bytes'] > 0
  assert sum(totals['traffic_bytes_by_kind'].values()) == totals['traffic_bytes']
  assert record['datasheet_peak_tflops'] is None  # no data sheet for a CPU
  rows = TINY.data.tokens_per_batch // TINY.data.max_len
  assert record['batch'] == rows and record['seq_len'] == TINY.data.max_len
  assert record['tokens_per_sec'] == pytest.approx(2 * TINY.data.tokens_per_batch / (record['step_ms'] / 1e3))


def test_step_counts_out_of_range_and_a_missing_config_are_one_line_errors():
  """No timed step left no median to report, and the job ended in a traceback."""
  runs = {('--config=configs/bench/tiny.py', '--steps=0'): 'error: flag --steps=0: ',
          ('--config=configs/bench/tiny.py', '--warmup_steps=-1'): 'error: flag --warmup_steps=-1: ',
          ('--config=configs/bench/tiny.py', '--config.perf.remat=all'): "error: config perf.remat='all' is not one of",
          ('--steps=1',): 'error: --config is required'}
  children = {flags: spawn([python(), '-m', 'admin_jax.bench', *flags], subprocess_env()) for flags in runs}
  for flags, child in children.items():
    result = finish(child, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith(runs[flags]), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_step_xla_cannot_compile_is_one_line_error():
  """XLA refusing the program (out of memory on the target, a flag it cannot honour) is reported as
  one line, which `cli.run` prints without a traceback."""
  class Refused:
    def lower(self, *args):
      del args
      return self

    def compile(self):
      raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 146.2G.\nBuffers: ...')

  with pytest.raises(UserError) as error:
    bench._compiled(Refused())
  assert str(error.value) == ('XLA could not compile the train step: '
                              'RESOURCE_EXHAUSTED: Out of memory allocating 146.2G.')


def test_bench_keeps_tensorflow_and_grain_off_the_gpu_path():
  code = ("import admin_jax.bench, sys; "
          "assert 'tensorflow' not in sys.modules and 'grain' not in sys.modules, 'imported'")
  subprocess.run([python(), '-c', code], cwd=REPO, env=subprocess_env(), check=True, timeout=60)


def test_random_batch_is_fully_packed_with_valid_segments():
  batch = bench.random_packed_batch(rows=16, length=12, vocab=50)
  for side in ('inputs', 'targets'):
    segments, positions = batch[f'{side}_segmentation'], batch[f'{side}_position']
    assert segments.shape == (16, 12) and (segments >= 1).all()  # no padding
    assert (np.diff(segments, axis=1) >= 0).all() and (np.diff(segments, axis=1) <= 1).all()
    new_segment = np.diff(segments, axis=1) == 1
    assert (positions[:, 0] == 0).all()
    assert np.array_equal(positions[:, 1:], np.where(new_segment, 0, positions[:, :-1] + 1))
    assert (batch[side] > 2).all() and (batch[side] < 50).all()  # no PAD, EOS or UNK ids
  assert np.array_equal(batch['inputs_segmentation'].max(1), batch['targets_segmentation'].max(1))
  assert (batch['inputs_segmentation'] != batch['targets_segmentation']).any()  # lengths differ by side


