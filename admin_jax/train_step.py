"""The train state, created already sharded, and the jitted train and eval steps."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections
import optax

from admin_jax import losses
from admin_jax import sharding
from admin_jax.model import Transformer
from admin_jax.model import TransformerConfig

Batch = dict[str, jax.Array]


# fairseq's --fp16-init-scale default: the dynamic loss scale a float16 run starts from.
LOSS_SCALE_INIT = 128.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LossScale:
  """fairseq's dynamic loss scale, for perf.dtype='float16' (DynamicLossScaler, tolerance 0).

  The summed loss is multiplied by `scale` before the backward pass so that small float16
  gradients do not flush to zero. A step whose gradient overflows halves the scale; after
  `window` steps in a row without one, it doubles. Not flax's DynamicScale: that grows one step
  later than fairseq and adjusts per gradient call, which accumulation would make per micro-batch.
  """
  scale: jax.Array  # float32
  good_steps: jax.Array  # finite steps since the scale last changed

  def adjust(self, finite: jax.Array, window: int) -> 'LossScale':
    grow = finite & (self.good_steps + 1 >= window)
    scale = jnp.where(finite, jnp.where(grow, self.scale * 2, self.scale), self.scale / 2)
    return LossScale(scale, jnp.where(finite & ~grow, self.good_steps + 1, 0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """Everything that changes during training; parameters keep their logical-axis metadata."""
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array  # base key; step t uses fold_in(rng, t)
  bad_steps: jax.Array  # consecutive non-finite steps (a float16 overflow is not one)
  skipped_steps: jax.Array  # all non-finite steps so far
  loss_scale: LossScale | None = None  # float16 only: other runs' checkpoints keep their tree


@dataclasses.dataclass(frozen=True)
class Setup:
  """What is static for a run: the model's graph, the optimizer and the state's shardings."""
  model_cfg: TransformerConfig
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any
  mesh: jax.sharding.Mesh
  prng_impl: str = 'threefry2x32'


def model_from(setup: Setup, params: nnx.State) -> Transformer:
  return nnx.merge(setup.graphdef, params)


def _new_state(model_cfg: TransformerConfig, tx: optax.GradientTransformation, seed: int,
               prng_impl: str) -> TrainState:
  _, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(seed)))
  zero = jnp.zeros([], jnp.int32)
  rng = jax.random.key_data(jax.random.key(seed, impl=prng_impl))
  loss_scale = LossScale(jnp.asarray(LOSS_SCALE_INIT, jnp.float32), zero) if model_cfg.dtype == 'float16' else None
  return TrainState(zero, params, tx.init(params), rng, zero, zero, loss_scale)


def abstract_train_state(model_cfg: TransformerConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                         mesh: jax.sharding.Mesh, seed: int,
                         prng_impl: str = 'threefry2x32') -> tuple[Setup, TrainState]:
  """The Setup and the state's shapes, allocating and compiling nothing: all a restore needs.

  `prng_impl` derives each step's dropout keys, from which every dropout call takes one 32-bit
  seed for its hashed mask (model/dropout.py): the masks are the same on every mesh whichever it
  is, and it costs next to nothing. Parameters are initialised by threefry whatever it is.
  """
  abstract_model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(seed)))
  graphdef, _ = nnx.split(abstract_model)
  abstract_state = jax.eval_shape(lambda: _new_state(model_cfg, tx, seed, prng_impl))
  shardings = sharding.tree_shardings(abstract_state, mesh)
  return Setup(model_cfg, graphdef, tx, schedule, shardings, mesh, prng_impl), abstract_state


def create_train_state(model_cfg: TransformerConfig, tx: optax.GradientTransformation,
                       schedule: optax.Schedule, mesh: jax.sharding.Mesh, seed: int,
                       prng_impl: str = 'threefry2x32') -> tuple[Setup, TrainState]:
  """Initialises parameters and optimizer state directly in their shards (never whole on one host)."""
  setup, _ = abstract_train_state(model_cfg, tx, schedule, mesh, seed, prng_impl)
  return setup, initial_state(setup, seed)


def initial_state(setup: Setup, seed: int) -> TrainState:
  """The state at step 0 of a Setup already made, in its shards."""
  with jax.set_mesh(setup.mesh):
    return jax.jit(lambda: _new_state(setup.model_cfg, setup.tx, seed, setup.prng_impl),
                   out_shardings=setup.state_shardings)()


def step_rng(setup: Setup, state: TrainState) -> jax.Array:
  """The dropout key of the state's current step; the profiling pass replays the first one."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=setup.prng_impl), state.step)


def micro_batch_rng(rng: jax.Array, index: int | jax.Array) -> jax.Array:
  return jax.random.fold_in(rng, index)


def _summed_loss(setup: Setup, params: nnx.State, batch: Batch, rng: jax.Array | None,
                 label_smoothing: float, chunk_tokens: int = 0,
                 loss_scale: jax.Array | None = None) -> tuple[jax.Array, losses.TokenLosses]:
  """Summed token losses (times `loss_scale`, for the gradient; the returned sums are unscaled);
  with `chunk_tokens`, never the whole batch's float32 logits at once."""
  model = model_from(setup, params)
  weights = batch['targets_segmentation'] > 0
  if chunk_tokens:
    sums = losses.chunked_label_smoothed_cross_entropy(
        model.final_states(batch, rng=rng), model.output_table().table[...], batch['targets'], weights,
        label_smoothing, chunk_tokens)
  else:
    sums = losses.label_smoothed_cross_entropy(model(batch, rng=rng), batch['targets'], weights, label_smoothing)
  return sums.loss if loss_scale is None else sums.loss * loss_scale, sums


def make_train_step(setup: Setup, train: ml_collections.ConfigDict) -> Callable[[TrainState, Batch], tuple]:
  """One optimizer update from `grad_accum` micro-batches stacked on a leading axis.

  Gradients of summed token losses are added over micro-batches and divided by the total
  number of target tokens, so accumulation equals one large batch exactly. A non-finite loss
  or gradient skips the update (parameters and optimizer state unchanged) and is counted; in
  float16 it is an overflow, which adjusts the loss scale (LossScale) instead of counting as bad.
  """
  grad_fn = jax.value_and_grad(_summed_loss, argnums=1, has_aux=True)

  def train_step(state: TrainState, micro_batches: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = step_rng(setup, state)
    scaling = state.loss_scale is not None
    loss_scale = state.loss_scale.scale if scaling else None

    def accumulate(carry, xs):
      grads, totals = carry
      index, batch = xs
      (_, sums), g = grad_fn(setup, state.params, batch, micro_batch_rng(rng, index), train.label_smoothing,
                            train.loss_chunk_tokens, loss_scale)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, totals, sums)), None

    num_micro = jax.tree.leaves(micro_batches)[0].shape[0]
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    totals = losses.TokenLosses(*(jnp.zeros([], jnp.float32) for _ in range(3)))
    (grads, totals), _ = jax.lax.scan(accumulate, (zeros, totals), (jnp.arange(num_micro), micro_batches))
    tokens = jnp.maximum(totals.tokens, 1.0)
    grads = jax.tree.map(lambda g: g / (tokens * loss_scale if scaling else tokens), grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(totals.loss) & jnp.isfinite(grad_norm)

    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep_new(params, state.params),
        opt_state=keep_new(opt_state, state.opt_state),
        rng=state.rng,
        bad_steps=jnp.where(finite, 0, state.bad_steps if scaling else state.bad_steps + 1),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
        loss_scale=state.loss_scale.adjust(finite, train.loss_scale_window) if scaling else None)
    metrics = {
        'loss': totals.loss / tokens,
        'nll': totals.nll / tokens,
        'tokens': totals.tokens,
        'grad_norm': grad_norm,
        'lr': setup.schedule(state.step),
        'finite': finite,
    }
    if scaling:
      metrics['loss_scale'] = new_state.loss_scale.scale  # after this step's adjustment
    return new_state, metrics

  return train_step


def make_eval_step(setup: Setup, label_smoothing: float) -> Callable[[nnx.State, Batch], losses.TokenLosses]:
  """Summed validation losses of one batch, dropout off."""

  def eval_step(params: nnx.State, batch: Batch) -> losses.TokenLosses:
    return _summed_loss(setup, params, batch, None, label_smoothing)[1]

  return eval_step


def jit_train_step(setup: Setup, train: ml_collections.ConfigDict, micro_batch_sharding) -> Callable:
  """The train step under jit with explicit shardings; the state is donated."""
  return jax.jit(make_train_step(setup, train),
                 in_shardings=(setup.state_shardings, micro_batch_sharding),
                 out_shardings=(setup.state_shardings, None),
                 donate_argnums=0)
