"""Multi-head attention with the reference's fused-QKV initialisation and a decoding cache.

Three implementations compute the same attention (`TransformerConfig.attention_impl`):
'xla' (einsums and a softmax that XLA fuses; attention dropout as the paper), 'cudnn'
(jax.nn.dot_product_attention, cuDNN flash attention on GPUs; no attention dropout) and 'flash'
(the Pallas kernel of flash_attention.py: flash attention with the paper's attention dropout).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from admin_jax import sharding
from admin_jax.model import dropout
from admin_jax.model import flash_attention
from admin_jax.model import layers
from admin_jax.model.flash_attention import Part
from admin_jax.sharding import constrain

# Large but finite, so that a query with no visible key (a padding row) yields a uniform
# distribution instead of NaN (see `attend`).
_MASKED = -1e9


class Visibility(NamedTuple):
  """Which keys each query sees: those of its own packed segment (segment 0 is padding) and, if
  `causal`, not later ones. Segment ids rather than a dense mask, so that flash attention can
  rebuild the mask of each tile instead of reading a [batch, q, k] tensor.

  A query that sees no key (a padding position) gets the mean of its row's values where
  `blind_queries_average` (see `attend`); otherwise the fused kernels leave it at zero, which
  costs nothing, and nothing a loss reads depends on a padding position.
  """
  query_segments: jax.Array  # [batch, q]
  key_segments: jax.Array  # [batch, k]
  causal: bool = False
  blind_queries_average: bool = False

  def mask(self) -> jax.Array:
    """[batch, 1, q, k] boolean, broadcasting over heads."""
    query, key = self.query_segments[:, :, None], self.key_segments[:, None, :]
    mask = (query == key) & (key > 0)
    if self.causal:
      q, k = query.shape[1], key.shape[2]
      mask &= jnp.arange(k)[None, :] <= jnp.arange(q)[:, None]
    return mask[:, None]


class KVCache(NamedTuple):
  """Keys and values of one attention layer: [batch, length, heads, head_dim] arrays, or (from
  `Attention.key_value`) parts of the one array their projection wrote, which the flash kernels read
  in place; `arrays()` gives arrays, as a decoding cache holds them."""
  key: jax.Array | Part
  value: jax.Array | Part

  def arrays(self) -> 'KVCache':
    return KVCache(_array(self.key), _array(self.value))


def _array(x: jax.Array | Part) -> jax.Array:
  """A [batch, length, heads, head_dim] array, sliced out of its projection if a `Part` of one."""
  return x.array() if isinstance(x, Part) else x


@jax.custom_vjp
def _softmax(logits: jax.Array) -> jax.Array:
  """softmax over the last axis, computed in float32 and returned in the logits' dtype.

  The backward pass keeps only that output, so under bf16 compute the attention probabilities
  are stored once, in bf16 (jax.nn.softmax keeps its float32 output: a float32 [b, h, q, k]
  tensor per attention layer), and the logits' gradient is bf16, so that both backward matmuls
  of q k^T run in bf16 rather than TF32.
  """
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)


def _softmax_forward(logits):
  probs = _softmax(logits)
  return probs, layers.as_stored(probs)


def _softmax_backward(probs, grad):
  wide_probs, grad = probs.astype(jnp.float32), grad.astype(jnp.float32)
  return ((wide_probs * (grad - (grad * wide_probs).sum(-1, keepdims=True))).astype(probs.dtype),)


_softmax.defvjp(_softmax_forward, _softmax_backward)


def _mesh_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
  """The mesh axes that one PartitionSpec entry splits a dimension over."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _flash(query: Part, key: Part, value: Part, visibility: Visibility, *, scale: float, dropout_rate: float,
           rng: jax.Array | None) -> jax.Array:
  """flash_attention on each device's shard of the batch and heads, under the current mesh.

  A Pallas call is opaque to XLA's partitioner, hence shard_map. Each shard folds its index into
  the dropout seed, since the kernel's mask depends only on the seed and local positions.
  """
  seed = jnp.zeros((), jnp.int32) if rng is None else dropout.seed_from(rng)
  rate = dropout_rate if rng is not None else 0.0
  sources, biases, roles = flash_attention.distinct_sources((query, key, value))

  def local(sources, biases, q_segments, k_segments, seed, shard_axes=()):
    if shard_axes:
      seed = dropout.fold_in(seed, jax.lax.axis_index(shard_axes))
    parts = (Part(sources[source], part, biases[source]) for source, part in roles)
    return flash_attention.flash_attention(*parts, q_segments, k_segments, causal=visibility.causal,
                                           dropout_rate=rate, seed=seed if rate else None, scale=scale)

  operands = (sources, biases, visibility.query_segments, visibility.key_segments, seed)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(*operands)
  mesh_shape = dict(mesh.shape)
  source_specs = [sharding.logical_to_spec(('batch', 'length', 'qkv', 'heads', 'kv'), source.shape, mesh_shape)
                  for source in sources]
  q_spec = sharding.logical_to_spec(('batch', 'length', 'heads', 'kv'), query.shape, mesh_shape)
  shard_axes = _mesh_axes(q_spec[0]) + _mesh_axes(q_spec[2])  # the batch's and the heads'
  bias_specs = [None if bias is None else sharding.logical_to_spec(('qkv', 'heads', 'kv'), bias.shape, mesh_shape)
                for bias in biases]
  specs = (source_specs, bias_specs, jax.P(q_spec[0], None), jax.P(source_specs[roles[1][0]][0], None), jax.P())
  return jax.shard_map(functools.partial(local, shard_axes=shard_axes), mesh=mesh, in_specs=specs,
                       out_specs=q_spec, check_vma=False)(*operands)


def attend(query: jax.Array | Part, key: jax.Array | Part, value: jax.Array | Part, visibility: Visibility, *,
           scale: float, dropout_rate: float, rng: jax.Array | None, impl: str = 'xla') -> jax.Array:
  """softmax(scale * q k^T) v by `impl` (see the module docstring); q, k, v [batch, length, heads,
  head_dim], each an array or a `Part` of the array a fused projection wrote.

  The queries are scaled in the compute dtype. The 'xla' path computes the logits in that dtype,
  as the reference's fp16 training and T5X's and MaxText's defaults do, and the softmax in float32.
  float32 logits would double the bytes of the largest tensors of the step and turn both backward
  matmuls of q k^T into TF32 ones. 'flash' reads parts in place: no slices, and their gradients
  are written into the projection's.

  'cudnn' has no dropout: it is only valid with attention dropout off. A single query (a
  decoding step) always takes the 'xla' path: there is nothing to fuse.

  A query that sees no key (a padding position) attends uniformly to all keys of its row, as the
  XLA path's large negative logits make it: padding positions then carry values like real ones
  into the profiling pass's variances, as in the reference's padded batches (zeros there would
  damp omega's growth with depth). The fused kernels leave such rows at zero; where
  `visibility.blind_queries_average` (the profiling and analysis passes) they are set here, a pass
  over the output and a reduction over the values that training, which never reads them, skips.
  """
  mask = visibility.mask()
  if impl == 'flash' and query.shape[1] > 1:
    parts = (x if isinstance(x, Part) else Part.of(x) for x in (query, key, value))
    context = _flash(*parts, visibility, scale=scale, dropout_rate=dropout_rate, rng=rng)
  else:
    query, key, value = (_array(x) for x in (query, key, value))
    query = query * jnp.asarray(scale, query.dtype)
    if impl == 'xla' or query.shape[1] == 1:
      logits = jnp.einsum('bqhd,bkhd->bhqk', query, key)
      probs = _softmax(jnp.where(mask, logits, max(_MASKED, float(jnp.finfo(logits.dtype).min))))  # float16: -65504
      return jnp.einsum('bhqk,bkhd->bqhd', dropout.apply_to_probabilities(probs, dropout_rate, rng), value)
    if rng is not None and dropout_rate > 0:
      raise ValueError("cuDNN attention has no dropout: set model.attention_dropout=0")
    implementation = 'cudnn' if jax.default_backend() == 'gpu' else None
    context = jax.nn.dot_product_attention(query, key, value, mask=mask, scale=1.0, implementation=implementation)
  if not visibility.blind_queries_average:
    return context
  sees_a_key = mask.any(-1)[:, 0, :, None, None]  # [batch, q, 1, 1]
  return jnp.where(sees_a_key, context, _array(value).mean(1, keepdims=True).astype(context.dtype))


class Attention(nnx.Module):
  """Self- or cross-attention.

  Q, K and V live in one [d, 3, heads, head_dim] kernel because the reference initialises them as
  one fused (3d, d) matrix: xavier-uniform over that shape gives the bound sqrt(6 / 4d), 1/sqrt(2)
  of what separate (d, d) matrices would get. Cross-attention uses the same kernel, queries from
  the decoder and keys/values from the encoder output. DeepNorm (`gain` set) draws xavier-normal
  per projection instead, with gain 1 for Q and K and `gain` for V and the output projection.
  """

  def __init__(self, d_model: int, num_heads: int, *, gain: float | None, impl: str = 'xla', rngs: nnx.Rngs):
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
    self.impl = impl

  def _project(self, x: jax.Array, parts: slice) -> list[Part]:
    """Q, K and/or V of x from one matmul, as parts of its output with the bias still to add:
    XLA adds it where it slices them out, the flash kernels where they read them."""
    kernel = self.qkv[...][:, parts].astype(x.dtype)
    y = constrain(jnp.einsum('bld,dphk->blphk', x, kernel), ('batch', 'length', 'qkv', 'heads', 'kv'))
    bias = self.qkv_bias[...][parts].astype(x.dtype)
    return [Part(y, i, bias) for i in range(y.shape[2])]

  def query(self, x: jax.Array) -> Part:
    return self._project(x, slice(0, 1))[0]

  def key_value(self, memory: jax.Array) -> KVCache:
    return KVCache(*self._project(memory, slice(1, 3)))

  def output(self, context: jax.Array) -> layers.Branch:
    y = jnp.einsum('blhk,hkd->bld', context, self.out[...].astype(context.dtype))
    return layers.Branch(constrain(y, ('batch', 'length', 'embed')), self.out_bias[...])

  def __call__(self, x: jax.Array, visibility: Visibility, *, dropout_rate: float,
               rng: jax.Array | None) -> layers.Branch:
    """Self-attention: Q, K and V from one matmul against the whole fused kernel."""
    context = attend(*self._project(x, slice(0, 3)), visibility, scale=self.scale, dropout_rate=dropout_rate,
                     rng=rng, impl=self.impl)
    return self.output(context)

  def attend_to(self, x: jax.Array, kv: KVCache, visibility: Visibility, *,
                dropout_rate: float, rng: jax.Array | None) -> layers.Branch:
    """Attention of `x` over precomputed keys and values (the decoder's cross-attention cache)."""
    context = attend(self.query(x), kv.key, kv.value, visibility, scale=self.scale, dropout_rate=dropout_rate,
                     rng=rng, impl=self.impl)
    return self.output(context)

  def cached_self_attention(self, x: jax.Array, cache: KVCache, index: jax.Array) -> tuple[layers.Branch, KVCache]:
    """One decoding step: writes this position's key/value at `index`, attends to positions <= index."""
    new = self.key_value(x).arrays()
    cache = KVCache(*(jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), index, axis=1)
                      for c, n in zip(cache, new)))
    batch, length = cache.key.shape[:2]
    written = jnp.broadcast_to(jnp.arange(length) <= index, (batch, length)).astype(jnp.int32)
    visibility = Visibility(jnp.ones((batch, 1), jnp.int32), written)
    return self.attend_to(x, cache, visibility, dropout_rate=0.0, rng=None), cache
