"""Logical axis names and the one table that maps them to the device mesh.

Every parameter carries `logical_axes` metadata and every large activation is constrained
with `constrain(x, axes)`; nothing else in the project names a mesh axis. The rules follow
T5X: each logical name lists mesh axes in order of preference, and a mesh axis already used
by an earlier dimension of the same array is skipped, so ('batch', 'length', 'embed') puts the
batch on (data, fsdp) while a parameter ('embed', 'mlp') puts embed on fsdp (FSDP/ZeRO-3).
"""

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from admin_jax.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical name -> mesh axes it may be split over, most preferred first.
LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('batch', ('data', 'fsdp')),  # data parallel over data and fsdp
    ('length', ()),
    ('embed', ('fsdp',)),  # parameters: FSDP shards the model dimension
    ('mlp', ('tensor',)),  # Megatron: FFN columns, then rows
    ('heads', ('tensor',)),  # Megatron: attention heads
    ('kv', ()),
    ('vocab', ('tensor',)),
    ('qkv', ()),
    ('layers', ()),  # the scanned layer axis is never split
    ('norm', ()),  # LayerNorm gains/biases and omega: small, replicated
)
_RULES = dict(LOGICAL_AXIS_RULES)

LogicalAxes = Sequence[str | None]


def logical_to_spec(axes: LogicalAxes, shape: Sequence[int], mesh_shape: dict[str, int]) -> P:
  """The PartitionSpec for an array of `shape` whose dimensions have logical names `axes`."""
  if len(axes) != len(shape):
    raise ValueError(f'logical axes {tuple(axes)} do not match shape {tuple(shape)}')
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    if name is not None and name not in _RULES:
      raise ValueError(f'logical axis {name!r} has no sharding rule')
    chosen = []
    for mesh_axis in _RULES.get(name, ()) if name else ():
      ways = mesh_shape.get(mesh_axis, 1)
      split = int(np.prod([mesh_shape[a] for a in chosen])) * ways
      if mesh_axis in used or ways == 1 or size % split:
        continue
      chosen.append(mesh_axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return P(*spec)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  """Pins an activation's sharding when running under a mesh; a no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, dict(mesh.shape)))


def mesh_sizes(mesh_config: ml_collections.ConfigDict, device_count: int) -> tuple[int, ...]:
  """The (data, fsdp, tensor) sizes of the config's mesh over `device_count` devices; -1 takes what is left."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise UserError(f'config mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if device_count % known:
      raise UserError(f'config mesh {dict(zip(MESH_AXES, sizes))} does not divide {device_count} devices')
    sizes[sizes.index(-1)] = device_count // known
  if int(np.prod(sizes)) != device_count:
    raise UserError(f'config mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, '
                    f'{device_count} are available')
  return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices of all processes; -1 takes what is left."""
  devices = list(devices if devices is not None else jax.devices())
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(mesh_sizes(mesh_config, len(devices)), MESH_AXES, axis_types=auto, devices=devices)


def tree_shardings(abstract_tree, mesh: Mesh):
  """NamedShardings for a state tree whose nnx Variables carry `logical_axes` metadata.

  The result has the state's tree structure (Variables hold a NamedSharding instead of an
  array), so it serves as jit shardings and as orbax restore targets alike. Leaves without
  metadata (optimizer counters, RNG keys, step) are replicated.
  """
  mesh_shape = dict(mesh.shape)

  def sharding(leaf):
    if isinstance(leaf, nnx.Variable):
      axes = leaf.get_metadata().get('logical_axes')
      spec = logical_to_spec(axes, leaf.shape, mesh_shape) if axes else P()
      return leaf.replace(NamedSharding(mesh, spec))  # same tree structure as the state
    return NamedSharding(mesh, P())

  return jax.tree.map(sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_shards(mesh: Mesh | jax.sharding.AbstractMesh, process_count: int | None = None) -> int:
  """Ways the batch dimension is split: over data and fsdp, and at least once per process (of this
  run, or `process_count` of a run planned elsewhere)."""
  return int(np.lcm(mesh.shape['data'] * mesh.shape['fsdp'], process_count or jax.process_count()))


def check_batch_rows(rows: int, mesh: Mesh | jax.sharding.AbstractMesh, process_count: int | None = None) -> None:
  """Refuses a global batch of `rows` that the mesh's batch shards cannot split evenly."""
  if rows % (ways := batch_shards(mesh, process_count)):
    raise UserError(f'a batch of {rows} rows does not split over the {ways} batch shards of mesh {dict(mesh.shape)}: '
                    'make data.tokens_per_batch // data.max_len a multiple of it')


def round_to_batch_shards(rows: int, mesh: Mesh) -> int:
  """The smallest multiple of batch_shards(mesh) that is at least `rows`."""
  ways = batch_shards(mesh)
  return -(-max(rows, 1) // ways) * ways


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, micro_batched: bool = False) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays split over the batch axes of the mesh.

  With `micro_batched`, arrays are [micro_batches, rows, length] and only rows are split.
  """
  out = {}
  for name, array in local.items():
    global_shape = list(array.shape)
    global_shape[1 if micro_batched else 0] *= jax.process_count()
    check_batch_rows(global_shape[1 if micro_batched else 0], mesh)
    out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, global_shape, micro_batched), array,
                                                       tuple(global_shape))
  return out


def batch_sharding(mesh: Mesh, global_shape: Sequence[int], micro_batched: bool = False) -> NamedSharding:
  """How a global [rows, length] (or [micro_batches, rows, length]) batch array is split."""
  axes = ((None,) if micro_batched else ()) + ('batch', 'length')
  return NamedSharding(mesh, logical_to_spec(axes, global_shape, dict(mesh.shape)))
