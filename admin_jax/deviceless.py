"""Compiling for a GPU this machine does not have: XLA's deviceless compilation.

`python -m admin_jax.bench --preset=big18 --target=h100` says whether a train step fits on the
card and how long it takes to compile, from a laptop or a CPU-only CI machine: XLA fuses and plans
the program's memory for the named card as it would on one. It needs only the CUDA PJRT plugin of
the installed jax (about 0.5 GB), not CUDA itself. On a machine without a GPU, keep it out of the
environment that trains (there JAX would look for a GPU at every start) and put it on PYTHONPATH
for this job alone:

    pip install --target ~/cuda-plugin "jax-cuda12-plugin==$(python -c 'import jax; print(jax.__version__)')"
    PYTHONPATH=~/cuda-plugin python -m admin_jax.bench --preset=big18 --target=h100

Two things need the card: autotuning (so the kernels are XLA's untuned defaults and compile
seconds exclude autotuning) and running (so there is no step time).
"""

import dataclasses
import importlib.metadata
import importlib.util
import os
import sys

import jax

from admin_jax.errors import UserError

PLUGIN_MODULE = 'jax_plugins.xla_cuda12'
PLUGIN_DISTRIBUTION = 'jax-cuda12-pjrt'  # the wheel that installs PLUGIN_MODULE
DEFAULT_POOL_FRACTION = 0.75  # of device memory that JAX's GPU allocator takes unless told otherwise


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """The published figures of one card that XLA's GPU compiler plans with."""
  device_kind: str  # as jax.Device.device_kind reports the real card
  compute_capability: tuple[int, int]
  cores: int  # streaming multiprocessors
  memory_bytes: int  # as the driver reports it
  memory_bandwidth: int  # bytes per second
  l2_cache_bytes: int
  clock_ghz: float
  shared_memory_per_core: int
  shared_memory_per_block_optin: int

  def target_config(self) -> str:
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
  device_memory_size: {self.memory_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{self.device_kind}"
'''


_HOPPER = dict(compute_capability=(9, 0), cores=132, l2_cache_bytes=50 * 2 ** 20, clock_ghz=1.98,
               shared_memory_per_core=228 * 1024, shared_memory_per_block_optin=227 * 1024)
TARGETS = {
    'h100': GpuTarget('NVIDIA H100 80GB HBM3', memory_bytes=81_559 * 2 ** 20, memory_bandwidth=3_350 * 10 ** 9,
                      **_HOPPER),
    'h200': GpuTarget('NVIDIA H200', memory_bytes=143_771 * 2 ** 20, memory_bandwidth=4_800 * 10 ** 9, **_HOPPER),
}


def plugin_installed() -> bool:
  try:
    return importlib.util.find_spec(PLUGIN_MODULE) is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


def plugin_version(search_path: list[str] | None = None) -> str | None:
  """The release of the plugin installed on `search_path` (by default sys.path), or None where the
  plugin carries no package metadata."""
  found = importlib.metadata.distributions(name=PLUGIN_DISTRIBUTION, path=sys.path if search_path is None
                                           else search_path)
  return next((distribution.version for distribution in found), None)


def pool_bytes(target: GpuTarget) -> int:
  """What JAX's allocator may use on the card: XLA_PYTHON_CLIENT_MEM_FRACTION of it (default 0.75)."""
  return int(target.memory_bytes * float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', DEFAULT_POOL_FRACTION)))


def compile_only_devices(name: str) -> list[jax.Device]:
  """One device of card `name` that programs can be compiled for but not run on.

  Call before anything else initialises JAX's backends: the CUDA plugin must not look for a GPU.
  """
  wanted = importlib.metadata.version('jaxlib')
  install = f'pip install jax-cuda12-plugin=={wanted}'
  if not plugin_installed():
    raise UserError(f'--target={name} needs the CUDA PJRT plugin of jax {wanted} (no GPU or CUDA): {install}')
  found = plugin_version()
  if found not in (None, wanted):  # jaxlib ignores a plugin of another release, and compiling then crashes
    raise UserError(f'--target={name} needs the CUDA PJRT plugin of jaxlib {wanted}, not the installed {found}: '
                    f'{install}')
  os.environ['JAX_SKIP_CUDA_CONSTRAINTS_CHECK'] = '1'  # there is no CUDA installation to check
  jax.config.update('jax_platforms', 'cpu')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  topology = topologies.get_topology_desc(name, platform='cuda', target_config=TARGETS[name].target_config(),
                                          topology='1x1x1')
  return list(topology.devices)
