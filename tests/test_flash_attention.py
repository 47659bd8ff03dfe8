"""The Pallas flash attention (with in-kernel dropout) against a plain jnp float32 attention.

Off GPUs the kernels run in the Pallas interpreter, so shapes stay tiny; block sizes of 16 and 32
still give several query and key blocks, and odd lengths exercise the padding path.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admin_jax.model.attention import Visibility, attend
from admin_jax.model.flash_attention import Part, dropout_keep_mask, flash_attention

# The documented quantisation: the drop threshold is round(rate * 2^16) out of 2^16 levels.
LEVELS = 2 ** 16
BATCH, HEADS, HEAD_DIM = 2, 2, 16
SEED = 1234


def reference_attention(q, k, v, q_segments, k_segments, *, causal: bool, rate: float, seed) -> jax.Array:
  """softmax over the visible keys in float32, the module's keep-mask, inverted dropout scaling."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision=jax.lax.Precision.HIGHEST)
  visible = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] > 0)
  if causal:
    visible &= jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  visible = visible[:, None]
  probs = jnp.where(visible, jax.nn.softmax(jnp.where(visible, logits, -1e30), axis=-1), 0.0)
  if seed is not None and rate > 0:
    threshold = round(rate * LEVELS)
    probs = jnp.where(dropout_keep_mask(seed, probs.shape, rate), probs * (LEVELS / (LEVELS - threshold)), 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v, precision=jax.lax.Precision.HIGHEST)


def packed(length: int, rows: list[list[int]]) -> jax.Array:
  """[len(rows), length] segment ids: row r holds segments 1, 2, ... of the given sizes, then 0s."""
  out = np.zeros((len(rows), length), np.int32)
  for r, sizes in enumerate(rows):
    out[r, :sum(sizes)] = np.repeat(np.arange(1, len(sizes) + 1), sizes)
  return jnp.asarray(out)


class Case(NamedTuple):
  q_len: int
  k_len: int
  causal: bool
  rate: float
  block_q: int
  block_k: int
  q_segments: list[list[int]]
  k_segments: list[list[int]] | None  # None: self-attention, the query segments


CASES = {
    'causal_dropout': Case(64, 64, True, 0.1, 16, 16, [[20, 25], [64]], None),
    'bidirectional_no_dropout': Case(64, 64, False, 0.0, 32, 16, [[30, 20], [64]], None),
    # q != k, neither a multiple of its block; query segment 3 has no keys at all.
    'cross_dropout_padded': Case(40, 72, False, 0.2, 16, 32, [[10, 12, 8], [40]], [[30, 20], [72]]),
    'causal_dropout_padded': Case(50, 50, True, 0.1, 32, 16, [[20, 25], [50]], None),
}


def inputs(case: Case, dtype=jnp.float32):
  """q, k, v, segments and the output cotangent of `case`, from a fixed numpy seed."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(BATCH, case.q_len, HEADS, HEAD_DIM))
  k, v = (rng.normal(size=(BATCH, case.k_len, HEADS, HEAD_DIM)) for _ in range(2))
  cotangent = rng.normal(size=q.shape)
  q_segments = packed(case.q_len, case.q_segments)
  k_segments = q_segments if case.k_segments is None else packed(case.k_len, case.k_segments)
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  return q, k, v, q_segments, k_segments, jnp.asarray(cotangent, jnp.float32)


def output_and_grads(attention, q, k, v, cotangent):
  """attention(q, k, v) and the gradients of <attention(q, k, v), cotangent> w.r.t. q, k, v."""
  out, vjp = jax.vjp(attention, q, k, v)
  return out, vjp(cotangent.astype(out.dtype))


@functools.cache
def results(name: str, dtype=jnp.float32):
  """(flash output and grads, reference output and grads, q_segments, k_segments) of a case."""
  case = CASES[name]
  q, k, v, q_segments, k_segments, cotangent = inputs(case, dtype)
  options = dict(causal=case.causal, rate=case.rate, seed=jnp.uint32(SEED))

  @jax.jit
  def flash(q, k, v, seed):
    return output_and_grads(
        lambda q, k, v: flash_attention(q, k, v, q_segments, k_segments, causal=case.causal,
                                        dropout_rate=case.rate, seed=seed, block_q=case.block_q,
                                        block_k=case.block_k), q, k, v, cotangent)

  reference = output_and_grads(lambda q, k, v: reference_attention(q, k, v, q_segments, k_segments, **options),
                               *(x.astype(jnp.float32) for x in (q, k, v)), cotangent)
  return flash(q, k, v, options['seed']), reference, q_segments, k_segments


def assert_close(actual: jax.Array, expected: jax.Array, tolerance: float):
  """max |actual - expected| <= tolerance * max |expected| (elementwise relative error is
  meaningless for entries near 0)."""
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert actual.shape == expected.shape
  error, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert scale > 0 and error <= tolerance * scale, f'max error {error} vs max |expected| {scale}'


@pytest.mark.parametrize('name', CASES)
def test_forward_matches_reference(name):
  (out, _), (expected, _), _, _ = results(name)
  assert out.dtype == jnp.float32
  assert_close(out, expected, 1e-5)


@pytest.mark.parametrize('name', CASES)
def test_gradients_match_reference(name):
  (_, grads), (_, expected), _, _ = results(name)
  for grad, want, label in zip(grads, expected, 'qkv'):
    assert grad.dtype == jnp.float32, label
    assert_close(grad, want, 1e-5)


@pytest.mark.parametrize('name', ['cross_dropout_padded', 'causal_dropout_padded'])
def test_rows_without_visible_keys_are_zero(name):
  """Padding queries, and queries whose segment has no key, give exactly 0 and no NaN."""
  (out, (dq, dk, dv)), _, q_segments, k_segments = results(name)
  blind = ~(q_segments[:, :, None] == k_segments[:, None, :]).any(-1) | (q_segments == 0)
  assert blind.any() and not blind.all()
  assert np.all(np.asarray(out)[np.asarray(blind)] == 0)
  assert np.all(np.asarray(dq)[np.asarray(blind)] == 0)
  assert all(np.isfinite(np.asarray(g)).all() for g in (out, dq, dk, dv))


def test_no_seed_or_zero_rate_means_no_dropout():
  case = CASES['bidirectional_no_dropout']
  q, k, v, q_segments, k_segments, _ = inputs(case)
  expected = reference_attention(q, k, v, q_segments, k_segments, causal=False, rate=0.0, seed=None)
  attend = functools.partial(flash_attention, q, k, v, q_segments, k_segments, causal=False, block_q=32)
  assert_close(attend(dropout_rate=0.3, seed=None), expected, 1e-5)
  assert_close(attend(dropout_rate=0.0, seed=jnp.uint32(SEED)), expected, 1e-5)


def test_seed_is_traced_and_deterministic():
  """One compiled function: the same seed repeats its output, another seed changes it."""
  case = CASES['causal_dropout']
  q, k, v, q_segments, _, _ = inputs(case)
  attend = jax.jit(lambda seed: flash_attention(q, k, v, q_segments, q_segments, causal=True, dropout_rate=0.1,
                                                seed=seed, block_q=32, block_k=32))
  first, again, other = attend(jnp.uint32(7)), attend(jnp.uint32(7)), attend(jnp.uint32(8))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)


def test_bfloat16_matches_float32_reference():
  (out, grads), (expected, expected_grads), _, _ = results('causal_dropout_padded', jnp.bfloat16)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  assert_close(out, expected, 2e-2)
  for grad, want in zip(grads, expected_grads):
    assert_close(grad, want, 2e-2)


def test_inside_checkpointed_scan():
  """Layers scanned under jax.checkpoint, each with a seed drawn from its own PRNG key."""
  case = CASES['causal_dropout']
  q, k, v, segments, _, cotangent = inputs(case)
  layer_keys = jax.random.split(jax.random.key(0), 2)

  def stack(attention):
    def layer(x, key):
      seed = jax.random.bits(key, (), jnp.uint32)
      return attention(x, k, v, segments, segments, causal=True, rate=0.1, seed=seed) + x, None
    return lambda x: (jax.lax.scan(jax.checkpoint(layer), x, layer_keys)[0] * cotangent).sum()

  def flash(q, k, v, q_segments, k_segments, *, causal, rate, seed):
    return flash_attention(q, k, v, q_segments, k_segments, causal=causal, dropout_rate=rate, seed=seed,
                           block_q=32, block_k=16)

  assert_close(jax.jit(jax.grad(stack(flash)))(q), jax.grad(stack(reference_attention))(q), 1e-5)


@pytest.mark.parametrize('layout', ['self_attention_qkv', 'cross_attention_q_kv'])
def test_parts_of_fused_projections_match_separate_arrays(layout):
  """Q, K and V read in place from the arrays a fused projection writes (one [b, l, 3, h, d] for
  self-attention; [b, q, 1, h, d] and [b, k, 2, h, d] for cross-attention), their biases added and
  the queries scaled inside: the output and the gradients of those whole arrays and of the biases
  equal the float32 reference's on the parts sliced out."""
  case = CASES['causal_dropout_padded' if layout == 'self_attention_qkv' else 'cross_dropout_padded']
  q, k, v, q_segments, k_segments, cotangent = inputs(case)
  scale, seed = 0.3, jnp.uint32(SEED)
  rng = np.random.default_rng(1)
  if layout == 'self_attention_qkv':
    sources = (jnp.stack([q, k, v], axis=2),)
    parts = lambda qkv, bias: (Part(qkv, 0, bias), Part(qkv, 1, bias), Part(qkv, 2, bias))
  else:
    sources = (q[:, :, None], jnp.stack([k, v], axis=2))
    parts = lambda q, kv, q_bias, kv_bias: (Part(q, 0, q_bias), Part(kv, 0, kv_bias), Part(kv, 1, kv_bias))
  biases = tuple(jnp.asarray(rng.normal(size=x.shape[2:]), jnp.float32) for x in sources)

  def flash(*arrays):
    return flash_attention(*parts(*arrays), q_segments, k_segments, causal=case.causal, dropout_rate=case.rate,
                           seed=seed, scale=scale, block_q=case.block_q, block_k=case.block_k)

  def reference(*arrays):
    q, k, v = (part.array() for part in parts(*arrays))
    return reference_attention(q * scale, k, v, q_segments, k_segments, causal=case.causal, rate=case.rate, seed=seed)

  out, vjp = jax.vjp(jax.jit(flash), *sources, *biases)
  expected, expected_vjp = jax.vjp(reference, *sources, *biases)
  assert_close(out, expected, 1e-5)
  grads, wanted = vjp(cotangent), expected_vjp(cotangent)
  for grad, want in zip(grads[:len(sources)], wanted):
    for part in range(grad.shape[2]):  # each part (Q's scaled) against its own magnitude
      assert_close(grad[:, :, part], want[:, :, part], 1e-5)
  # Whole: the keys' bias has no gradient (softmax ignores a shift of every logit of a row), which
  # the kernels give exactly and the reference to rounding.
  for grad, want in zip(grads[len(sources):], wanted[len(sources):]):
    assert_close(grad, want, 1e-5)
  key_bias_grad = grads[-1][1 if layout == 'self_attention_qkv' else 0]
  assert not np.asarray(key_bias_grad).any()


def test_every_part_of_a_source_must_be_attended():
  q, k, v, segments, _, _ = inputs(CASES['causal_dropout'])
  qkv = jnp.stack([q, k, v, v], axis=2)
  with pytest.raises(ValueError, match='parts'):
    flash_attention(Part(qkv, 0), Part(qkv, 1), Part(qkv, 2), segments, segments, causal=True, dropout_rate=0.0,
                    seed=None)


def agreement(a: jax.Array, b: jax.Array) -> float:
  return float((a == b).mean())


def assert_within_5_standard_errors(observed: float, expected: float, n: int):
  error = np.sqrt(expected * (1 - expected) / n)
  assert abs(observed - expected) < 5 * error, f'{observed} vs {expected} +- {error}'


@pytest.mark.parametrize('rate', [0.1, 0.5])
def test_dropout_rate(rate):
  mask = dropout_keep_mask(jnp.uint32(SEED), (4, 8, 128, 128), rate)
  assert_within_5_standard_errors(1 - float(mask.mean()), rate, mask.size)


def test_masks_look_independent():
  """Two seeds, two heads, two batch rows, neighbouring keys or queries: each pair of masks
  agrees as often as independent Bernoulli draws would, (1-r)^2 + r^2."""
  rate = 0.3
  shape = (4, 8, 128, 128)
  mask = dropout_keep_mask(jnp.uint32(SEED), shape, rate)
  independent = (1 - rate) ** 2 + rate ** 2
  pairs = [(mask, dropout_keep_mask(jnp.uint32(SEED + 1), shape, rate)),
           (mask[:, :-1], mask[:, 1:]), (mask[:-1], mask[1:]),
           (mask[..., :-1], mask[..., 1:]), (mask[..., :-1, :], mask[..., 1:, :])]
  for a, b in pairs:
    assert_within_5_standard_errors(agreement(a, b), independent, a.size)


def test_mask_depends_on_seed_bits_only():
  """The same seed reproduces the mask; int32 and uint32 seeds with the same bits agree."""
  shape = (2, 2, 16, 16)
  first = dropout_keep_mask(jnp.uint32(0xFFFFFFFF), shape, 0.5)
  np.testing.assert_array_equal(first, dropout_keep_mask(jnp.uint32(0xFFFFFFFF), shape, 0.5))
  np.testing.assert_array_equal(first, dropout_keep_mask(jnp.int32(-1), shape, 0.5))


def test_scale_is_inverse_of_quantised_keep_probability():
  """At rate 0.99 the 2^-16 quantisation moves the keep probability by 5e-4 relative: visible."""
  case = CASES['causal_dropout']
  q, k, v, q_segments, _, _ = inputs(case)
  options = dict(causal=True, seed=jnp.uint32(SEED))
  out = flash_attention(q, k, v, q_segments, q_segments, dropout_rate=0.99, block_q=32, block_k=32, **options)
  assert_close(out, reference_attention(q, k, v, q_segments, q_segments, rate=0.99, **options), 1e-5)


def test_lowers_for_triton():
  """The forward and both backward kernels lower to Triton for a GPU, also from a CPU-only jax.

  This is what interpret mode cannot show: every operation the kernels use has a Triton lowering
  and every tile has a power-of-two size. jax 0.11 asks which card it lowers for even without one:
  an abstract mesh names it (jax 0.10 takes it too).
  """
  q = jax.ShapeDtypeStruct((2, 100, 4, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 70, 4, 64), jnp.bfloat16)
  segments = [jax.ShapeDtypeStruct(x.shape[:2], jnp.int32) for x in (q, k)]

  def loss(q, k, v, q_segments, k_segments, seed):
    out = flash_attention(q, k, v, q_segments, k_segments, causal=True, dropout_rate=0.1, seed=seed, interpret=False)
    return out.astype(jnp.float32).sum()

  def fused_loss(qkv, segments, seed):  # self-attention reading one fused projection, 3 parts
    parts = (Part(qkv, 0), Part(qkv, 1), Part(qkv, 2))
    out = flash_attention(*parts, segments, segments, causal=True, dropout_rate=0.1, seed=seed, scale=0.125,
                          interpret=False)
    return out.astype(jnp.float32).sum()

  seed = jax.ShapeDtypeStruct((), jnp.uint32)
  qkv = jax.ShapeDtypeStruct((2, 100, 3, 4, 64), jnp.bfloat16)
  h100 = jax.sharding.AbstractDevice(device_kind='NVIDIA H100', num_cores=132, platform='gpu')
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ('data',), abstract_device=h100)):
    for traced in (jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k, *segments, seed),
                   jax.jit(jax.grad(fused_loss)).trace(qkv, segments[0], seed)):
      lowered = traced.lower(lowering_platforms=('cuda',)).as_text()
      for kernel in ('flash_attention_forward', 'flash_attention_dkv', 'flash_attention_dq'):
        assert f'"{kernel}"' in lowered


@pytest.mark.parametrize('blind_queries_average', [True, False])
def test_attend_sets_queries_without_keys_only_where_asked(blind_queries_average):
  """`attention.attend` with the flash kernel equals the XLA path on queries that see keys; on
  those that see none (padding) it equals it too where the pass asks (profiling, analysis: the
  mean of the row's values), and leaves them at 0 otherwise (training, which never reads them)."""
  case = CASES['cross_dropout_padded']
  q, k, v, q_segments, k_segments, _ = inputs(case)
  visibility = Visibility(q_segments, k_segments, blind_queries_average=blind_queries_average)
  flash, xla = (attend(q, k, v, visibility, scale=1.0, dropout_rate=0.0, rng=None, impl=impl)
                for impl in ('flash', 'xla'))
  blind = ~visibility.mask().any(-1)[:, 0]  # [batch, q]
  assert blind.any() and (~blind).any()
  assert_close(flash[~blind], xla[~blind], 1e-5)
  if blind_queries_average:
    assert_close(flash[blind], xla[blind], 1e-5)
  else:
    assert not np.asarray(flash[blind]).any()
