"""Sharded training: mesh equivalence, sharding rules, accumulation, optimizer, FLOPs, the demo run."""

import functools
import json
import math
import re
import shutil
import subprocess
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from admin_jax import cli
from admin_jax import flops
from admin_jax import optim
from admin_jax import trained_run
from admin_jax import sharding
from admin_jax import train as train_lib
from admin_jax import train_step as train_step_lib
from admin_jax.errors import UserError
from configs import demo
from conftest import REPO
from conftest import finish
from conftest import model_config
from conftest import packed_batch
from conftest import python
from conftest import spawn
from conftest import subprocess_env


def test_logical_rules_skip_used_and_indivisible_axes():
  mesh = {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert sharding.logical_to_spec(('batch', 'length', 'embed'), (8, 4, 16), mesh) == jax.P(('data', 'fsdp'), None,
                                                                                            None)
  assert sharding.logical_to_spec(('embed', 'mlp'), (16, 32), mesh) == jax.P('fsdp', 'tensor')
  assert sharding.logical_to_spec(('vocab', 'embed'), (7, 16), mesh) == jax.P(None, 'fsdp')


def train_config(**kw) -> ml_collections.ConfigDict:
  base = dict(optimizer='radam', lr=1e-3, warmup_steps=4, warmup_init_lr=1e-7, b1=0.9, b2=0.98, eps=1e-8,
              weight_decay=0.0, clip_norm=0.0, label_smoothing=0.1, loss_chunk_tokens=0)
  return ml_collections.ConfigDict({**base, **kw})


def test_grad_accumulation_equals_one_full_batch(np_rng):
  cfg = model_config(40, residual='admin', num_encoder_layers=1, num_decoder_layers=1, d_model=16,
                     ffn_dim=32, num_heads=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  train = train_config(optimizer='adam')
  tx, schedule = optim.make_optimizer(train)
  setup, state = train_step_lib.create_train_state(cfg, tx, schedule, mesh, seed=0)
  batch = packed_batch(np_rng, 4, 10, 40, [[3, 7], [10], [2, 2, 2], [9]])  # uneven token counts per half
  step = jax.jit(train_step_lib.make_train_step(setup, train))
  full_state, full = step(state, {k: v[None] for k, v in batch.items()})
  halves_state, halves = step(state, {k: v.reshape(2, 2, 10) for k, v in batch.items()})
  np.testing.assert_allclose(halves['loss'], full['loss'], rtol=1e-6)
  np.testing.assert_allclose(halves['grad_norm'], full['grad_norm'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(full_state.params), jax.tree.leaves(halves_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_loss_equals_the_whole_batch_loss(np_rng):
  cfg = model_config(40, residual='pre_ln', num_encoder_layers=1, num_decoder_layers=1,
                     d_model=16, ffn_dim=32, num_heads=2, dropout=0.1, attention_dropout=0.1,
                     activation_dropout=0.1)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  batch = {k: v[None] for k, v in packed_batch(np_rng, 3, 10, 40, [[3, 7], [10], [4]]).items()}
  results = []
  for chunk in (0, 7):  # 7 does not divide the 30 target positions: the last chunk is padded
    train = train_config(optimizer='adam', loss_chunk_tokens=chunk)
    tx, schedule = optim.make_optimizer(train)
    setup, state = train_step_lib.create_train_state(cfg, tx, schedule, mesh, seed=0)
    results.append(jax.jit(train_step_lib.make_train_step(setup, train))(state, batch))
  (plain_state, plain), (chunked_state, chunked) = results
  for key in ('loss', 'nll', 'tokens', 'grad_norm'):
    np.testing.assert_allclose(chunked[key], plain[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(plain_state.params), jax.tree.leaves(chunked_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_rbg_dropout_keys_train_like_threefry(dropout, np_rng):
  """train.prng_impl changes the dropout masks and nothing else: with dropout off, the same step."""
  cfg = model_config(40, residual='admin', num_encoder_layers=1, num_decoder_layers=1, d_model=16,
                     ffn_dim=32, num_heads=2, dropout=dropout, attention_dropout=dropout,
                     activation_dropout=dropout)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  batch = {k: v[None] for k, v in packed_batch(np_rng, 2, 10, 40, [[3, 7], [10]]).items()}
  train = train_config(optimizer='adam')
  tx, schedule = optim.make_optimizer(train)
  losses_by_impl = {}
  for impl in ('threefry2x32', 'rbg'):
    setup, state = train_step_lib.create_train_state(cfg, tx, schedule, mesh, seed=0, prng_impl=impl)
    assert state.rng.shape == jax.random.key_data(jax.random.key(0, impl=impl)).shape
    step = jax.jit(train_step_lib.make_train_step(setup, train))
    runs = [float(step(state, batch)[1]['loss']) for _ in range(2)]
    assert runs[0] == runs[1] and math.isfinite(runs[0])  # deterministic per key
    losses_by_impl[impl] = runs[0]
  if dropout:
    assert losses_by_impl['rbg'] != losses_by_impl['threefry2x32']
  else:
    assert losses_by_impl['rbg'] == losses_by_impl['threefry2x32']


def test_resume_may_change_how_parameters_are_computed_but_not_what_they_are(tmp_path):
  """A resume may change any perf.* key (but into or out of float16, whose state holds a loss scale), and
  no model.* key; nor the vocabulary, languages or dropout PRNG."""
  config = demo.get_config()
  cli.write_config(config, str(tmp_path))
  config.perf.update(scan_layers=not config.perf.scan_layers, attention_impl='flash', dtype='bfloat16',
                     remat='full', unrolled_encoder_layers=1, unrolled_decoder_layers=2, stream_dtype='bfloat16',
                     layer_norm_impl='pallas')
  assert set(config.perf.to_dict().items()) & set(demo.get_config().perf.to_dict().items()) == set()  # all changed
  train_lib.check_workdir_compatible(config, str(tmp_path))  # the same parameters: accepted
  config.model.ffn_dim *= 2
  config.model.attention_dropout = 0.0
  config.train.prng_impl = 'rbg'  # the saved dropout key would not fit
  config.perf.dtype = 'float16'
  with pytest.raises(UserError, match=re.escape("model.attention_dropout (0.1 -> 0.0), model.ffn_dim (256 -> 512), "
                                                "train.prng_impl ('threefry2x32' -> 'rbg'), "
                                                "perf.dtype ('float32' -> 'float16')")):
    train_lib.check_workdir_compatible(config, str(tmp_path))


def test_a_workdir_config_of_an_earlier_version_reads_over_the_defaults(tmp_path):
  """Keys added since a run wrote its config.json take their defaults, what the run did before they
  existed, so its checkpoints still resume and translate; a damaged file, a value of the wrong type
  and keys this version lacks are refused in one line naming the file."""
  config = demo.get_config()
  cli.write_config(config, str(tmp_path))
  path = tmp_path / cli.CONFIG_JSON
  saved = json.loads(path.read_text())
  del saved['perf']['stream_dtype'], saved['perf']['unrolled_encoder_layers']
  path.write_text(json.dumps(saved))
  assert cli.read_config(str(tmp_path)).to_dict() == config.to_dict()  # the demo keeps both at their defaults
  train_lib.check_workdir_compatible(config, str(tmp_path))
  assert trained_run.saved_config(str(tmp_path)).perf.stream_dtype == 'float32'
  refused = [({**saved, 'model': {**saved['model'], 'gone': 1}}, 'has keys this version does not know: model.gone'),
             ({**saved, 'train': {**saved['train'], 'lr': 'fast'}}, "Could not override field 'lr'"),
             ([saved], 'is damaged: not a config of sections of keys')]
  for text, message in [(json.dumps(value), message) for value, message in refused] + [('{"model": {', 'is damaged: ')]:
    path.write_text(text)
    for read in (trained_run.saved_config, functools.partial(train_lib.check_workdir_compatible, config)):
      with pytest.raises(UserError, match=re.escape(message)) as error:
        read(str(tmp_path))
      assert str(error.value).startswith(str(path)) and '\n' not in str(error.value)


def numpy_clinic_radam(grads, params, lr, b1=0.9, b2=0.98, eps=1e-8, wd=0.0):
  """Transformer-Clinic's RAdam in float64: no step while N_sma < 5, decoupled decay first."""
  p, m, v = params.astype(np.float64), np.zeros_like(params, np.float64), np.zeros_like(params, np.float64)
  n_max = 2 / (1 - b2) - 1
  out = []
  for t, (g, rate) in enumerate(zip(grads, lr), start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    n = n_max - 2 * t * b2 ** t / (1 - b2 ** t)
    p = p - wd * rate * p
    if n >= 5:
      step = math.sqrt((1 - b2 ** t) * (n - 4) * (n - 2) * n_max / ((n_max - 4) * (n_max - 2) * n)) / (1 - b1 ** t)
      p = p - rate * step * m / (np.sqrt(v) + eps * math.sqrt(1 - b2 ** t))
    out.append(p.copy())
  return out


def test_radam_matches_the_reference_fork():
  train = train_config(weight_decay=0.01, lr=1e-2, warmup_steps=3)
  tx, schedule = optim.make_optimizer(train)
  rng = np.random.default_rng(0)
  params = rng.normal(size=(5,)).astype(np.float32)
  grads = [rng.normal(size=(5,)) for _ in range(10)]
  state = tx.init(jnp.asarray(params))
  current = jnp.asarray(params)
  ours = []
  for g in grads:
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, current)
    current = optax.apply_updates(current, updates)
    ours.append(np.asarray(current))
  expected = numpy_clinic_radam(grads, params, [float(schedule(t)) for t in range(10)], wd=0.01)
  for t in range(10):
    np.testing.assert_allclose(ours[t], expected[t], rtol=1e-5, atol=1e-7, err_msg=f'update {t + 1}')
  # The first five updates only decay weights: the Adam direction is withheld.
  assert np.allclose(ours[0], params * (1 - 0.01 * float(schedule(0))), rtol=1e-6)


def test_inverse_sqrt_schedule():
  schedule = optim.inverse_sqrt_schedule(1e-3, 4000, 1e-7)
  assert math.isclose(float(schedule(0)), 1e-7, rel_tol=1e-5)
  assert math.isclose(float(schedule(2000)), 1e-7 + 2000 * (1e-3 - 1e-7) / 4000, rel_tol=1e-5)
  assert math.isclose(float(schedule(4000)), 1e-3, rel_tol=1e-5)
  assert math.isclose(float(schedule(16000)), 5e-4, rel_tol=1e-5)


def test_flop_count_matches_hand_count():
  cfg = model_config(10, num_encoder_layers=1, num_decoder_layers=1, d_model=2, ffn_dim=4,
                     num_heads=1)
  # One row, 3 source and 5 target tokens. Forward multiply-adds, counted by hand:
  enc = 3 * (2 * 6 + 2 * 2 + 2 * 4 * 2) + 3 * 3 * 2 * 2  # QKV + out + FFN per token; scores + context
  dec_self = 5 * (2 * 6 + 2 * 2) + 5 * 5 * 2 * 2 / 2  # causal: half the score/context work
  dec_cross = 5 * 2 * 2 + 3 * 2 * 4 + 5 * 2 * 2 + 5 * 3 * 2 * 2  # q, kv of the source, out, scores + context
  dec_ffn = 5 * 2 * 4 * 2
  logits = 5 * 2 * 10
  forward_macs = enc + dec_self + dec_cross + dec_ffn + logits
  assert flops.training_flops(cfg, batch=1, src_len=3, tgt_len=5) == pytest.approx(3 * 2 * forward_macs)
  scores_and_context = 3 * 3 * 2 * 2 + 5 * 5 * 2 * 2 / 2 + 5 * 3 * 2 * 2
  assert flops.attention_flops(cfg, batch=1, src_len=3, tgt_len=5) == pytest.approx(3 * 2 * scores_and_context)


TINY_DEMO = ['--config.model.d_model=32', '--config.model.ffn_dim=64', '--config.model.num_encoder_layers=2',
             '--config.model.num_decoder_layers=2', '--config.data.synthetic_train_size=2000',
             '--config.data.synthetic_eval_size=8', '--config.data.tokens_per_batch=1024',
             '--config.data.max_len=32', '--config.data.vocab_size=300', '--config.train.num_steps=40',
             '--config.train.warmup_steps=10', '--config.train.log_every_steps=10',
             '--config.checkpoint.every_steps=20', '--config.eval.every_steps=0']


# A workdir's config.json as it was written before how the model is computed had a section of its own (perf):
# the demo with TINY_DEMO, every key of today's perf section under model.
CONFIG_BEFORE_PERF = REPO / 'tests' / 'fixtures' / 'config_before_perf.json'


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory) -> tuple:
  """The tiny demo trained (and traced) in a workdir holding CONFIG_BEFORE_PERF: (workdir, the run's output)."""
  workdir = tmp_path_factory.mktemp('demo')
  shutil.copy(CONFIG_BEFORE_PERF, workdir / cli.CONFIG_JSON)
  traced = ['--config.train.trace_first_step=30', '--config.train.trace_steps=2']
  out = subprocess.run([python(), '-m', 'admin_jax.train', '--config=configs/demo.py', f'--workdir={workdir}',
                        *TINY_DEMO, *traced], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, out


def test_demo_training_reduces_loss_and_leaves_its_artifacts(demo_run):
  tmp_path, out = demo_run
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  losses_by_step = [r['loss'] for r in records if 'loss' in r]
  assert len(losses_by_step) == 4 and losses_by_step == sorted(losses_by_step, reverse=True), losses_by_step
  assert losses_by_step[-1] < losses_by_step[0] - 0.4, losses_by_step
  for key in ('step', 'loss', 'nll', 'ppl', 'lr', 'grad_norm', 'tokens_per_sec', 'tflops_per_device', 'mfu'):
    assert key in records[1], key
  assert 'compile_seconds' in records[0] and 'test_bleu' in records[-1]
  assert 'test BLEU' in out.stdout
  omega = json.loads((tmp_path / 'omega.json').read_text())
  assert len(omega['encoder']) == 4 and len(omega['decoder']) == 6 and omega['encoder'][0] == 1.0
  for name in ('config.json', 'profile.ratio.init', 'omega.png', 'curves.png', 'spm.model'):
    assert (tmp_path / name).stat().st_size > 0, name
  assert (tmp_path / 'checkpoints' / '40').is_dir()
  assert list((tmp_path / 'tensorboard').iterdir())
  assert 'traced steps 31..32' in out.stdout
  assert [p.stat().st_size > 0 for p in (tmp_path / 'trace').rglob('*.xplane.pb')] == [True]


def test_a_workdir_written_before_the_perf_section_resumes_and_translates(demo_run, tmp_path):
  """Its config.json (CONFIG_BEFORE_PERF) holds perf.* under model.*: the trained demo's checkpoints, beside
  it, resume with today's names for the same settings, and translate and evaluate."""
  trained, _ = demo_run
  saved = cli.read_config(str(trained))
  assert json.loads(CONFIG_BEFORE_PERF.read_text())['model']['dtype'] == 'float32'  # the fixture's shape
  assert saved.perf.dtype == 'float32' and 'dtype' not in saved.model  # read in today's shape
  runs = {}
  for job in ('train', 'translate', 'evaluate'):
    shutil.copytree(trained, tmp_path / job)
    shutil.copy(CONFIG_BEFORE_PERF, tmp_path / job / cli.CONFIG_JSON)
  (tmp_path / 'source.txt').write_text('a b c\n')
  runs['train'] = spawn([python(), '-m', 'admin_jax.train', '--config=configs/demo.py',
                         f'--workdir={tmp_path / "train"}', *TINY_DEMO, '--config.train.num_steps=42',
                         '--config.perf.scan_layers=true'], subprocess_env())
  runs['translate'] = spawn([python(), '-m', 'admin_jax.translate', f'--workdir={tmp_path / "translate"}',
                             f'--input={tmp_path / "source.txt"}', f'--output={tmp_path / "hypotheses.txt"}'],
                            subprocess_env())
  runs['evaluate'] = spawn([python(), '-m', 'admin_jax.evaluate', f'--workdir={tmp_path / "evaluate"}',
                            '--split=valid'], subprocess_env())
  done = {job: finish(child) for job, child in runs.items()}
  for job, out in done.items():
    assert out.returncode == 0, (job, out.stderr[-3000:])
  assert f'resumed from {tmp_path / "train"}/checkpoints/40' in done['train'].stdout
  assert cli.read_config(str(tmp_path / 'train')).perf.scan_layers  # rewritten in today's shape
  assert len((tmp_path / 'hypotheses.txt').read_text().splitlines()) == 1


def test_float16_demo_loss_falls_and_a_loss_scale_below_the_threshold_stops_in_one_line(tmp_path):
  omegas = tmp_path / 'omega.json'  # a given profile: no profiling pass to compile
  omegas.write_text(json.dumps({'encoder': [1.0, 1.2, 1.3, 1.4], 'decoder': [1.0, 1.2, 1.3, 1.4, 1.5, 1.6]}))
  fp16 = ['--config.perf.dtype=float16', '--config.eval.every_steps=-1', f'--config.admin.profile_path={omegas}']
  falling = spawn([python(), '-m', 'admin_jax.train', '--config=configs/demo.py', f'--workdir={tmp_path / "demo"}',
                   *TINY_DEMO, *fp16], subprocess_env())
  # Adam at lr 1e30 from step 1: the parameters blow up, then every gradient overflows.
  blowing_up = spawn([python(), '-m', 'admin_jax.train', '--config=configs/demo.py', f'--workdir={tmp_path / "up"}',
                      *TINY_DEMO, *fp16, '--config.train.optimizer=adam', '--config.train.lr=1e30',
                      '--config.train.warmup_steps=1', '--config.train.log_every_steps=1',
                      '--config.train.num_steps=100', '--config.train.loss_scale_threshold=16'], subprocess_env())
  out = finish(falling)
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / 'demo' / 'metrics.jsonl').read_text().splitlines()]
  losses_by_step = [r['loss'] for r in records if 'loss' in r]
  assert losses_by_step[-1] < losses_by_step[0] - 0.4, losses_by_step
  assert all(r['loss_scale'] >= 128 for r in records if 'loss' in r)
  out = finish(blowing_up)
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  scales = {r['step']: r['loss_scale'] for r in map(json.loads, (tmp_path / 'up' / 'metrics.jsonl').read_text()
                                                                  .splitlines()) if 'loss' in r}
  first_low = min(s for s, scale in scales.items() if scale < 16)
  assert [scales[s] for s in range(first_low - 3, first_low + 1)] == [64, 32, 16, 8]  # halved at each overflow
  error = out.stderr.splitlines()[-1]  # before it: the progress bar
  assert error.startswith('error: training diverged: the float16 loss scale fell below '
                          f'train.loss_scale_threshold=16.0 at step {first_low} '), error


def test_mistyped_config_key_is_refused_in_one_line(tmp_path):
  out = subprocess.run([python(), '-m', 'admin_jax.train', '--config=configs/demo.py', f'--workdir={tmp_path}',
                        '--config.model.residul=post_ln'], cwd=REPO, env=subprocess_env(), capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and 'model.residul' in lines[0] and 'residual' in lines[0], out.stderr
  assert not (tmp_path / 'config.json').exists()


@pytest.mark.parametrize('override, message', [
    ('--config.model.residual=postln', "model.residual='postln' is not one of"),
    ('--config.perf.stream_dtype=float16', "perf.stream_dtype='float16' is not one of"),
    ('--config.model.d_model=abc', 'd_model'),
    ('--no_such_flag=1', "error: Unknown command line flag 'no_such_flag'\n"),  # quotes kept
    ('--config.admin.profile_tokens=32', 'admin.profile_tokens=32 must be 0 (the whole batch) or between'),
])
def test_bad_config_values_are_refused_in_one_line(tmp_path, override, message):
  out = subprocess.run([python(), '-m', 'admin_jax.train', '--config=configs/demo.py', f'--workdir={tmp_path}',
                        override], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize('override, message', [
    (('model.residul', 'admin'), """unknown config key 'model.residul' (did you mean "model.residual"?)"""),
    (('model', '3'), "unknown config key 'model'"),
    (('model.d_model.x', '3'), "unknown config key 'model.d_model.x'"),
    (('model.num_heads', '2.5'), "config model.num_heads='2.5': expected an integer"),
    (('train.lr', 'fast'), "config train.lr='fast': expected a number"),
    (('perf.scan_layers', 'maybe'), "config perf.scan_layers='maybe': expected true or false"),
    (('model.dtype', 'float32'), """unknown config key 'model.dtype' (did you mean "perf.dtype"?)"""),
])
def test_overrides_are_checked_against_the_config_keys_and_types(override, message):
  with pytest.raises(UserError, match=re.escape(message)):
    cli.check_overrides(demo.get_config(), [override])


def test_overrides_of_the_right_type_pass():
  cli.check_overrides(demo.get_config(), [('model.num_heads', '8'), ('train.lr', '1'), ('train.lr', '3e-4'),
                                          ('perf.scan_layers', 'True'), ('model.residual', 'anything')])


def test_numeric_config_values_outside_their_range_are_refused():
  """Each key of cli's range tables on the demo config: its edge refused by name, the nearest value
  a run can use accepted."""
  cases = ([(key, 0, 1, 'positive') for key in cli.POSITIVE]
           + [(key, -1, 0, 'non-negative') for key in cli.NON_NEGATIVE]
           + [(key, bad, 0, 'in [0, 1)') for key in cli.FRACTIONS for bad in (1, -0.1)])
  for key, bad, good, wanted in cases:
    config = demo.get_config()
    section, name = key.split('.')
    config[section][name] = bad
    with pytest.raises(UserError, match=re.escape(f'config {key} must be {wanted}, got {bad}')):
      cli.validate(config)
    config[section][name] = good
    # A width of 1 is odd and does not split into the demo's 4 heads; one token holds no row of 64.
    if key not in ('model.d_model', 'data.tokens_per_batch'):
      cli.validate(config)


def test_config_files_that_give_no_config_are_refused_in_one_line(tmp_path):
  """Every job reads --config through cli.load_config under cli.run, as this child does: a file that
  is missing, fails to run or returns nothing, and an argument its get_config refuses, each end in
  a line naming the file and the error, without a traceback."""
  broken = {'syntax.py': 'def get_config(:\n', 'import.py': 'import admin_jax_no_such_module\n',
            'no_return.py': 'def get_config():\n  pass\n'}
  for name, text in broken.items():
    (tmp_path / name).write_text(text)
  expected = {  # by --config: what the error line says after the config argument
      'configs/missing.py': "[Errno 2] No such file or directory: 'configs/missing.py'",
      'configs': "[Errno 21] Is a directory: 'configs'",
      f'{tmp_path}/syntax.py': 'SyntaxError: ',
      f'{tmp_path}/import.py': "ModuleNotFoundError: No module named 'admin_jax_no_such_module'",
      f'{tmp_path}/no_return.py': 'get_config() returned NoneType, not an ml_collections.ConfigDict',
      'configs/multi30k.py:bogus': "ValueError: config argument 'bogus': expected a layer count",
      'configs/demo.py:18': "ValueError: this config takes no argument, got '18'",
  }
  job = 'from admin_jax import cli; cli.run(lambda argv: cli.load_config())'
  children = {config: spawn([python(), '-c', job, f'--config={config}'], subprocess_env()) for config in expected}
  for config, message in expected.items():
    out = finish(children[config], timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr
    prefixes = (f'error: --config={config}: ', f'error: flag --config={config}: ')  # flag: raised by absl's parse
    assert lines[-1].startswith(tuple(prefix + message for prefix in prefixes)), out.stderr
    # ml_collections itself warns about a get_config without a return value, on lines of its own.
    assert len(lines) == 1 or config.endswith('no_return.py'), out.stderr


def test_a_micro_batch_of_less_than_one_row_is_refused():
  """Every job's config check, so that train, bench and compile all refuse it the same way (a zero-row
  batch would otherwise split evenly over any mesh)."""
  config = demo.get_config()
  config.data.tokens_per_batch = config.data.max_len - 1
  with pytest.raises(UserError, match=re.escape('config data.tokens_per_batch=63 is less than one row of '
                                                'data.max_len=64 tokens')):
    cli.validate(config)
  config.data.tokens_per_batch = config.data.max_len
  cli.validate(config)


def test_pallas_layer_norm_needs_a_power_of_two_width():
  config = demo.get_config()
  config.perf.layer_norm_impl = 'pallas'
  config.model.update(d_model=384, num_heads=4)
  with pytest.raises(UserError, match="perf.layer_norm_impl='pallas' needs a power-of-two model.d_model"):
    cli.validate(config)
  config.model.d_model = 256
  cli.validate(config)


@pytest.mark.parametrize('key', ['unrolled_encoder_layers', 'unrolled_decoder_layers'])
def test_layers_unrolled_before_a_scan_need_the_scan(key):
  config = demo.get_config()
  config.perf.update(scan_layers=False, **{key: 2})
  with pytest.raises(UserError, match=f'perf.{key} counts the layers run before a scan: it needs '
                                      'perf.scan_layers=True'):
    cli.validate(config)
  config.perf[key] = -1
  with pytest.raises(UserError, match=f'perf.{key} must be non-negative'):
    cli.validate(config)
  config.perf.update(scan_layers=True, **{key: 2})
  cli.validate(config)


@pytest.mark.parametrize('name, arg, layers, residual', [
    ('default', None, (6, 6), 'admin'), ('demo', None, (3, 3), 'admin'),
    ('wmt14_en_de', '18,post_ln', (18, 18), 'post_ln'), ('wmt14_en_de', '12', (12, 12), 'admin'),
    ('wmt14_en_fr', '60', (60, 12), 'admin'), ('iwslt14_de_en', 'pre_ln', (6, 6), 'pre_ln'),
    ('multi30k', '18', (18, 18), 'admin')])
def test_configs_encode_the_recipes(name, arg, layers, residual):
  import importlib

  from admin_jax import cli
  config = importlib.import_module(f'configs.{name}').get_config(arg)
  cli.validate(config)
  assert (config.model.num_encoder_layers, config.model.num_decoder_layers) == layers
  assert config.model.residual == residual
  if name.startswith(('wmt', 'iwslt')):
    assert config.train.optimizer == 'radam' and config.train.warmup_init_lr == 1e-7
    assert config.train.label_smoothing == 0.1 and config.train.clip_norm == 0.0


def test_train_logs_the_fraction_of_time_it_waits_for_data(tmp_path, monkeypatch):
  """data_wait_fraction: near 0 while the pipeline keeps up with a fast step, near 1 once it is
  slowed on purpose (by 0.4 s a batch from the second log window on)."""
  from admin_jax import metrics
  from admin_jax.data import pipeline

  config = demo.get_config()
  config.model.update(residual='pre_ln', d_model=32, ffn_dim=64, num_heads=2, num_encoder_layers=1,
                      num_decoder_layers=1)  # pre_ln: no profiling pass to compile
  config.data.update(synthetic_train_size=500, synthetic_eval_size=8, tokens_per_batch=256, max_len=32,
                     vocab_size=300)
  config.train.update(num_steps=8, log_every_steps=4)
  config.checkpoint.every_steps = 0
  config.eval.every_steps = -1
  real_iterator = pipeline.train_iterator
  fast_batches = 1 + 4  # the first batch, then one fetched after each step of the first window

  class Slowed:
    def __init__(self, iterator):
      self.iterator, self.fetched = iterator, 0

    def __next__(self):
      self.fetched += 1
      if self.fetched > fast_batches:
        time.sleep(0.4)
      return next(self.iterator)

    def __getattr__(self, name):
      return getattr(self.iterator, name)

  monkeypatch.setattr(pipeline, 'train_iterator', lambda *a, **k: Slowed(real_iterator(*a, **k)))
  train_lib.train_and_evaluate(config, str(tmp_path))
  waits = [r['data_wait_fraction'] for r in metrics.read_metrics(str(tmp_path)) if 'data_wait_fraction' in r]
  assert len(waits) == 2 and waits[0] < 0.2 and waits[1] > 0.8, waits


# The authors' values, per paper recipe (docs admin_spec.md section 5; Transformer-Clinic nmt-experiments scripts):
# decode length: fairseq-generate's defaults max_len_a=0, max_len_b=200 (no --max-len-* in eval_*.sh);
# profile tokens: --max-tokens of the single-GPU profiling run; stopping: --max-update or --max-epoch;
# averaging: the last 10 epoch checkpoints (IWSLT epochs 81-90, En-De 91-100, En-Fr 41-50).
PAPER_RECIPES = [
    # config, arg, profile tokens, train.num_steps (None: no update limit), train.num_epochs (0: none)
    ('iwslt14_de_en', None, 4096, 100_000, 0),
    ('wmt14_en_de', '6', 8192, 500_000, 0),
    ('wmt14_en_de', '18,pre_ln', 8192, 500_000, 0),
    ('wmt14_en_fr', '6', 8000, None, 50),
    ('wmt14_en_fr', '60', 5000, None, 50),
]


@pytest.mark.parametrize('name, arg, profile_tokens, num_steps, num_epochs', PAPER_RECIPES)
def test_paper_recipes_decode_profile_stop_and_average_as_the_authors(name, arg, profile_tokens, num_steps,
                                                                       num_epochs):
  import importlib

  config = importlib.import_module(f'configs.{name}').get_config(arg)
  cli.validate(config)
  assert (config.eval.max_len_a, config.eval.max_len_b) == (0, 200)
  assert config.data.max_len >= 200 + 1  # the output cap (EOS included) does not cut fairseq's 200 tokens
  assert config.admin.profile_tokens == profile_tokens
  assert config.train.num_epochs == num_epochs
  assert config.train.num_steps == num_steps if num_steps else config.train.num_steps >= 10 ** 9
  assert config.checkpoint.every_epochs == 1 and config.checkpoint.keep >= 10  # avg:10 finds 10 epochs
