"""Flash attention with attention dropout, as a Pallas kernel (Triton on GPUs).

XLA attention with dropout materialises the [batch, heads, q, k] probabilities and dropout mask in
HBM, and recomputes the softmax in the backward pass; cuDNN flash attention avoids that but has no
dropout, which the paper's recipe (Admin, fairseq) uses on attention probabilities. These kernels
keep each [block_q, block_k] tile in registers: the forward pass runs an online softmax over key
blocks, and the dropout keep-mask is a counter-based hash of (seed, batch, head, query, key), so the
backward kernels regenerate exactly the forward's mask instead of reading it back. Q, K and V may be
parts of the one array their fused projection wrote (`Part`): the kernels read them in place and write
their gradients into that array's gradient, so slicing them out and concatenating their gradients
for the projection's backward matmuls are no passes of their own.

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


@dataclasses.dataclass(frozen=True, eq=False)
class Part:
  """Q, K or V as part `index` of a [batch, length, parts, heads, head_dim] array plus its bias
  ([parts, heads, head_dim], or None), as one matmul projects them together (attention.Attention).
  Not a pytree: the index is static."""
  source: jax.Array
  index: int
  bias: jax.Array | None = None

  @classmethod
  def of(cls, x: jax.Array) -> 'Part':
    """A [batch, length, heads, head_dim] array as the only part of itself."""
    return cls(x[:, :, None], 0)

  @property
  def shape(self) -> tuple[int, ...]:
    """[batch, length, heads, head_dim]."""
    return self.source.shape[:2] + self.source.shape[3:]

  def array(self) -> jax.Array:
    """The part, bias added, as a [batch, length, heads, head_dim] array of its own (a copy)."""
    part = self.source[:, :, self.index]
    return part if self.bias is None else part + self.bias[self.index]


def dropout_keep_mask(seed: jax.Array, shape_bhqk: tuple[int, int, int, int], rate: float) -> jax.Array:
  """The boolean [batch, heads, q, k] keep-mask that `flash_attention` applies for this seed.

  Built from the same hash as the kernels, for reference implementations and tests.
  """
  batch, heads, q_len, k_len = shape_bhqk
  keys = dropout.stream_key(dropout.seed_int32(seed), jnp.arange(batch * heads, dtype=jnp.int32))
  rows, cols = jnp.arange(q_len, dtype=jnp.int32), jnp.arange(k_len, dtype=jnp.int32)
  keep = jax.vmap(lambda *key: dropout.kept_tile(key, rows, cols, k_len, dropout.threshold(rate)))(*keys)
  return keep.reshape(batch, heads, q_len, k_len)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static parameters of one attention call (hashable: custom_vjp's non-differentiable argument)."""
  causal: bool
  threshold: int  # 0: no dropout
  softmax_scale: float  # multiplies q k^T
  roles: tuple[tuple[int, int], ...]  # (source, part) of Q, K and V among the sources the kernels read
  block_q: int
  block_k: int
  num_heads: int
  k_len: int  # unpadded: the dropout counter uses it, so padding does not change the mask
  num_warps: int
  num_stages: int
  interpret: bool

  @property
  def keep_scale(self) -> float:
    return dropout.keep_scale(self.threshold)

  @property
  def kv_sources(self) -> tuple[int, ...]:
    """The sources of K and V, each once: the dK/dV kernel writes one gradient for each."""
    (_, _), (k_source, _), (v_source, _) = self.roles
    return (k_source,) if k_source == v_source else (k_source, v_source)


def _matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """2-D matmul contracting a's dim contract[0] with b's dim contract[1], float32 accumulation.

  HIGHEST keeps float32 operands in float32: at the default precision Triton rounds them to TF32
  (relative error 1e-3, seen on an H200), which the float32 path, there to check against, must not.
  bf16 operands are multiplied as they are either way.
  """
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def _scaled_queries(cfg: _Config, q: jax.Array) -> jax.Array:
  """A tile of queries times the softmax scale, in their dtype, as the XLA path scales them."""
  return q if cfg.softmax_scale == 1.0 else q * jnp.asarray(cfg.softmax_scale, q.dtype)


def _biased(tile: jax.Array, bias: jax.Array) -> jax.Array:
  """A [rows, head_dim] tile of Q, K or V with its projection's bias added, in their dtype: the
  projection's matmul writes them without it, so that no pass of XLA's adds it."""
  return tile + bias[None, :]


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
  return None if key is None else dropout.kept_tile(key, rows, cols, cfg.k_len, cfg.threshold)


def _drop(keep: jax.Array | None, x: jax.Array, scale: float) -> jax.Array:
  """x * scale where kept and 0 where dropped; x itself without dropout."""
  return x if keep is None else dropout.kept_and_scaled(x, keep, scale)


def _key_blocks(cfg: _Config, q_block: jax.Array, num_k_blocks: int) -> jax.Array:
  """Key blocks a query block can see: all, or (causal) those not wholly after its last query."""
  if not cfg.causal:
    return num_k_blocks
  return jnp.minimum(num_k_blocks, lax.div((q_block + 1) * cfg.block_q + cfg.block_k - 1, cfg.block_k))


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, q_bias_ref, k_bias_ref, v_bias_ref, q_seg_ref, k_seg_ref, o_ref,
                    lse_ref, *, cfg: _Config):
  """One query block of one (batch, head): online softmax over key blocks (base 2: exp2 is cheaper).

  m is the running max of the base-2 logits, l the running sum of exp2(s - m) over all visible keys
  (dropout does not change the normaliser), acc the running sum of the kept exp2(s - m) times v.
  """
  q_block = pl.program_id(2)
  key = _program_key(cfg, seed_ref)
  q = _scaled_queries(cfg, _biased(q_ref[...], q_bias_ref[...]))
  k_bias, v_bias = k_bias_ref[...], v_bias_ref[...]
  q_segments = q_seg_ref[...]
  rows = _positions(q_block, cfg.block_q)

  def body(k_block, carry):
    acc, m, l = carry
    keys = pl.ds(k_block * cfg.block_k, cfg.block_k)
    cols = _positions(k_block, cfg.block_k)
    visible = _visible(q_segments, k_seg_ref[keys], rows, cols, cfg.causal)
    s = jnp.where(visible, _matmul(q, _biased(k_ref[keys, :], k_bias), (1, 1)) * _LOG2E, _MASKED)
    m_next = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(visible, jnp.exp2(s - m_next[:, None]), 0.0)
    correction = jnp.exp2(m - m_next)
    l = l * correction + p.sum(axis=-1)
    v = _biased(v_ref[keys, :], v_bias)
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
  o_ref[...] = (acc * (cfg.keep_scale / l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log2(l), jnp.inf)


def _probabilities(cfg: _Config, q, k, q_segments, k_segments, lse, rows, cols) -> jax.Array:
  """The forward's softmax probabilities of one tile, recomputed from the saved logsumexp."""
  visible = _visible(q_segments, k_segments, rows, cols, cfg.causal)
  return jnp.where(visible, jnp.exp2(_matmul(q, k, (1, 1)) * _LOG2E - lse[:, None]), 0.0)


def _dkv_kernel(seed_ref, q_ref, k_ref, v_ref, q_bias_ref, k_bias_ref, v_bias_ref, q_seg_ref, k_seg_ref, do_ref,
                lse_ref, delta_ref, *grad_refs, cfg: _Config):
  """dK and dV of one key block, looping over the query blocks that can see it.

  With P the softmax and Z the scaled keep-mask: O = (Z * P) V, so dV = (Z * P)^T dO, and
  dS = P * (Z * (dO V^T) - D) with D = rowsum(dO * O) (from _dq_kernel); dK = dS^T Q, Q scaled.
  `grad_refs` end with the gradient blocks of `cfg.kv_sources` ([block_k, parts, head_dim] each) and
  this block's sum of dV's rows (V's bias's gradient, summed over blocks after), after the input
  that one of them aliases when Q shares its source (its Q part, written by _dq_kernel, is kept).
  """
  k_block = pl.program_id(2)
  key = _program_key(cfg, seed_ref)
  k, v = _biased(k_ref[...], k_bias_ref[...]), _biased(v_ref[...], v_bias_ref[...])
  q_bias = q_bias_ref[...]
  k_segments = k_seg_ref[...]
  cols = _positions(k_block, cfg.block_k)

  def body(q_block, carry):
    dk, dv = carry
    queries = pl.ds(q_block * cfg.block_q, cfg.block_q)
    rows = _positions(q_block, cfg.block_q)
    q, do = _scaled_queries(cfg, _biased(q_ref[queries, :], q_bias)), do_ref[queries, :]
    p = _probabilities(cfg, q, k, q_seg_ref[queries], k_segments, lse_ref[queries], rows, cols)
    keep = _tile_keep(cfg, key, rows, cols)
    dv = dv + _matmul(_drop(keep, p, cfg.keep_scale).astype(do.dtype), do, (0, 0))
    dp = _drop(keep, _matmul(do, v, (1, 1)), cfg.keep_scale)
    ds = p * (dp - delta_ref[queries][:, None])
    dk = dk + _matmul(ds.astype(q.dtype), q, (0, 0))
    return dk, dv

  first = lax.div(k_block * cfg.block_k, cfg.block_q) if cfg.causal else 0
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(first, q_ref.shape[0] // cfg.block_q, body, (zeros, zeros))
  *_, dv_sum_ref = grad_refs
  outputs = grad_refs[-len(cfg.kv_sources) - 1:-1]
  for (source, part), grad in zip(cfg.roles[1:], (dk, dv)):
    out_ref = outputs[cfg.kv_sources.index(source)]
    out_ref[:, part, :] = grad.astype(out_ref.dtype)
  dv_sum_ref[...] = dv.sum(axis=0)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, q_bias_ref, k_bias_ref, v_bias_ref, q_seg_ref, k_seg_ref, do_ref,
               lse_ref, o_ref, dq_ref, delta_ref, dq_sum_ref, *, cfg: _Config):
  """dQ = scale * dS K of one query block, looping over the key blocks it can see (dS as in
  _dkv_kernel), written into Q's part of its source's [block_q, parts, head_dim] gradient block;
  also the block's D = rowsum(dO * O), which _dkv_kernel reads, and its sum of dQ's rows (Q's
  bias's gradient, summed over blocks after).

  D is rowsum(dO * O) because O = (Z * P) V makes it equal rowsum(P * Z * (dO V^T)), as softmax's
  VJP needs.
  """
  q_block = pl.program_id(2)
  key = _program_key(cfg, seed_ref)
  q, do = _scaled_queries(cfg, _biased(q_ref[...], q_bias_ref[...])), do_ref[...]
  k_bias, v_bias = k_bias_ref[...], v_bias_ref[...]
  q_segments, lse = q_seg_ref[...], lse_ref[...]
  delta = jnp.sum(do.astype(jnp.float32) * o_ref[...].astype(jnp.float32), axis=1)
  rows = _positions(q_block, cfg.block_q)

  def body(k_block, dq):
    keys = pl.ds(k_block * cfg.block_k, cfg.block_k)
    cols = _positions(k_block, cfg.block_k)
    k = _biased(k_ref[keys, :], k_bias)
    p = _probabilities(cfg, q, k, q_segments, k_seg_ref[keys], lse, rows, cols)
    dp = _drop(_tile_keep(cfg, key, rows, cols), _matmul(do, _biased(v_ref[keys, :], v_bias), (1, 1)), cfg.keep_scale)
    ds = p * (dp - delta[:, None])
    return dq + _matmul(ds.astype(k.dtype), k, (1, 0))

  num_k_blocks = _key_blocks(cfg, q_block, k_ref.shape[0] // cfg.block_k)
  dq = lax.fori_loop(0, num_k_blocks, body, jnp.zeros(q.shape, jnp.float32)) * cfg.softmax_scale
  dq_ref[:, cfg.roles[0][1], :] = dq.astype(dq_ref.dtype)
  delta_ref[...] = delta
  dq_sum_ref[...] = dq.sum(axis=0)


def _compiler_params(num_warps: int, num_stages: int):
  """Triton launch parameters. jax 0.4.3x-0.5 named the class TritonCompilerParams; later versions
  (0.6 up to at least 0.10) name it CompilerParams, so take whichever this jax has."""
  params = getattr(pltriton, 'CompilerParams', None) or getattr(pltriton, 'TritonCompilerParams')
  return params(num_warps=num_warps, num_stages=num_stages)


def _blocked(block: int, head_dim: int, tiled: bool, part: int = 0):
  """BlockSpec of part `part` of a [batch, length, parts, heads, head_dim] array for one (batch, head):
  block i of grid axis 2 if `tiled`, else the whole (padded) length, which the kernel slices itself."""
  if tiled:
    return pl.BlockSpec((pl.squeezed, block, pl.squeezed, pl.squeezed, head_dim), lambda b, h, i: (b, i, part, h, 0))
  return pl.BlockSpec((pl.squeezed, block, pl.squeezed, pl.squeezed, head_dim), lambda b, h, i: (b, 0, part, h, 0))


def _all_parts(block: int, parts: int, head_dim: int):
  """BlockSpec of block i of a [batch, length, parts, heads, head_dim] gradient, all its parts: the
  kernels write theirs (a part at a time, so `parts` need not be a power of two)."""
  return pl.BlockSpec((pl.squeezed, block, parts, pl.squeezed, head_dim), lambda b, h, i: (b, i, 0, h, 0))


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


def _block_sums(head_dim: int) -> pl.BlockSpec:
  """BlockSpec of per-block sums of a gradient's rows, [batch, heads, blocks, head_dim]: one vector
  per program."""
  return pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, head_dim), lambda b, h, i: (b, h, i, 0))


def _bias(part: int, head_dim: int) -> pl.BlockSpec:
  """BlockSpec of a [parts, heads, head_dim] bias: the vector of one part and head."""
  return pl.BlockSpec((pl.squeezed, pl.squeezed, head_dim), lambda b, h, i: (part, h, 0))


def _bias_specs(cfg: _Config, head_dim: int) -> list[pl.BlockSpec]:
  """BlockSpecs of the biases that Q, K and V add."""
  return [_bias(part, head_dim) for _, part in cfg.roles]


def _call(kernel, cfg: _Config, grid: tuple[int, int, int], in_specs, out_specs, out_shape, name: str,
          input_output_aliases=None):
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=cfg.interpret, name=name, input_output_aliases=input_output_aliases or {},
      compiler_params=_compiler_params(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def _role_arrays(cfg: _Config, per_source) -> tuple[jax.Array, jax.Array, jax.Array]:
  """What Q, K and V read of a per-source sequence (sources, biases): an array up to three times."""
  return tuple(per_source[source] for source, _ in cfg.roles)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg: _Config, seed, sources, biases, q_seg, k_seg) -> tuple[jax.Array, jax.Array]:
  """Output [b, q, 1, h, d] and base-2 logsumexp [b, h, q] (float32).

  Jitted (as `_backward`) so that every layer calling the kernels with the same configuration and
  shapes shares one trace and one Triton lowering: traced anew per call, they were a third of a
  deep model's compile time."""
  q, k, v = _role_arrays(cfg, sources)
  (_, q_part), (_, k_part), (_, v_part) = cfg.roles
  batch, q_len, _, heads, dim = q.shape
  k_len = k.shape[1]
  in_specs = [_SEED_SPEC,
              _blocked(cfg.block_q, dim, tiled=True, part=q_part),
              _blocked(k_len, dim, tiled=False, part=k_part),
              _blocked(k_len, dim, tiled=False, part=v_part),
              *_bias_specs(cfg, dim),
              _segments(cfg.block_q, tiled=True),
              _segments(k_len, tiled=False)]
  return _call(
      _forward_kernel, cfg, (batch, heads, q_len // cfg.block_q), in_specs=in_specs,
      out_specs=[_blocked(cfg.block_q, dim, tiled=True), _rows(cfg.block_q, tiled=True)],
      out_shape=[jax.ShapeDtypeStruct((batch, q_len, 1, heads, dim), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
      name='flash_attention_forward')(seed, q, k, v, *_role_arrays(cfg, biases), q_seg, k_seg)


@functools.partial(jax.jit, static_argnums=0)
def _backward(cfg: _Config, seed, sources, biases, q_seg, k_seg, out, lse,
              dout) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array]:
  """The gradient of each source, and those of Q's and V's biases ([heads, head_dim], float32): the
  dQ kernel (one program per query block) writes Q's part, then the dK/dV kernel (one per key
  block: no atomics) K's and V's, into the same array where Q shares their source."""
  q, k, v = _role_arrays(cfg, sources)
  (q_source, q_part), (_, k_part), (_, v_part) = cfg.roles
  batch, q_len, _, heads, dim = q.shape
  k_len = k.shape[1]
  f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
  operands = (seed, q, k, v, *_role_arrays(cfg, biases), q_seg, k_seg, dout, lse)
  dq_specs = [_SEED_SPEC,
              _blocked(cfg.block_q, dim, tiled=True, part=q_part),
              _blocked(k_len, dim, tiled=False, part=k_part),
              _blocked(k_len, dim, tiled=False, part=v_part),
              *_bias_specs(cfg, dim),
              _segments(cfg.block_q, tiled=True),
              _segments(k_len, tiled=False),
              _blocked(cfg.block_q, dim, tiled=True),  # dO
              _rows(cfg.block_q, tiled=True),  # logsumexp
              _blocked(cfg.block_q, dim, tiled=True)]  # O
  q_blocks = q_len // cfg.block_q
  d_q_source, delta, dq_sums = _call(
      _dq_kernel, cfg, (batch, heads, q_blocks), in_specs=dq_specs,
      out_specs=[_all_parts(cfg.block_q, q.shape[2], dim), _rows(cfg.block_q, tiled=True), _block_sums(dim)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), f32((batch, heads, q_len)),
                 f32((batch, heads, q_blocks, dim))],
      name='flash_attention_dq')(*operands, out)
  operands += (delta,)
  dkv_specs = [_SEED_SPEC,
               _blocked(q_len, dim, tiled=False, part=q_part),
               _blocked(cfg.block_k, dim, tiled=True, part=k_part),
               _blocked(cfg.block_k, dim, tiled=True, part=v_part),
               *_bias_specs(cfg, dim),
               _segments(q_len, tiled=False),
               _segments(cfg.block_k, tiled=True),
               _blocked(q_len, dim, tiled=False),  # dO
               _rows(q_len, tiled=False),  # logsumexp
               _rows(q_len, tiled=False)]  # D
  kv_sources = [sources[source] for source in cfg.kv_sources]
  kv_specs = [_all_parts(cfg.block_k, source.shape[2], dim) for source in kv_sources]
  aliased = {}  # where Q shares a source with K or V, that output starts as the dQ kernel's
  if q_source in cfg.kv_sources:
    aliased = {len(operands): cfg.kv_sources.index(q_source)}
    operands, dkv_specs = operands + (d_q_source,), dkv_specs + [kv_specs[cfg.kv_sources.index(q_source)]]
  k_blocks = k_len // cfg.block_k
  *d_kv_sources, dv_sums = _call(
      _dkv_kernel, cfg, (batch, heads, k_blocks), in_specs=dkv_specs, out_specs=kv_specs + [_block_sums(dim)],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in kv_sources] + [f32((batch, heads, k_blocks, dim))],
      input_output_aliases=aliased, name='flash_attention_dkv')(*operands)
  grads = dict(zip(cfg.kv_sources, d_kv_sources))
  grads.setdefault(q_source, d_q_source)
  return tuple(grads[i] for i in range(len(sources))), dq_sums.sum((0, 2)), dv_sums.sum((0, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, seed, sources, biases, q_seg, k_seg) -> jax.Array:
  return _forward(cfg, seed, sources, biases, q_seg, k_seg)[0]


def _attention_fwd(cfg: _Config, seed, sources, biases, q_seg, k_seg):
  out, lse = _forward(cfg, seed, sources, biases, q_seg, k_seg)
  out, lse = checkpoint_name(out, OUTPUT_NAME), checkpoint_name(lse, LOGSUMEXP_NAME)
  return out, (seed, sources, biases, q_seg, k_seg, out, lse)


def _attention_bwd(cfg: _Config, residuals, dout):
  seed, sources, biases, q_seg, k_seg, out, lse = residuals
  d_sources, d_q_bias, d_v_bias = _backward(cfg, seed, sources, biases, q_seg, k_seg, out, lse, dout)
  # K's bias has none: softmax ignores a shift of all the logits of a row.
  d_biases = [jnp.zeros(bias.shape, jnp.float32) for bias in biases]
  for (source, part), grad in ((cfg.roles[0], d_q_bias), (cfg.roles[2], d_v_bias)):
    d_biases[source] = d_biases[source].at[part].add(grad)
  return None, d_sources, tuple(d.astype(b.dtype) for d, b in zip(d_biases, biases)), None, None


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


def distinct_sources(
    parts: tuple[Part, Part, Part]) -> tuple[list[jax.Array], list[jax.Array | None], tuple[tuple[int, int], ...]]:
  """The arrays that Q, K and V are parts of, each once, their biases, and the (source, part) of
  each of Q, K, V.

  Every part of every source must be one of them: the kernels write the gradient of those parts
  only, and the rest of such an array's gradient would be left undefined.
  """
  sources, roles = [], []
  for part in parts:
    index = next((i for i, source in enumerate(sources) if source.source is part.source), len(sources))
    if index == len(sources):
      sources.append(part)
    elif sources[index].bias is not part.bias:
      raise ValueError('the parts of one array must share its bias')
    roles.append((index, part.index))
  for index, source in enumerate(sources):
    if sorted(part for i, part in roles if i == index) != list(range(source.source.shape[2])):
      raise ValueError(f'flash_attention reads parts {[p for i, p in roles if i == index]} of an array of '
                       f'{source.source.shape[2]} parts: each part must be exactly one of query, key and value')
  return [x.source for x in sources], [x.bias for x in sources], tuple(roles)


def flash_attention(query: jax.Array | Part, key: jax.Array | Part, value: jax.Array | Part,
                    query_segments: jax.Array, key_segments: jax.Array, *, causal: bool, dropout_rate: float,
                    seed: jax.Array | None, scale: float = 1.0, block_q: int = 64, block_k: int = 64,
                    num_warps: int = 4, num_stages: int = 3, interpret: bool | None = None) -> jax.Array:
  """Dropout(softmax(scale * q k^T)) v over packed rows, without materialising [b, h, q, k] in HBM.

  query [b, q, h, d]; key, value [b, k, h, d]; each either an array or a `Part` of one array that
  holds several of them ([b, length, parts, h, d], as a fused projection writes it, and its bias),
  which the kernels then read in place, adding the bias, and whose gradient they write whole. The
  queries are multiplied by `scale` in their dtype (the 1/sqrt(d) of attention). Query i sees key j
  iff key_segments[j] > 0, query_segments[i] == key_segments[j] and (if causal) j <= i; a query that
  sees no key gets output 0 and zero gradients. Softmax and accumulation are float32; the result has
  query's dtype.

  Dropout drops p_ij where dropout_keep_mask(seed, [b, h, q, k], dropout_rate) is False and scales
  the kept ones by the inverse keep probability. `seed` is a traced int32/uint32 scalar (e.g.
  jax.random.bits(key, (), jnp.uint32)) so that every step can draw a new mask without
  recompiling; seed=None or dropout_rate=0 means no dropout. The mask depends on the local batch
  index: under shard_map, fold the shard's index into `seed`, or shards share masks. Lengths and
  head_dim are padded inside to the block sizes (and head_dim to a power of two >= 16), as Triton
  requires. The block sizes, num_warps and num_stages are the Triton launch's tiling
  (benchmarks/flash_sweep.py times them). `interpret=None` compiles the kernels with Triton for CUDA
  and runs the Pallas interpreter on other platforms (slow; for tests), by the platform compiled for.
  """
  parts = tuple(x if isinstance(x, Part) else Part.of(x) for x in (query, key, value))
  sources, biases, roles = distinct_sources(parts)
  biases = [jnp.zeros(x.shape[2:], x.dtype) if b is None else b for x, b in zip(sources, biases)]
  (batch, q_len, _, heads, dim), k_shape = parts[0].source.shape, parts[1].source.shape
  k_len = k_shape[1]
  if (k_shape[0], k_shape[3:]) != (batch, (heads, dim)) or parts[2].source.shape[:2] != k_shape[:2] or any(
      source.shape[3:] != (heads, dim) for source in sources):
    raise ValueError(f'query {parts[0].shape}, key {parts[1].shape} and value {parts[2].shape} do not match')
  block_q, block_k = _block_size(block_q, q_len), _block_size(block_k, k_len)
  config = functools.partial(_Config, causal=causal, threshold=0 if seed is None else dropout.threshold(dropout_rate),
                             softmax_scale=scale, roles=roles, block_q=block_q, block_k=block_k, num_heads=heads,
                             k_len=k_len, num_warps=num_warps, num_stages=num_stages)
  # A source's length padded to the blocks of every role it plays (powers of two: the largest).
  blocks = [max(block_q if role == 0 else block_k for role, (i, _) in enumerate(roles) if i == index)
            for index in range(len(sources))]
  dim_padded = max(_MIN_BLOCK, pl.next_power_of_2(dim))
  padded = [_pad(_pad(source, 1, pl.cdiv(source.shape[1], block) * block), 4, dim_padded)
            for source, block in zip(sources, blocks)]
  biases = tuple(_pad(bias.astype(source.dtype), 2, dim_padded) for bias, source in zip(biases, sources))
  q_padded, k_padded = padded[roles[0][0]].shape[1], padded[roles[1][0]].shape[1]
  seed = jnp.zeros((1,), jnp.int32) if seed is None else dropout.seed_int32(seed).reshape(1)
  segments = (_pad(query_segments.astype(jnp.int32), 1, q_padded), _pad(key_segments.astype(jnp.int32), 1, k_padded))
  if interpret is None:  # the platform compiled for decides, which need not be this machine's
    out = lax.platform_dependent(
        seed, tuple(padded), biases, *segments, cuda=functools.partial(_attention, config(interpret=False)),
        default=functools.partial(_attention, config(interpret=True)))
  else:
    out = _attention(config(interpret=interpret), seed, tuple(padded), biases, *segments)
  return out[:, :q_len, 0, :, :dim]
