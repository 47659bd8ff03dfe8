"""Devices of an accelerator this machine does not have, for XLA's deviceless compilation.

`python -m admin_jax.compile --config=... --target=v4-32|h100-8` compiles a config's train step for
a TPU slice or GPUs from a laptop or a CPU-only CI machine: XLA fuses and plans the program's memory
for the named chips as it would on them. It needs only the PJRT plugin of the platform (libtpu for
TPUs, about 0.7 GB; jax's CUDA plugin for GPUs, about 0.5 GB), not the hardware. On a machine
without the hardware keep the plugin out of the environment that trains (JAX would look for the
device at every start): the job finds it in `.tpu-plugin/` or `.cuda-plugin/` at the repository root,

    pip install --no-deps --target .tpu-plugin "libtpu==0.0.42.*"  # the libtpu that jax[tpu]==0.10.2 pins
    pip install --target .cuda-plugin "jax-cuda12-plugin==0.10.2"  # the installed jax's version

or in the environment itself (a TPU VM has libtpu there already); without one, the job prints the
install line for the installed jax.

What needs the hardware: GPU autotuning (so GPU kernels are XLA's untuned defaults and compile
seconds exclude autotuning), and running (so there is no step time).
"""

import dataclasses
import importlib.metadata
import importlib.util
import os
import pathlib
import sys

import jax

from admin_jax import targets
from admin_jax.errors import UserError

# Where the job looks for a platform's plugin before the environment: gitignored folders at the repository root.
PLUGIN_ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_PLUGIN_DIR = '.tpu-plugin'
CUDA_PLUGIN_DIR = '.cuda-plugin'
PLUGIN_MODULE = 'jax_plugins.xla_cuda12'
PLUGIN_DISTRIBUTION = 'jax-cuda12-pjrt'  # the wheel that installs PLUGIN_MODULE
DEFAULT_POOL_FRACTION = 0.75  # of device memory that JAX's GPU allocator takes unless told otherwise
# libtpu looks for the TPU VM it runs on (metadata server, worker hostnames) and warns when there is none, and
# takes a lock that keeps a second process off the chips: a compile-only process has no VM and no chips.
_NO_TPU_VM = {'TPU_SKIP_MDS_QUERY': '1', 'TPU_WORKER_HOSTNAMES': 'localhost', 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """The published figures of one card, besides its memory (admin_jax/targets.py), that XLA's GPU
  compiler plans with."""
  compute_capability: tuple[int, int]
  cores: int  # streaming multiprocessors
  memory_bandwidth: int  # bytes per second
  l2_cache_bytes: int
  clock_ghz: float
  shared_memory_per_core: int
  shared_memory_per_block_optin: int

  def target_config(self, chip: targets.Chip) -> str:
    """The card as a stream_executor.GpuTargetConfigProto in text format."""
    major, minor = self.compute_capability
    return f'''gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_core}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  threads_per_core_limit: 2048
  core_count: {self.cores}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.memory_bandwidth}
  l2_cache_size: {self.l2_cache_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {chip.memory_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{chip.device_kind}"
'''


_HOPPER = dict(compute_capability=(9, 0), cores=132, l2_cache_bytes=50 * 2 ** 20, clock_ghz=1.98,
               shared_memory_per_core=228 * 1024, shared_memory_per_block_optin=227 * 1024)
GPU_SPECS = {
    'h100': GpuSpec(memory_bandwidth=3_350 * 10 ** 9, **_HOPPER),
    'h200': GpuSpec(memory_bandwidth=4_800 * 10 ** 9, **_HOPPER),
}


def plugin_installed() -> bool:
  try:
    return importlib.util.find_spec(PLUGIN_MODULE) is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


def plugin_version(search_path: list[str] | None = None) -> str | None:
  """The release of the CUDA plugin installed on `search_path` (by default sys.path), or None where the
  plugin carries no package metadata."""
  found = importlib.metadata.distributions(name=PLUGIN_DISTRIBUTION, path=sys.path if search_path is None
                                           else search_path)
  return next((distribution.version for distribution in found), None)


def pool_bytes(memory_bytes: int) -> int:
  """What JAX's allocator may use of a card's memory: XLA_PYTHON_CLIENT_MEM_FRACTION of it (default 0.75)."""
  return int(memory_bytes * float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', DEFAULT_POOL_FRACTION)))


def available_bytes(target: targets.Target) -> int:
  """Per chip, what a plan for `target` may use: the TPU compiler's usable HBM, or the GPU allocator's pool."""
  return target.chip.usable_bytes or pool_bytes(target.chip.memory_bytes)


def libtpu_requirement() -> str:
  """The libtpu that the installed jax's `tpu` extra pins, e.g. 'libtpu==0.0.42.*'."""
  requirement = next(r for r in importlib.metadata.requires('jax') or () if r.startswith('libtpu'))
  return requirement.split(';')[0].strip()


def _libtpu_path() -> str | None:
  """libtpu.so in .tpu-plugin/ at the repository root, else the environment's, else None."""
  local = PLUGIN_ROOT / TPU_PLUGIN_DIR / 'libtpu' / 'libtpu.so'
  if local.is_file():
    return str(local)
  spec = importlib.util.find_spec('libtpu')
  return str(pathlib.Path(spec.origin).parent / 'libtpu.so') if spec and spec.origin else None


def _tpu_devices(target: targets.Target) -> list[jax.Device]:
  requirement = libtpu_requirement()
  library = _libtpu_path()
  if library is None:
    raise UserError(f'--target={target.name} needs libtpu (no TPU): pip install --no-deps --target '
                    f'{TPU_PLUGIN_DIR} "{requirement}" (at the repository root)')
  found = next(importlib.metadata.distributions(name='libtpu', path=[str(pathlib.Path(library).parents[1])]), None)
  wanted = requirement.removeprefix('libtpu==').rstrip('*')
  if found is not None and not found.version.startswith(wanted):
    raise UserError(f'--target={target.name} needs {requirement} (what jax {jax.__version__} pins), not the '
                    f'installed {found.version}')
  os.environ['TPU_LIBRARY_PATH'] = library
  for key, value in {**_NO_TPU_VM, 'TPU_ACCELERATOR_TYPE': target.name}.items():
    os.environ.setdefault(key, value)
  jax.config.update('jax_platforms', 'cpu')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  options = {'chip_config_name': 'megacore'} if target.megacore else {}
  if target.chips == 1:
    options['chips_per_host_bounds'] = (1, 1, 1)
  return list(topologies.get_topology_desc(platform='tpu', topology_name=target.topology, **options).devices)


def _cuda_devices(target: targets.Target) -> list[jax.Device]:
  local = PLUGIN_ROOT / CUDA_PLUGIN_DIR
  if local.is_dir() and str(local) not in sys.path:
    sys.path.insert(0, str(local))
  wanted = importlib.metadata.version('jaxlib')
  install = f'pip install --target {CUDA_PLUGIN_DIR} jax-cuda12-plugin=={wanted}'
  if not plugin_installed():
    raise UserError(f'--target={target.name} needs the CUDA PJRT plugin of jax {wanted} (no GPU or CUDA): {install}')
  found = plugin_version()
  if found not in (None, wanted):  # jaxlib ignores a plugin of another release, and compiling then crashes
    raise UserError(f'--target={target.name} needs the CUDA PJRT plugin of jaxlib {wanted}, not the installed '
                    f'{found}: {install}')
  os.environ['JAX_SKIP_CUDA_CONSTRAINTS_CHECK'] = '1'  # there is no CUDA installation to check
  jax.config.update('jax_platforms', 'cpu')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  config = GPU_SPECS[target.chip_name].target_config(target.chip)
  return list(topologies.get_topology_desc(target.chip_name, platform='cuda', target_config=config,
                                           topology=target.topology).devices)


def compile_only_devices(target: targets.Target) -> list[jax.Device]:
  """The chips of `target`, which programs can be compiled for but not run on.

  Call before anything else initialises JAX's backends: the plugin must not look for a device.
  """
  return (_tpu_devices if target.platform == 'tpu' else _cuda_devices)(target)
