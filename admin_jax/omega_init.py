"""Admin's profiling pass: omega for every sublayer from one training-mode forward (spec 2).

The reference runs a separate single-GPU job that writes `profile.ratio.init`. Here the pass is
one jitted computation over the training mesh, run inside the training program before step 0,
on the first training batch with the first step's dropout key. The encoder and decoder each
carry their own running scalar r through their scanned layers; see `model/residual.py`.
Only omega changes: every other parameter keeps its initial value.
"""

from collections.abc import Callable
import dataclasses
import json

from etils import epath
import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import multihost_utils
import numpy as np

from admin_jax import files
from admin_jax import plots
from admin_jax import sharding
from admin_jax.errors import UserError
from admin_jax.model.residual import DECODER_SUBLAYERS_PER_LAYER
from admin_jax.model.residual import ENCODER_SUBLAYERS_PER_LAYER
from admin_jax.train_step import Setup
from admin_jax.train_step import TrainState
from admin_jax.train_step import micro_batch_rng
from admin_jax.train_step import model_from
from admin_jax.train_step import step_rng

OMEGA_JSON = 'omega.json'
REFERENCE_PROFILE = 'profile.ratio.init'
OMEGA_PNG = 'omega.png'

Omegas = dict[str, np.ndarray]


def profile_omegas(setup: Setup, state: TrainState, batch: dict[str, jax.Array], *,
                   mask_padding: bool) -> Omegas:
  """Runs the pass on `batch` (one micro-batch, sharded like training) with step 0's dropout key."""
  with jax.set_mesh(setup.mesh):
    omegas = profile_pass(setup, mask_padding=mask_padding)(state, batch)
  return {k: np.asarray(jax.device_get(v), np.float64) for k, v in omegas.items()}


def profile_pass(setup: Setup, *, mask_padding: bool) -> Callable[[TrainState, dict[str, jax.Array]], dict]:
  """The pass as one jitted function of (state, batch) to omegas: what a run computes, and what
  `admin_jax.compile` plans for a target, since it can need more memory than a train step."""

  def run(state, batch):
    rng = micro_batch_rng(step_rng(setup, state), 0)
    return model_from(setup, state.params).profile_omegas(batch, rng=rng, mask_padding=mask_padding)

  return jax.jit(run)


def profile_batch(first: dict[str, np.ndarray], profile_tokens: int,
                  mesh: jax.sharding.Mesh) -> tuple[dict[str, jax.Array], dict[str, np.ndarray]]:
  """The batch the pass measures, as global arrays, and its rows (for `batch_statistics`).

  `first` is this process's rows of the first micro-batch. With `profile_tokens` (admin.profile_tokens)
  the pass sees only the first profile_tokens // length rows of the global batch, as the authors profile
  one `--max-tokens` batch on one GPU: the same rows whatever the mesh and the number of processes (the
  global batch depends on data.shards only), split over the mesh where they divide, else replicated.
  """
  if not profile_tokens:
    return sharding.global_batch(first, mesh), first
  whole = first if jax.process_count() == 1 else {
      k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in first.items()}
  rows, length = whole['inputs'].shape
  count = profile_tokens // length
  if not 1 <= count <= rows:
    raise UserError(f'admin.profile_tokens={profile_tokens} is not between one and all {rows} rows of '
                    f'{length} tokens of the first batch')
  chosen = {k: v[:count] for k, v in whole.items()}
  placed = {k: jax.make_array_from_callback(v.shape, sharding.batch_sharding(mesh, v.shape),
                                            lambda index, v=v: v[index]) for k, v in chosen.items()}
  return placed, chosen


def with_omegas(setup: Setup, state: TrainState, omegas: Omegas) -> TrainState:
  """The state with omega vectors filled from the profile; all other leaves untouched."""

  def fill(params):
    model = model_from(setup, params)
    model.set_omegas(jnp.asarray(omegas['encoder']), jnp.asarray(omegas['decoder']))
    return nnx.split(model)[1]

  with jax.set_mesh(setup.mesh):
    params = jax.jit(fill, out_shardings=setup.state_shardings.params)(state.params)
  return dataclasses.replace(state, params=params)


def batch_statistics(batch: dict[str, np.ndarray]) -> dict[str, int]:
  """What the profile was measured on, recorded next to it for reproducibility."""
  stats = {}
  for side in ('inputs', 'targets'):
    segments = np.asarray(batch[f'{side}_segmentation'])
    stats[f'{side}_shape'] = list(segments.shape)
    stats[f'{side}_tokens'] = int((segments > 0).sum())
    stats[f'{side}_sentences'] = int(sum(len(set(row[row > 0].tolist())) for row in segments))
  return stats


def expected_counts(num_encoder_layers: int, num_decoder_layers: int) -> tuple[int, int]:
  return ENCODER_SUBLAYERS_PER_LAYER * num_encoder_layers, DECODER_SUBLAYERS_PER_LAYER * num_decoder_layers


def write_profile(workdir: str, omegas: Omegas, stats: dict) -> None:
  """DIR/omega.json, DIR/profile.ratio.init (the reference's `index value` format) and DIR/omega.png."""
  record = {'encoder': [float(v) for v in omegas['encoder']],
            'decoder': [float(v) for v in omegas['decoder']],
            'batch': stats}
  files.write_text(epath.Path(workdir) / OMEGA_JSON, json.dumps(record, indent=2))
  lines = [f'{i} {v!r}' for stack in ('encoder', 'decoder') for i, v in enumerate(record[stack], start=1)]
  files.write_text(epath.Path(workdir) / REFERENCE_PROFILE, '\n'.join(lines) + '\n')
  plots.plot_omegas(omegas, epath.Path(workdir) / OMEGA_PNG)


def read_profile(path: str, num_encoder_layers: int, num_decoder_layers: int) -> Omegas:
  """Reads omega.json or a reference profile file and checks it fits the model.

  Reference files hold `index value` lines, encoder then decoder, the index restarting at 1
  for the decoder; deepnmt's value-only variant is split by the model's sublayer counts.
  """
  n_enc, n_dec = expected_counts(num_encoder_layers, num_decoder_layers)
  try:
    text = epath.Path(path).read_text()
  except OSError as error:
    raise UserError(f'cannot read profile {path}: {error.strerror or error}') from None
  try:
    if path.endswith('.json'):
      record = json.loads(text)
      omegas = {k: np.asarray(record[k], np.float64) for k in ('encoder', 'decoder')}
    else:
      omegas = _parse_reference(text, n_enc)
  except (ValueError, KeyError, TypeError) as error:
    raise UserError(f'profile {path} is malformed: {error}') from None
  got = (len(omegas['encoder']), len(omegas['decoder']))
  if got != (n_enc, n_dec):
    raise UserError(f'profile {path} has {got[0]} encoder and {got[1]} decoder sublayers; '
                    f'the model has {n_enc} and {n_dec}')
  return omegas


def _parse_reference(text: str, num_encoder_sublayers: int) -> Omegas:
  rows = [line.split() for line in text.splitlines() if line.strip()]
  if all(len(r) == 1 for r in rows):
    values = [float(r[0]) for r in rows]
    return {'encoder': np.asarray(values[:num_encoder_sublayers]),
            'decoder': np.asarray(values[num_encoder_sublayers:])}
  stacks: list[list[float]] = []
  for row in rows:
    if len(row) != 2:
      raise ValueError(f'expected "index value", got {" ".join(row)!r}')
    index, value = int(float(row[0])), float(row[1])
    if index == 1:
      stacks.append([])
    if not stacks or index != len(stacks[-1]) + 1:
      raise ValueError(f'sublayer index {index} out of order')
    stacks[-1].append(value)
  if len(stacks) != 2:
    raise ValueError(f'expected an encoder and a decoder section, found {len(stacks)}')
  return {'encoder': np.asarray(stacks[0]), 'decoder': np.asarray(stacks[1])}


def find_existing_profile(workdir: str, configured_path: str) -> str | None:
  """The profile a run must reuse: the configured one, else one already in the workdir."""
  if configured_path:
    return configured_path
  path = epath.Path(workdir) / OMEGA_JSON
  return str(path) if path.exists() else None
