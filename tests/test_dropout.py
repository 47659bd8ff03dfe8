"""Dropout: hashed keep-masks (rate, independence, seeds), and backward passes that store no mask.

The masks are checked statistically, within 5 standard errors of what independent Bernoulli draws
would give; the backward passes against differentiation of plain jnp.where dropout with the same mask.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admin_jax.model import dropout


def assert_within_5_standard_errors(observed: float, expected: float, n: int) -> None:
  error = math.sqrt(expected * (1 - expected) / n)
  assert abs(observed - expected) < 5 * error, f'{observed} vs {expected} +- {error}'


@pytest.mark.parametrize('rate', [0.1, 0.3])
@pytest.mark.parametrize('shape', [(2 ** 20,), (16, 8, 64, 128)], ids=['flat', 'bhqk'])
def test_keep_mask_rate(shape, rate):
  mask = dropout.keep_mask(jnp.uint32(99), shape, dropout.threshold(rate))
  assert mask.shape == shape and mask.dtype == jnp.bool_
  assert_within_5_standard_errors(1 - float(mask.mean()), rate, mask.size)


def test_keep_masks_look_independent():
  """Neighbours along every axis, and two seeds, agree as often as independent draws would."""
  rate = 0.3
  shape = (8, 16, 64, 64)
  mask = dropout.keep_mask(jnp.uint32(7), shape, dropout.threshold(rate))
  independent = (1 - rate) ** 2 + rate ** 2
  pairs = [(mask, dropout.keep_mask(jnp.uint32(8), shape, dropout.threshold(rate)))]
  pairs += [(jnp.take(mask, jnp.arange(n - 1), axis), jnp.take(mask, jnp.arange(1, n), axis))
            for axis, n in enumerate(shape)]
  for a, b in pairs:
    assert_within_5_standard_errors(float((a == b).mean()), independent, a.size)


def test_keep_mask_is_the_same_under_jit_and_for_any_seed_type():
  shape, threshold = (4, 33, 17), dropout.threshold(0.5)
  mask = dropout.keep_mask(jnp.uint32(0xFFFFFFFF), shape, threshold)
  np.testing.assert_array_equal(mask, dropout.keep_mask(jnp.int32(-1), shape, threshold))
  np.testing.assert_array_equal(mask, jax.jit(dropout.keep_mask, static_argnums=(1, 2))(jnp.int32(-1), shape,
                                                                                         threshold))


def _numpy_keep_mask(seed: int, shape: tuple[int, ...], threshold: int) -> np.ndarray:
  """Independent reference in uint32 NumPy: the top 16 bits of lowbias32's first three steps of
  multiplier * (row-major index) + offset, against the threshold."""
  multiplier, offset = (np.asarray(v).view(np.uint32) for v in dropout.stream_key(jnp.int32(seed), 0))
  c = np.arange(math.prod(shape), dtype=np.uint32) * multiplier + offset
  c ^= c >> 16
  c *= np.uint32(0x7FEB352D)
  c ^= c >> 15
  c *= np.uint32(0x846CA68B)
  return ((c >> 16) >= threshold).reshape(shape)


@pytest.mark.parametrize('shape', [(1000,), (4, 33, 17), (2, 3, 40, 24)])
def test_keep_mask_hashes_the_row_major_index(shape):
  threshold = dropout.threshold(0.3)
  np.testing.assert_array_equal(dropout.keep_mask(jnp.int32(12345), shape, threshold),
                                _numpy_keep_mask(12345, shape, threshold))


def test_a_scanned_stack_keeps_no_mask_sized_counter_between_layers():
  """XLA hoists any part of a mask's counter that is the same on every layer out of a scanned
  stack and keeps it in memory as an int32 array of the mask's shape, which every layer then reads
  (about 1 GB per mask on big6); the counter must have no such part."""
  shape = (8, 16, 64, 128)

  def loss(x, keys):
    return jax.lax.scan(lambda h, key: (jnp.tanh(dropout.apply(h, 0.1, key)), None), x, keys)[0].sum()

  program = jax.jit(jax.grad(loss)).lower(jnp.ones(shape), jax.random.split(jax.random.key(0), 6)).compile()
  loop_states = [line.split(' while(')[0] for line in program.as_text().splitlines() if ' while(' in line]
  assert any('f32[8,16,64,128]' in state for state in loop_states), loop_states  # the stack's loops
  for state in loop_states:
    assert not re.search(r'[su]32\[8,16,64,128\]', state), state


def _plain(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Dropout as jnp.where with the key's mask, whose differentiation stores the boolean mask."""
  threshold = dropout.threshold(rate)
  keep = dropout.keep_mask(jax.random.bits(rng, (), jnp.uint32), x.shape, threshold)
  return jnp.where(keep, (x.astype(jnp.float32) * dropout.keep_scale(threshold)).astype(x.dtype), 0)


def _grads_equal(lean, plain, operand, cotangent):
  out, vjp = jax.vjp(lean, operand)
  want_out, want_vjp = jax.vjp(plain, operand)
  np.testing.assert_array_equal(out, want_out)
  np.testing.assert_allclose(vjp(cotangent)[0], want_vjp(cotangent)[0], rtol=1e-6, atol=1e-7)
  return vjp


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_apply_rebuilds_its_mask_for_the_backward_pass(dtype, np_rng):
  """Output and gradient of plain dropout with the key's mask; the backward pass keeps only the
  scalar seed."""
  x = jnp.asarray(np_rng.normal(0, 1, (4, 8, 32)), dtype)
  cotangent = jnp.asarray(np_rng.normal(0, 1, x.shape), dtype)
  rng = jax.random.key(1)
  vjp = _grads_equal(lambda a: dropout.apply(a, 0.2, rng), lambda a: _plain(a, 0.2, rng), x, cotangent)
  assert [a.shape for a in jax.tree.leaves(vjp)] == [()]


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_relu_dropout_equals_relu_then_dropout(dtype, np_rng):
  """Same output and gradient as dropout(relu(h)) with the same key, keeping only the output."""
  h = jnp.asarray(np_rng.normal(0, 1, (4, 8, 64)), dtype).at[0, 0, :4].set(0.0)  # relu's kink
  cotangent = jnp.asarray(np_rng.normal(0, 1, h.shape), dtype)
  rng = jax.random.key(3)
  vjp = _grads_equal(lambda a: dropout.apply_after_relu(a, 0.25, rng),
                     lambda a: _plain(jax.nn.relu(a), 0.25, rng), h, cotangent)
  assert [a.dtype for a in jax.tree.leaves(vjp)] == [dtype]  # the output alone, no boolean masks
  np.testing.assert_array_equal(dropout.apply_after_relu(h, 0.25, None), jax.nn.relu(h))


def test_probability_dropout_equals_dropout_through_softmax(np_rng):
  """Through a softmax with fully masked keys (probabilities exactly 0) the gradient equals
  plain dropout's, although the backward pass reads the output instead of the mask."""
  logits = jnp.asarray(np_rng.normal(0, 2, (2, 3, 6, 10)), jnp.float32).at[..., 7:].set(-1e9)
  cotangent = jnp.asarray(np_rng.normal(0, 1, logits.shape), jnp.float32)
  rng = jax.random.key(5)
  softmax = lambda z: jax.nn.softmax(z, axis=-1)
  vjp = _grads_equal(lambda z: dropout.apply_to_probabilities(softmax(z), 0.3, rng),
                     lambda z: _plain(softmax(z), 0.3, rng), logits, cotangent)
  assert not any(a.dtype == jnp.bool_ for a in jax.tree.leaves(vjp))
