"""Flash attention with attention dropout, as a Pallas kernel (Triton on GPUs).

XLA attention with dropout materialises the [batch, heads, q, k] probabilities and dropout mask in
HBM, and recomputes the softmax in the backward pass; cuDNN flash attention avoids that but has no
dropout, which the paper's recipe (Admin, fairseq) uses on attention probabilities. These kernels
keep each [block_q, block_k] tile in registers: the forward pass runs an online softmax over key
blocks, and the dropout keep-mask is a counter-based hash of (seed, batch, head, query, key), so the
backward kernels regenerate exactly the forward's mask instead of reading it back.

Everything here is also plain jnp, so interpret mode runs the same kernels on the CPU for tests.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from admin_jax.model import dropout

_LOG2E = math.log2(math.e)
# Finite stand-in for -inf on masked logits: exp2 of (masked - max) is 0 or, on a row with no
# visible key, 1 (zeroed by the visibility mask), never NaN from (-inf) - (-inf).
_MASKED = -1e30
_MIN_BLOCK = 16  # Triton's tl.dot needs every matmul dimension >= 16
# Names of the forward kernel's outputs that its backward pass reads: a remat policy that saves
# them keeps the forward kernel from running a second time in the backward pass.
OUTPUT_NAME = 'flash_attention_output'
LOGSUMEXP_NAME = 'flash_attention_logsumexp'


def _keep(key: tuple[jax.Array, jax.Array], rows: jax.Array, cols: jax.Array, k_len: int,
          threshold: int) -> jax.Array:
  """[len(rows), len(cols)]: True where dropout keeps p[row, col] of the keyed matrix, whose
  element c = row * k_len + col. The row and column terms of the keyed counter are precomputed,
  so the counter costs one add per element."""
  multiplier, offset = key
  counter = (rows * (k_len * multiplier) + offset)[:, None] + (cols * multiplier)[None, :]
  return dropout.kept(counter, threshold)


def dropout_keep_mask(seed: jax.Array, shape_bhqk: tuple[int, int, int, int], rate: float) -> jax.Array:
  """The boolean [batch, heads, q, k] keep-mask that `flash_attention` applies for this seed.

  Built from the same hash as the kernels, for reference implementations and tests.
  """
  batch, heads, q_len, k_len = shape_bhqk
  keys = dropout.stream_key(dropout.seed_int32(seed), jnp.arange(batch * heads, dtype=jnp.int32))
  rows, cols = jnp.arange(q_len, dtype=jnp.int32), jnp.arange(k_len, dtype=jnp.int32)
  keep = jax.vmap(lambda *key: _keep(key, rows, cols, k_len, dropout.threshold(rate)))(*keys)
  return keep.reshape(batch, heads, q_len, k_len)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static parameters of one attention call (hashable: custom_vjp's non-differentiable argument)."""
  causal: bool
  threshold: int  # 0: no dropout
  block_q: int
  block_k: int
  num_heads: int
  k_len: int  # unpadded: the dropout counter uses it, so padding does not change the mask
  num_warps: int
  num_stages: int
  interpret: bool

  @property
  def scale(self) -> float:
    return dropout.keep_scale(self.threshold)


def _matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """2-D matmul contracting a's dim contract[0] with b's dim contract[1], float32 accumulation.

  HIGHEST keeps float32 operands in float32: at the default precision Triton rounds them to TF32
  (relative error 1e-3, seen on an H200), which the float32 path, there to check against, must not.
  bf16 operands are multiplied as they are either way.
  """
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def _positions(block: int, size: int) -> jax.Array:
  return block * size + lax.broadcasted_iota(jnp.int32, (size,), 0)


def _visible(q_segments: jax.Array, k_segments: jax.Array, rows: jax.Array, cols: jax.Array,
             causal: bool) -> jax.Array:
  """[block_q, block_k]: same packed segment, key not padding, and (causal) key not after query."""
  visible = (q_segments[:, None] == k_segments[None, :]) & (k_segments[None, :] > 0)
  if causal:
    visible &= cols[None, :] <= rows[:, None]
  return visible


def _program_key(cfg: _Config, seed_ref) -> tuple[jax.Array, jax.Array] | None:
  """The dropout key of this program's (batch, head), or None without dropout.

  Read at the kernel's top level: the interpreter substitutes program_id only there, not inside
  loop bodies (and it is loop-invariant anyway).
  """
  if not cfg.threshold:
    return None
  return dropout.stream_key(seed_ref[0], pl.program_id(0) * cfg.num_heads + pl.program_id(1))


def _tile_keep(cfg: _Config, key: tuple[jax.Array, jax.Array] | None, rows: jax.Array,
               cols: jax.Array) -> jax.Array | None:
  """The tile's [block_q, block_k] dropout keep-mask, or None without dropout."""
  return None if key is None else _keep(key, rows, cols, cfg.k_len, cfg.threshold)


def _drop(keep: jax.Array | None, x: jax.Array, scale: float) -> jax.Array:
  """x * scale where kept and 0 where dropped; x itself without dropout."""
  return x if keep is None else jnp.where(keep, x * scale, 0.0)


def _key_blocks(cfg: _Config, q_block: jax.Array, num_k_blocks: int) -> jax.Array:
  """Key blocks a query block can see: all, or (causal) those not wholly after its last query."""
  if not cfg.causal:
    return num_k_blocks
  return jnp.minimum(num_k_blocks, lax.div((q_block + 1) * cfg.block_q + cfg.block_k - 1, cfg.block_k))


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, o_ref, lse_ref, *, cfg: _Config):
  """One query block of one (batch, head): online softmax over key blocks (base 2: exp2 is cheaper).

  m is the running max of the base-2 logits, l the running sum of exp2(s - m) over all visible keys
  (dropout does not change the normaliser), acc the running sum of the kept exp2(s - m) times v.
  """
  q_block = pl.program_id(2)
  key = _program_key(cfg, seed_ref)
  q = q_ref[...]
  q_segments = q_seg_ref[...]
  rows = _positions(q_block, cfg.block_q)

  def body(k_block, carry):
    acc, m, l = carry
    keys = pl.ds(k_block * cfg.block_k, cfg.block_k)
    cols = _positions(k_block, cfg.block_k)
    visible = _visible(q_segments, k_seg_ref[keys], rows, cols, cfg.causal)
    s = jnp.where(visible, _matmul(q, k_ref[keys, :], (1, 1)) * _LOG2E, _MASKED)
    m_next = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(visible, jnp.exp2(s - m_next[:, None]), 0.0)
    correction = jnp.exp2(m - m_next)
    l = l * correction + p.sum(axis=-1)
    v = v_ref[keys, :]
    kept = _drop(_tile_keep(cfg, key, rows, cols), p, 1.0)  # the 1 / keep scale is applied at the end
    acc = acc * correction[:, None] + _matmul(kept.astype(v.dtype), v, (1, 0))
    return acc, m_next, l

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((cfg.block_q,), _MASKED, jnp.float32),
          jnp.zeros((cfg.block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(0, _key_blocks(cfg, q_block, k_ref.shape[0] // cfg.block_k), body, init)
  # A row with no visible key has l = 0: its output is 0 and its logsumexp +inf, so that the
  # backward pass's exp2(s - lse) is 0 there too.
  seen = l > 0
  l = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc * (cfg.scale / l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log2(l), jnp.inf)


def _probabilities(cfg: _Config, q, k, q_segments, k_segments, lse, rows, cols) -> jax.Array:
  """The forward's softmax probabilities of one tile, recomputed from the saved logsumexp."""
  visible = _visible(q_segments, k_segments, rows, cols, cfg.causal)
  return jnp.where(visible, jnp.exp2(_matmul(q, k, (1, 1)) * _LOG2E - lse[:, None]), 0.0)


def _dkv_kernel(seed_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, cfg: _Config):
  """dK and dV of one key block, looping over the query blocks that can see it.

  With P the softmax and Z the scaled keep-mask: O = (Z * P) V, so dV = (Z * P)^T dO, and
  dS = P * (Z * (dO V^T) - D) with D = rowsum(dO * O); dK = dS^T Q (the caller pre-scaled Q).
  """
  k_block = pl.program_id(2)
  key = _program_key(cfg, seed_ref)
  k, v = k_ref[...], v_ref[...]
  k_segments = k_seg_ref[...]
  cols = _positions(k_block, cfg.block_k)

  def body(q_block, carry):
    dk, dv = carry
    queries = pl.ds(q_block * cfg.block_q, cfg.block_q)
    rows = _positions(q_block, cfg.block_q)
    q, do = q_ref[queries, :], do_ref[queries, :]
    p = _probabilities(cfg, q, k, q_seg_ref[queries], k_segments, lse_ref[queries], rows, cols)
    keep = _tile_keep(cfg, key, rows, cols)
    dv = dv + _matmul(_drop(keep, p, cfg.scale).astype(do.dtype), do, (0, 0))
    dp = _drop(keep, _matmul(do, v, (1, 1)), cfg.scale)
    ds = p * (dp - delta_ref[queries][:, None])
    dk = dk + _matmul(ds.astype(q.dtype), q, (0, 0))
    return dk, dv

  first = lax.div(k_block * cfg.block_k, cfg.block_q) if cfg.causal else 0
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(first, q_ref.shape[0] // cfg.block_q, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               cfg: _Config):
  """dQ = dS K of one query block, looping over the key blocks it can see (dS as in _dkv_kernel)."""
  q_block = pl.program_id(2)
  key = _program_key(cfg, seed_ref)
  q, do = q_ref[...], do_ref[...]
  q_segments, lse, delta = q_seg_ref[...], lse_ref[...], delta_ref[...]
  rows = _positions(q_block, cfg.block_q)

  def body(k_block, dq):
    keys = pl.ds(k_block * cfg.block_k, cfg.block_k)
    cols = _positions(k_block, cfg.block_k)
    k = k_ref[keys, :]
    p = _probabilities(cfg, q, k, q_segments, k_seg_ref[keys], lse, rows, cols)
    dp = _drop(_tile_keep(cfg, key, rows, cols), _matmul(do, v_ref[keys, :], (1, 1)), cfg.scale)
    ds = p * (dp - delta[:, None])
    return dq + _matmul(ds.astype(k.dtype), k, (1, 0))

  num_k_blocks = _key_blocks(cfg, q_block, k_ref.shape[0] // cfg.block_k)
  dq_ref[...] = lax.fori_loop(0, num_k_blocks, body, jnp.zeros(q.shape, jnp.float32)).astype(dq_ref.dtype)


def _compiler_params(num_warps: int, num_stages: int):
  """Triton launch parameters. jax 0.4.3x-0.5 named the class TritonCompilerParams; later versions
  (0.6 up to at least 0.10) name it CompilerParams, so take whichever this jax has."""
  params = getattr(pltriton, 'CompilerParams', None) or getattr(pltriton, 'TritonCompilerParams')
  return params(num_warps=num_warps, num_stages=num_stages)


def _blocked(block: int, head_dim: int, tiled: bool):
  """BlockSpec of a [batch, length, heads, head_dim] array for one (batch, head): block i of grid
  axis 2 if `tiled`, else the whole (padded) length, which the kernel slices itself."""
  if tiled:
    return pl.BlockSpec((pl.squeezed, block, pl.squeezed, head_dim), lambda b, h, i: (b, i, h, 0))
  return pl.BlockSpec((pl.squeezed, block, pl.squeezed, head_dim), lambda b, h, i: (b, 0, h, 0))


def _segments(block: int, tiled: bool):
  """BlockSpec of [batch, length] segment ids, blocked like `_blocked`."""
  if tiled:
    return pl.BlockSpec((pl.squeezed, block), lambda b, h, i: (b, i))
  return pl.BlockSpec((pl.squeezed, block), lambda b, h, i: (b, 0))


def _rows(block: int, tiled: bool):
  """BlockSpec of a per-query [batch, heads, q] float32 array (logsumexp, D), blocked like `_blocked`."""
  if tiled:
    return pl.BlockSpec((pl.squeezed, pl.squeezed, block), lambda b, h, i: (b, h, i))
  return pl.BlockSpec((pl.squeezed, pl.squeezed, block), lambda b, h, i: (b, h, 0))


_SEED_SPEC = pl.BlockSpec((1,), lambda b, h, i: (0,))


def _call(kernel, cfg: _Config, grid: tuple[int, int, int], in_specs, out_specs, out_shape, name: str):
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=cfg.interpret, name=name,
      compiler_params=_compiler_params(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def _forward(cfg: _Config, seed, q, k, v, q_seg, k_seg) -> tuple[jax.Array, jax.Array]:
  """Output [b, q, h, d] and base-2 logsumexp [b, h, q] (float32)."""
  batch, q_len, heads, dim = q.shape
  k_len = k.shape[1]
  in_specs = [_SEED_SPEC,
              _blocked(cfg.block_q, dim, tiled=True),  # q
              _blocked(k_len, dim, tiled=False),  # k
              _blocked(k_len, dim, tiled=False),  # v
              _segments(cfg.block_q, tiled=True),
              _segments(k_len, tiled=False)]
  return _call(
      _forward_kernel, cfg, (batch, heads, q_len // cfg.block_q), in_specs=in_specs,
      out_specs=[_blocked(cfg.block_q, dim, tiled=True), _rows(cfg.block_q, tiled=True)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
      name='flash_attention_forward')(seed, q, k, v, q_seg, k_seg)


def _backward(cfg: _Config, seed, q, k, v, q_seg, k_seg, out, lse, dout) -> tuple[jax.Array, ...]:
  """dQ, dK, dV: one kernel per key block for dK and dV, one per query block for dQ (no atomics)."""
  batch, q_len, heads, dim = q.shape
  k_len = k.shape[1]
  # D = rowsum(dO * O): O = (Z * P) V makes it equal rowsum(P * Z * (dO V^T)), as softmax's VJP needs.
  delta = jnp.einsum('bqhd,bqhd->bhq', dout.astype(jnp.float32), out.astype(jnp.float32))
  operands = (seed, q, k, v, q_seg, k_seg, dout, lse, delta)
  dkv_specs = [_SEED_SPEC,
               _blocked(q_len, dim, tiled=False),  # q
               _blocked(cfg.block_k, dim, tiled=True),  # k
               _blocked(cfg.block_k, dim, tiled=True),  # v
               _segments(q_len, tiled=False),
               _segments(cfg.block_k, tiled=True),
               _blocked(q_len, dim, tiled=False),  # dO
               _rows(q_len, tiled=False),  # logsumexp
               _rows(q_len, tiled=False)]  # D
  dk, dv = _call(
      _dkv_kernel, cfg, (batch, heads, k_len // cfg.block_k), in_specs=dkv_specs,
      out_specs=[_blocked(cfg.block_k, dim, tiled=True)] * 2,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name='flash_attention_dkv')(*operands)
  dq_specs = [_SEED_SPEC,
              _blocked(cfg.block_q, dim, tiled=True),  # q
              _blocked(k_len, dim, tiled=False),  # k
              _blocked(k_len, dim, tiled=False),  # v
              _segments(cfg.block_q, tiled=True),
              _segments(k_len, tiled=False),
              _blocked(cfg.block_q, dim, tiled=True),  # dO
              _rows(cfg.block_q, tiled=True),  # logsumexp
              _rows(cfg.block_q, tiled=True)]  # D
  dq = _call(
      _dq_kernel, cfg, (batch, heads, q_len // cfg.block_q), in_specs=dq_specs,
      out_specs=_blocked(cfg.block_q, dim, tiled=True),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name='flash_attention_dq')(*operands)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, seed, q, k, v, q_seg, k_seg) -> jax.Array:
  return _forward(cfg, seed, q, k, v, q_seg, k_seg)[0]


def _attention_fwd(cfg: _Config, seed, q, k, v, q_seg, k_seg):
  out, lse = _forward(cfg, seed, q, k, v, q_seg, k_seg)
  out, lse = checkpoint_name(out, OUTPUT_NAME), checkpoint_name(lse, LOGSUMEXP_NAME)
  return out, (seed, q, k, v, q_seg, k_seg, out, lse)


def _attention_bwd(cfg: _Config, residuals, dout):
  seed, q, k, v, q_seg, k_seg, out, lse = residuals
  dq, dk, dv = _backward(cfg, seed, q, k, v, q_seg, k_seg, out, lse, dout)
  return None, dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _block_size(requested: int, length: int) -> int:
  """The requested block, shrunk (to a power of two >= 16) for sequences shorter than it."""
  if requested < 1 or requested & (requested - 1):
    raise ValueError(f'block sizes must be powers of two (a Triton requirement), got {requested}')
  return min(requested, max(_MIN_BLOCK, pl.next_power_of_2(length)))


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
  """x zero-padded at the end of `axis` to `size` (segment 0: padding that nothing attends to)."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def flash_attention(query: jax.Array, key: jax.Array, value: jax.Array, query_segments: jax.Array,
                    key_segments: jax.Array, *, causal: bool, dropout_rate: float, seed: jax.Array | None,
                    block_q: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 3,
                    interpret: bool | None = None) -> jax.Array:
  """Dropout(softmax(q k^T)) v over packed rows, without materialising [b, h, q, k] in HBM.

  query [b, q, h, d] must already carry the 1/sqrt(d) scale; key, value [b, k, h, d]. Query i sees
  key j iff key_segments[j] > 0, query_segments[i] == key_segments[j] and (if causal) j <= i; a
  query that sees no key gets output 0 and zero gradients. Softmax and accumulation are float32;
  the result has query's dtype.

  Dropout drops p_ij where dropout_keep_mask(seed, [b, h, q, k], dropout_rate) is False and scales
  the kept ones by the inverse keep probability. `seed` is a traced int32/uint32 scalar (e.g.
  jax.random.bits(key, (), jnp.uint32)) so that every step can draw a new mask without
  recompiling; seed=None or dropout_rate=0 means no dropout. The mask depends on the local batch
  index: under shard_map, fold the shard's index into `seed`, or shards share masks. Lengths and head_dim are padded
  inside to the block sizes (and head_dim to a power of two >= 16), as Triton requires. The block
  sizes, num_warps and num_stages are the Triton launch's tiling (benchmarks/flash_sweep.py times them).
  `interpret=None` compiles the kernels with Triton for CUDA and runs the Pallas interpreter on
  other platforms (slow; for tests), by the platform compiled for.
  """
  _, q_len, heads, dim = query.shape
  k_len = key.shape[1]
  if key.shape[-1] != dim or value.shape != key.shape:
    raise ValueError(f'query {query.shape}, key {key.shape} and value {value.shape} do not match')
  block_q, block_k = _block_size(block_q, q_len), _block_size(block_k, k_len)
  config = functools.partial(_Config, causal=causal, threshold=0 if seed is None else dropout.threshold(dropout_rate),
                             block_q=block_q, block_k=block_k, num_heads=heads, k_len=k_len, num_warps=num_warps,
                             num_stages=num_stages)
  q_padded, k_padded = pl.cdiv(q_len, block_q) * block_q, pl.cdiv(k_len, block_k) * block_k
  dim_padded = max(_MIN_BLOCK, pl.next_power_of_2(dim))
  operands = (jnp.zeros((1,), jnp.int32) if seed is None else dropout.seed_int32(seed).reshape(1),
              _pad(_pad(query, 1, q_padded), 3, dim_padded),
              _pad(_pad(key, 1, k_padded), 3, dim_padded),
              _pad(_pad(value, 1, k_padded), 3, dim_padded),
              _pad(query_segments.astype(jnp.int32), 1, q_padded),
              _pad(key_segments.astype(jnp.int32), 1, k_padded))
  if interpret is None:  # the platform compiled for decides, which need not be this machine's
    out = lax.platform_dependent(*operands, cuda=functools.partial(_attention, config(interpret=False)),
                                 default=functools.partial(_attention, config(interpret=True)))
  else:
    out = _attention(config(interpret=interpret), *operands)
  return out[:, :q_len, :, :dim]
