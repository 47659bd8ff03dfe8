"""The analysis tools: the paper's qualitative findings at initialisation, and the commands' files."""

import csv
import json
import subprocess

import jax
from flax import nnx
import numpy as np
import pytest

from admin_jax.analysis import dependency
from admin_jax.analysis import grad_norms
from admin_jax.analysis import omega
from admin_jax.analysis import output_change
from admin_jax.analysis import probe
from admin_jax.errors import UserError
from admin_jax.model import TransformerConfig
from conftest import REPO
from conftest import model_config
from conftest import python
from conftest import subprocess_env

VOCAB = 1000
RESIDUALS = ('post_ln', 'pre_ln', 'admin')
ENCODER_LAYERS = 24
# One model shape for every test, so each compiled function is shared; d_model 128 keeps the
# output-change curves smooth enough to read growth rates from three seeds.
SHAPE = dict(vocab_size=VOCAB, num_encoder_layers=ENCODER_LAYERS, num_decoder_layers=1, d_model=128, ffn_dim=512,
             num_heads=4)


def config(residual: str) -> TransformerConfig:
  return probe.probe_config(model_config(residual=residual, **SHAPE))


@pytest.fixture(scope='module')
def batch():
  return probe.random_batch(VOCAB, 8, 32, seed=0)


@pytest.fixture(scope='module')
def models(batch):
  """The models at initialisation, one per residual the tests compare."""
  return {r: probe.build_model(config(r), batch, seed=0) for r in RESIDUALS}


@pytest.fixture(scope='module')
def admin_forward(models, batch):
  """Admin's logits and encoder output from the plain forward, and its `trace`."""
  graphdef, state = nnx.split(models['admin'])

  @jax.jit
  def run(state):
    model = nnx.merge(graphdef, state)
    memory = model.encode(batch['inputs'], batch['inputs_segmentation'], batch['inputs_position'])
    return model(batch), memory, model.trace(batch, probe.zero_offsets(model.cfg, batch))

  return jax.tree.map(np.asarray, run(state))


def read_csv(path):
  with open(path) as f:
    return list(csv.reader(f))


def assert_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


# --- the tap in the model ----------------------------------------------------------------------

def test_trace_is_the_forward_and_chains_sublayers(admin_forward):
  logits, memory, (traced_logits, traced) = admin_forward
  np.testing.assert_array_equal(traced_logits, logits)
  enc, dec = traced['encoder'], traced['decoder']
  assert enc.output.shape == (ENCODER_LAYERS, 2, 8, 32, 128) and dec.branch.shape == (1, 3, 8, 32, 128)
  # x_k is the next sublayer's input, and the last one is the encoder output.
  outputs = enc.output.reshape(-1, 8, 32, 128)
  np.testing.assert_array_equal(outputs[:-1], enc.input.reshape(-1, 8, 32, 128)[1:])
  np.testing.assert_allclose(outputs[-1], memory, atol=1e-6)


# --- output change (spec 7.1) ------------------------------------------------------------------

def test_perturbation_skips_biases_layernorm_and_omega(models):
  for model in models.values():
    _, weights, rest = nnx.split(model, output_change.is_perturbed, ...)
    perturbed = {path[-1] for path, _ in nnx.to_flat_state(weights)}
    kept = {path[-1] for path, _ in nnx.to_flat_state(rest)}
    assert perturbed == {'table', 'qkv', 'out', 'fc1', 'fc2'}
    assert kept >= {'qkv_bias', 'out_bias', 'fc1_bias', 'fc2_bias', 'scale', 'bias'}
    assert ('omega' in kept) == (model.cfg.residual == 'admin')


def _loglog_slope(depths, values):
  return np.polyfit(np.log(depths), np.log(values), 1)[0]


def test_output_change_grows_linearly_for_post_ln_only(batch, tmp_path):
  depths = [1, 2, 4, 8, 16, ENCODER_LAYERS]
  residuals = list(RESIDUALS)
  rows = output_change.sweep(config('post_ln'), residuals, depths, [0, 1, 2], batch)
  output_change.write(rows, str(tmp_path))

  change = {r: np.array([row[3] for row in rows if row[0] == r]) for r in residuals}
  deep = slice(2, None)  # depths 4..24: past the embedding's constant share
  slope = {r: _loglog_slope(depths[deep], change[r][deep]) for r in residuals}
  ratio = {r: change[r][-1] / change[r][3] for r in residuals}  # 24 layers over 8
  for r in residuals:
    print(f'{r:8s} change {np.array2string(change[r], precision=3)}  '
          f'log-log slope(4..24) {slope[r]:.2f}  change(24)/change(8) {ratio[r]:.2f}')
  assert all(np.isfinite(c).all() and (c > 0).all() for c in change.values())
  assert 0.8 < slope['post_ln'] < 1.3 and ratio['post_ln'] > 2.2  # linear: slope 1, ratio 3
  for r in ('pre_ln', 'admin'):
    assert slope[r] < 0.6 and ratio[r] < 1.8  # logarithmic: ratio log(48)/log(16) ~ 1.4
    assert slope['post_ln'] - slope[r] > 0.4
  table = read_csv(tmp_path / 'output_change.csv')
  assert table[0] == list(output_change.HEADER) and len(table) == 1 + len(residuals) * len(depths)
  assert_png(tmp_path / 'output_change.png')

  # admin_logn's omega depends on the depth, so it is built per depth; one depth is enough here.
  (logn,) = output_change.sweep(config('admin_logn'), ['admin_logn'], [ENCODER_LAYERS], [0, 1, 2], batch)
  print(f'admin_logn change({ENCODER_LAYERS}) {logn[3]:.3f}')
  assert logn[:3] == ('admin_logn', ENCODER_LAYERS, 2 * ENCODER_LAYERS)
  assert logn[3] < 0.5 * change['post_ln'][-1]


# --- gradient norms (spec 7.3) -----------------------------------------------------------------

def test_grad_norms_shapes_and_last_sublayer_against_the_logits(models, batch, admin_forward):
  for residual in ('post_ln', 'admin'):
    norms = grad_norms.grad_norms(models[residual], batch)
    assert norms['encoder'].shape == (2 * ENCODER_LAYERS,) and norms['decoder'].shape == (3,), residual
    assert all(np.isfinite(v).all() and (v > 0).all() for v in norms.values()), residual
  # Admin's (as Post-LN's) last decoder output x_K feeds the logits x_K E^T directly, so
  # dL/dx_K = (softmax - onehot) E / tokens.
  probs = np.asarray(jax.nn.softmax(admin_forward[0]), np.float64)
  rows, positions = np.indices(batch['targets'].shape)
  probs[rows, positions, batch['targets']] -= 1.0
  table = np.asarray(models['admin'].embedding.table[...], np.float64)
  expected = np.linalg.norm(probs @ table / batch['targets'].size)
  np.testing.assert_allclose(norms['decoder'][-1], expected, rtol=1e-4)


# --- dependency (spec 7.2) ---------------------------------------------------------------------

def test_dependency_components_sum_to_each_sublayer_output(models, batch):
  for residual, model in models.items():
    _, traced = model.trace_encoder(batch['inputs'], batch['inputs_segmentation'], batch['inputs_position'],
                                    probe.zero_offsets(model.cfg, batch)['encoder'])
    outputs = np.asarray(traced.output).reshape(-1, 8, 32, 128)
    for i, parts in enumerate(dependency.components(model, batch)):
      assert len(parts) == i + 2
      np.testing.assert_allclose(sum(parts), outputs[i], atol=2e-4, err_msg=f'{residual} x_{i + 1}')


def test_dependency_post_ln_leans_on_its_own_branch(models, batch):
  betas = {r: dependency.dependency(model, batch) for r, model in models.items()}
  for r, beta in betas.items():
    assert beta.shape == (2 * ENCODER_LAYERS, 2 * ENCODER_LAYERS + 1) and np.isfinite(beta).all(), r
    np.testing.assert_allclose(np.square(beta).sum(1), 1.0, rtol=1e-9)
    assert not np.triu(beta[:, 1:], 1).any()
  diagonal = {r: np.diag(beta[:, 1:]) for r, beta in betas.items()}
  for r, values in diagonal.items():
    print(f'diagonal beta_ii {r:8s} {np.array2string(values, precision=2)}')
  post = diagonal['post_ln']
  assert 0.35 < post.mean() < 0.65 and post.min() > 0.25  # ~0.5 for every layer
  for r in ('pre_ln', 'admin'):  # Admin at initialisation looks like Pre-LN
    assert diagonal[r][ENCODER_LAYERS:].mean() < 0.6 * post.mean(), r
    assert betas[r][-1, 0] > 2 * betas['post_ln'][-1, 0], r  # and keeps leaning on the embedding


# --- the commands' files -----------------------------------------------------------------------

def test_grad_norms_and_dependency_write_csv_and_png(models, batch, tmp_path):
  rows = grad_norms.run({r: models[r] for r in ('post_ln', 'admin')}, batch, str(tmp_path))
  table = read_csv(tmp_path / 'grad_norms.csv')
  assert table[0] == list(grad_norms.HEADER) and len(table) == 1 + len(rows) == 1 + 2 * (2 * ENCODER_LAYERS + 3)
  assert table[1][:4] == ['post_ln', 'encoder', '1', 'self_attn'] and table[-1][3] == 'ffn'
  assert {row[3] for row in table[1:] if row[1] == 'decoder'} == {'self_attn', 'cross_attn', 'ffn'}
  assert_png(tmp_path / 'grad_norms.png')

  betas = dependency.run({'post_ln (init)': models['post_ln']}, batch, str(tmp_path))
  table = read_csv(tmp_path / 'dependency.csv')
  assert table[0] == list(dependency.HEADER) and len(table) == 1 + sum(range(2, 2 * ENCODER_LAYERS + 2))  # j = 0..i
  assert float(table[1][3]) == pytest.approx(betas['post_ln (init)'][0, 0])
  assert_png(tmp_path / 'dependency.png')


def test_omega_reads_the_workdir_and_plots(tmp_path):
  (tmp_path / 'omega.json').write_text(json.dumps({'encoder': [1.0, 1.3, 1.45, 1.5],
                                                   'decoder': [1.0, 1.34, 1.48, 1.61, 1.69, 1.82]}))
  rows = omega.run(omega.read_omegas(str(tmp_path)), str(tmp_path))
  assert rows[1] == ('encoder', 2, 'ffn', 1.3) and rows[5] == ('decoder', 2, 'cross_attn', 1.34)
  assert len(read_csv(tmp_path / 'omega.csv')) == 1 + 10
  assert_png(tmp_path / 'omega.png')


@pytest.mark.parametrize('content, message', [
    (None, 'not found'),
    ('{"encoder": [1.0, 1.2]', 'cannot read'),
    ('{"encoder": [1.0, 1.2, 1.3], "decoder": [1, 2, 3]}', 'multiple'),
    ('{"encoder": [1.0, "x"], "decoder": [1, 2, 3]}', 'finite numbers'),
])
def test_omega_bad_workdir_is_a_user_error(tmp_path, content, message):
  if content is not None:
    (tmp_path / 'omega.json').write_text(content)
  with pytest.raises(UserError, match=message):
    omega.read_omegas(str(tmp_path))


def _run(module, *args):
  return subprocess.run([python(), '-m', f'admin_jax.analysis.{module}', *args], cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)


def test_output_change_command(tmp_path):
  result = _run('output_change', '--config=configs/default.py', '--config.model.d_model=16',
                '--config.model.ffn_dim=32', '--config.model.num_heads=2', '--config.model.num_decoder_layers=1',
                '--config.data.vocab_size=50', '--depths=2,1', '--residuals=post_ln', '--num_seeds=1',
                '--sentences=2', '--length=5', f'--out={tmp_path}')
  assert result.returncode == 0, result.stderr
  table = read_csv(tmp_path / 'output_change.csv')
  assert [row[:3] for row in table] == [list(output_change.HEADER[:3]), ['post_ln', '1', '2'], ['post_ln', '2', '4']]
  assert all(float(row[3]) > 0 for row in table[1:])
  assert_png(tmp_path / 'output_change.png')


def test_command_bad_input_is_one_line(tmp_path):
  result = _run('omega', f'--workdir={tmp_path}', f'--out={tmp_path}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f'error: {tmp_path}/omega.json not found: run the Admin profiling '
                                                'pass for this workdir first']
