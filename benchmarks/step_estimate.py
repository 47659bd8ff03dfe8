"""A planned train step's time on an H200, priced part by part at the rates a measured trace ran at.

`python -m admin_jax.compile --config=... --target=h200 --dump_dir=DIR` writes what XLA would run on
the card (DIR/train_step.hlo.txt; benchmarks/traffic.py estimates the bytes each op moves), but no time:
that needs the card. This prices each part
of such a plan at the rate the same kind of work ran at in the measured trace of big6 on an H200
(docs/PERF.md): the matmuls' FLOPs at the GEMMs' rate, the flash kernels at the
sweep's time per layer, the Pallas LayerNorm kernels' and XLA's fusions' bytes at the bandwidths
they reached, and the idle gaps between kernels per layer. Priced so, the measured base6 and
scanned big18 plans come within 0.5% and 4.1% of their measured steps. The rates hold for plans with
flash attention and the Pallas LayerNorm, at the attention shape of configs/bench/ (2048 sequence-head
pairs of 256 x 256 per micro-batch), which is all this prices.

  python -m benchmarks.step_estimate configs/bench/big18.py DIR/train_step.hlo.txt   # from the repository root
"""

import dataclasses
import json

from absl import app, flags
import ml_collections

from admin_jax import cli
from admin_jax import flops
from admin_jax.errors import UserError
from admin_jax.model import TransformerConfig
from benchmarks import traffic

# Call D, H200, big6 unrolled with flash attention and the Pallas LayerNorm, 112.8 ms per step:
GEMM_FLOPS_PER_S = 41.08e12 / 52.5e-3  # its matmuls' FLOPs (all but attention's) over the GEMMs' time
LAYER_NORM_BYTES_PER_S = 29.2e9 / 8.8e-3  # the LayerNorm kernels' planned bytes over their time
FUSION_BYTES_PER_S = 88.6e9 / 29.3e-3  # XLA's reduction and loop fusions' planned bytes over their time
GAP_S_PER_LAYER = 3.7e-3 / 6  # device idle time per encoder-decoder layer pair

ATTENTION_SHAPE = (2048, 256)  # (rows x heads, data.max_len) per micro-batch: the flash time's measured shape
_FLASH_MS = flags.DEFINE_float(
    'flash_ms_per_layer', 2.77, "One encoder-decoder layer pair's attention kernels, forward and backward (two "
    "unmasked calls, one causal): the H200 sweep with 3 pipeline stages, the default; with 2 stages they took 3.17.")


def _part(row: dict[str, str]) -> str:
  """Which rate prices an op of the program's traffic."""
  if row['kind'] == 'gemm':
    return 'gemm'
  if 'triton' in row['kind'] and 'flash_attention' in row['op_name']:
    return 'flash'
  if 'triton' in row['kind'] and 'layer_norm' in row['op_name']:
    return 'layer_norm'
  return 'fusions'  # XLA's fusions and copies


def estimate(config: ml_collections.ConfigDict, traffic_rows: list[dict[str, str]], flash_ms_per_layer: float) -> dict:
  """The planned step's time in parts (ms) and its tokens per second, for a config of one micro-batch
  at ATTENTION_SHAPE."""
  cfg = TransformerConfig.from_config(config, config.data.vocab_size)
  rows, length = config.data.tokens_per_batch // config.data.max_len, config.data.max_len
  if (rows * cfg.num_heads, length) != ATTENTION_SHAPE or config.train.grad_accum != 1:
    raise app.UsageError(f'the flash time holds for {ATTENTION_SHAPE[0]} rows x heads of {ATTENTION_SHAPE[1]} '
                         f'tokens in one micro-batch; the config has {rows} x {cfg.num_heads} of {length}, '
                         f'{config.train.grad_accum} micro-batches')
  bytes_by_part = {'gemm': 0, 'flash': 0, 'layer_norm': 0, 'fusions': 0}
  for row in traffic_rows:
    bytes_by_part[_part(row)] += int(row['bytes'])
  if not bytes_by_part['flash'] or not bytes_by_part['layer_norm']:
    raise app.UsageError('the plan has no flash attention or Pallas LayerNorm kernels: the rates are for plans '
                         'compiled with --attention_impl=flash --layer_norm_impl=pallas')
  if (layers := cfg.num_encoder_layers) != cfg.num_decoder_layers:
    raise app.UsageError('the rates are per encoder-decoder layer pair: the stacks must be equally deep')
  seconds = {
      'gemm': flops.projection_flops(cfg, rows, length, length) / GEMM_FLOPS_PER_S,
      'flash': layers * flash_ms_per_layer * 1e-3,
      'layer_norm': bytes_by_part['layer_norm'] / LAYER_NORM_BYTES_PER_S,
      'fusions': bytes_by_part['fusions'] / FUSION_BYTES_PER_S,
      'gaps': layers * GAP_S_PER_LAYER,
  }
  step = sum(seconds.values())
  return {'card': 'NVIDIA H200', 'step_ms': round(step * 1e3, 1), 'tokens_per_sec': round(rows * length / step),
          'parts_ms': {part: round(s * 1e3, 1) for part, s in seconds.items()},
          'planned_bytes': bytes_by_part}


def main(argv):
  if len(argv) != 3:
    raise app.UsageError('expected CONFIG_FILE PROGRAM')
  try:
    config = cli.load_config_file(argv[1])
  except UserError as error:
    raise app.UsageError(str(error)) from None
  try:
    with open(argv[2]) as f:
      program = f.read()
  except OSError as error:
    raise app.UsageError(f'{argv[2]}: {error.strerror}') from None
  rows = [{field: str(value) for field, value in dataclasses.asdict(op).items()} for op in traffic.estimate(program)]
  print(json.dumps({'config': argv[1], **estimate(config, rows, _FLASH_MS.value)}))


if __name__ == '__main__':
  app.run(main)
