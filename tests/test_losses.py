"""The label-smoothed cross-entropy against NumPy (values) and float64 autodiff (gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admin_jax import losses

SMOOTHING = 0.1


def plain_sums(logits, targets, weights):
  """The loss and NLL sums from log_softmax, as written, for jax.vjp in float64."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  loss = (1 - SMOOTHING) * nll - SMOOTHING / logits.shape[-1] * logp.sum(-1)
  return (loss * weights).sum(), (nll * weights).sum()


def test_values_match_numpy(np_rng):
  logits = np_rng.normal(size=(2, 3, 7))
  targets = np_rng.integers(0, 7, (2, 3))
  weights = np.array([[1, 1, 0], [1, 0, 0]])
  got = losses.label_smoothed_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                            jnp.asarray(weights), SMOOTHING)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  smoothed = (1 - SMOOTHING) * nll + SMOOTHING / 7 * -logp.sum(-1)
  np.testing.assert_allclose(got.loss, (smoothed * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(got.nll, (nll * weights).sum(), rtol=1e-5)
  assert float(got.tokens) == 3


@pytest.mark.parametrize('scale', [1.0, 300.0], ids=['unit', 'large'])
def test_gradients_match_float64_autodiff(scale, np_rng):
  """Values and logit gradients (cotangents on both the loss and the NLL) against log_softmax in
  float64, rtol 1e-5; large logits and rows of equal logits exercise the online log-sum-exp merge."""
  logits = np_rng.normal(size=(3, 5, 1000)) * scale
  logits[0, 0] = 2.5  # a row whose every logit is its maximum
  targets = np_rng.integers(0, 1000, (3, 5))
  weights = (np_rng.uniform(size=(3, 5)) < 0.8).astype(np.float32)
  cotangent = (np.float32(0.7), np.float32(-1.3))

  def sums(logits):
    out = losses.label_smoothed_cross_entropy(logits, jnp.asarray(targets), jnp.asarray(weights), SMOOTHING)
    return out.loss, out.nll

  got, vjp = jax.vjp(jax.jit(sums), jnp.asarray(logits, jnp.float32))
  (got_grad,) = vjp(cotangent)
  with jax.enable_x64():
    want, want_vjp = jax.vjp(lambda x: plain_sums(x, jnp.asarray(targets), jnp.asarray(weights, jnp.float64)),
                             jnp.asarray(np.asarray(logits, np.float32), jnp.float64))
    (want_grad,) = want_vjp(tuple(np.float64(c) for c in cotangent))
    want, want_grad = [np.asarray(w) for w in want], np.asarray(want_grad)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.isfinite(np.asarray(got_grad)).all()
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5 * np.abs(want_grad).max())


def test_bf16_logits_give_bf16_gradients(np_rng):
  """Under bf16 compute the logits' gradient is bf16 (one write), equal to the float32 one rounded."""
  logits = jnp.asarray(np_rng.normal(size=(4, 64)) * 3, jnp.bfloat16)
  targets, weights = jnp.asarray(np_rng.integers(0, 64, 4)), jnp.ones(4)
  loss = lambda x: losses.label_smoothed_cross_entropy(x, targets, weights, SMOOTHING).loss
  got, want = jax.grad(loss)(logits), jax.grad(loss)(logits.astype(jnp.float32))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2 ** -7, atol=1e-6)
