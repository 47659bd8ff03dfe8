"""Multi-head attention with the reference's fused-QKV initialisation and a decoding cache."""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from admin_jax.model import layers
from admin_jax.sharding import constrain

# Large but finite, so that a query with no visible key (a padding row) yields a uniform
# distribution instead of NaN.
_MASKED = -1e9


class KVCache(NamedTuple):
  """Keys and values of one attention layer: [batch, length, heads, head_dim]."""
  key: jax.Array
  value: jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax(logits: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """softmax over the last axis in float32, returned in `dtype`.

  The backward pass keeps only that `dtype` output, so under bf16 compute the attention
  probabilities are stored once, in bf16, rather than in float32 as well (jax.nn.softmax keeps
  its float32 output for the backward pass: a float32 [b, h, q, k] tensor per attention layer).
  """
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


def _softmax_forward(logits, dtype):
  probs = _softmax(logits, dtype)
  return probs, probs


def _softmax_backward(dtype, probs, grad):
  del dtype
  probs, grad = probs.astype(jnp.float32), grad.astype(jnp.float32)
  return (probs * (grad - (grad * probs).sum(-1, keepdims=True)),)


_softmax.defvjp(_softmax_forward, _softmax_backward)


def attend(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array, *,
           dropout_rate: float, rng: jax.Array | None, fused: bool = False) -> jax.Array:
  """softmax(q k^T) v with logits and softmax in float32; `mask` broadcasts to [b, h, q, k].

  `fused` hands the whole computation to jax.nn.dot_product_attention, as cuDNN flash attention
  on GPUs (XLA elsewhere). It has no dropout: it is only valid with attention dropout off.
  """
  if fused:
    if rng is not None and dropout_rate > 0:
      raise ValueError('fused attention has no dropout: set model.attention_dropout=0')
    implementation = 'cudnn' if jax.default_backend() == 'gpu' else None
    return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=1.0, implementation=implementation)
  logits = jnp.einsum('bqhd,bkhd->bhqk', query, key, preferred_element_type=jnp.float32)
  probs = _softmax(jnp.where(mask, logits, _MASKED), value.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', layers.dropout(probs, dropout_rate, rng), value)


class Attention(nnx.Module):
  """Self- or cross-attention.

  Q, K and V live in one [d, 3, heads, head_dim] kernel because the reference initialises them as
  one fused (3d, d) matrix: xavier-uniform over that shape gives the bound sqrt(6 / 4d), 1/sqrt(2)
  of what separate (d, d) matrices would get. Cross-attention uses the same kernel, queries from
  the decoder and keys/values from the encoder output. DeepNorm (`gain` set) draws xavier-normal
  per projection instead, with gain 1 for Q and K and `gain` for V and the output projection.
  """

  def __init__(self, d_model: int, num_heads: int, *, gain: float | None, fused: bool = False, rngs: nnx.Rngs):
    head_dim = d_model // num_heads
    shape = (d_model, 3, num_heads, head_dim)
    if gain is None:
      qkv = layers.uniform(layers.xavier_bound(d_model, 3 * d_model))(rngs.params(), shape, jnp.float32)
      out_init = layers.uniform(layers.xavier_bound(d_model, d_model))
    else:
      std = math.sqrt(2.0 / (2 * d_model))
      gains = jnp.asarray([1.0, 1.0, gain], jnp.float32)[None, :, None, None]
      qkv = std * gains * jax.random.normal(rngs.params(), shape, jnp.float32)
      out_init = layers.normal(gain * std)
    self.qkv = nnx.Param(qkv, logical_axes=('embed', 'qkv', 'heads', 'kv'))
    self.qkv_bias = layers.param(layers.zeros, rngs.params(), shape[1:], ('qkv', 'heads', 'kv'))
    self.out = layers.param(out_init, rngs.params(), (num_heads, head_dim, d_model), ('heads', 'kv', 'embed'))
    self.out_bias = layers.param(layers.zeros, rngs.params(), (d_model,), ('embed',))
    self.scale = head_dim ** -0.5
    self.fused = fused

  def _project(self, x: jax.Array, parts: slice) -> jax.Array:
    kernel = self.qkv[...][:, parts].astype(x.dtype)
    y = jnp.einsum('bld,dphk->blphk', x, kernel) + self.qkv_bias[...][parts].astype(x.dtype)
    return constrain(y, ('batch', 'length', 'qkv', 'heads', 'kv'))

  def query(self, x: jax.Array) -> jax.Array:
    return self._project(x, slice(0, 1))[:, :, 0] * jnp.asarray(self.scale, x.dtype)

  def key_value(self, memory: jax.Array) -> KVCache:
    kv = self._project(memory, slice(1, 3))
    return KVCache(kv[:, :, 0], kv[:, :, 1])

  def output(self, context: jax.Array) -> jax.Array:
    y = jnp.einsum('blhk,hkd->bld', context, self.out[...].astype(context.dtype))
    return constrain(y + self.out_bias[...].astype(context.dtype), ('batch', 'length', 'embed'))

  def __call__(self, x: jax.Array, mask: jax.Array, *, dropout_rate: float, rng: jax.Array | None) -> jax.Array:
    """Self-attention: Q, K and V from one matmul against the whole fused kernel."""
    qkv = self._project(x, slice(0, 3))
    query = qkv[:, :, 0] * jnp.asarray(self.scale, x.dtype)
    context = attend(query, qkv[:, :, 1], qkv[:, :, 2], mask, dropout_rate=dropout_rate, rng=rng, fused=self.fused)
    return self.output(context)

  def attend_to(self, x: jax.Array, kv: KVCache, mask: jax.Array, *,
                dropout_rate: float, rng: jax.Array | None) -> jax.Array:
    """Attention of `x` over precomputed keys and values (the decoder's cross-attention cache)."""
    context = attend(self.query(x), kv.key, kv.value, mask, dropout_rate=dropout_rate, rng=rng, fused=self.fused)
    return self.output(context)

  def cached_self_attention(self, x: jax.Array, cache: KVCache, index: jax.Array) -> tuple[jax.Array, KVCache]:
    """One decoding step: writes this position's key/value at `index`, attends to positions <= index."""
    new = self.key_value(x)
    cache = KVCache(*(jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), index, axis=1)
                      for c, n in zip(cache, new)))
    visible = (jnp.arange(cache.key.shape[1]) <= index)[None, None, None, :]
    return self.attend_to(x, cache, visible, dropout_rate=0.0, rng=None), cache
