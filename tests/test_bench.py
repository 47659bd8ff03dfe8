"""The training benchmark runs end to end, and the optimisations it times change no result."""

import csv
import dataclasses
import json
import math
import pathlib
import subprocess
from typing import Any, NamedTuple

from absl import app
from flax import nnx
import jax
import numpy as np
import optax
import pytest

from admin_jax import bench
from admin_jax import sharding
from admin_jax import train_step as train_step_lib
from admin_jax.errors import UserError
from admin_jax.model import Transformer
from configs import default
from conftest import REPO
from conftest import finish
from conftest import python
from conftest import spawn
from conftest import subprocess_env

TINY = bench.PRESETS['tiny']


class Tolerance(NamedTuple):
  """Relative error allowed in the loss and in each parameter's update (L2 norm of the difference)."""
  loss: float
  update: float


# bfloat16 keeps 8 bits: the loss (log-softmax in float32) moves by less than 1e-4, but gradients of a
# freshly initialised model are sums that largely cancel, so their L2 error reaches about 6%.
BF16 = Tolerance(loss=2e-2, update=1e-1)
F32 = Tolerance(loss=1e-5, update=1e-5)


class FastPath(NamedTuple):
  """Config fields that turn one optimisation on, its tolerance, and fields both paths share.

  The plain path is the tiny preset (float32, unrolled layers, no remat, dropout 0.1) with `shared`
  applied; a path that only applies without attention dropout, say, sets attention_dropout=0 there.
  """
  on: dict[str, Any]
  tolerance: Tolerance
  shared: tuple[tuple[str, Any], ...] = ()


# A new fast path (chunked cross-entropy, ...) is one more line here.
FAST_PATHS = [
    pytest.param(FastPath({'attention_impl': 'cudnn'}, F32, (('attention_dropout', 0.0),)), id='cudnn_attention'),
    pytest.param(FastPath({'attention_impl': 'flash'}, F32, (('attention_dropout', 0.0),)), id='flash_attention'),
    pytest.param(FastPath({'dtype': 'bfloat16'}, BF16), id='bfloat16'),
    pytest.param(FastPath({'remat': 'full'}, F32), id='remat_full'),
    pytest.param(FastPath({'scan_layers': True}, F32), id='scan'),
    # What deep stacks use (big18): matmul outputs, the flash outputs and the FFN's activation saved.
    pytest.param(FastPath({'scan_layers': True, 'remat': 'dots'}, F32), id='scan_remat_dots'),
    pytest.param(FastPath({'layer_norm_impl': 'pallas'}, F32), id='pallas_layer_norm'),
    # What GPU runs use: both Pallas kernels under bf16 compute, against XLA's ops under bf16.
    pytest.param(FastPath({'attention_impl': 'flash', 'layer_norm_impl': 'pallas'}, BF16,
                          (('attention_dropout', 0.0), ('dtype', 'bfloat16'))), id='pallas_kernels_bfloat16'),
    # The residual stream in bf16 too (model.stream_dtype), through the Pallas LayerNorm, carried once by a
    # scan with remat=dots (big18's configuration), against bf16 compute.
    pytest.param(FastPath({'stream_dtype': 'bfloat16', 'layer_norm_impl': 'pallas', 'scan_layers': True,
                           'remat': 'dots'}, BF16, (('dtype', 'bfloat16'),)), id='bfloat16_stream'),
]


def test_tiny_preset_prints_one_json_line_with_every_field(tmp_path):
  command = [python(), '-m', 'admin_jax.bench', '--preset=tiny', '--steps=3', '--warmup_steps=1',
             '--loss_chunk_tokens=64', '--prng_impl=rbg', f'--trace_dir={tmp_path}']
  result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, result.stdout
  record = json.loads(lines[0])
  expected = {'preset', 'device', 'n_devices', 'tokens_per_sec', 'step_ms', 'model_tflops_per_sec', 'mfu',
              'matmul_peak_tflops', 'datasheet_peak_tflops', 'compile_seconds', 'peak_memory_bytes',
              'peak_memory_source', 'params', 'layers', 'd_model', 'ffn_dim', 'num_heads', 'vocab_size',
              'seq_len', 'batch', 'dtype', 'remat', 'steps', 'warmup_steps', 'jax', 'step_ms_min',
              'compiled_temp_bytes', 'prng_impl', 'attention_impl', 'attention_dropout', 'scan_layers',
              'traffic_bytes', 'traffic_bytes_by_kind', 'layer_norm_impl', 'stream_dtype', 'unrolled_encoder_layers',
              'unrolled_decoder_layers'}
  assert expected <= set(record), expected - set(record)
  numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
  assert {k: v for k, v in numbers.items() if not (math.isfinite(v) and v > 0)} == {}
  assert record['preset'] == 'tiny' and record['device'] == 'cpu' and record['steps'] == 3
  assert record['loss_chunk_tokens'] == 64 and record['prng_impl'] == 'rbg'
  # The trace: the optimised program, and a per-op table (device timelines only: empty on a CPU).
  assert 'ENTRY' in (tmp_path / 'hlo.txt').read_text()
  assert (tmp_path / 'ops.csv').read_text().splitlines()[0] == 'line,op,count,total_us,percent_of_line'
  assert_traffic_table_adds_up(record, tmp_path / 'traffic.csv')
  assert record['datasheet_peak_tflops'] is None  # no data sheet for a CPU
  assert record['tokens_per_sec'] == pytest.approx(TINY.batch * TINY.seq_len / (record['step_ms'] / 1e3))


def assert_traffic_table_adds_up(record: dict, table: pathlib.Path) -> None:
  """traffic.csv's rows sum to the record's total, as its kinds do."""
  with table.open() as f:
    rows = list(csv.DictReader(f))
  assert rows and sum(int(row['bytes']) for row in rows) == record['traffic_bytes'] > 0
  assert sum(record['traffic_bytes_by_kind'].values()) == record['traffic_bytes']


def test_step_counts_out_of_range_are_one_line_errors():
  """No timed step left no median to report, and the job ended in a traceback."""
  children = {flag: spawn([python(), '-m', 'admin_jax.bench', '--preset=tiny', flag], subprocess_env())
              for flag in ('--steps=0', '--warmup_steps=-1')}
  for flag, child in children.items():
    result = finish(child, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith(f'error: flag {flag}: '), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_step_xla_cannot_compile_is_one_line_error():
  """XLA refusing the program (out of memory on the target, a flag it cannot honour) is reported as
  one line naming the preset, which `cli.run` prints without a traceback."""
  class Refused:
    def lower(self, *args):
      del args
      return self

    def compile(self):
      raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 146.2G.\nBuffers: ...')

  with pytest.raises(UserError) as error:
    bench._compiled('big18', Refused())
  assert str(error.value) == ('big18: XLA could not compile the train step: '
                              'RESOURCE_EXHAUSTED: Out of memory allocating 146.2G.')


def test_bench_keeps_tensorflow_and_grain_off_the_gpu_path():
  code = ("import admin_jax.bench, sys; "
          "assert 'tensorflow' not in sys.modules and 'grain' not in sys.modules, 'imported'")
  subprocess.run([python(), '-c', code], cwd=REPO, env=subprocess_env(), check=True, timeout=60)


def test_random_batch_is_fully_packed_with_valid_segments():
  batch = bench.random_packed_batch(bench.Preset(layers=1, d_model=8, ffn_dim=8, num_heads=1, batch=16,
                                                 seq_len=12, vocab_size=50))
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


@pytest.fixture(scope='module')
def plain_setup():
  """The plain path's setup and state, with SGD at learning rate 1.

  The update then is minus the gradient, so comparing updated parameters compares gradients
  element by element; an adaptive optimizer's first step (about the gradient's sign) would hide
  differences. The fast paths change the graph only, so every variant starts from this state.
  """
  cfg = bench.model_config(TINY)
  mesh = sharding.make_mesh(default.get_config().mesh)
  return train_step_lib.create_train_state(cfg, optax.sgd(1.0), optax.constant_schedule(1.0), mesh, seed=0)


def _one_step(setup: train_step_lib.Setup, state: train_step_lib.TrainState,
              overrides: dict) -> tuple[float, train_step_lib.TrainState]:
  """(loss, new state) of one real train step, on a fixed batch and dropout key, with `overrides`."""
  cfg = dataclasses.replace(setup.model_cfg, **overrides)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  variant = dataclasses.replace(setup, model_cfg=cfg, graphdef=graphdef)
  local = {k: v[None] for k, v in bench.random_packed_batch(TINY).items()}
  batch = sharding.global_batch(local, setup.mesh, micro_batched=True)
  step = train_step_lib.jit_train_step(variant, default.get_config().train,
                                       jax.tree.map(lambda a: a.sharding, batch))
  state = jax.tree.map(lambda a: a.copy(), state)  # the step donates its input
  with jax.set_mesh(setup.mesh):
    new_state, metrics = step(state, batch)
  assert bool(metrics['finite'])
  return float(metrics['loss']), new_state


@pytest.fixture(scope='module')
def plain_steps() -> dict:
  """Plain-path steps already run, by their shared fields: fast paths that share them compile it once."""
  return {}


def _relative_errors(fast: nnx.State, plain: nnx.State, start: nnx.State) -> dict[str, float]:
  """Per parameter: |fast update - plain update| / |plain update| (L2 norms; update = new - start)."""
  errors = {}
  for (path, f), (_, p), (_, s) in zip(*(nnx.to_flat_state(x) for x in (fast, plain, start))):
    f_update, p_update = np.asarray(f[...]) - np.asarray(s[...]), np.asarray(p[...]) - np.asarray(s[...])
    errors['/'.join(map(str, path))] = float(np.linalg.norm(f_update - p_update) /
                                             max(np.linalg.norm(p_update), 1e-12))
  return errors


@pytest.mark.parametrize('path', FAST_PATHS)
def test_fast_path_train_step_equals_plain_path(path, plain_setup, plain_steps):
  setup, start = plain_setup
  if path.shared not in plain_steps:
    plain_steps[path.shared] = _one_step(setup, start, dict(path.shared))
  plain_loss, plain_state = plain_steps[path.shared]
  fast_loss, fast_state = _one_step(setup, start, {**dict(path.shared), **path.on})
  assert fast_loss == pytest.approx(plain_loss, rel=path.tolerance.loss)
  errors = _relative_errors(fast_state.params, plain_state.params, start.params)
  assert {k: e for k, e in errors.items() if e > path.tolerance.update} == {}


def test_step_estimate_prices_each_part_of_a_plan_at_its_rate():
  """benchmarks/step_estimate.py: matmul FLOPs at the GEMMs' rate (their bytes are in that rate),
  flash kernels per layer, LayerNorm kernels' and XLA fusions' bytes at their own bandwidths."""
  from benchmarks import step_estimate  # pylint: disable=g-import-not-at-top
  triton = 'custom-call:__gpu$xla.gpu.triton'
  rows = [{'kind': 'gemm', 'op_name': 'dot_general', 'bytes': '7000000000'},
          {'kind': triton, 'op_name': 'jit(_forward)/flash_attention_forward/pallas_call', 'bytes': '5000000000'},
          {'kind': triton, 'op_name': 'jit(_backward)/residual_layer_norm_backward/pallas_call', 'bytes': '3000000000'},
          {'kind': 'fusion:kLoop', 'op_name': 'select_n', 'bytes': '2000000000'},
          {'kind': 'copy', 'op_name': 'copy', 'bytes': '1000000000'}]
  record = step_estimate.estimate('big18', rows, flash_ms_per_layer=2.5)
  preset = bench.PRESETS['big18']
  cfg = bench.model_config(preset)
  # big18's matmuls by hand, per token forward: encoder QKV + out + FFN, decoder self QKV + out, cross q + kv +
  # out, FFN; tied logits.
  d, f = cfg.d_model, cfg.ffn_dim
  per_token = 18 * (4 * d * d + 2 * d * f) + 18 * (4 * d * d + 4 * d * d + 2 * d * f) + d * cfg.vocab_size
  matmul_flops = 3 * 2 * per_token * preset.batch * preset.seq_len
  expected_ms = {'gemm': 1e3 * matmul_flops / step_estimate.GEMM_FLOPS_PER_S, 'flash': 18 * 2.5,
                 'layer_norm': 1e3 * 3e9 / step_estimate.LAYER_NORM_BYTES_PER_S,
                 'fusions': 1e3 * 3e9 / step_estimate.FUSION_BYTES_PER_S,
                 'gaps': 1e3 * 18 * step_estimate.GAP_S_PER_LAYER}
  assert record['parts_ms'] == pytest.approx(expected_ms, abs=0.05)
  assert record['step_ms'] == pytest.approx(sum(expected_ms.values()), abs=0.05)
  assert record['tokens_per_sec'] == pytest.approx(preset.batch * preset.seq_len / (record['step_ms'] / 1e3), rel=1e-3)
  with pytest.raises(app.UsageError, match='no flash attention or Pallas LayerNorm'):
    step_estimate.estimate('big18', rows[:1] + rows[3:], flash_ms_per_layer=2.5)
