"""The Admin profiling pass against an independent NumPy recurrence, across meshes and files."""

import json
import math

import jax
from flax import nnx
import ml_collections
import numpy as np
import pytest

from admin_jax import optim
from admin_jax import omega_init
from admin_jax import sharding
from admin_jax import train_step as train_step_lib
from admin_jax.errors import UserError
from admin_jax.model import Transformer
from admin_jax.model.transformer import decoder_inputs
from conftest import model_config
from conftest import packed_batch
import numpy_reference as ref

VOCAB = 50


def tiny(**kw):
  base = dict(vocab_size=VOCAB, residual='admin', num_encoder_layers=3, num_decoder_layers=3, d_model=16,
              ffn_dim=32, num_heads=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
  return model_config(**{**base, **kw})


def numpy_profile(model: Transformer, batch) -> dict[str, list[float]]:
  """Spec 2.2 in float64: omega_k := r, r := sqrt(Var[omega_k x] + Var[f_k]) over the padded tensor."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  d = model.cfg.d_model
  table = params['embedding']['table']

  def embed(tokens, positions, segments):
    return np.where((segments > 0)[..., None], math.sqrt(d) * table[tokens] + ref.sinusoid(positions, d), 0.0)

  def masks(q_seg, k_seg, causal):
    m = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
    if causal:
      m &= np.tril(np.ones((q_seg.shape[1], k_seg.shape[1]), bool))[None]
    return m

  def run_stack(x, stack, n_layers, branches):
    r, omegas = 1.0, []
    for layer in range(n_layers):
      p = jax.tree.map(lambda a: a[layer], stack)
      for name, branch in branches:
        omegas.append(r)
        f = np.stack([branch(p, x[b], b) for b in range(x.shape[0])])
        shortcut = r * x
        r = math.sqrt(shortcut.var() + f.var())
        x = ref.layer_norm(shortcut + f, p[f'{name}_residual']['norm'])
    return x, omegas

  src_seg, tgt_seg = batch['inputs_segmentation'], batch['targets_segmentation']
  enc_mask, self_mask, cross_mask = masks(src_seg, src_seg, False), masks(tgt_seg, tgt_seg, True), masks(
      tgt_seg, src_seg, False)
  x = embed(batch['inputs'], batch['inputs_position'], src_seg)
  enc = params['encoder']['layers']
  memory, enc_omegas = run_stack(x, enc, model.cfg.num_encoder_layers, [
      ('self_attention', lambda p, y, b: ref.attention(y, y, p['self_attention'], enc_mask[b])),
      ('ffn', lambda p, y, b: ref.ffn(y, p['ffn']))])
  y = embed(np.asarray(decoder_inputs(batch['targets'], batch['targets_position'], tgt_seg)),
            batch['targets_position'], tgt_seg)
  dec = params['decoder']['layers']
  _, dec_omegas = run_stack(y, dec, model.cfg.num_decoder_layers, [
      ('self_attention', lambda p, y, b: ref.attention(y, y, p['self_attention'], self_mask[b])),
      ('cross_attention', lambda p, y, b: ref.attention(y, memory[b], p['cross_attention'], cross_mask[b])),
      ('ffn', lambda p, y, b: ref.ffn(y, p['ffn']))])
  return {'encoder': enc_omegas, 'decoder': dec_omegas}


def test_profile_matches_numpy_recurrence(np_rng):
  model = Transformer(tiny(), rngs=nnx.Rngs(0))
  batch = packed_batch(np_rng, 3, 12, VOCAB, [[5, 7], [12], [4]])  # row 3 mostly padding
  omegas = nnx.jit(lambda m, b: m.profile_omegas(b, rng=None))(model, batch)
  expected = numpy_profile(model, batch)
  for stack in ('encoder', 'decoder'):
    np.testing.assert_allclose(np.asarray(omegas[stack]), expected[stack], rtol=1e-5, atol=1e-5)
    assert omegas[stack][0] == 1.0
    assert np.all(np.diff(np.asarray(omegas[stack])) > 0), 'omega grows with depth at initialisation'


def _setup(seed=0, dropout=0.1):
  train = ml_collections.ConfigDict(dict(optimizer='radam', lr=1e-3, warmup_steps=10, warmup_init_lr=1e-7, b1=0.9,
                                         b2=0.98, eps=1e-8, weight_decay=0.0, clip_norm=0.0, label_smoothing=0.1,
                                         loss_chunk_tokens=0))
  tx, schedule = optim.make_optimizer(train)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  cfg = tiny(dropout=dropout, attention_dropout=dropout, activation_dropout=dropout)
  return train_step_lib.create_train_state(cfg, tx, schedule, mesh, seed), mesh


def test_dropout_profile_is_deterministic_per_seed(np_rng):
  batch = packed_batch(np_rng, 2, 12, VOCAB, [[5, 4], [6]])  # a third of the tokens are padding
  (setup, state), mesh = _setup(seed=0)
  first = omega_init.profile_omegas(setup, state, sharding.global_batch(batch, mesh), mask_padding=False)
  again = omega_init.profile_omegas(setup, state, sharding.global_batch(batch, mesh), mask_padding=False)
  (setup_off, state_off), _ = _setup(seed=0, dropout=0.0)
  off = omega_init.profile_omegas(setup_off, state_off, sharding.global_batch(batch, mesh), mask_padding=False)
  masked = omega_init.profile_omegas(setup, state, sharding.global_batch(batch, mesh), mask_padding=True)
  for stack in ('encoder', 'decoder'):
    np.testing.assert_array_equal(first[stack], again[stack])
    assert not np.allclose(first[stack], off[stack]), 'dropout is active during profiling'
    assert not np.allclose(first[stack], masked[stack]), 'mask_padding changes the statistic'


def test_with_omegas_changes_only_omega(np_rng):
  (setup, state), mesh = _setup()
  before = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
  omegas = {'encoder': np.arange(1, 7) * 0.5, 'decoder': np.arange(1, 10) * 0.25}
  after = omega_init.with_omegas(setup, state, omegas)
  model = train_step_lib.model_from(setup, after.params)
  np.testing.assert_allclose(model.get_omegas()['encoder'], omegas['encoder'], rtol=1e-6)
  np.testing.assert_allclose(model.get_omegas()['decoder'], omegas['decoder'], rtol=1e-6)
  for (path, old), (_, new) in zip(before, jax.tree_util.tree_flatten_with_path(jax.device_get(after.params))[0]):
    if 'omega' not in jax.tree_util.keystr(path):
      np.testing.assert_array_equal(old, new)


def test_profile_files_round_trip_and_mismatch(tmp_path):
  omegas = {'encoder': np.array([1.0, 1.25, 1.5, 1.625]), 'decoder': np.array([1.0, 1.5, 1.75, 2.0, 2.25, 2.5])}
  omega_init.write_profile(str(tmp_path), omegas, {'inputs_tokens': 3})
  assert (tmp_path / 'omega.png').stat().st_size > 0
  lines = (tmp_path / 'profile.ratio.init').read_text().splitlines()
  assert lines[0] == '1 1.0' and lines[4] == '1 1.0' and lines[-1].startswith('6 ')
  for name in ('omega.json', 'profile.ratio.init'):
    back = omega_init.read_profile(str(tmp_path / name), 2, 2)
    for stack in omegas:
      np.testing.assert_array_equal(back[stack], omegas[stack])
  with pytest.raises(UserError, match='has 4 encoder and 6 decoder sublayers; the model has 12 and 18'):
    omega_init.read_profile(str(tmp_path / 'profile.ratio.init'), 6, 6)
  values_only = tmp_path / 'values.init'
  values_only.write_text('\n'.join(str(v) for v in [*omegas['encoder'], *omegas['decoder']]))
  np.testing.assert_array_equal(omega_init.read_profile(str(values_only), 2, 2)['decoder'], omegas['decoder'])


def test_profile_batch_takes_the_first_rows_and_refuses_more_than_the_batch(np_rng):
  batch = packed_batch(np_rng, 4, 8, VOCAB, [[8], [3, 5], [6], [2]])
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  placed, rows = omega_init.profile_batch(batch, 23, mesh)  # 2 whole rows of 8 tokens
  for k, v in batch.items():
    np.testing.assert_array_equal(rows[k], v[:2])
    np.testing.assert_array_equal(placed[k], v[:2])
  with pytest.raises(UserError, match='profile_tokens=40 is not between one and all 4 rows of 8 tokens'):
    omega_init.profile_batch(batch, 40, mesh)


def test_profile_job_writes_files_and_train_reuses_them(tmp_path):
  import subprocess

  from conftest import REPO, python, subprocess_env
  tiny_run = ['--config=configs/demo.py', f'--workdir={tmp_path}', '--config.model.d_model=32',
              '--config.model.ffn_dim=64', '--config.model.num_encoder_layers=2', '--config.model.num_decoder_layers=2',
              '--config.data.synthetic_train_size=500', '--config.data.synthetic_eval_size=4',
              '--config.data.tokens_per_batch=512', '--config.data.max_len=32', '--config.data.vocab_size=200']
  out = subprocess.run([python(), '-m', 'admin_jax.profile_omega', *tiny_run, '--config.admin.profile_tokens=80'],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  profile = (tmp_path / 'omega.json').read_text()
  assert json.loads(profile)['batch']['inputs_shape'] == [2, 32]  # 80 tokens: 2 of the 16 rows of 32
  assert 'encoder omega: 1.000' in out.stdout
  assert len((tmp_path / 'profile.ratio.init').read_text().splitlines()) == 4 + 6
  out = subprocess.run([python(), '-m', 'admin_jax.train', *tiny_run, '--config.train.num_steps=2',
                        '--config.eval.every_steps=0'], cwd=REPO, env=subprocess_env(), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f'omega from {tmp_path}/omega.json' in out.stdout
  assert (tmp_path / 'omega.json').read_text() == profile


def test_the_former_profile_command_runs_the_same_job(tmp_path):
  """`python -m admin_jax.profile` (what users typed before `profile_omega`) is the same job: its check of
  the residual answers before any work."""
  import subprocess

  from conftest import REPO, python, subprocess_env
  out = subprocess.run([python(), '-m', 'admin_jax.profile', '--config=configs/demo.py', f'--workdir={tmp_path}',
                        '--config.model.residual=post_ln'], cwd=REPO, env=subprocess_env(), capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2 and out.stderr.strip() == (
      "error: profiling applies to model.residual='admin', not 'post_ln'"), out.stderr
