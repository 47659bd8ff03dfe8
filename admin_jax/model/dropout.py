"""Dropout whose keep-masks are a counter-based hash of (seed, element index).

A mask costs about ten integer operations per element, which XLA fuses into the op that applies
it, and which the backward pass repeats instead of reading a stored mask: no random bits are
written to memory and no boolean mask is kept from forward to backward (random bits and masks
were about a tenth of a base Transformer step's memory traffic). The element index is the
position in the global array, so every mesh draws the same mask. The seed of each call comes from
its JAX PRNG key; the flash attention kernels draw their masks from the same hash.

Rates are quantised to 2^-16: the top 16 bits of the hash are compared with an integer threshold,
and kept values are scaled by the exact inverse of the quantised keep probability, so the
expectation is unchanged.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

_LEVELS = 2 ** 16


def _int32(constant: int) -> int:
  """A uint32 constant as the int32 with the same bits: the hash runs in int32, whose wrapping
  multiply and add, xor and logical shift give the same bits as uint32 arithmetic."""
  constant %= 1 << 32
  return constant - (1 << 32) if constant >= 1 << 31 else constant


_MIX_1 = _int32(0x7FEB352D)  # lowbias32's constants (C. Wellons, "Hash function prospector")
_MIX_2 = _int32(0x846CA68B)
_GOLDEN = _int32(0x9E3779B9)


def threshold(rate: float) -> int:
  """Dropout drops where the top 16 bits of the hash are below this: `rate` quantised to 2^-16."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'dropout rate must be in [0, 1), got {rate}')
  return round(rate * _LEVELS)


def keep_scale(drop_threshold: int) -> float:
  """What kept values are multiplied by: the exact inverse of the quantised keep probability."""
  return _LEVELS / (_LEVELS - drop_threshold)


def _multiply_xorshift(x: jax.Array) -> jax.Array:
  """lowbias32 without its final xorshift, which changes only the low 16 bits."""
  x = x ^ lax.shift_right_logical(x, 16)
  x = x * _MIX_1
  x = x ^ lax.shift_right_logical(x, 15)
  return x * _MIX_2


def _lowbias32(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer finaliser with near-ideal avalanche, int32 bits in and out."""
  x = _multiply_xorshift(x)
  return x ^ lax.shift_right_logical(x, 16)


def stream_key(seed: jax.Array, stream: jax.Array | int) -> tuple[jax.Array, jax.Array]:
  """(odd multiplier, offset) of one mask: element c is kept by the hash of multiplier * c + offset.
  The keyed affine map makes each mask its own permutation of the hash, not a shifted copy of
  another's (as mix(c ^ key) would)."""
  key = _lowbias32(seed + _lowbias32(jnp.asarray(stream, jnp.int32) * _GOLDEN + _GOLDEN))
  return key | 1, _lowbias32(key + _GOLDEN)


def kept(counter: jax.Array, drop_threshold: int) -> jax.Array:
  """True where the element whose keyed counter (multiplier * c + offset) is `counter` is kept.

  One round of the hash, and only the high bits that lowbias32's last step leaves alone: the
  hash is the flash kernels' main non-matmul cost.
  """
  return lax.shift_right_logical(_multiply_xorshift(counter), 16) >= drop_threshold


def kept_tile(key: tuple[jax.Array, jax.Array], rows: jax.Array, cols: jax.Array, row_length: int,
              drop_threshold: int) -> jax.Array:
  """[len(rows), len(cols)]: what `keep_mask` keeps of a tile of a [..., row_length] array whose
  flattened rows `rows` (global indices) and columns `cols` it holds, for the key of `stream_key`:
  element c = row * row_length + col. Kernels build their tiles' masks with it; the row and column
  terms of the keyed counter are computed once each, so the counter costs one add per element."""
  multiplier, offset = key
  counter = (rows * (row_length * multiplier) + offset)[:, None] + (cols * multiplier)[None, :]
  return kept(counter, drop_threshold)


def seed_int32(seed: jax.Array) -> jax.Array:
  """A scalar seed as int32 with the same bits (uint32 seeds are bit-cast, not clipped)."""
  seed = jnp.asarray(seed)
  if seed.dtype == jnp.uint32:
    seed = lax.bitcast_convert_type(seed, jnp.int32)
  return seed.astype(jnp.int32)


def seed_from(rng: jax.Array) -> jax.Array:
  """The int32 seed of one dropout call, drawn from its JAX PRNG key."""
  return seed_int32(jax.random.bits(rng, (), jnp.uint32))


def fold_in(seed: jax.Array, index: jax.Array) -> jax.Array:
  """A seed per shard, for kernels that see only local positions (the flash kernels under
  shard_map): without it, shards of the batch would share masks."""
  return seed_int32(seed) + jnp.asarray(index, jnp.int32) * _GOLDEN


def keep_mask(seed: jax.Array, shape: tuple[int, ...], drop_threshold: int) -> jax.Array:
  """The boolean keep-mask of an array of `shape`, element c being its row-major index (mod 2^32)."""
  multiplier, offset = stream_key(seed_int32(seed), 0)
  # multiplier * index + offset, summed from one small iota per axis already multiplied by the
  # (per-call) multiplier: no full-size part of the counter is the same on every call, which XLA
  # would hoist out of a scanned stack and keep in memory, read again by every layer.
  counter = jnp.broadcast_to(offset, shape)
  for axis, size in enumerate(shape):
    stride = multiplier * _int32(math.prod(shape[axis + 1:]))
    counter = counter + lax.broadcast_in_dim(lax.iota(jnp.int32, size) * stride, shape, (axis,))
  return kept(counter, drop_threshold)


def _scale(x: jax.Array, scale: float) -> jax.Array:
  if scale == 1.0:
    return x
  return (x.astype(jnp.float32) * scale).astype(x.dtype)  # scaled in float32: exact


def kept_and_scaled(x: jax.Array, keep: jax.Array, scale: float) -> jax.Array:
  """where(keep, x * scale, 0), scaled in float32 and rounded to x's dtype: how every dropout here
  applies its mask, the kernels' tiles included, so that all paths round alike."""
  return jnp.where(keep, _scale(x, scale), jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _apply_with_seed(x: jax.Array, seed: jax.Array, drop_threshold: int) -> jax.Array:
  """Dropout of x by the hash of `seed`; the backward pass keeps only the seed and rebuilds the mask."""
  return kept_and_scaled(x, keep_mask(seed, x.shape, drop_threshold), keep_scale(drop_threshold))


def _apply_forward(x, seed, drop_threshold):
  return _apply_with_seed(x, seed, drop_threshold), seed


def _apply_backward(drop_threshold, seed, grad):
  return _apply_with_seed(grad, seed, drop_threshold), None


_apply_with_seed.defvjp(_apply_forward, _apply_backward)


def apply(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; `rng=None` means deterministic (evaluation, decoding, analysis)."""
  if rng is None or rate == 0.0:
    return x
  return _apply_with_seed(x, seed_from(rng), threshold(rate))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _scale_kept(x: jax.Array, keep: jax.Array, scale: float, name: str | None = None) -> jax.Array:
  """where(keep, x * scale, 0), whose backward pass reads its output instead of `keep`: the
  gradient flows where the output is non-zero. Exact wherever a kept zero of x has no gradient
  of its own (see the callers), and the backward pass needs neither mask nor seed. `name` names
  the output for remat policies: being the backward pass's only residual too, saving it by that
  name saves all that the backward pass needs."""
  return kept_and_scaled(x, keep, scale)


def _scale_kept_forward(x, keep, scale, name):
  y = kept_and_scaled(x, keep, scale)
  if name is not None:  # here, not in _scale_kept: the name must be on the residual itself
    y = checkpoint_name(y, name)
  return y, y


def _scale_kept_backward(scale, name, y, grad):
  del name
  return jnp.where(y != 0, _scale(grad, scale), jnp.zeros_like(grad)), None


_scale_kept.defvjp(_scale_kept_forward, _scale_kept_backward)


def apply_after_relu(h: jax.Array, rate: float, rng: jax.Array | None, *, name: str | None = None) -> jax.Array:
  """dropout(relu(h)). Its backward pass needs only the output, which the next matmul keeps
  anyway, instead of ReLU's boolean mask of the FFN's widest tensor; `name` names that output for
  remat policies (see _scale_kept)."""
  if rng is None or rate == 0.0:
    return _scale_kept(h, h > 0, 1.0, name)
  drop_threshold = threshold(rate)
  keep = keep_mask(seed_from(rng), h.shape, drop_threshold) & (h > 0)
  return _scale_kept(h, keep, keep_scale(drop_threshold), name)


def apply_to_probabilities(probs: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Dropout of softmax outputs, whose backward pass reads the output. Exact: where a probability
  is 0 the softmax's own backward pass multiplies the gradient by that 0."""
  if rng is None or rate == 0.0:
    return probs
  drop_threshold = threshold(rate)
  return _scale_kept(probs, keep_mask(seed_from(rng), probs.shape, drop_threshold), keep_scale(drop_threshold))
