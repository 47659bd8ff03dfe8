"""The train step's fast paths (attention and LayerNorm kernels, bf16, remat, scan) change no result.

Each path runs one real train step (configs/bench/tiny.py, SGD at learning rate 1, so the update is minus the
gradient) and is compared with the plain path, loss and every parameter's update, within its tolerance.
"""

import dataclasses
from typing import Any, NamedTuple

from flax import nnx
import jax
import numpy as np
import optax
import pytest

from admin_jax import bench
from admin_jax import sharding
from admin_jax import train_step as train_step_lib
from admin_jax.model import Transformer
from admin_jax.model import TransformerConfig
from configs.bench import tiny

TINY = tiny.get_config()


class Tolerance(NamedTuple):
  """Relative error allowed in the loss and in each parameter's update (L2 norm of the difference)."""
  loss: float
  update: float


# bfloat16 keeps 8 bits: the loss (log-softmax in float32) moves by less than 1e-4, but gradients of a
# freshly initialised model are sums that largely cancel, so their L2 error reaches about 6%.
BF16 = Tolerance(loss=2e-2, update=1e-1)
F32 = Tolerance(loss=1e-5, update=1e-5)


class FastPath(NamedTuple):
  """Config fields that turn one optimisation on, its tolerance, and fields both paths share.

  The plain path is configs/bench/tiny.py (float32, unrolled layers, no remat, dropout 0.1) with `shared`
  applied; a path that only applies without attention dropout, say, sets attention_dropout=0 there.
  """
  on: dict[str, Any]
  tolerance: Tolerance
  shared: tuple[tuple[str, Any], ...] = ()


# A new fast path (chunked cross-entropy, ...) is one more line here.
FAST_PATHS = [
    pytest.param(FastPath({'attention_impl': 'cudnn'}, F32, (('attention_dropout', 0.0),)), id='cudnn_attention'),
    pytest.param(FastPath({'attention_impl': 'flash'}, F32, (('attention_dropout', 0.0),)), id='flash_attention'),
    pytest.param(FastPath({'dtype': 'bfloat16'}, BF16), id='bfloat16'),
    pytest.param(FastPath({'remat': 'full'}, F32), id='remat_full'),
    pytest.param(FastPath({'scan_layers': True}, F32), id='scan'),
    # What deep stacks use (big18): matmul outputs, the flash outputs and the FFN's activation saved.
    pytest.param(FastPath({'scan_layers': True, 'remat': 'dots'}, F32), id='scan_remat_dots'),
    pytest.param(FastPath({'layer_norm_impl': 'pallas'}, F32), id='pallas_layer_norm'),
    # What GPU runs use: both Pallas kernels under bf16 compute, against XLA's ops under bf16.
    pytest.param(FastPath({'attention_impl': 'flash', 'layer_norm_impl': 'pallas'}, BF16,
                          (('attention_dropout', 0.0), ('dtype', 'bfloat16'))), id='pallas_kernels_bfloat16'),
    # The residual stream in bf16 too (perf.stream_dtype), through the Pallas LayerNorm, carried once by a
    # scan with remat=dots (big18's configuration), against bf16 compute.
    pytest.param(FastPath({'stream_dtype': 'bfloat16', 'layer_norm_impl': 'pallas', 'scan_layers': True,
                           'remat': 'dots'}, BF16, (('dtype', 'bfloat16'),)), id='bfloat16_stream'),
]


@pytest.fixture(scope='module')
def plain_setup():
  """The plain path's setup and state, with SGD at learning rate 1.

  The update then is minus the gradient, so comparing updated parameters compares gradients
  element by element; an adaptive optimizer's first step (about the gradient's sign) would hide
  differences. The fast paths change the graph only, so every variant starts from this state.
  """
  cfg = TransformerConfig.from_config(TINY, TINY.data.vocab_size)
  mesh = sharding.make_mesh(TINY.mesh)
  return train_step_lib.create_train_state(cfg, optax.sgd(1.0), optax.constant_schedule(1.0), mesh, seed=0)


def _one_step(setup: train_step_lib.Setup, state: train_step_lib.TrainState,
              overrides: dict) -> tuple[float, train_step_lib.TrainState]:
  """(loss, new state) of one real train step, on a fixed batch and dropout key, with `overrides`."""
  cfg = dataclasses.replace(setup.model_cfg, **overrides)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  variant = dataclasses.replace(setup, model_cfg=cfg, graphdef=graphdef)
  local = bench.micro_batches(TINY)
  batch = sharding.global_batch(local, setup.mesh, micro_batched=True)
  step = train_step_lib.jit_train_step(variant, TINY.train,
                                       jax.tree.map(lambda a: a.sharding, batch))
  state = jax.tree.map(lambda a: a.copy(), state)  # the step donates its input
  with jax.set_mesh(setup.mesh):
    new_state, metrics = step(state, batch)
  assert bool(metrics['finite'])
  return float(metrics['loss']), new_state


@pytest.fixture(scope='module')
def plain_steps() -> dict:
  """Plain-path steps already run, by their shared fields: fast paths that share them compile it once."""
  return {}


def _relative_errors(fast: nnx.State, plain: nnx.State, start: nnx.State) -> dict[str, float]:
  """Per parameter: |fast update - plain update| / |plain update| (L2 norms; update = new - start)."""
  errors = {}
  for (path, f), (_, p), (_, s) in zip(*(nnx.to_flat_state(x) for x in (fast, plain, start))):
    f_update, p_update = np.asarray(f[...]) - np.asarray(s[...]), np.asarray(p[...]) - np.asarray(s[...])
    errors['/'.join(map(str, path))] = float(np.linalg.norm(f_update - p_update) /
                                             max(np.linalg.norm(p_update), 1e-12))
  return errors


@pytest.mark.parametrize('path', FAST_PATHS)
def test_fast_path_train_step_equals_plain_path(path, plain_setup, plain_steps):
  setup, start = plain_setup
  if path.shared not in plain_steps:
    plain_steps[path.shared] = _one_step(setup, start, dict(path.shared))
  plain_loss, plain_state = plain_steps[path.shared]
  fast_loss, fast_state = _one_step(setup, start, {**dict(path.shared), **path.on})
  assert fast_loss == pytest.approx(plain_loss, rel=path.tolerance.loss)
  errors = _relative_errors(fast_state.params, plain_state.params, start.params)
  assert {k: e for k, e in errors.items() if e > path.tolerance.update} == {}
