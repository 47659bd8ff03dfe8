"""Building blocks initialised as the reference fairseq fork does (spec section 3)."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from admin_jax import sharding
from admin_jax.model import dropout
from admin_jax.model import layer_norm_kernel
from admin_jax.sharding import LogicalAxes
from admin_jax.sharding import constrain

LN_EPS = 1e-5  # fairseq/apex; Flax's default 1e-6 changes Post-LN numerics measurably
POSITION_OFFSET = 2  # fairseq positions start at padding_idx + 1 = 2


def param(init, key: jax.Array, shape: tuple[int, ...], axes: LogicalAxes) -> nnx.Param:
  """A float32 parameter carrying its logical axis names for the sharding rules."""
  return nnx.Param(init(key, shape, jnp.float32), logical_axes=tuple(axes))


def uniform(bound: float):
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def normal(std: float):
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def xavier_bound(fan_in: int, fan_out: int) -> float:
  return math.sqrt(6.0 / (fan_in + fan_out))


def as_stored(residual: jax.Array) -> jax.Array:
  """`residual`, kept for a backward pass in its own dtype. XLA, allowed excess precision by
  default, would otherwise read a bf16 residual's float32 source again where the backward pass
  converts it back to float32, and keep that float32 tensor alive from forward to backward."""
  return jax.lax.optimization_barrier(residual)


class Branch(NamedTuple):
  """A sublayer's branch output before its last bias and its output dropout, which the residual
  applies: the Pallas LayerNorm adds and drops them as it reads the branch output."""
  value: jax.Array  # [..., d_model] in the compute dtype
  bias: jax.Array  # [d_model]

  def dropped(self, rate: float, rng: jax.Array | None) -> jax.Array:
    """f_k as the reference computes it: dropout(value + bias), in the compute dtype."""
    return dropout.apply(self.value + self.bias.astype(self.value.dtype), rate, rng)


def _normalize(s: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(normalised s, mean, 1/std) over the last axis, in float32."""
  mean = s.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(s - mean).mean(-1, keepdims=True) + LN_EPS)
  return (s - mean) * rstd, mean, rstd


def residual_layer_norm(x: jax.Array, branch: jax.Array, shortcut: jax.Array, scale: jax.Array, bias: jax.Array,
                        impl: str = 'xla', *, branch_bias: jax.Array | None = None, dropout_rate: float = 0.0,
                        rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """LN(shortcut * x + dropout(branch + branch_bias)), the Post-LN, Admin and DeepNorm residual,
  computed in float32 and returned in x's dtype (the stream's), with its copy in the branch's
  (compute) dtype: the same array where the two dtypes are the same.

  The next branch reads the copy: made here, it costs no pass of its own over the stream, and the
  two outputs' gradients (the next residual's shortcut and the next branch's input) are summed
  inside this backward pass instead of by one more. `shortcut` is omega ([d_model]) or a scalar;
  `branch_bias` ([d_model]) is the branch's last bias, and the dropout (`rng=None`: none) its output
  dropout. The backward pass keeps x, the branch output in their own dtypes and two statistics per
  token, and recomputes the rest; differentiated as written it would keep about four float32
  [batch, length, d_model] tensors per sublayer, the largest share of a Post-LN model's activation
  memory under bf16 compute. `impl` 'xla' leaves the passes to XLA's fusions; 'pallas' runs one
  kernel each way (layer_norm_kernel.py), which reads the residual stream fewer times and applies
  the branch's bias and dropout as it reads it.
  """
  if branch_bias is None:
    branch_bias = jnp.zeros(x.shape[-1], branch.dtype)
  if impl == 'pallas':
    return _pallas_residual_layer_norm(x, branch, branch_bias, shortcut, scale, bias, dropout_rate, rng)
  return _xla_residual_layer_norm(x, Branch(branch, branch_bias).dropped(dropout_rate, rng), shortcut, scale, bias)


def _pallas_residual_layer_norm(x, branch, branch_bias, shortcut, scale, bias, dropout_rate, rng):
  """layer_norm_kernel on each device's rows under the current mesh: a Pallas call is opaque to
  XLA's partitioner, hence shard_map over the batch and length, with whole rows on every device,
  each with its rows' global indices, which the dropout mask hashes."""
  dropping = rng is not None and dropout_rate > 0
  seed = dropout.seed_from(rng) if dropping else jnp.zeros((), jnp.int32)
  row_ids = jax.lax.iota(jnp.int32, math.prod(x.shape[:-1])).reshape(x.shape[:-1])

  def kernel(x, branch, row_ids, seed, branch_bias, shortcut, scale, bias):
    return layer_norm_kernel.residual_layer_norm(
        x, branch, branch_bias, shortcut, scale, bias, eps=LN_EPS, seed=seed,
        drop_threshold=dropout.threshold(dropout_rate) if dropping else 0, row_ids=row_ids)

  operands = (x, branch, row_ids, seed, branch_bias, shortcut, scale, bias)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(*operands)
  spec = sharding.logical_to_spec(('batch', 'length', 'embed'), x.shape, dict(mesh.shape))
  rows = jax.P(spec[0], spec[1], None)
  in_specs = (rows, rows, jax.P(spec[0], spec[1])) + (jax.P(),) * 5
  return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=(rows, rows), check_vma=False)(*operands)


@jax.custom_vjp
def _xla_residual_layer_norm(x, branch, shortcut, scale, bias):
  return _residual_layer_norm_forward(x, branch, shortcut, scale, bias)[0]


def _residual_layer_norm_forward(x, branch, shortcut, scale, bias):
  normalized, mean, rstd = _normalize(shortcut * x.astype(jnp.float32) + branch.astype(jnp.float32))
  y = normalized * scale + bias
  return stream_and_copy(y, x.dtype, branch.dtype), (x, as_stored(branch), shortcut, scale, mean, rstd)


def _in_stream_dtype(a: jax.Array, stream_dtype: jnp.dtype) -> jax.Array:
  """`a` rounded to the stream's dtype, and stored so where that is narrower than float32: XLA,
  allowed excess precision, would otherwise drop the rounding and its reverse in the next sublayer
  and keep the stream (or its gradient) in float32 after all."""
  rounded = a.astype(stream_dtype)
  return as_stored(rounded) if rounded.dtype.itemsize < 4 else rounded


def stream_and_copy(y: jax.Array, stream_dtype: jnp.dtype, compute_dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """y as the residual stream holds it, and its copy in the compute dtype (the same array where the
  dtypes are the same)."""
  value = _in_stream_dtype(y, stream_dtype)
  return value, value if stream_dtype == compute_dtype else y.astype(compute_dtype)


def _residual_layer_norm_backward(saved, grads):
  x, branch, shortcut, scale, mean, rstd = saved
  grad = grads[0].astype(jnp.float32) + grads[1].astype(jnp.float32)
  x32 = x.astype(jnp.float32)
  normalized = (shortcut * x32 + branch.astype(jnp.float32) - mean) * rstd
  token_axes = tuple(range(grad.ndim - 1))
  d_scale, d_bias = (grad * normalized).sum(token_axes), grad.sum(token_axes)
  d_normalized = grad * scale
  d_sum = rstd * (d_normalized - d_normalized.mean(-1, keepdims=True)
                  - normalized * (d_normalized * normalized).mean(-1, keepdims=True))
  d_shortcut = (d_sum * x32).sum(token_axes if shortcut.ndim else None).reshape(shortcut.shape)
  return _in_stream_dtype(d_sum * shortcut, x.dtype), d_sum.astype(branch.dtype), d_shortcut, d_scale, d_bias


_xla_residual_layer_norm.defvjp(_residual_layer_norm_forward, _residual_layer_norm_backward)


class LayerNorm(nnx.Module):
  """LayerNorm with statistics in float32 and eps 1e-5; returns float32."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs):
    self.scale = param(ones, rngs.params(), (d_model,), ('norm',))
    self.bias = param(zeros, rngs.params(), (d_model,), ('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    return _normalize(x.astype(jnp.float32))[0] * self.scale[...] + self.bias[...]


class Embedding(nnx.Module):
  """Token embedding N(0, d^-0.5), scaled by sqrt(d) on lookup; doubles as the output projection."""

  def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs):
    table = normal(d_model ** -0.5)(rngs.params(), (vocab_size, d_model), jnp.float32)
    self.table = nnx.Param(table.at[0].set(0.0), logical_axes=('vocab', 'embed'))  # row 0 = PAD
    self.d_model = d_model

  def __call__(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return jnp.take(self.table[...], tokens, axis=0).astype(dtype) * jnp.asarray(math.sqrt(self.d_model), dtype)

  def logits(self, x: jax.Array) -> jax.Array:
    """x @ E^T in the compute dtype (accumulated in float32): no bias, no scaling, as fairseq's
    shared softmax. bfloat16 logits, like fairseq's fp16 ones, keep the backward matmuls in
    bfloat16; float32 logits would pull both into float32 (TF32 on GPUs, twice the bytes)."""
    return jnp.einsum('bld,vd->blv', x, self.table[...].astype(x.dtype))


def sinusoidal_positions(positions: jax.Array, segments: jax.Array, d_model: int) -> jax.Array:
  """fairseq's sinusoid: concat[sin, cos] (not interleaved), `half - 1` in the frequency
  denominator, positions offset by 2, zero vectors at padding (segment 0)."""
  half = d_model // 2
  freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  angle = (positions + POSITION_OFFSET).astype(jnp.float32)[..., None] * freq
  emb = jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)
  return jnp.where((segments > 0)[..., None], emb, 0.0)


# What the FFN's backward pass reads (fc2's weight gradient and the ReLU/dropout's mask, see
# dropout.apply_after_relu): remat='dots' saves it rather than fc1's output, from which it would
# recompute it.
FFN_HIDDEN_NAME = 'ffn_hidden'


class FeedForward(nnx.Module):
  """fc1 -> ReLU -> dropout -> fc2, xavier-uniform weights (or xavier-normal x gain for DeepNorm)."""

  def __init__(self, d_model: int, ffn_dim: int, *, gain: float | None, rngs: nnx.Rngs):
    def init(fan_in, fan_out):
      if gain is None:
        return uniform(xavier_bound(fan_in, fan_out))
      return normal(gain * math.sqrt(2.0 / (fan_in + fan_out)))

    self.fc1 = param(init(d_model, ffn_dim), rngs.params(), (d_model, ffn_dim), ('embed', 'mlp'))
    self.fc1_bias = param(zeros, rngs.params(), (ffn_dim,), ('mlp',))
    self.fc2 = param(init(ffn_dim, d_model), rngs.params(), (ffn_dim, d_model), ('mlp', 'embed'))
    self.fc2_bias = param(zeros, rngs.params(), (d_model,), ('embed',))

  def __call__(self, x: jax.Array, *, activation_dropout: float, rng: jax.Array | None) -> Branch:
    dtype = x.dtype
    h = jnp.einsum('bld,df->blf', x, self.fc1[...].astype(dtype)) + self.fc1_bias[...].astype(dtype)
    h = dropout.apply_after_relu(constrain(h, ('batch', 'length', 'mlp')), activation_dropout, rng,
                                 name=FFN_HIDDEN_NAME)
    return Branch(jnp.einsum('blf,fd->bld', h, self.fc2[...].astype(dtype)), self.fc2_bias[...])
