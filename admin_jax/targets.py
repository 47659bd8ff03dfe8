"""The accelerators a config can be compiled for without one: Cloud TPU slices and NVIDIA GPUs.

One table: each chip's memory, bf16 peak and the source of every figure; each TPU slice size's
chip count and topology; how a target's name (`v4-32`, `v5litepod-16`, `h100-8`) maps to them.
`admin_jax/compile.py` compiles for a target, `admin_jax/deviceless.py` makes its devices, and
`admin_jax/flops.py` takes a device's data-sheet peak (for MFU) from here.
"""

import dataclasses

import ml_collections

from admin_jax.errors import UserError

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip (a TPU chip, a GPU) as a plan counts it."""
  device_kind: str  # as jax.Device.device_kind reports it
  memory_bytes: int  # HBM on the data sheet
  peak_tflops: float  # dense bf16 TFLOP/s on the data sheet
  source: str
  usable_bytes: int | None = None  # what XLA may plan with on a TPU; GPUs: JAX's allocator pool (deviceless.py)


# TPU chips: HBM and peak from each generation's Cloud TPU page; usable bytes are the "available HBM"
# that libtpu 0.0.42.1's compiler (jax 0.10.2) names when a program does not fit.
TPU_CHIPS = {
    'v4': Chip('TPU v4', 32 * GIB, 275.0, 'https://cloud.google.com/tpu/docs/v4', int(30.75 * GIB)),
    'v5e': Chip('TPU v5 lite', 16 * GIB, 197.0, 'https://cloud.google.com/tpu/docs/v5e', int(15.75 * GIB)),
    'v5p': Chip('TPU v5', 95 * GIB, 459.0, 'https://cloud.google.com/tpu/docs/v5p', int(95.74 * GIB)),
    'v6e': Chip('TPU v6 lite', 32 * GIB, 918.0, 'https://cloud.google.com/tpu/docs/v6e', int(31.25 * GIB)),
}


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """How Cloud names a generation's slices and lays out their chips."""
  chip: str  # key of TPU_CHIPS
  prefixes: tuple[str, ...]  # accelerator-type prefixes, e.g. v5litepod-16 and v5e-16
  topology_prefix: str  # as libtpu names its topologies, e.g. 'v4:2x2x1'
  cores_per_chip: int  # 2 (megacore): v4-N and v5p-N count TensorCores, N/2 chips
  layouts: dict[int, str]  # chips -> the slice's default topology
  chips_per_host: int  # of multi-host slices; a slice of up to 8 chips on v5e/v6e is one host


# Default slice shapes (https://cloud.google.com/tpu/docs/types-topologies): v4 and v5p are 3D, up to a
# 4096-chip pod; v5e and v6e 2D, up to 256 chips.
_CUBES = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8', 256: '4x8x8', 512: '8x8x8',
          1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'}
_SQUARES = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}
TPU_GENERATIONS = (
    TpuGeneration('v4', ('v4',), 'v4', 2, _CUBES, 4),
    TpuGeneration('v5p', ('v5p',), 'v5p', 2, _CUBES, 4),
    TpuGeneration('v5e', ('v5litepod', 'v5e'), 'v5e', 1, _SQUARES, 4),
    TpuGeneration('v6e', ('v6e',), 'v6e', 1, _SQUARES, 4),
)

# GPUs: one card each; `name-N` is N of them, 8 to a host (NVLink within a host).
GPU_CHIPS = {
    'h100': Chip('NVIDIA H100 80GB HBM3', 81_559 * 2 ** 20, 989.0,
                 'https://www.nvidia.com/en-us/data-center/h100/ (SXM, dense bf16); memory as the driver reports it'),
    'h200': Chip('NVIDIA H200', 143_771 * 2 ** 20, 989.0,
                 'https://www.nvidia.com/en-us/data-center/h200/ (SXM, dense bf16); memory as the driver reports it'),
}
GPUS_PER_HOST = 8

# Kernels written for GPUs (Triton through Pallas, cuDNN), by config key: a TPU runs XLA's ops instead.
GPU_ONLY_KERNELS = {'attention_impl': ('flash', 'cudnn'), 'layer_norm_impl': ('pallas',)}


@dataclasses.dataclass(frozen=True)
class Target:
  """A named slice or set of GPUs: what to compile for and what to compare the plan with."""
  name: str
  platform: str  # 'tpu' | 'cuda'
  chip_name: str  # key of TPU_CHIPS or GPU_CHIPS
  chip: Chip
  chips: int
  hosts: int
  topology: str  # libtpu's topology name ('v4:2x2x1'), or slices x hosts x GPUs for CUDA ('1x1x8')
  megacore: bool = False  # a TPU chip's two TensorCores act as one device (v4, v5p)


def _tpu(name: str, generation: TpuGeneration, size: int) -> Target:
  chips, remainder = divmod(size, generation.cores_per_chip)
  if remainder or chips not in generation.layouts:
    sizes = ', '.join(str(c * generation.cores_per_chip) for c in generation.layouts)
    raise ValueError(f'{name}: a {generation.prefixes[0]} slice has {sizes} '
                     f'{"TensorCores" if generation.cores_per_chip > 1 else "chips"}')
  hosts = 1 if generation.cores_per_chip == 1 and chips <= 8 else max(1, chips // generation.chips_per_host)
  return Target(name, 'tpu', generation.chip, TPU_CHIPS[generation.chip], chips, hosts,
                f'{generation.topology_prefix}:{generation.layouts[chips]}', generation.cores_per_chip > 1)


def resolve(name: str) -> Target:
  """The target called `name`: a Cloud TPU accelerator type (`v4-32`, `v5litepod-16` or `v5e-16`,
  `v5p-8`, `v6e-4`) or a GPU with an optional count (`h100`, `h200-8`). ValueError names what exists."""
  prefix, _, count = name.partition('-')
  if prefix in GPU_CHIPS:
    gpus = int(count) if count.isdigit() else (1 if not count else 0)
    if gpus < 1 or (gpus > GPUS_PER_HOST and gpus % GPUS_PER_HOST):
      raise ValueError(f'{name}: a GPU target is {prefix}-N with N GPUs, up to {GPUS_PER_HOST} or a multiple of it')
    per_host = min(gpus, GPUS_PER_HOST)
    return Target(name, 'cuda', prefix, GPU_CHIPS[prefix], gpus, gpus // per_host, f'1x{gpus // per_host}x{per_host}')
  for generation in TPU_GENERATIONS:
    if prefix in generation.prefixes and count.isdigit():
      return _tpu(name, generation, int(count))
  known = ', '.join(f'{p}-N' for g in TPU_GENERATIONS for p in g.prefixes)
  raise ValueError(f'unknown target {name!r}: expected a TPU slice ({known}) or a GPU ({", ".join(GPU_CHIPS)}, '
                   'optionally -N)')


def chip_of_kind(device_kind: str) -> Chip | None:
  """The chip a jax.Device.device_kind names, or None for one this table lacks."""
  return next((chip for chip in (*TPU_CHIPS.values(), *GPU_CHIPS.values()) if chip.device_kind == device_kind), None)


def refuse_gpu_kernels(perf: ml_collections.ConfigDict, platform: str, where: str) -> None:
  """GPU-only kernels on a TPU would run in Pallas' interpreter, far slower: refused, naming them."""
  if platform != 'tpu':
    return
  chosen = [f'perf.{key}={perf[key]!r}' for key, kernels in GPU_ONLY_KERNELS.items() if perf[key] in kernels]
  if chosen:
    raise UserError(f'{" and ".join(chosen)} {"is a GPU kernel" if len(chosen) == 1 else "are GPU kernels"}, '
                    f'not for {where}: use the default xla on a TPU')
