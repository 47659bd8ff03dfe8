"""Training throughput: `python -m admin_jax.bench --preset=base6,big6,big18 [--steps=20]`.

Times the real train step (Admin model, label-smoothed loss, RAdam update, donated state) on
random, fully packed rows, so the figures measure the model and not the input pipeline. Prints
one JSON line per preset on stdout; progress goes to stderr. Omega keeps its initial value
(no profiling pass): it changes no shape and no FLOP.

`peak_memory_bytes` from the device's allocator is the process's peak so far, so with several
presets in one process a later preset reports at least the earlier ones' peak; run one preset
per process (as benchmarks/gpu_bench.sh does) for exact figures.
"""

import dataclasses
import json
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np
from tqdm import tqdm

from admin_jax import flops
from admin_jax import optim
from admin_jax import sharding
from admin_jax import train_step as train_step_lib
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
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per preset; the median is reported.')
_WARMUP_STEPS = flags.DEFINE_integer('warmup_steps', 3, 'Untimed steps after compiling.')
_REMAT = flags.DEFINE_enum('remat', 'none', ['none', 'full', 'dots'], 'Rematerialisation of each layer.')
_LOSS_CHUNK_TOKENS = flags.DEFINE_integer('loss_chunk_tokens', 0,
                                          'Tokens projected onto the vocabulary at a time in the loss (0: all).')
flags.register_validator('preset', lambda names: all(n in PRESETS for n in names),
                         message=f'every preset must be one of {", ".join(PRESETS)}')

MAX_SEGMENTS = 4


def model_config(preset: Preset, remat: str = 'none') -> TransformerConfig:
  """The paper's Admin model (dropout 0.1 everywhere, shared embeddings) at the preset's shapes."""
  return TransformerConfig(vocab_size=preset.vocab_size, residual='admin', num_encoder_layers=preset.layers,
                           num_decoder_layers=preset.layers, d_model=preset.d_model, ffn_dim=preset.ffn_dim,
                           num_heads=preset.num_heads, dtype=preset.dtype, remat=remat, max_len=preset.seq_len)


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


def benchmark(name: str, preset: Preset, steps: int, warmup_steps: int, remat: str,
              matmul_peak: float, loss_chunk_tokens: int = 0) -> dict:
  """Compiles and times the train step of one preset; returns the JSON record."""
  cfg = model_config(preset, remat)
  config = default.get_config()
  config.train.loss_chunk_tokens = loss_chunk_tokens
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = optim.make_optimizer(config.train)
  setup, state = train_step_lib.create_train_state(cfg, tx, schedule, mesh, config.train.seed)
  local = {k: v[None] for k, v in random_packed_batch(preset).items()}  # one micro-batch
  micro_batches = sharding.global_batch(local, mesh, micro_batched=True)
  step_fn = train_step_lib.jit_train_step(setup, config.train, jax.tree.map(lambda a: a.sharding, micro_batches))

  with jax.set_mesh(mesh):
    start = time.perf_counter()
    compiled = step_fn.lower(state, micro_batches).compile()
    compile_seconds = time.perf_counter() - start
    state, _ = _timed_steps(compiled, state, micro_batches, warmup_steps, f'{name} warm-up')
    state, seconds = _timed_steps(compiled, state, micro_batches, steps, name)

  step_s = statistics.median(seconds)
  n_devices = jax.device_count()
  tflops = flops.training_flops(cfg, preset.batch, preset.seq_len, preset.seq_len) / step_s / 1e12 / n_devices
  datasheet = flops.datasheet_peak()
  memory, memory_source = _memory(compiled)
  return {
      'preset': name,
      'device': jax.devices()[0].device_kind,
      'n_devices': n_devices,
      'tokens_per_sec': preset.batch * preset.seq_len / step_s,  # no padding: every target token counts
      'step_ms': step_s * 1e3,
      'model_tflops_per_sec': tflops,
      'mfu': tflops / matmul_peak,
      'matmul_peak_tflops': matmul_peak,
      'datasheet_peak_tflops': datasheet[1] if datasheet else None,
      'compile_seconds': compile_seconds,
      'peak_memory_bytes': memory,
      'peak_memory_source': memory_source,
      'params': sum(x.size for x in jax.tree.leaves(state.params)),
      'layers': preset.layers,
      'd_model': preset.d_model,
      'ffn_dim': preset.ffn_dim,
      'num_heads': preset.num_heads,
      'vocab_size': preset.vocab_size,
      'seq_len': preset.seq_len,
      'batch': preset.batch,
      'dtype': preset.dtype,
      'remat': remat,
      'loss_chunk_tokens': loss_chunk_tokens or None,  # None: the whole batch's logits at once
      'steps': steps,
      'warmup_steps': warmup_steps,
      'jax': jax.__version__,
  }


def main(argv):
  del argv
  matmul_peak = flops.measured_matmul_tflops()
  for name in tqdm(_PRESET.value, desc='presets', unit='preset', disable=len(_PRESET.value) == 1):
    record = benchmark(name, PRESETS[name], _STEPS.value, _WARMUP_STEPS.value, _REMAT.value, matmul_peak,
                       _LOSS_CHUNK_TOKENS.value)
    print(json.dumps(record), flush=True)


if __name__ == '__main__':
  app.run(main)
