"""The Admin Transformer against independent NumPy references and its structural invariants."""

import collections
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import pallas as pl
import numpy as np
import pytest

from admin_jax.model import Transformer
from admin_jax.model import TransformerConfig
from admin_jax.model import dropout
from admin_jax.model import residual as residual_lib
from admin_jax.model.attention import Visibility
from admin_jax.model.transformer import decoder_inputs
from conftest import model_config
from conftest import packed_batch
import numpy_reference as ref

VARIANTS = residual_lib.RESIDUALS
VOCAB = 40


def tiny(residual='admin', **overrides) -> TransformerConfig:
  kw = dict(vocab_size=VOCAB, residual=residual, num_encoder_layers=2, num_decoder_layers=2, d_model=16,
            ffn_dim=32, num_heads=4, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, dtype='float32')
  kw.update(overrides)
  return model_config(**kw)


def forward(model, batch, rng=None):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, b, r: nnx.merge(graphdef, s)(b, rng=r))(state, batch, rng)


@pytest.mark.parametrize('residual', VARIANTS)
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_shapes_and_dtypes(residual, dtype, np_rng):
  model = Transformer(tiny(residual, dtype=dtype, dropout=0.1), rngs=nnx.Rngs(0))
  batch = packed_batch(np_rng, 2, 10, VOCAB, [[4, 5], [10]])
  logits = forward(model, batch, jax.random.key(1))
  assert logits.shape == (2, 10, VOCAB) and logits.dtype == jnp.dtype(dtype)  # fairseq's fp16 logits are half too
  assert np.isfinite(np.asarray(logits)).all()
  params = nnx.state(model, nnx.Param)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  omegas = [p for path, p in nnx.to_flat_state(params) if path[-1] == 'omega']
  if residual in residual_lib.ADMIN_RESIDUALS:
    assert {o.shape for o in omegas} == {(2, 16)} and len(omegas) == 2 + 3
  else:
    assert not omegas


@pytest.mark.parametrize('residual', ['post_ln', 'pre_ln', 'admin'])
def test_masking_between_segments_and_future_positions(residual, np_rng):
  model = Transformer(tiny(residual), rngs=nnx.Rngs(0))
  batch = packed_batch(np_rng, 1, 12, VOCAB, [[5, 7]])
  base = np.asarray(forward(model, batch))
  # A different token in segment 2 (either side) leaves segment 1's outputs unchanged.
  for side in ('inputs', 'targets'):
    changed = {k: v.copy() for k, v in batch.items()}
    changed[side][0, 7] = (changed[side][0, 7] - 2) % (VOCAB - 3) + 3
    out = np.asarray(forward(model, changed))
    np.testing.assert_allclose(out[0, :5], base[0, :5], atol=1e-6)
    assert not np.allclose(out[0, 5:], base[0, 5:])
  # A later target token never changes earlier logits (the decoder is causal).
  later = {k: v.copy() for k, v in batch.items()}
  later['targets'][0, 3] = 7
  out = np.asarray(forward(model, later))
  np.testing.assert_allclose(out[0, :4], base[0, :4], atol=1e-6)
  assert not np.allclose(out[0, 4], base[0, 4])


# A bf16 stream under float32 compute: the stream and the copy the decoder reads differ.
@pytest.mark.parametrize('residual, stream_dtype', [(r, 'float32') for r in VARIANTS] + [('admin', 'bfloat16')])
def test_cached_decoding_equals_full_forward(residual, stream_dtype, np_rng):
  model = Transformer(tiny(residual, stream_dtype=stream_dtype), rngs=nnx.Rngs(3))
  batch = packed_batch(np_rng, 2, 9, VOCAB, [[9], [6]])
  full = np.asarray(forward(model, batch))
  dec_in = np.asarray(decoder_inputs(batch['targets'], batch['targets_position'], batch['targets_segmentation']))
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    m = nnx.merge(graphdef, state)
    memory = m.encode(batch['inputs'], batch['inputs_segmentation'], batch['inputs_position'])
    cache = m.init_cache(memory, batch['inputs_segmentation'], 9)
    steps = []
    for t in range(9):
      logits, cache = m.decode_step(jnp.asarray(dec_in[:, t]), cache)
      steps.append(logits)
    return jnp.stack(steps, 1)

  cached = np.asarray(run(state))
  np.testing.assert_allclose(cached[0], full[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(cached[1, :6], full[1, :6], atol=1e-5, rtol=1e-5)


def layer_params(model_stack, i):
  """Layer i's weights from the stacked state, as nested float64 dicts."""
  state = nnx.to_pure_dict(nnx.state(model_stack.layers, nnx.Param))
  return jax.tree.map(lambda a: np.asarray(a[i], np.float64), state)


@pytest.mark.parametrize('residual', VARIANTS)
def test_layers_match_numpy_reference(residual, np_rng):
  cfg = tiny(residual, num_encoder_layers=1, num_decoder_layers=1, scan_layers=False)
  model = Transformer(cfg, rngs=nnx.Rngs(5))
  if residual == 'admin':  # distinct omegas per sublayer, so a mixed-up assignment shows
    model.set_omegas([1.0, 1.7], [1.0, 1.3, 2.1])
  c = residual_lib.deepnorm_constants(1, 1)
  enc_shortcut = c.encoder_alpha if residual == 'deepnorm' else 1.0
  dec_shortcut = c.decoder_alpha if residual == 'deepnorm' else 1.0

  length, src_len = 6, 5
  x = np_rng.normal(size=(1, length, 16)).astype(np.float32)
  memory = np_rng.normal(size=(1, src_len, 16)).astype(np.float32)
  seg = np.ones((1, length), np.int32)
  mem_seg = np.ones((1, src_len), np.int32)
  enc_layer = nnx.merge(*nnx.split(model.encoder.layers))
  dec_layer = nnx.merge(*nnx.split(model.decoder.layers))

  def unstack(layer_module):
    graphdef, state = nnx.split(layer_module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))

  stream = residual_lib.Stream.of(jnp.asarray(x), cfg.stream, cfg.compute_dtype)
  enc_out = unstack(enc_layer)(stream, Visibility(seg, seg), None, None)[0].value
  dec_out = unstack(dec_layer)(stream, jnp.asarray(memory, cfg.compute_dtype), Visibility(seg, seg, causal=True),
                               Visibility(seg, mem_seg), None, None)[0].value

  pe, pd = layer_params(model.encoder, 0), layer_params(model.decoder, 0)
  x64, m64 = x[0].astype(np.float64), memory[0].astype(np.float64)
  full = np.ones((length, length), bool)
  causal = np.tril(full)
  cross = np.ones((length, src_len), bool)
  h = ref.sublayer(residual, x64, lambda y: ref.attention(y, y, pe['self_attention'], full),
                  pe['self_attention_residual'], enc_shortcut)
  h = ref.sublayer(residual, h, lambda y: ref.ffn(y, pe['ffn']), pe['ffn_residual'], enc_shortcut)
  np.testing.assert_allclose(np.asarray(enc_out[0]), h, atol=2e-5, rtol=1e-5)

  h = ref.sublayer(residual, x64, lambda y: ref.attention(y, y, pd['self_attention'], causal),
                  pd['self_attention_residual'], dec_shortcut)
  h = ref.sublayer(residual, h, lambda y: ref.attention(y, m64, pd['cross_attention'], cross),
                  pd['cross_attention_residual'], dec_shortcut)
  h = ref.sublayer(residual, h, lambda y: ref.ffn(y, pd['ffn']), pd['ffn_residual'], dec_shortcut)
  np.testing.assert_allclose(np.asarray(dec_out[0]), h, atol=2e-5, rtol=1e-5)


def test_initialisation_statistics():
  d = 64
  cfg = tiny('post_ln', d_model=d, ffn_dim=256, num_heads=4, vocab_size=2000)
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  table = np.asarray(params['embedding']['table'])
  assert abs(table[1:].std() / d ** -0.5 - 1) < 0.03 and not table[0].any()
  enc = params['encoder']['layers']
  for name, w, bound in (('qkv', enc['self_attention']['qkv'], math.sqrt(6 / (4 * d))),
                         ('out', enc['self_attention']['out'], math.sqrt(6 / (2 * d))),
                         ('fc1', enc['ffn']['fc1'], math.sqrt(6 / (d + 256))),
                         ('fc2', enc['ffn']['fc2'], math.sqrt(6 / (d + 256)))):
    w = np.asarray(w)
    assert np.abs(w).max() <= bound, name
    assert np.abs(w).max() > 0.95 * bound, name  # uniform over the whole xavier range
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.05, name
  leaves = nnx.to_flat_state(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  for path, value in leaves:
    if 'bias' in path[-1]:
      assert not np.asarray(value[...]).any(), path
    if path[-2] == 'norm' and path[-1] == 'scale':
      assert (np.asarray(value[...]) == 1).all(), path


def test_deepnorm_scales_branch_init():
  cfg = tiny('deepnorm', d_model=64, ffn_dim=256, num_encoder_layers=6, num_decoder_layers=6)
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  c = residual_lib.deepnorm_constants(6, 6)
  qkv = np.asarray(params['decoder']['layers']['self_attention']['qkv'])
  std = math.sqrt(2 / (2 * 64))
  assert abs(qkv[..., 0, :, :].std() / std - 1) < 0.05  # Q: gain 1
  assert abs(qkv[..., 2, :, :].std() / (c.decoder_beta * std) - 1) < 0.05  # V: gain beta
  fc1 = np.asarray(params['encoder']['layers']['ffn']['fc1'])
  assert abs(fc1.std() / (c.encoder_beta * math.sqrt(2 / (64 + 256))) - 1) < 0.05


@pytest.mark.parametrize('n, expected', [(6, 1.612), (12, 2.017), (18, 2.335), (36, 3.041), (200, 6.075)])
def test_admin_logn_omega(n, expected):
  assert round(residual_lib.logn_omega(n), 3) == expected


def test_admin_logn_model_uses_stack_sizes():
  model = Transformer(tiny('admin_logn', num_encoder_layers=3, num_decoder_layers=4), rngs=nnx.Rngs(0))
  omegas = model.get_omegas()
  np.testing.assert_allclose(omegas['encoder'], residual_lib.logn_omega(6), rtol=1e-6)
  np.testing.assert_allclose(omegas['decoder'], residual_lib.logn_omega(12), rtol=1e-6)


@pytest.mark.parametrize('layer_norm_impl', ['xla', 'pallas'])
def test_stream_dtype_is_what_every_sublayer_outputs(layer_norm_impl, np_rng):
  """perf.stream_dtype='bfloat16' keeps x_k in bf16 between sublayers: every sublayer output the
  encoder's trace records is a bf16 value, and the logits stay within bf16 rounding of the float32
  stream's. With the float32 stream (the default) most outputs are not bf16 values."""
  batch = packed_batch(np_rng, 2, 10, VOCAB, [[4, 6], [10]])
  outputs, logits = {}, {}
  for stream_dtype in ('float32', 'bfloat16'):
    cfg = tiny('admin', dtype='bfloat16', stream_dtype=stream_dtype, layer_norm_impl=layer_norm_impl)
    model = Transformer(cfg, rngs=nnx.Rngs(5))
    offsets = jnp.zeros((cfg.num_encoder_layers, 2) + batch['inputs'].shape + (cfg.d_model,))
    _, sublayers = model.trace_encoder(batch['inputs'], batch['inputs_segmentation'], batch['inputs_position'],
                                       offsets)
    outputs[stream_dtype] = np.asarray(sublayers.output)
    logits[stream_dtype] = np.asarray(forward(model, batch), np.float32)
  as_bf16 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(outputs['bfloat16'], as_bf16(outputs['bfloat16']))
  assert (outputs['float32'] != as_bf16(outputs['float32'])).mean() > 0.9
  np.testing.assert_allclose(logits['bfloat16'], logits['float32'], atol=0.05 * np.abs(logits['float32']).max())


def test_a_scanned_bfloat16_stream_carries_and_saves_one_array(np_rng):
  """Where the stream's dtype is the compute dtype, x_k and its copy are one array, and one pytree
  leaf (`residual.Stream`): a scan carries it once and saves it once per layer for the backward pass,
  one [layers, batch, length, d_model] stack per stack fewer than the float32 stream's two dtypes."""
  batch = packed_batch(np_rng, 2, 16, VOCAB, [[7, 9], [16]])
  stacked = {}
  for stream_dtype in ('float32', 'bfloat16'):
    cfg = tiny('admin', dtype='bfloat16', stream_dtype=stream_dtype, num_encoder_layers=3, num_decoder_layers=3,
               remat='dots', scan_layers=True)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)))
    _, vjp = jax.vjp(lambda p: nnx.merge(graphdef, p)(batch).astype(jnp.float32).sum(), params)
    stacked[stream_dtype] = [r.dtype for r in jax.tree.leaves(vjp) if getattr(r, 'shape', ()) == (3, 2, 16, 16)]
  assert set(stacked['bfloat16']) == {jnp.dtype(jnp.bfloat16)}
  assert len(stacked['bfloat16']) == len(stacked['float32']) - 2
  value = jnp.zeros((2, 16), jnp.bfloat16)
  assert len(jax.tree.leaves(residual_lib.Stream(value, value))) == 1
  assert len(jax.tree.leaves(residual_lib.Stream(value.astype(jnp.float32), value))) == 2


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scan_equals_python_loop(remat, np_rng):
  batch = packed_batch(np_rng, 2, 8, VOCAB, [[3, 5], [8]])
  cfg = tiny('admin', num_encoder_layers=3, num_decoder_layers=3, dropout=0.1, attention_dropout=0.1,
             activation_dropout=0.1, remat=remat)
  scanned = Transformer(cfg, rngs=nnx.Rngs(7))
  looped = Transformer(tiny('admin', num_encoder_layers=3, num_decoder_layers=3, dropout=0.1,
                            attention_dropout=0.1, activation_dropout=0.1, scan_layers=False), rngs=nnx.Rngs(7))
  key = jax.random.key(2)
  np.testing.assert_allclose(np.asarray(forward(scanned, batch, key)), np.asarray(forward(looped, batch, key)),
                             atol=1e-5, rtol=1e-5)


def _scan_lengths(jaxpr: jax.extend.core.Jaxpr) -> list[int]:
  """The lengths of the scans in a jaxpr, nested ones included, in program order."""
  lengths = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'scan':
      lengths.append(eqn.params['length'])
    for param in eqn.params.values():
      inner = getattr(param, 'jaxpr', param)
      if isinstance(inner, jax.extend.core.Jaxpr):
        lengths += _scan_lengths(inner)
  return lengths


def test_layers_unrolled_before_a_scan_change_no_result(np_rng):
  """Scanned stacks with their first layers unrolled (perf.unrolled_encoder_layers and
  unrolled_decoder_layers) scan only the layers after them (two of the encoder's three, none of
  the decoder's two, which asked for more than it has), and are the same function as the scanned
  stacks (which test_scan_equals_python_loop ties to the loop): logits and gradients under dropout,
  each sublayer's profiled omega in forward order, and cached decoding."""
  batch = packed_batch(np_rng, 2, 8, VOCAB, [[3, 5], [8]])
  key = jax.random.key(2)
  dec_in = decoder_inputs(batch['targets'], batch['targets_position'], batch['targets_segmentation'])
  results = []
  for unrolled, scanned in (((1, 3), [2]), ((0, 0), [3, 2])):
    cfg = tiny('admin', num_encoder_layers=3, num_decoder_layers=2, dropout=0.1, attention_dropout=0.1,
               activation_dropout=0.1, scan_layers=True, unrolled_encoder_layers=unrolled[0],
               unrolled_decoder_layers=unrolled[1])
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(7)))

    def loss(params, graphdef=graphdef):
      return (nnx.merge(graphdef, params)(batch, rng=key) ** 2).sum()

    @jax.jit
    def run(state, graphdef=graphdef):
      model = nnx.merge(graphdef, state)
      memory = model.encode(batch['inputs'], batch['inputs_segmentation'], batch['inputs_position'])
      cache, steps = model.init_cache(memory, batch['inputs_segmentation'], 3), []
      for t in range(3):
        step_logits, cache = model.decode_step(dec_in[:, t], cache)
        steps.append(step_logits)
      return jax.value_and_grad(loss)(state), model.profile_omegas(batch, rng=key), jnp.stack(steps, 1)

    assert _scan_lengths(jax.make_jaxpr(loss)(state).jaxpr) == scanned
    results.append(run(state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
               *results)
  assert results[0][1]['encoder'].shape == (6,) and results[0][1]['decoder'].shape == (6,)


def test_remat_dots_saves_the_flash_kernels_outputs(np_rng):
  """remat='dots' recomputes a layer's elementwise work in the backward pass but keeps the flash
  forward kernel's outputs: gradients equal those without remat, and the compiled program runs the
  forward kernel no more often than without remat (saving only matmul outputs, it ran it twice)."""
  batch = packed_batch(np_rng, 2, 16, VOCAB, [[7, 9], [16]])
  cotangent = jnp.asarray(np_rng.normal(size=(2, 16, VOCAB)), jnp.float32)
  grads, forward_kernels = [], []
  for remat in ('none', 'dots'):
    cfg = tiny('admin', attention_impl='flash', dropout=0.1, attention_dropout=0.1, remat=remat, scan_layers=True)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)))
    grad = jax.jit(jax.grad(lambda p: (nnx.merge(graphdef, p)(batch, rng=jax.random.key(1)) * cotangent).sum()))
    compiled = grad.lower(params).compile()
    grads.append(compiled(params))
    forward_kernels.append(compiled.as_text().count('flash_attention_forward'))
  # float32, summed in another order where the recomputed forward pass is fused differently:
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6), *grads)
  assert forward_kernels[1] == forward_kernels[0] > 0


def test_remat_dots_saves_the_ffn_activation_rather_than_fc1_output(np_rng):
  """Under remat='dots' the FFN's backward pass reads its ReLU/dropout output (fc2's weight
  gradient, the mask): saving that by name, instead of fc1's output (a matmul output, saveable too),
  spares recomputing it. The saved [layers, batch, length, ffn] residuals are that output: no value
  below zero, some dropped to zero."""
  ffn_dim = 56  # no other dimension of the model has this size
  batch = packed_batch(np_rng, 2, 16, VOCAB, [[7, 9], [16]])
  cfg = tiny('admin', dropout=0.1, activation_dropout=0.1, ffn_dim=ffn_dim, remat='dots', scan_layers=True)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)))
  _, vjp = jax.vjp(lambda p: nnx.merge(graphdef, p)(batch, rng=jax.random.key(1)).sum(), params)
  saved = [r for r in jax.tree.leaves(vjp) if getattr(r, 'ndim', 0) == 4 and r.shape[-1] == ffn_dim]
  assert len(saved) == 2  # one stack of layers each side
  for activations in saved:
    assert activations.min() >= 0 and (activations == 0).mean() > 0.1


def test_kernels_are_traced_once_whatever_the_depth(np_rng, monkeypatch):
  """Layers of the same shapes share one trace of each Pallas kernel (and so one Triton lowering):
  traced per layer, the kernels were a third of a deep model's compile time."""
  batch = packed_batch(np_rng, 2, 16, VOCAB, [[7, 9], [16]])
  traced = []
  real_pallas_call = pl.pallas_call

  def counted_pallas_call(kernel, **kw):
    traced.append(kw['name'])
    return real_pallas_call(kernel, **kw)

  monkeypatch.setattr(pl, 'pallas_call', counted_pallas_call)
  counts = []
  for layers in (1, 3):
    jax.clear_caches()
    traced.clear()
    cfg = tiny('admin', attention_impl='flash', layer_norm_impl='pallas', dropout=0.1, attention_dropout=0.1,
               num_encoder_layers=layers, num_decoder_layers=layers, scan_layers=False)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)))
    jax.make_jaxpr(jax.grad(lambda p: nnx.merge(graphdef, p)(batch, rng=jax.random.key(1)).sum()))(params)
    counts.append(collections.Counter(traced))
  assert counts[0] == counts[1]
  assert set(counts[0]) == {'flash_attention_forward', 'flash_attention_dq', 'flash_attention_dkv',
                            'residual_layer_norm_forward', 'residual_layer_norm_backward'}


@pytest.mark.parametrize('prng_impl', ['threefry2x32', 'rbg'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_dropout_rate_and_expectation(prng_impl, dtype):
  """Dropout drops `rate` of the values and keeps the mean: 2^20 draws, 5 standard errors."""
  n, rate = 2 ** 20, 0.1
  x = jnp.full((n,), 3.0, dtype)
  y = np.asarray(jax.jit(lambda k: dropout.apply(x, rate, k))(jax.random.key(7, impl=prng_impl)), np.float64)
  dropped = (y == 0).mean()
  assert abs(dropped - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
  assert abs(y.mean() / 3.0 - 1.0) < 5 * math.sqrt(rate / (1 - rate) / n) + (4e-3 if dtype == 'bfloat16' else 1e-6)
  other = np.asarray(dropout.apply(x, rate, jax.random.key(8, impl=prng_impl)))
  assert ((other == 0) != (y == 0)).mean() > 0.1  # another key, another mask
  assert dropout.apply(x, rate, None) is x and dropout.apply(x, 0.0, jax.random.key(0)) is x
