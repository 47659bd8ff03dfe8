"""Training throughput: `python -m admin_jax.bench --preset=base6,big6,big18 [--steps=20]`.

Times the real train step (Admin model, label-smoothed loss, RAdam update, donated state) on
random, fully packed rows, so the figures measure the model and not the input pipeline. Prints
one JSON line per preset on stdout; progress goes to stderr. Omega keeps its initial value
(no profiling pass): it changes no shape and no FLOP.

`peak_memory_bytes` from the device's allocator is the process's peak so far, so with several
presets in one process a later preset reports at least the earlier ones' peak; run one preset
per process (as benchmarks/gpu_bench.sh does) for exact figures.

`--input --config=configs/X.py [--config.a.b=v ...]` times the input pipeline alone instead
(admin_jax/data/throughput.py), at the config's shapes and data.workers.
"""

import collections
import dataclasses
import glob
import json
import os
import statistics
import time

from absl import flags
from absl import logging
import jax
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
from configs import default


@dataclasses.dataclass(frozen=True)
class Preset:
  """The shapes of one benchmark: `layers` each side, `batch` rows of `seq_len` tokens per step."""
  layers: int
  d_model: int
  ffn_dim: int
  num_heads: int
  batch: int
  seq_len: int = 256
  vocab_size: int = 32000
  dtype: str = 'bfloat16'


PRESETS = {
    'base6': Preset(layers=6, d_model=512, ffn_dim=2048, num_heads=8, batch=256),
    'big6': Preset(layers=6, d_model=1024, ffn_dim=4096, num_heads=16, batch=128),
    'big18': Preset(layers=18, d_model=1024, ffn_dim=4096, num_heads=16, batch=128),
    # CI smoke test: seconds on a CPU, where bfloat16 matmuls are emulated and slow.
    'tiny': Preset(layers=2, d_model=64, ffn_dim=128, num_heads=4, batch=8, seq_len=32, vocab_size=1000,
                   dtype='float32'),
}

_PRESET = flags.DEFINE_list('preset', ['base6'], f'Comma-separated presets: {", ".join(PRESETS)}.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per preset; the median is reported.', lower_bound=1)
_WARMUP_STEPS = flags.DEFINE_integer('warmup_steps', 3, 'Untimed steps after compiling.', lower_bound=0)
_REMAT = flags.DEFINE_enum('remat', 'none', cli.CHOICES['model.remat'], 'Rematerialisation of each layer.')
_LOSS_CHUNK_TOKENS = flags.DEFINE_integer('loss_chunk_tokens', 0,
                                          'Tokens projected onto the vocabulary at a time in the loss (0: all).',
                                          lower_bound=0)
_PRNG_IMPL = flags.DEFINE_enum('prng_impl', 'threefry2x32', cli.CHOICES['train.prng_impl'],
                               'PRNG of the dropout keys (the masks are hashed from them).')
_ATTENTION_IMPL = flags.DEFINE_enum('attention_impl', 'xla', cli.CHOICES['model.attention_impl'],
                                    'Attention implementation; cudnn runs with attention dropout 0 (it has none).')
_LAYER_NORM_IMPL = flags.DEFINE_enum('layer_norm_impl', 'xla', cli.CHOICES['model.layer_norm_impl'],
                                     'The residual LayerNorm: XLA fusions or one Pallas kernel each way.')
_STREAM_DTYPE = flags.DEFINE_enum('stream_dtype', 'float32', cli.CHOICES['model.stream_dtype'],
                                   'dtype of the residual stream between sublayers (model.stream_dtype).')
_SCAN_LAYERS = flags.DEFINE_bool('scan_layers', False, 'One lax.scan per stack (compile time flat in depth) '
                                  'rather than unrolled layers.')
_UNROLLED_ENCODER_LAYERS = flags.DEFINE_integer('unrolled_encoder_layers', 0, 'With --scan_layers: encoder '
                                                'layers run before its scan (model.unrolled_encoder_layers).',
                                                lower_bound=0)
_UNROLLED_DECODER_LAYERS = flags.DEFINE_integer('unrolled_decoder_layers', 0, 'With --scan_layers: decoder '
                                                'layers run before its scan (model.unrolled_decoder_layers).',
                                                lower_bound=0)
_TRACE_DIR = flags.DEFINE_string('trace_dir', '', 'Also trace a few steps of the last preset here and write '
                                 'ops.csv (device time per XLA op), hlo.txt (the optimised program) and '
                                 'the TensorBoard trace (benchmarks/traffic.py estimates hlo.txt\'s memory traffic).')
_INPUT = flags.DEFINE_bool('input', False, 'Time the training input pipeline alone instead, at --config\'s shapes '
                           'and data.workers (admin_jax/data/throughput.py).')
flags.register_multi_flags_validator(
    ['unrolled_encoder_layers', 'unrolled_decoder_layers', 'scan_layers'],
    lambda f: f['scan_layers'] or not (f['unrolled_encoder_layers'] or f['unrolled_decoder_layers']),
    message='--unrolled_encoder_layers and --unrolled_decoder_layers count layers run before a scan: they need '
            '--scan_layers')
flags.register_validator('preset', lambda names: all(n in PRESETS for n in names),
                         message=f'every preset must be one of {", ".join(PRESETS)}')

MAX_SEGMENTS = 4
SEED = default.get_config().train.seed  # of the parameters and dropout keys, as training's
TRACE_STEPS = 3
TOP_OPS = 25  # ops logged from a trace


@dataclasses.dataclass(frozen=True)
class Options:
  """The optimisations a run times; the defaults are the plain train step."""
  remat: str = 'none'
  loss_chunk_tokens: int = 0
  prng_impl: str = 'threefry2x32'
  attention_impl: str = 'xla'
  scan_layers: bool = False
  unrolled_encoder_layers: int = 0
  unrolled_decoder_layers: int = 0
  layer_norm_impl: str = 'xla'
  stream_dtype: str = 'float32'

  @property
  def attention_dropout(self) -> float:
    return 0.0 if self.attention_impl == 'cudnn' else 0.1


def model_config(preset: Preset, options: Options = Options()) -> TransformerConfig:
  """The paper's Admin model (dropout 0.1 everywhere, shared embeddings) at the preset's shapes."""
  return TransformerConfig(vocab_size=preset.vocab_size, residual='admin', num_encoder_layers=preset.layers,
                           num_decoder_layers=preset.layers, d_model=preset.d_model, ffn_dim=preset.ffn_dim,
                           num_heads=preset.num_heads, dtype=preset.dtype, remat=options.remat,
                           attention_impl=options.attention_impl, attention_dropout=options.attention_dropout,
                           scan_layers=options.scan_layers, unrolled_encoder_layers=options.unrolled_encoder_layers,
                           unrolled_decoder_layers=options.unrolled_decoder_layers,
                           layer_norm_impl=options.layer_norm_impl, stream_dtype=options.stream_dtype,
                           max_len=preset.seq_len)


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


def random_packed_batch(preset: Preset, seed: int = 0) -> dict[str, np.ndarray]:
  """Random rows with no padding: 1 to MAX_SEGMENTS sentence pairs per row, lengths differing by side."""
  rng = np.random.default_rng(seed)
  segments = rng.integers(1, MAX_SEGMENTS + 1, preset.batch)
  batch = {}
  for side in ('inputs', 'targets'):
    tokens, segmentation, position = _packed_side(rng, segments, preset.seq_len, preset.vocab_size)
    batch.update({side: tokens, f'{side}_segmentation': segmentation, f'{side}_position': position})
  return batch


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




def _described(preset: Preset, options: Options) -> dict:
  """The fields of a record that say what ran."""
  return {
      'layers': preset.layers,
      'd_model': preset.d_model,
      'ffn_dim': preset.ffn_dim,
      'num_heads': preset.num_heads,
      'vocab_size': preset.vocab_size,
      'seq_len': preset.seq_len,
      'batch': preset.batch,
      'dtype': preset.dtype,
      'remat': options.remat,
      'loss_chunk_tokens': options.loss_chunk_tokens or None,  # None: the whole batch's logits at once
      'prng_impl': options.prng_impl,
      'attention_impl': options.attention_impl,
      'scan_layers': options.scan_layers,
      'unrolled_encoder_layers': options.unrolled_encoder_layers or None,  # None: no layers run before a scan
      'unrolled_decoder_layers': options.unrolled_decoder_layers or None,
      'layer_norm_impl': options.layer_norm_impl,
      'stream_dtype': options.stream_dtype,
      'attention_dropout': options.attention_dropout,
      'jax': jax.__version__,
  }


def _train_step(preset: Preset, options: Options):
  """(jitted train step, Setup) of the preset, on a mesh of all devices."""
  config = default.get_config()
  config.train.loss_chunk_tokens = options.loss_chunk_tokens
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = optim.make_optimizer(config.train)
  setup, _ = train_step_lib.abstract_train_state(model_config(preset, options), tx, schedule, mesh, SEED,
                                                 options.prng_impl)
  batch_sharding = sharding.batch_sharding(mesh, (1, preset.batch, preset.seq_len), micro_batched=True)
  return train_step_lib.jit_train_step(setup, config.train, batch_sharding), setup


def _compiled(name: str, step_fn, *args) -> tuple[jax.stages.Compiled, float]:
  """The step compiled for `args`, and the seconds that took (lowering included). XLA's refusal (a
  flag it cannot honour, say) becomes one line naming the preset."""
  start = time.perf_counter()
  try:
    compiled = step_fn.lower(*args).compile()
  except jax.errors.JaxRuntimeError as error:
    raise UserError(f'{name}: XLA could not compile the train step: {str(error).splitlines()[0]}') from None
  return compiled, time.perf_counter() - start


def benchmark(name: str, preset: Preset, options: Options, steps: int, warmup_steps: int, matmul_peak: float,
              trace_dir: str = '') -> dict:
  """Compiles and times the train step of one preset; returns the JSON record."""
  step_fn, setup = _train_step(preset, options)
  state = train_step_lib.initial_state(setup, SEED)
  local = {k: v[None] for k, v in random_packed_batch(preset).items()}  # one micro-batch
  micro_batches = sharding.global_batch(local, setup.mesh, micro_batched=True)

  with jax.set_mesh(setup.mesh):
    compiled, compile_seconds = _compiled(name, step_fn, state, micro_batches)
    state, _ = _timed_steps(compiled, state, micro_batches, warmup_steps, f'{name} warm-up')
    state, seconds = _timed_steps(compiled, state, micro_batches, steps, name)
    if trace_dir:
      _trace(compiled, state, micro_batches, trace_dir)

  step_s = statistics.median(seconds)
  n_devices = jax.device_count()
  flops_per_step = flops.training_flops(setup.model_cfg, preset.batch, preset.seq_len, preset.seq_len)
  tflops = flops_per_step / step_s / 1e12 / n_devices
  datasheet = flops.datasheet_peak()
  memory, memory_source = _memory(compiled)
  plan = compiled.memory_analysis()
  return {
      'preset': name,
      'device': jax.devices()[0].device_kind,
      'n_devices': n_devices,
      'tokens_per_sec': preset.batch * preset.seq_len / step_s,  # no padding: every target token counts
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
      **_described(preset, options),
  }


def main(argv):
  del argv
  if _INPUT.value:
    from admin_jax.data import throughput  # pylint: disable=g-import-not-at-top  (grain: not on the step's path)
    print(json.dumps(throughput.measure(cli.load_config(), cli.WORKDIR.value or '')), flush=True)
    return
  options = Options(remat=_REMAT.value, loss_chunk_tokens=_LOSS_CHUNK_TOKENS.value, prng_impl=_PRNG_IMPL.value,
                    attention_impl=_ATTENTION_IMPL.value, scan_layers=_SCAN_LAYERS.value,
                    unrolled_encoder_layers=_UNROLLED_ENCODER_LAYERS.value,
                    unrolled_decoder_layers=_UNROLLED_DECODER_LAYERS.value, layer_norm_impl=_LAYER_NORM_IMPL.value,
                    stream_dtype=_STREAM_DTYPE.value)
  names = _PRESET.value
  matmul_peak = flops.measured_matmul_tflops()
  for name in tqdm(names, desc='presets', unit='preset', disable=len(names) == 1):
    trace_dir = _TRACE_DIR.value if name == names[-1] else ''
    record = benchmark(name, PRESETS[name], options, _STEPS.value, _WARMUP_STEPS.value, matmul_peak, trace_dir)
    print(json.dumps(record), flush=True)


if __name__ == '__main__':
  cli.run(main)
