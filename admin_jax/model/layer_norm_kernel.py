"""The residual LayerNorm LN(shortcut * x + branch) of Post-LN, Admin and DeepNorm as Pallas kernels.

XLA splits this LayerNorm into several passes over the float32 residual stream: statistics, then
normalisation, in the forward pass; in the backward pass the input gradient and, separately, the
column sums for the gain, bias and omega gradients, each reading the stream and the branch output
again. In the plans of the big6 step that is about a third of all its memory traffic (docs/PERF.md).
Here one kernel reads x and the branch once and writes the output, its copy in the branch's dtype
(what the next branch's matmuls read) and two statistics per token; one backward kernel reads both
output gradients (the stream's and the copy's, summed here rather than by a pass of XLA's), x and
the branch once, and writes both input gradients and, per program (a loop over blocks of rows),
partial sums of the three parameter gradients (summed after).

Float32 throughout, as `layers.residual_layer_norm`, whose results these equal to rounding.
`interpret=None` compiles with Triton for CUDA and runs the Pallas interpreter elsewhere (tests).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Rows a program handles at a time: this many elements of [rows, d_model]. Small enough that the
# backward pass's six live [rows, d_model] float32 tiles fit in registers at 8 warps (16 values per
# thread each).
_BLOCK_ELEMENTS = 4096
# Such blocks per backward program, looped over, so that its per-program partial sums of the three
# parameter gradients (3 x 4 bytes x d_model, written, then read again to be summed) are a small
# share of its traffic: with one block per program they were a sixth of it on big6.
_BACKWARD_BLOCKS = 16


@dataclasses.dataclass(frozen=True)
class _Config:
  block_rows: int
  backward_blocks: int  # blocks of block_rows rows per backward program
  eps: float
  interpret: bool


def _forward_kernel(x_ref, branch_ref, shortcut_ref, scale_ref, bias_ref, y_ref, copy_ref, mean_ref, rstd_ref, *,
                    eps: float):
  s = shortcut_ref[...][None, :] * x_ref[...] + branch_ref[...].astype(jnp.float32)
  mean = jnp.mean(s, axis=1)
  centred = s - mean[:, None]
  rstd = lax.rsqrt(jnp.mean(centred * centred, axis=1) + eps)
  y = centred * rstd[:, None] * scale_ref[...][None, :] + bias_ref[...][None, :]
  y_ref[...] = y
  copy_ref[...] = y.astype(copy_ref.dtype)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _backward_kernel(grad_ref, grad_copy_ref, x_ref, branch_ref, shortcut_ref, scale_ref, mean_ref, rstd_ref,
                     d_x_ref, d_branch_ref, d_shortcut_ref, d_scale_ref, d_bias_ref, *, cfg: _Config):
  shortcut, scale = shortcut_ref[...][None, :], scale_ref[...][None, :]

  def block(i, sums):
    rows = pl.ds(i * cfg.block_rows, cfg.block_rows)
    x = x_ref[rows, :]
    grad = grad_ref[rows, :] + grad_copy_ref[rows, :].astype(jnp.float32)
    rstd = rstd_ref[rows][:, None]
    normalized = (shortcut * x + branch_ref[rows, :].astype(jnp.float32) - mean_ref[rows][:, None]) * rstd
    d_normalized = grad * scale
    d_sum = rstd * (d_normalized - jnp.mean(d_normalized, axis=1)[:, None]
                    - normalized * jnp.mean(d_normalized * normalized, axis=1)[:, None])
    d_x_ref[rows, :] = d_sum * shortcut
    d_branch_ref[rows, :] = d_sum.astype(d_branch_ref.dtype)
    d_shortcut, d_scale, d_bias = sums
    return (d_shortcut + jnp.sum(d_sum * x, axis=0), d_scale + jnp.sum(grad * normalized, axis=0),
            d_bias + jnp.sum(grad, axis=0))

  zeros = jnp.zeros(scale.shape[1:], jnp.float32)
  d_shortcut_ref[...], d_scale_ref[...], d_bias_ref[...] = lax.fori_loop(0, cfg.backward_blocks, block,
                                                                         (zeros,) * 3)


def _row_block(rows: int, d: int) -> pl.BlockSpec:
  return pl.BlockSpec((rows, d), lambda i: (i, 0))


def _per_row(rows: int) -> pl.BlockSpec:
  return pl.BlockSpec((rows,), lambda i: (i,))


def _vector(d: int) -> pl.BlockSpec:
  return pl.BlockSpec((d,), lambda i: (0,))


def _partial_sum(d: int) -> pl.BlockSpec:
  return pl.BlockSpec((pl.squeezed, d), lambda i: (i, 0))


def _call(kernel, cfg: _Config, grid: int, in_specs, out_specs, out_shape, name: str, num_warps: int):
  return pl.pallas_call(kernel, grid=(grid,), in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=cfg.interpret, name=name,
                        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1))


def _forward(cfg: _Config, x, branch, shortcut, scale, bias):
  rows, d = x.shape
  f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
  block = cfg.block_rows
  return _call(functools.partial(_forward_kernel, eps=cfg.eps), cfg, rows // block,
               in_specs=[_row_block(block, d), _row_block(block, d), _vector(d), _vector(d), _vector(d)],
               out_specs=[_row_block(block, d), _row_block(block, d), _per_row(block), _per_row(block)],
               out_shape=[f32((rows, d)), jax.ShapeDtypeStruct((rows, d), branch.dtype), f32((rows,)), f32((rows,))],
               name='residual_layer_norm_forward', num_warps=4)(x, branch, shortcut, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer_norm(cfg: _Config, x, branch, shortcut, scale, bias):
  return tuple(_forward(cfg, x, branch, shortcut, scale, bias)[:2])


def _layer_norm_fwd(cfg: _Config, x, branch, shortcut, scale, bias):
  y, copy, mean, rstd = _forward(cfg, x, branch, shortcut, scale, bias)
  return (y, copy), (x, branch, shortcut, scale, mean, rstd)


def _layer_norm_bwd(cfg: _Config, saved, grads):
  x, branch, shortcut, scale, mean, rstd = saved
  grad, grad_copy = grads
  rows, d = x.shape
  block = cfg.block_rows * cfg.backward_blocks
  programs = rows // block
  f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
  d_x, d_branch, *partial_sums = _call(
      functools.partial(_backward_kernel, cfg=cfg), cfg, programs,
      in_specs=[_row_block(block, d), _row_block(block, d), _row_block(block, d), _row_block(block, d), _vector(d),
                _vector(d), _per_row(block), _per_row(block)],
      out_specs=[_row_block(block, d), _row_block(block, d), _partial_sum(d), _partial_sum(d), _partial_sum(d)],
      out_shape=[f32((rows, d)), jax.ShapeDtypeStruct((rows, d), branch.dtype), f32((programs, d)),
                 f32((programs, d)), f32((programs, d))],
      name='residual_layer_norm_backward', num_warps=8)(grad, grad_copy, x, branch, shortcut, scale, mean, rstd)
  d_shortcut, d_scale, d_bias = (p.sum(0) for p in partial_sums)
  return d_x, d_branch, d_shortcut, d_scale, d_bias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def residual_layer_norm(x: jax.Array, branch: jax.Array, shortcut: jax.Array, scale: jax.Array,
                        bias: jax.Array, *, eps: float, interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """LN(shortcut * x + branch) * scale + bias over the last axis (variance + eps) in float32, and
  the same rounded to the branch's dtype.

  x is float32 [..., d], branch any float dtype of the same shape, shortcut a scalar or [d], scale
  and bias [d]; d must be a power of two (a Triton block). Rows are padded to the block inside.
  """
  d = x.shape[-1]
  if d & (d - 1):
    raise ValueError(f'the Pallas residual LayerNorm needs a power-of-two model dimension, got {d}')
  rows = x.size // d
  block_rows = min(max(1, _BLOCK_ELEMENTS // d), pl.next_power_of_2(rows))
  backward_blocks = min(_BACKWARD_BLOCKS, pl.next_power_of_2(pl.cdiv(rows, block_rows)))
  padded = pl.cdiv(rows, block_rows * backward_blocks) * block_rows * backward_blocks
  pad = lambda a: jnp.pad(a.reshape(rows, d), ((0, padded - rows), (0, 0)))
  vector = jnp.broadcast_to(shortcut.astype(jnp.float32), (d,))
  operands = (pad(x.astype(jnp.float32)), pad(branch), vector, scale.astype(jnp.float32), bias.astype(jnp.float32))
  if interpret is None:  # the platform compiled for decides, which need not be this machine's
    outputs = lax.platform_dependent(
        *operands, cuda=functools.partial(_layer_norm, _Config(block_rows, backward_blocks, eps, interpret=False)),
        default=functools.partial(_layer_norm, _Config(block_rows, backward_blocks, eps, interpret=True)))
  else:
    outputs = _layer_norm(_Config(block_rows, backward_blocks, eps, interpret), *operands)
  return tuple(out[:rows].reshape(x.shape) for out in outputs)
