"""The residual LayerNorm's hand-written backward pass against differentiation of the plain formula.

It must give the gradients of what it replaces, and keep less for the backward pass: the second
is checked on the residuals that jax.vjp closes over. It returns the output and its copy in the
branch's dtype, whose gradients it sums: the plain formula's gradient for the sum of both cotangents.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admin_jax.model import dropout
from admin_jax.model import layer_norm_kernel
from admin_jax.model import layers

SHAPE = (3, 5, 16)  # batch, length, d_model


def _plain_residual_layer_norm(x, branch, shortcut, scale, bias):
  """LN(shortcut * x + branch) as written, for jax.vjp to differentiate."""
  s = shortcut * x + branch.astype(x.dtype)
  mean = s.mean(-1, keepdims=True)
  var = jnp.square(s - mean).mean(-1, keepdims=True)
  return (s - mean) / jnp.sqrt(var + layers.LN_EPS) * scale + bias


def _residual_inputs(rng: np.random.Generator, shortcut_shape: tuple[int, ...], branch_dtype):
  d = SHAPE[-1]
  return (rng.normal(0, 1.5, SHAPE).astype(np.float32),
          jnp.asarray(rng.normal(0, 0.7, SHAPE), branch_dtype),
          (1.0 + rng.uniform(0, 2, shortcut_shape)).astype(np.float32),
          rng.normal(1, 0.2, d).astype(np.float32),
          rng.normal(0, 0.2, d).astype(np.float32))


IMPLS = ['xla', 'pallas']  # XLA's fusions; the Pallas kernels (layer_norm_kernel.py), interpreted on the CPU


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('shortcut_shape', [(SHAPE[-1],), ()], ids=['omega', 'scalar'])
def test_residual_layer_norm_matches_float64_autodiff(shortcut_shape, impl, np_rng):
  """Output, copy and all five gradients against jax.vjp of the plain formula in float64 (rtol 1e-5)."""
  inputs = _residual_inputs(np_rng, shortcut_shape, jnp.float32)
  cotangents = [np_rng.normal(0, 1, SHAPE).astype(np.float32) for _ in range(2)]
  (out, copy), vjp = jax.vjp(functools.partial(layers.residual_layer_norm, impl=impl),
                             *(jnp.asarray(a) for a in inputs))
  grads = vjp(tuple(jnp.asarray(c) for c in cotangents))
  with jax.enable_x64():
    wide = [jnp.asarray(np.asarray(a, np.float64)) for a in inputs]
    want_out, want_vjp = jax.vjp(_plain_residual_layer_norm, *wide)
    want_grads = want_vjp(jnp.asarray(cotangents[0], jnp.float64) + cotangents[1])
    want_out, want_grads = np.asarray(want_out), [np.asarray(g) for g in want_grads]
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(copy, out)
  for name, got, want in zip(('x', 'branch', 'shortcut', 'scale', 'bias'), grads, want_grads):
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max(), err_msg=name)


def test_residual_layer_norm_keeps_one_float32_tensor(np_rng):
  """Under bf16 compute the backward pass keeps x (float32) and the bf16 branch, not the four
  float32 [batch, length, d_model] tensors that differentiating the formula keeps."""
  x, branch, shortcut, scale, bias = _residual_inputs(np_rng, (SHAPE[-1],), jnp.bfloat16)
  _, vjp = jax.vjp(layers.residual_layer_norm, x, branch, shortcut, scale, bias)
  full = sorted(str(a.dtype) for a in jax.tree.leaves(vjp) if a.shape == SHAPE)
  assert full == ['bfloat16', 'float32']
  _, plain_vjp = jax.vjp(_plain_residual_layer_norm, x, branch, shortcut, scale, bias)
  assert sum(a.shape == SHAPE and a.dtype == jnp.float32 for a in jax.tree.leaves(plain_vjp)) >= 3


@pytest.mark.parametrize('impl', IMPLS)
def test_residual_layer_norm_bf16_branch_gradient(impl, np_rng):
  """Under bf16 compute the copy is the output rounded to bf16, and the branch's gradient (for a
  float32 cotangent of the output and a bf16 one of the copy) arrives in bf16 and equals the
  float32 one rounded."""
  x, branch, shortcut, scale, bias = _residual_inputs(np_rng, (SHAPE[-1],), jnp.bfloat16)
  cotangent = jnp.asarray(np_rng.normal(0, 1, SHAPE), jnp.float32)
  copy_cotangent = jnp.asarray(np_rng.normal(0, 1, SHAPE), jnp.bfloat16)
  (out, copy), vjp = jax.vjp(functools.partial(layers.residual_layer_norm, impl=impl), x, branch, shortcut, scale,
                             bias)
  assert out.dtype == jnp.float32 and copy.dtype == jnp.bfloat16
  np.testing.assert_array_equal(copy, out.astype(jnp.bfloat16))
  _, plain_vjp = jax.vjp(_plain_residual_layer_norm, x, branch, shortcut, scale, bias)
  got = vjp((cotangent, copy_cotangent))[1]
  want = plain_vjp(cotangent + copy_cotangent.astype(jnp.float32))[1]
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize('impl', IMPLS)
def test_residual_layer_norm_in_a_bfloat16_stream(impl, np_rng):
  """With the residual stream in bf16 (perf.stream_dtype) as well as the branch, the output is bf16
  and the copy is the output itself; computed in float32, it and the input gradients are the float64
  formula's on the same bf16 inputs, rounded to bf16 (half a bf16 step: rtol 2^-8), the parameter
  gradients float32 sums (rtol 1e-5), and the backward pass keeps no float32 [batch, length, d] tensor."""
  x, branch, shortcut, scale, bias = _residual_inputs(np_rng, (SHAPE[-1],), jnp.bfloat16)
  x = jnp.asarray(x, jnp.bfloat16)
  cotangents = [jnp.asarray(np_rng.normal(0, 1, SHAPE), jnp.bfloat16) for _ in range(2)]
  (out, copy), vjp = jax.vjp(functools.partial(layers.residual_layer_norm, impl=impl), x, branch, shortcut, scale,
                             bias)
  assert out.dtype == copy.dtype == jnp.bfloat16
  np.testing.assert_array_equal(copy, out)
  if impl == 'xla':
    assert {a.dtype for a in jax.tree.leaves(vjp) if a.shape == SHAPE} == {jnp.dtype(jnp.bfloat16)}
  grads = vjp(tuple(cotangents))
  with jax.enable_x64():
    wide = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, branch, shortcut, scale, bias)]
    want_out, want_vjp = jax.vjp(_plain_residual_layer_norm, *wide)
    want_grads = want_vjp(jnp.asarray(np.asarray(cotangents[0], np.float64) + np.asarray(cotangents[1], np.float64)))
    want_out, want_grads = np.asarray(want_out), [np.asarray(g) for g in want_grads]
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, rtol=2 ** -8, atol=1e-6)
  for name, got, want in zip(('x', 'branch', 'shortcut', 'scale', 'bias'), grads, want_grads):
    rtol = 2 ** -8 if got.dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=1e-5 * np.abs(want).max(),
                               err_msg=name)
  assert grads[0].dtype == grads[1].dtype == jnp.bfloat16


@pytest.mark.parametrize('shape', [(3, 37, 64), (3, 700, 64)], ids=['one_program', 'three_programs'])
def test_pallas_residual_layer_norm_pads_rows_to_its_block(shape, np_rng):
  """Rows that do not fill the kernels' blocks give the XLA path's output and gradients: 111 rows of
  64 in blocks of 64 rows, the backward program looping over 2 of them; 2100 rows, 3 backward
  programs of 16 blocks each, the last one partly padding."""
  x, branch, *cotangents = (jnp.asarray(np_rng.normal(0, 1, shape), jnp.float32) for _ in range(4))
  shortcut, scale, bias = (jnp.asarray(np_rng.uniform(0.5, 2, 64), jnp.float32) for _ in range(3))
  results = [jax.vjp(functools.partial(layers.residual_layer_norm, impl=impl), x, branch, shortcut, scale, bias)
             for impl in IMPLS]
  (want, want_vjp), (got, got_vjp) = results
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  for name, g, w in zip(('x', 'branch', 'shortcut', 'scale', 'bias'), got_vjp(tuple(cotangents)),
                        want_vjp(tuple(cotangents))):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4 * np.abs(w).max(), err_msg=name)


def test_pallas_residual_layer_norm_needs_a_power_of_two_width():
  x = jnp.ones((2, 3, 24))
  with pytest.raises(ValueError, match='power-of-two model dimension, got 24'):
    layers.residual_layer_norm(x, x, jnp.ones(()), jnp.ones(24), jnp.zeros(24), impl='pallas')


def _bias_and_dropout_inputs(np_rng, shape=(3, 37, 64)):
  d = shape[-1]
  x, branch, *cotangents = (jnp.asarray(np_rng.normal(0, 1, shape), jnp.float32) for _ in range(4))
  shortcut, scale, bias = (jnp.asarray(np_rng.uniform(0.5, 2, d), jnp.float32) for _ in range(3))
  branch_bias = jnp.asarray(np_rng.normal(0, 1, d), jnp.float32)
  return (x, branch, shortcut, scale, bias, branch_bias), cotangents


@pytest.mark.parametrize('rate', [0.0, 0.3])
def test_pallas_residual_layer_norm_applies_the_branch_bias_and_dropout(rate, np_rng):
  """The kernels add the branch's bias and drop what dropout.apply drops (the XLA path applies
  both as separate ops): the same output and gradients, the bias's included; where the mask drops
  an element, the branch gets no gradient."""
  (x, branch, shortcut, scale, bias, branch_bias), cotangents = _bias_and_dropout_inputs(np_rng)
  rng = jax.random.key(3)
  results = [jax.vjp(lambda *a, impl=impl: layers.residual_layer_norm(
      *a[:5], impl, branch_bias=a[5], dropout_rate=rate, rng=rng), x, branch, shortcut, scale, bias, branch_bias)
             for impl in IMPLS]
  (want, want_vjp), (got, got_vjp) = results
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  got_grads, want_grads = got_vjp(tuple(cotangents)), want_vjp(tuple(cotangents))
  for name, g, w in zip(('x', 'branch', 'shortcut', 'scale', 'bias', 'branch_bias'), got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4 * np.abs(w).max(), err_msg=name)
  dropped = np.asarray(got_grads[1]) == 0
  assert abs(dropped.mean() - rate) < 0.02


def test_pallas_residual_layer_norm_masks_rows_by_their_global_index(np_rng):
  """Under a mesh each device holds some rows of the batch; given those rows' global indices, the
  kernels drop what they drop in the whole array: two halves computed apart equal the whole."""
  (x, branch, shortcut, scale, bias, branch_bias), _ = _bias_and_dropout_inputs(np_rng, (4, 16, 64))
  seed = jnp.int32(11)
  run = functools.partial(layer_norm_kernel.residual_layer_norm, eps=layers.LN_EPS, seed=seed,
                          drop_threshold=dropout.threshold(0.3))
  whole = run(x, branch, branch_bias, shortcut, scale, bias)
  row_ids = jnp.arange(64, dtype=jnp.int32).reshape(4, 16)
  halves = [run(x[i:i + 2], branch[i:i + 2], branch_bias, shortcut, scale, bias, row_ids=row_ids[i:i + 2])
            for i in (0, 2)]
  for part, out in enumerate(whole):  # the same to rounding (blocks of other sizes sum in another order)
    np.testing.assert_allclose(np.concatenate([h[part] for h in halves]), out, rtol=1e-5, atol=1e-5)
  unshifted = run(x[2:], branch[2:], branch_bias, shortcut, scale, bias)  # as if rows 0 and 1
  assert np.abs(unshifted[0] - whole[0][2:]).max() > 0.1
