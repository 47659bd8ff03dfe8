"""Training throughput: `python -m admin_jax.bench --config=configs/bench/base6.py [--config.a.b=v ...]`.

Times the config's own train step (its model and `perf` settings, label-smoothed loss, optimizer,
train.grad_accum micro-batches, dropout PRNG and mesh; the state donated) on random, fully packed
rows of data.max_len tokens, data.tokens_per_batch per micro-batch, so that the figures measure the
model and not the input pipeline. Any training config can be timed so; configs/bench/ holds the
sizes of the measured table (docs/PERF.md). Prints one JSON line on stdout; progress goes to
stderr. Omega keeps its initial value (no profiling pass): it changes no shape and no FLOP.

`peak_memory_bytes` from the device's allocator is the process's peak: one config per process
(benchmarks/gpu_bench.sh runs several so).

`--input` times the config's input pipeline alone instead (admin_jax/data/throughput.py), at its
shapes and data.workers.
"""

import collections
import glob
import json
import os
import statistics
import time

from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
from tqdm import tqdm

from admin_jax import cli
from admin_jax import files
from admin_jax import flops
from admin_jax import optim
from admin_jax import sharding
from admin_jax import train_step as train_step_lib
from admin_jax.errors import UserError
from admin_jax.model import TransformerConfig
from admin_jax.special_tokens import UNK_ID

_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps; the median is reported.', lower_bound=1)
_WARMUP_STEPS = flags.DEFINE_integer('warmup_steps', 3, 'Untimed steps after compiling.', lower_bound=0)
_TRACE_DIR = flags.DEFINE_string('trace_dir', '', "Also trace a few steps here and write ops.csv (device time per "
                                 "XLA op), hlo.txt (the optimised program) and the TensorBoard trace "
                                 "(benchmarks/traffic.py estimates hlo.txt's memory traffic).")
_INPUT = flags.DEFINE_bool('input', False, "Time the training input pipeline alone instead, at --config's shapes "
                           'and data.workers (admin_jax/data/throughput.py).')

MAX_SEGMENTS = 4
TRACE_STEPS = 3
TOP_OPS = 25  # ops logged from a trace


def _packed_side(rng: np.random.Generator, segments: np.ndarray, length: int,
                 vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Tokens, segment ids (1..k) and positions of rows fully packed with segments[r] sentences each."""
  rows = len(segments)
  segmentation = np.empty((rows, length), np.int32)
  position = np.empty((rows, length), np.int32)
  for r, count in enumerate(segments):
    starts = np.concatenate([[0], np.sort(rng.choice(np.arange(1, length), count - 1, replace=False))])
    ids = np.searchsorted(starts, np.arange(length), side='right')
    segmentation[r] = ids
    position[r] = np.arange(length) - starts[ids - 1]
  tokens = rng.integers(UNK_ID + 1, vocab, (rows, length), dtype=np.int32)
  return tokens, segmentation, position


def random_packed_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random rows with no padding: 1 to MAX_SEGMENTS sentence pairs per row, lengths differing by side."""
  rng = np.random.default_rng(seed)
  segments = rng.integers(1, MAX_SEGMENTS + 1, rows)
  batch = {}
  for side in ('inputs', 'targets'):
    tokens, segmentation, position = _packed_side(rng, segments, length, vocab)
    batch.update({side: tokens, f'{side}_segmentation': segmentation, f'{side}_position': position})
  return batch


def micro_batches(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """train.grad_accum random micro-batches of data.tokens_per_batch // data.max_len rows, stacked."""
  rows = config.data.tokens_per_batch // config.data.max_len  # at least one: cli.validate refuses fewer
  batches = [random_packed_batch(rows, config.data.max_len, config.data.vocab_size, seed)
             for seed in range(config.train.grad_accum)]
  return {key: np.stack([batch[key] for batch in batches]) for key in batches[0]}


def _memory(compiled: jax.stages.Compiled) -> tuple[int, str]:
  """(peak bytes, source): the allocator's peak where the device keeps one, else the compiler's plan."""
  stats = jax.devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'memory_stats.peak_bytes_in_use'
  analysis = compiled.memory_analysis()
  return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes), 'memory_analysis.temp+argument'


def _timed_steps(compiled, state, micro_batches, count: int, desc: str) -> tuple[train_step_lib.TrainState, list]:
  """Runs `count` steps, blocking on each one's outputs so that every time is the step's own."""
  seconds = []
  for _ in tqdm(range(count), desc=desc, unit='step', leave=False, disable=count == 0):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(compiled(state, micro_batches))
    seconds.append(time.perf_counter() - start)
  return state, seconds


def _trace(compiled, state, micro_batches, directory: str) -> None:
  """Traces TRACE_STEPS steps into `directory` and writes ops.csv and the optimised program (hlo.txt) beside
  the trace."""
  files.write_text(os.path.join(directory, 'hlo.txt'), compiled.as_text())
  with jax.profiler.trace(directory):
    _timed_steps(compiled, state, micro_batches, TRACE_STEPS, 'trace')
  rows = device_op_times(directory)
  files.write_csv(os.path.join(directory, 'ops.csv'), ['line', 'op', 'count', 'total_us', 'percent_of_line'], rows)
  for line, op, count, total_us, percent in rows[:TOP_OPS]:
    logging.info('%-22s %-50s %6d %12.0f us %5.1f%%', line, op, count, total_us, percent)


def device_op_times(directory: str) -> list[tuple[str, str, int, float, float]]:
  """(timeline, op, count, total microseconds, percent of its timeline) for the device timelines of
  the newest trace in `directory`, the slowest first. On GPUs the "XLA Ops" timeline names each
  op as the optimised HLO does, so hlo.txt says what each fusion computes."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top

  newest = max(glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True), key=os.path.getmtime)
  totals = collections.defaultdict(lambda: [0, 0.0])
  line_totals = collections.Counter()
  for plane in ProfileData.from_file(newest).planes:
    if not plane.name.startswith('/device:'):
      continue
    for line in plane.lines:
      for event in line.events:
        entry = totals[line.name, event.name]
        entry[0] += 1
        entry[1] += event.duration_ns / 1e3
        line_totals[line.name] += event.duration_ns / 1e3
  rows = [(line, op, count, total, 100 * total / line_totals[line]) for (line, op), (count, total) in totals.items()]
  return sorted(rows, key=lambda row: -row[3])


def _described(config: ml_collections.ConfigDict, rows: int) -> dict:
  """The fields of a record that say what ran: the config file and its overrides, its model and perf
  sections, and the step's shapes."""
  return {
      'config': config_flags.get_config_filename(flags.FLAGS['config']),
      'overrides': config_flags.get_override_values(flags.FLAGS['config']),
      **config.model.to_dict(),
      **config.perf.to_dict(),
      'vocab_size': config.data.vocab_size,
      'seq_len': config.data.max_len,
      'batch': rows,
      'grad_accum': config.train.grad_accum,
      'loss_chunk_tokens': config.train.loss_chunk_tokens or None,  # None: the whole batch's logits at once
      'prng_impl': config.train.prng_impl,
      'jax': jax.__version__,
  }


def _compiled(step_fn, *args) -> tuple[jax.stages.Compiled, float]:
  """The step compiled for `args`, and the seconds that took (lowering included). XLA's refusal (a
  flag it cannot honour, say) becomes one line."""
  start = time.perf_counter()
  try:
    compiled = step_fn.lower(*args).compile()
  except jax.errors.JaxRuntimeError as error:
    raise UserError(f'XLA could not compile the train step: {str(error).splitlines()[0]}') from None
  return compiled, time.perf_counter() - start


def benchmark(config: ml_collections.ConfigDict, steps: int, warmup_steps: int, matmul_peak: float,
              trace_dir: str = '') -> dict:
  """Compiles and times the config's train step; returns the JSON record."""
  model_cfg = TransformerConfig.from_config(config, config.data.vocab_size)
  local = micro_batches(config)
  accum, rows, length = local['inputs'].shape
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_rows(rows, mesh)
  tx, schedule = optim.make_optimizer(config.train)
  setup, _ = train_step_lib.abstract_train_state(model_cfg, tx, schedule, mesh, config.train.seed,
                                                 config.train.prng_impl)
  step_fn = train_step_lib.jit_train_step(
      setup, config.train, sharding.batch_sharding(mesh, local['inputs'].shape, micro_batched=True))
  state = train_step_lib.initial_state(setup, config.train.seed)
  batches = sharding.global_batch(local, mesh, micro_batched=True)

  with jax.set_mesh(mesh):
    compiled, compile_seconds = _compiled(step_fn, state, batches)
    state, _ = _timed_steps(compiled, state, batches, warmup_steps, 'warm-up')
    state, seconds = _timed_steps(compiled, state, batches, steps, 'steps')
    if trace_dir:
      _trace(compiled, state, batches, trace_dir)

  step_s = statistics.median(seconds)
  n_devices = jax.device_count()
  flops_per_step = accum * flops.training_flops(model_cfg, rows, length, length)
  tflops = flops_per_step / step_s / 1e12 / n_devices
  datasheet = flops.datasheet_peak()
  memory, memory_source = _memory(compiled)
  plan = compiled.memory_analysis()
  return {
      'device': jax.devices()[0].device_kind,
      'n_devices': n_devices,
      'tokens_per_sec': accum * rows * length / step_s,  # no padding: every target token counts
      'step_ms': step_s * 1e3,
      'step_ms_min': min(seconds) * 1e3,
      'model_tflops_per_sec': tflops,
      'mfu': tflops / matmul_peak,
      'matmul_peak_tflops': matmul_peak,
      'datasheet_peak_tflops': datasheet[1] if datasheet else None,
      'compile_seconds': compile_seconds,
      'peak_memory_bytes': memory,
      'peak_memory_source': memory_source,
      'compiled_temp_bytes': int(plan.temp_size_in_bytes),  # the step's own working memory, per compile
      'params': sum(x.size for x in jax.tree.leaves(state.params)),
      'steps': steps,
      'warmup_steps': warmup_steps,
      **_described(config, rows),
  }


def main(argv):
  del argv
  config = cli.load_config()
  if _INPUT.value:
    from admin_jax.data import throughput  # pylint: disable=g-import-not-at-top  (grain: not on the step's path)
    print(json.dumps(throughput.measure(config, cli.WORKDIR.value or '')), flush=True)
    return
  record = benchmark(config, _STEPS.value, _WARMUP_STEPS.value, flops.measured_matmul_tflops(), _TRACE_DIR.value)
  print(json.dumps(record), flush=True)


if __name__ == '__main__':
  cli.run(main)
