"""A planned train step's time on an H200, priced part by part at the rates a measured trace ran at.

`python -m admin_jax.compile --config=... --target=h200 --dump_dir=DIR` writes what XLA would run on
the card (DIR/train_step.hlo.txt; benchmarks/traffic.py estimates the bytes each op moves), but no time:
that needs the card. This prices each part
of such a plan at the rate the same kind of work ran at in the measured trace of big6 on an H200
(docs/PERF.md): the matmuls' FLOPs at the GEMMs' rate, the flash kernels at the
sweep's time per layer, the Pallas LayerNorm kernels' and XLA's fusions' bytes at the bandwidths
they reached, and the idle gaps between kernels per layer. Priced so, the measured base6 and
scanned big18 plans come within 0.5% and 4.1% of their measured steps. The rates hold for plans with
flash attention and the Pallas LayerNorm, at the presets' attention shapes (2048 sequence-head
pairs of 256 x 256 per call), which is all this prices.

  python -m benchmarks.step_estimate big18 DIR/train_step.hlo.txt   # from the repository root, for a config
                                                                     # of big18's shapes
"""

import dataclasses
import json

from absl import app, flags

from admin_jax import bench
from admin_jax import flops
from benchmarks import traffic

# Call D, H200, big6 unrolled with flash attention and the Pallas LayerNorm, 112.8 ms per step:
GEMM_FLOPS_PER_S = 41.08e12 / 52.5e-3  # its matmuls' FLOPs (all but attention's) over the GEMMs' time
LAYER_NORM_BYTES_PER_S = 29.2e9 / 8.8e-3  # the LayerNorm kernels' planned bytes over their time
FUSION_BYTES_PER_S = 88.6e9 / 29.3e-3  # XLA's reduction and loop fusions' planned bytes over their time
GAP_S_PER_LAYER = 3.7e-3 / 6  # device idle time per encoder-decoder layer pair

_PRESETS = ('base6', 'big6', 'big18')  # the attention shape the flash time was measured at
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


def estimate(preset_name: str, traffic_rows: list[dict[str, str]], flash_ms_per_layer: float) -> dict:
  """The planned step's time in parts (ms) and its tokens per second."""
  bytes_by_part = {'gemm': 0, 'flash': 0, 'layer_norm': 0, 'fusions': 0}
  for row in traffic_rows:
    bytes_by_part[_part(row)] += int(row['bytes'])
  if not bytes_by_part['flash'] or not bytes_by_part['layer_norm']:
    raise app.UsageError('the plan has no flash attention or Pallas LayerNorm kernels: the rates are for plans '
                         'compiled with --attention_impl=flash --layer_norm_impl=pallas')
  preset = bench.PRESETS[preset_name]
  cfg = bench.model_config(preset)
  seconds = {
      'gemm': flops.projection_flops(cfg, preset.batch, preset.seq_len, preset.seq_len) / GEMM_FLOPS_PER_S,
      'flash': preset.layers * flash_ms_per_layer * 1e-3,
      'layer_norm': bytes_by_part['layer_norm'] / LAYER_NORM_BYTES_PER_S,
      'fusions': bytes_by_part['fusions'] / FUSION_BYTES_PER_S,
      'gaps': preset.layers * GAP_S_PER_LAYER,
  }
  step = sum(seconds.values())
  return {'preset': preset_name, 'card': 'NVIDIA H200', 'step_ms': round(step * 1e3, 1),
          'tokens_per_sec': round(preset.batch * preset.seq_len / step),
          'parts_ms': {part: round(s * 1e3, 1) for part, s in seconds.items()},
          'planned_bytes': bytes_by_part}


def main(argv):
  if len(argv) != 3 or argv[1] not in _PRESETS:
    raise app.UsageError(f'expected PRESET PROGRAM, the preset one of {", ".join(_PRESETS)}')
  try:
    with open(argv[2]) as f:
      program = f.read()
  except OSError as error:
    raise app.UsageError(f'{argv[2]}: {error.strerror}') from None
  rows = [{field: str(value) for field, value in dataclasses.asdict(op).items()} for op in traffic.estimate(program)]
  print(json.dumps(estimate(argv[1], rows, _FLASH_MS.value)))


if __name__ == '__main__':
  app.run(main)
