"""The residual LayerNorm LN(shortcut * x + dropout(branch + branch_bias)) of Post-LN, Admin and
DeepNorm as Pallas kernels.

XLA splits this LayerNorm into several passes over the float32 residual stream: statistics, then
normalisation, in the forward pass; in the backward pass the input gradient and, separately, the
column sums for the gain, bias and omega gradients, each reading the stream and the branch output
again. In the plans of the big6 step that is about a third of all its memory traffic (docs/PERF.md).
Here one kernel reads x and the branch once and writes the output, its copy in the branch's dtype
(what the next branch's matmuls read) and two statistics per token; one backward kernel reads both
output gradients (the stream's and the copy's, summed here rather than by a pass of XLA's), x and
the branch once, and writes both input gradients and, per program (a loop over blocks of rows),
partial sums of the parameter gradients (summed after). The branch's last bias and its dropout
are applied here too, as the branch output is read (the mask is `dropout.keep_mask`'s, rebuilt in the
backward kernel from the global row index of each row), and the bias's gradient is one more partial
sum: otherwise adding them, and masking the gradient and summing it for the bias, are one XLA pass
each way over the branch output of every sublayer.

Computed in float32 throughout (the stream may be stored in a narrower dtype), as
`layers.residual_layer_norm`, whose results these equal to rounding.
`interpret=None` compiles with Triton for CUDA and runs the Pallas interpreter elsewhere (tests).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from admin_jax.model import dropout

# Rows a program handles at a time: this many elements of [rows, d_model]. Small enough that the
# backward pass's six live [rows, d_model] float32 tiles fit in registers at 8 warps (16 values per
# thread each).
_BLOCK_ELEMENTS = 4096
# Such blocks per backward program, looped over, so that its per-program partial sums of the four
# parameter gradients (4 x 4 bytes x d_model, written, then read again to be summed) are a small
# share of its traffic: with one block per program three of them were a sixth of it on big6.
_BACKWARD_BLOCKS = 16
_FORWARD_WARPS = 4
_BACKWARD_WARPS = 8


@dataclasses.dataclass(frozen=True)
class _Config:
  block_rows: int
  backward_blocks: int  # blocks of block_rows rows per backward program
  eps: float
  drop_threshold: int  # of the branch's dropout; 0: none
  forward_warps: int
  backward_warps: int
  interpret: bool


def _keep(cfg: _Config, rows_ref, key_ref, rows, width: int) -> jax.Array | None:
  """The branch's dropout keep-mask of a block of rows (global row indices in rows_ref), or None."""
  if not cfg.drop_threshold:
    return None
  key = (key_ref[0], key_ref[1])
  cols = lax.broadcasted_iota(jnp.int32, (width,), 0)
  return dropout.kept_tile(key, rows_ref[rows], cols, width, cfg.drop_threshold)


def _dropped_branch(cfg: _Config, branch: jax.Array, branch_bias: jax.Array, keep: jax.Array | None) -> jax.Array:
  """dropout(branch + branch_bias) in float32, rounded as XLA's ops in the branch's dtype round it."""
  f = branch + branch_bias[None, :]
  if keep is not None:
    f = dropout.kept_and_scaled(f, keep, dropout.keep_scale(cfg.drop_threshold))
  return f.astype(jnp.float32)


def _forward_kernel(x_ref, branch_ref, branch_bias_ref, rows_ref, key_ref, shortcut_ref, scale_ref, bias_ref, y_ref,
                    *outputs, cfg: _Config):
  *copy_ref, mean_ref, rstd_ref = outputs  # the copy only where the stream's dtype is not the branch's
  keep = _keep(cfg, rows_ref, key_ref, slice(None), x_ref.shape[1])
  s = (shortcut_ref[...][None, :] * x_ref[...].astype(jnp.float32)
       + _dropped_branch(cfg, branch_ref[...], branch_bias_ref[...], keep))
  mean = jnp.mean(s, axis=1)
  centred = s - mean[:, None]
  rstd = lax.rsqrt(jnp.mean(centred * centred, axis=1) + cfg.eps)
  y = centred * rstd[:, None] * scale_ref[...][None, :] + bias_ref[...][None, :]
  y_ref[...] = y.astype(y_ref.dtype)
  for ref in copy_ref:
    ref[...] = y.astype(ref.dtype)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _backward_kernel(grad_ref, grad_copy_ref, x_ref, branch_ref, branch_bias_ref, rows_ref, key_ref, shortcut_ref,
                     scale_ref, mean_ref, rstd_ref, d_x_ref, d_branch_ref, d_branch_bias_ref, d_shortcut_ref,
                     d_scale_ref, d_bias_ref, *, cfg: _Config):
  shortcut, scale, branch_bias = shortcut_ref[...][None, :], scale_ref[...][None, :], branch_bias_ref[...]

  def block(i, sums):
    rows = pl.ds(i * cfg.block_rows, cfg.block_rows)
    x = x_ref[rows, :].astype(jnp.float32)
    grad = grad_ref[rows, :].astype(jnp.float32) + grad_copy_ref[rows, :].astype(jnp.float32)
    rstd = rstd_ref[rows][:, None]
    keep = _keep(cfg, rows_ref, key_ref, rows, x.shape[1])
    f = _dropped_branch(cfg, branch_ref[rows, :], branch_bias, keep)
    normalized = (shortcut * x + f - mean_ref[rows][:, None]) * rstd
    d_normalized = grad * scale
    d_sum = rstd * (d_normalized - jnp.mean(d_normalized, axis=1)[:, None]
                    - normalized * jnp.mean(d_normalized * normalized, axis=1)[:, None])
    d_x_ref[rows, :] = (d_sum * shortcut).astype(d_x_ref.dtype)
    d_branch = d_sum if keep is None else dropout.kept_and_scaled(d_sum, keep, dropout.keep_scale(cfg.drop_threshold))
    d_branch_ref[rows, :] = d_branch.astype(d_branch_ref.dtype)
    d_branch_bias, d_shortcut, d_scale, d_bias = sums
    return (d_branch_bias + jnp.sum(d_branch, axis=0), d_shortcut + jnp.sum(d_sum * x, axis=0),
            d_scale + jnp.sum(grad * normalized, axis=0), d_bias + jnp.sum(grad, axis=0))

  zeros = jnp.zeros(scale.shape[1:], jnp.float32)
  sums = lax.fori_loop(0, cfg.backward_blocks, block, (zeros,) * 4)
  d_branch_bias_ref[...], d_shortcut_ref[...], d_scale_ref[...], d_bias_ref[...] = sums


def _row_block(rows: int, d: int) -> pl.BlockSpec:
  return pl.BlockSpec((rows, d), lambda i: (i, 0))


def _per_row(rows: int) -> pl.BlockSpec:
  return pl.BlockSpec((rows,), lambda i: (i,))


def _vector(d: int) -> pl.BlockSpec:
  return pl.BlockSpec((d,), lambda i: (0,))


_KEY_SPEC = pl.BlockSpec((2,), lambda i: (0,))  # the dropout key: (multiplier, offset)


def _partial_sum(d: int) -> pl.BlockSpec:
  return pl.BlockSpec((pl.squeezed, d), lambda i: (i, 0))


def _call(kernel, cfg: _Config, grid: int, in_specs, out_specs, out_shape, name: str, num_warps: int):
  return pl.pallas_call(kernel, grid=(grid,), in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=cfg.interpret, name=name,
                        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1))


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg: _Config, x, branch, branch_bias, row_ids, key, shortcut, scale, bias):
  """Jitted (as `_backward`) so that every sublayer with the same configuration and shapes shares one
  trace and one Triton lowering: traced anew per call, they were a third of a deep model's compile time."""
  rows, d = x.shape
  f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
  block = cfg.block_rows
  copies = [jax.ShapeDtypeStruct((rows, d), branch.dtype)] if x.dtype != branch.dtype else []
  kernel = _call(functools.partial(_forward_kernel, cfg=cfg), cfg, rows // block,
                 in_specs=[_row_block(block, d), _row_block(block, d), _vector(d), _per_row(block), _KEY_SPEC,
                           _vector(d), _vector(d), _vector(d)],
                 out_specs=[_row_block(block, d)] * (1 + len(copies)) + [_per_row(block), _per_row(block)],
                 out_shape=[jax.ShapeDtypeStruct((rows, d), x.dtype)] + copies + [f32((rows,)), f32((rows,))],
                 name='residual_layer_norm_forward', num_warps=cfg.forward_warps)
  y, *copy, mean, rstd = kernel(x, branch, branch_bias, row_ids, key, shortcut, scale, bias)
  return y, copy[0] if copy else y, mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer_norm(cfg: _Config, x, branch, branch_bias, row_ids, key, shortcut, scale, bias):
  return tuple(_forward(cfg, x, branch, branch_bias, row_ids, key, shortcut, scale, bias)[:2])


def _layer_norm_fwd(cfg: _Config, x, branch, branch_bias, row_ids, key, shortcut, scale, bias):
  y, copy, mean, rstd = _forward(cfg, x, branch, branch_bias, row_ids, key, shortcut, scale, bias)
  return (y, copy), (x, branch, branch_bias, row_ids, key, shortcut, scale, mean, rstd)


@functools.partial(jax.jit, static_argnums=0)
def _backward(cfg: _Config, grad, grad_copy, x, branch, branch_bias, row_ids, key, shortcut, scale, mean, rstd):
  """d_x, d_branch and the gradients of the branch's bias, the shortcut, the scale and the bias."""
  rows, d = x.shape
  block = cfg.block_rows * cfg.backward_blocks
  programs = rows // block
  f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
  kernel = _call(
      functools.partial(_backward_kernel, cfg=cfg), cfg, programs,
      in_specs=[_row_block(block, d), _row_block(block, d), _row_block(block, d), _row_block(block, d), _vector(d),
                _per_row(block), _KEY_SPEC, _vector(d), _vector(d), _per_row(block), _per_row(block)],
      out_specs=[_row_block(block, d), _row_block(block, d)] + [_partial_sum(d)] * 4,
      out_shape=[jax.ShapeDtypeStruct((rows, d), x.dtype), jax.ShapeDtypeStruct((rows, d), branch.dtype)]
      + [f32((programs, d))] * 4,
      name='residual_layer_norm_backward', num_warps=cfg.backward_warps)
  d_x, d_branch, *partial_sums = kernel(grad, grad_copy, x, branch, branch_bias, row_ids, key, shortcut, scale, mean,
                                        rstd)
  return d_x, d_branch, *(p.sum(0) for p in partial_sums)


def _layer_norm_bwd(cfg: _Config, saved, grads):
  branch_bias = saved[2]
  d_x, d_branch, d_branch_bias, d_shortcut, d_scale, d_bias = _backward(cfg, *grads, *saved)
  return d_x, d_branch, d_branch_bias.astype(branch_bias.dtype), None, None, d_shortcut, d_scale, d_bias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def residual_layer_norm(x: jax.Array, branch: jax.Array, branch_bias: jax.Array, shortcut: jax.Array,
                        scale: jax.Array, bias: jax.Array, *, eps: float, seed: jax.Array | None = None,
                        drop_threshold: int = 0, row_ids: jax.Array | None = None,
                        block_elements: int = _BLOCK_ELEMENTS, backward_blocks: int = _BACKWARD_BLOCKS,
                        forward_warps: int = _FORWARD_WARPS, backward_warps: int = _BACKWARD_WARPS,
                        interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """LN(shortcut * x + dropout(branch + branch_bias)) * scale + bias over the last axis (variance +
  eps), computed in float32 and returned in x's dtype, and the same rounded to the branch's dtype
  (the same array where the dtypes are the same).

  x is [..., d] in the residual stream's dtype, branch any float dtype of the same shape,
  branch_bias [d] in its dtype, shortcut a scalar or [d], scale and bias [d]; d must be a power of
  two (a Triton block). Rows are padded to the block inside. Dropout (where `seed` is given and
  `drop_threshold` > 0, see dropout.threshold) drops what `dropout.keep_mask(seed, shape,
  drop_threshold)` drops of the whole array, of which x holds the rows `row_ids` ([...] int32; by
  default, all of them in order).
  block_elements (elements of a block of rows), backward_blocks (such blocks per backward program)
  and the warps of each kernel are the Triton launch's tiling (benchmarks/layer_norm_sweep.py times
  them).
  """
  d = x.shape[-1]
  if d & (d - 1):
    raise ValueError(f'the Pallas residual LayerNorm needs a power-of-two model dimension, got {d}')
  rows = x.size // d
  block_rows = min(max(1, block_elements // d), pl.next_power_of_2(rows))
  backward_blocks = min(backward_blocks, pl.next_power_of_2(pl.cdiv(rows, block_rows)))
  padded = pl.cdiv(rows, block_rows * backward_blocks) * block_rows * backward_blocks
  pad = lambda a: jnp.pad(a.reshape(rows, -1), ((0, padded - rows), (0, 0)))
  if seed is None:
    drop_threshold = 0
  row_ids = lax.iota(jnp.int32, rows) if row_ids is None else row_ids.reshape(rows).astype(jnp.int32)
  key = jnp.zeros((2,), jnp.int32) if not drop_threshold else jnp.stack(dropout.stream_key(dropout.seed_int32(seed), 0))
  vector = jnp.broadcast_to(shortcut.astype(jnp.float32), (d,))
  operands = (pad(x), pad(branch), branch_bias.astype(branch.dtype), pad(row_ids[:, None])[:, 0],
              key, vector, scale.astype(jnp.float32), bias.astype(jnp.float32))
  config = functools.partial(_Config, block_rows, backward_blocks, eps, drop_threshold, forward_warps, backward_warps)
  if interpret is None:  # the platform compiled for decides, which need not be this machine's
    outputs = lax.platform_dependent(*operands, cuda=functools.partial(_layer_norm, config(interpret=False)),
                                     default=functools.partial(_layer_norm, config(interpret=True)))
  else:
    outputs = _layer_norm(config(interpret), *operands)
  return tuple(out[:rows].reshape(x.shape) for out in outputs)
