"""Checkpointing and failure handling: real training runs in subprocesses, real signals, real damaged files.

Every run trains the same tiny Admin model on the synthetic corpus for 12 steps, checkpointing
every 3 and logging every step, so per-step losses can be compared. The omegas come from a fixed
profile (admin.profile_path) and compiled programs from a shared JAX compilation cache, which
keeps each run to seconds; a resumed run loads the very executable the uninterrupted run used.
The runs start together in two lanes (`scenarios`), and each test checks the outcome of its own.
"""

import base64
from collections.abc import Callable
from concurrent import futures
import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from admin_jax import checkpoint as checkpoint_lib
from admin_jax import optim
from admin_jax import trained_run
from admin_jax import sharding
from admin_jax import train_step as train_step_lib
from admin_jax.data import pipeline
from admin_jax.data.tokenizer import Tokenizer
from admin_jax.errors import UserError
from conftest import REPO
from conftest import model_config
from conftest import packed_batch
from conftest import python
from conftest import subprocess_env

NUM_STEPS = 12
EVERY = 3
TINY = (
    '--config=configs/demo.py', f'--config.train.num_steps={NUM_STEPS}', '--config.train.log_every_steps=1',
    f'--config.checkpoint.every_steps={EVERY}', '--config.checkpoint.keep=3', '--config.eval.every_steps=0',
    '--config.eval.beam_size=1', '--config.model.d_model=16', '--config.model.ffn_dim=32',
    '--config.model.num_encoder_layers=1', '--config.model.num_decoder_layers=1', '--config.data.vocab_size=200',
    '--config.data.max_len=32', '--config.data.tokens_per_batch=256', '--config.data.synthetic_train_size=500',
    '--config.data.synthetic_eval_size=4', '--config.data.eval_batch_size=4')
OMEGAS = {'encoder': [1.0, 1.1], 'decoder': [1.0, 1.1, 1.2]}  # one layer each: 2 and 3 sublayers
# RAdam's first real update is at step 6, then the loss is NaN. Without dropout the program compiles twice as fast.
DIVERGING = ('--config.train.lr=1e30', '--config.train.num_steps=1000', '--config.model.dropout=0.0',
             '--config.model.attention_dropout=0.0', '--config.model.activation_dropout=0.0')
TIMEOUT = 300


@dataclasses.dataclass
class Run:
  returncode: int
  stdout: str
  stderr: str


class Job:
  """A training run in a child process, its output in files (a pipe could fill up and stall it)."""

  def __init__(self, env: dict[str, str], workdir: pathlib.Path, *overrides: str):
    self._out, self._err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')
    command = [python(), '-m', 'admin_jax.train', f'--workdir={workdir}', *TINY, *overrides]
    self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self._out, stderr=self._err)

  def wait_until(self, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
      assert self.process.poll() is None, f'run ended before {what}:\n{self.finish().stderr[-3000:]}'
      if time.monotonic() > deadline:
        self.process.kill()
        pytest.fail(f'no {what} after {TIMEOUT}s')
      time.sleep(0.05)

  def finish(self) -> Run:
    try:
      self.process.wait(TIMEOUT)
    finally:
      self.process.kill()  # a no-op unless the wait timed out
    with self._out, self._err:
      self._out.seek(0)
      self._err.seek(0)
      return Run(self.process.returncode, self._out.read(), self._err.read())


def train(env: dict[str, str], workdir: pathlib.Path, *overrides: str) -> Run:
  return Job(env, workdir, *overrides).finish()


def losses(workdir: pathlib.Path) -> dict[int, float]:
  """The loss of every step, from its last record: a resumed run logs the killed run's last steps again.

  Only whole lines count: a running job may be halfway through writing the last one.
  """
  lines = (workdir / 'metrics.jsonl').read_text().split('\n')[:-1]
  return {r['step']: r['loss'] for r in map(json.loads, lines) if 'loss' in r}


def logged_step(workdir: pathlib.Path) -> int:
  """The last step a running job has logged, 0 before its first."""
  return max(losses(workdir), default=0) if (workdir / 'metrics.jsonl').exists() else 0


def restore_state(workdir: pathlib.Path, step: int):
  """The saved train state of `step` as the checkpoint lays it out (no target needed on one device)."""
  manager = ocp.CheckpointManager(workdir / 'checkpoints', options=ocp.CheckpointManagerOptions(read_only=True))
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state


def resumed_step(run: Run, workdir: pathlib.Path) -> int:
  prefix = f'resumed from {workdir}/checkpoints/'
  lines = [line for line in run.stdout.splitlines() if line.startswith(prefix)]
  assert len(lines) == 1, run.stdout
  return int(lines[0][len(prefix):])


@dataclasses.dataclass
class Scenario:
  workdir: pathlib.Path
  runs: list[Run]


def reference_run(env: dict[str, str], profile: str, workdir: pathlib.Path) -> Scenario:
  """Uninterrupted."""
  return Scenario(workdir, [train(env, workdir, profile)])


def killed_run(env: dict[str, str], profile: str, workdir: pathlib.Path) -> Scenario:
  """SIGKILL as soon as checkpoint 6 is complete, then the same command again."""
  job = Job(env, workdir, profile)
  job.wait_until(lambda: (workdir / 'checkpoints' / '6').is_dir(), 'checkpoint 6')
  job.process.send_signal(signal.SIGKILL)
  return Scenario(workdir, [job.finish(), train(env, workdir, profile)])


def damaged_run(env: dict[str, str], profile: str, workdir: pathlib.Path, reference: pathlib.Path) -> Scenario:
  """A copy of the reference workdir with checkpoint 12's largest array file cut in half, run again."""
  shutil.copytree(reference, workdir)
  data = workdir / 'checkpoints' / '12' / 'state' / 'ocdbt.process_0' / 'd'
  damaged = max(data.iterdir(), key=lambda p: p.stat().st_size)
  os.truncate(damaged, damaged.stat().st_size // 2)
  return Scenario(workdir, [train(env, workdir, profile)])


def other_mesh_run(env: dict[str, str], profile: str, workdir: pathlib.Path, reference: pathlib.Path) -> Scenario:
  """The reference workdir with checkpoint 6 only, resumed on a (data 2, fsdp 2, tensor 2) mesh of 8 devices.

  Stopped by SIGTERM once step 9 is logged, which spares compiling the final evaluation for this mesh.
  """
  shutil.copytree(reference, workdir, ignore=lambda folder, names: [
      n for n in names if (n.isdigit() and n != '6') or n == 'metrics.jsonl'])
  env = dict(env, XLA_FLAGS=subprocess_env(devices=8)['XLA_FLAGS'])
  job = Job(env, workdir, profile, '--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2',
            '--config.train.num_steps=1000')
  job.wait_until(lambda: logged_step(workdir) >= 9, 'step 9')
  job.process.send_signal(signal.SIGTERM)
  return Scenario(workdir, [job.finish()])


def diverging_runs(env: dict[str, str], profile: str, workdir: pathlib.Path) -> Scenario:
  """A diverging learning rate: SIGINT during setup; resumed, SIGTERM after step 3; resumed, diverges."""
  tolerant = (*DIVERGING, '--config.train.max_bad_steps=1000')
  early = Job(env, workdir, profile, *tolerant)
  early.wait_until(lambda: (workdir / 'config.json').exists(), 'config.json')  # written once the handler is set
  early.process.send_signal(signal.SIGINT)
  runs = [early.finish()]
  late = Job(env, workdir, profile, *tolerant)
  late.wait_until(lambda: logged_step(workdir) >= 3, 'step 3')
  late.process.send_signal(signal.SIGTERM)
  runs.append(late.finish())
  runs.append(train(env, workdir, profile, *DIVERGING, '--config.train.max_bad_steps=2'))
  return Scenario(workdir, runs)


def epoch_runs(env: dict[str, str], profile: str, workdir: pathlib.Path) -> Scenario:
  """Two epochs, saving per epoch: stopped at step 4 (in epoch 1), resumed; no evaluation."""
  epochs = ('--config.train.num_epochs=2', '--config.checkpoint.every_epochs=1', '--config.eval.every_steps=-1')
  return Scenario(workdir, [train(env, workdir, profile, *epochs, '--config.train.num_steps=4'),
                            train(env, workdir, profile, *epochs, '--config.train.num_steps=1000')])


@pytest.fixture(scope='module')
def scenarios(tmp_path_factory) -> dict[str, futures.Future]:
  """Every scenario's runs, started at once in two lanes (one per core); each test waits for its own.

  Lane 1: the reference run, then the runs that resume like it (killed, damaged). Lane 2: the
  diverging runs (their learning rate makes a program of their own to compile), then the
  other-mesh run, which starts from the reference run's checkpoint 6.
  """
  root = tmp_path_factory.mktemp('runs')
  env = dict(subprocess_env(), JAX_COMPILATION_CACHE_DIR=str(root / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  (root / 'omega.json').write_text(json.dumps(OMEGAS))
  profile = f'--config.admin.profile_path={root / "omega.json"}'
  with futures.ThreadPoolExecutor(1) as lane1, futures.ThreadPoolExecutor(1) as lane2:
    reference = lane1.submit(reference_run, env, profile, root / 'reference')
    reference_dir = lambda: reference.result().workdir
    started = {
        'reference': reference,
        'killed': lane1.submit(killed_run, env, profile, root / 'killed'),
        'damaged': lane1.submit(lambda: damaged_run(env, profile, root / 'damaged', reference_dir())),
        'epochs': lane1.submit(epoch_runs, env, profile, root / 'epochs'),
        'diverging': lane2.submit(diverging_runs, env, profile, root / 'diverging'),
        'other_mesh': lane2.submit(lambda: other_mesh_run(env, profile, root / 'other_mesh', reference_dir())),
    }
    yield started


@pytest.fixture(scope='module')
def reference(scenarios) -> pathlib.Path:
  scenario = scenarios['reference'].result()
  run, = scenario.runs
  assert run.returncode == 0, run.stderr[-3000:]
  assert sorted(losses(scenario.workdir)) == list(range(1, NUM_STEPS + 1))
  return scenario.workdir


def test_checkpoint_holds_state_data_position_and_tokenizer(reference):
  checkpoints = checkpoint_lib.Checkpoints(str(reference), keep=3, every_steps=EVERY)
  assert checkpoints.steps() == [6, 9, 12]  # keep=3 latest; no validation BLEU, so no best to add
  step = 12
  state = restore_state(reference, step)
  assert int(state['step']) == step and int(state['skipped_steps']) == 0
  omega = state['params']['encoder']['layers']['self_attention_residual']['omega']['value']
  np.testing.assert_allclose(omega, OMEGAS['encoder'][0], atol=1e-2)  # omega is a parameter, trained from there
  meta = checkpoints.restore_meta(step)
  assert meta['config']['model']['d_model'] == 16
  assert base64.b64decode(meta['spm_model']) == (reference / 'spm.model').read_bytes()
  position = checkpoints.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
  assert position and json.dumps(position)  # the data iterator's, as JSON


def test_sigkill_after_a_checkpoint_then_resume_matches_bitwise(scenarios, reference):
  scenario = scenarios['killed'].result()
  killed, resumed = scenario.runs
  assert killed.returncode == -signal.SIGKILL
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 6 <= resumed_step(resumed, scenario.workdir) < NUM_STEPS
  assert losses(scenario.workdir) == losses(reference)


def test_epochs_stop_exactly_after_a_resume_and_avg_takes_the_last_epochs(scenarios):
  scenario = scenarios['epochs'].result()
  workdir = scenario.workdir
  for run in scenario.runs:
    assert run.returncode == 0, run.stderr[-3000:]
  config = trained_run.saved_config(str(workdir))
  batches = pipeline.train_iterator(config, Tokenizer.load(workdir / 'spm.model'), seed=config.train.seed,
                                    process_index=0, process_count=1)
  first, second = (len(list(batches.one_epoch())) for _ in range(2))  # the epochs' sizes, counted apart
  assert 4 < first  # so the resume was in the middle of epoch 1
  assert resumed_step(scenario.runs[1], workdir) == 4
  assert sorted(losses(workdir)) == list(range(1, first + second + 1))
  checkpoints = checkpoint_lib.Checkpoints(str(workdir), keep=3, every_steps=EVERY)
  assert checkpoints.epoch_steps() == {first: 1, first + second: 2}
  assert len(checkpoints.steps()) > 3  # the latest 3 and the epochs' both kept
  assert trained_run.averaged_steps(checkpoints, 2) == [first, first + second]
  assert trained_run.averaged_steps(checkpoints, 1) == [first + second]
  with pytest.raises(UserError, match=r'avg:3 needs 3 epoch checkpoints, .* has 2: epochs \[1, 2\]'):
    trained_run.averaged_steps(checkpoints, 3)


def test_damaged_latest_checkpoint_is_reported_set_aside_and_the_previous_used(scenarios, reference):
  scenario = scenarios['damaged'].result()
  run, = scenario.runs
  checkpoints = scenario.workdir / 'checkpoints'
  assert run.returncode == 0, run.stderr[-3000:]
  warnings = [line for line in run.stderr.splitlines() if line.startswith('warning:')]
  assert len(warnings) == 1 and f'{checkpoints}/12 is damaged' in warnings[0], run.stderr[-3000:]
  assert resumed_step(run, scenario.workdir) == 9
  damaged = max((reference / 'checkpoints' / '12' / 'state' / 'ocdbt.process_0' / 'd').iterdir(),
                key=lambda p: p.stat().st_size)
  aside = checkpoints / '12.damaged' / damaged.relative_to(reference / 'checkpoints' / '12')
  assert aside.stat().st_size == damaged.stat().st_size // 2  # moved, not deleted or rewritten
  assert sorted(p.name for p in checkpoints.iterdir()) == ['12', '12.damaged', '6', '9']
  assert losses(scenario.workdir) == losses(reference)


def test_incompatible_workdir_is_refused_naming_the_keys(reference):
  before = (reference / 'config.json').read_text()
  run = train(subprocess_env(), reference, '--config.model.d_model=32', '--config.model.num_heads=8')
  assert run.returncode == 2
  assert run.stderr.count('\n') == 1 and run.stderr.startswith('error: workdir'), run.stderr
  assert 'model.d_model (16 -> 32)' in run.stderr and 'model.num_heads (4 -> 8)' in run.stderr
  assert (reference / 'config.json').read_text() == before


def test_resumes_on_another_mesh_with_the_same_losses(scenarios, reference):
  scenario = scenarios['other_mesh'].result()
  run, = scenario.runs
  assert run.returncode == 0, run.stderr[-3000:]
  assert resumed_step(run, scenario.workdir) == 6
  expected = losses(reference)
  got = {step: loss for step, loss in losses(scenario.workdir).items() if step in expected}
  assert sorted(got)[:3] == [7, 8, 9]
  np.testing.assert_allclose([got[s] for s in got], [expected[s] for s in got], rtol=1e-5)


@pytest.fixture(scope='module')
def diverging(scenarios) -> Scenario:
  return scenarios['diverging'].result()


def test_sigint_during_setup_stops_after_one_step_and_saves(diverging):
  run = diverging.runs[0]
  assert run.returncode == 0, run.stderr[-3000:]
  assert f'stopped by SIGINT at step 1; saved {diverging.workdir}/checkpoints/1' in run.stdout
  assert 'compiled train step' in run.stdout  # setup went on to the end: the signal only set a flag


def test_sigterm_finishes_the_step_saves_and_exits_zero(diverging):
  run = diverging.runs[1]
  assert run.returncode == 0, run.stderr[-3000:]
  assert resumed_step(run, diverging.workdir) == 1
  step = int(run.stdout.split('stopped by SIGTERM at step ')[1].split(';')[0])
  assert step >= 3 and f'saved {diverging.workdir}/checkpoints/{step}' in run.stdout
  assert int(restore_state(diverging.workdir, step)['step']) == step


def test_divergence_stops_naming_the_step_and_keeps_the_last_checkpoint(diverging):
  run = diverging.runs[2]
  assert run.returncode == 2, run.stderr[-3000:]
  records = losses(diverging.workdir)
  last = max(records)
  assert not math.isfinite(records[last]) and not math.isfinite(records[last - 1])
  assert 'Traceback' not in run.stderr, run.stderr[-3000:]
  error = run.stderr.splitlines()[-1]  # before it: the progress bar
  assert error.startswith('error: training diverged') and f'up to step {last};' in error, run.stderr[-3000:]
  kept = checkpoint_lib.Checkpoints(str(diverging.workdir), keep=3, every_steps=EVERY).latest_step()
  assert error.endswith(f'last good checkpoint: {kept}')
  state = restore_state(diverging.workdir, kept)
  assert int(state['step']) == kept
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state['params']))


TRAIN = ml_collections.ConfigDict(dict(
    optimizer='adam', lr=1e-3, warmup_steps=1, warmup_init_lr=1e-3, b1=0.9, b2=0.98, eps=1e-8,
    weight_decay=0.0, clip_norm=0.0, label_smoothing=0.1, loss_chunk_tokens=0))
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def test_non_finite_step_leaves_params_and_optimizer_unchanged_and_is_counted(np_rng):
  model_cfg = model_config(40, num_encoder_layers=1, num_decoder_layers=1, d_model=16, ffn_dim=32,
                           num_heads=4, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
  tx, schedule = optim.make_optimizer(TRAIN)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  setup, good = train_step_lib.create_train_state(model_cfg, tx, schedule, mesh, seed=0)
  batch = {k: v[None] for k, v in packed_batch(np_rng, 2, 16, 40, [[7, 9], [16]]).items()}
  step = jax.jit(train_step_lib.make_train_step(setup, TRAIN)).lower(good, batch).compile(FAST_COMPILE)
  leaves, treedef = jax.tree.flatten(good.params)
  state = dataclasses.replace(good, params=treedef.unflatten([leaves[0] * np.nan, *leaves[1:]]))

  for count in (1, 2):
    new, metrics = step(state, batch)
    assert not bool(metrics['finite'])
    before, after = jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((new.params, new.opt_state))
    for old, kept in zip(before, after):
      np.testing.assert_array_equal(kept, old)  # NaN == NaN here
    assert (int(new.step), int(new.bad_steps), int(new.skipped_steps)) == (count, count, count)
    state = new

  new, metrics = step(dataclasses.replace(state, params=good.params, opt_state=good.opt_state), batch)
  assert bool(metrics['finite'])
  assert (int(new.step), int(new.bad_steps), int(new.skipped_steps)) == (3, 0, 2)
  assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(good.params)))


def test_float16_overflow_halves_the_loss_scale_and_skips_the_step_and_good_steps_double_it(np_rng):
  model_cfg = model_config(40, num_encoder_layers=1, num_decoder_layers=1, d_model=16, ffn_dim=32,
                           num_heads=4, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                           dtype='float16')
  train = ml_collections.ConfigDict({**TRAIN.to_dict(), 'loss_scale_window': 2})
  tx, schedule = optim.make_optimizer(train)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  setup, good = train_step_lib.create_train_state(model_cfg, tx, schedule, mesh, seed=0)
  assert (float(good.loss_scale.scale), int(good.loss_scale.good_steps)) == (train_step_lib.LOSS_SCALE_INIT, 0)
  batch = {k: v[None] for k, v in packed_batch(np_rng, 2, 16, 40, [[7, 9], [16]]).items()}
  step = jax.jit(train_step_lib.make_train_step(setup, train)).lower(good, batch).compile(FAST_COMPILE)
  scaled = lambda state, scale, good_steps=0: dataclasses.replace(state, loss_scale=train_step_lib.LossScale(
      np.float32(scale), np.int32(good_steps)))

  # 2**100 times the loss overflows float16 in the backward pass: an injected overflow.
  new, metrics = step(scaled(good, 2.0 ** 100, good_steps=1), batch)
  assert not bool(metrics['finite'])
  for old, kept in zip(jax.tree.leaves((good.params, good.opt_state)), jax.tree.leaves((new.params, new.opt_state))):
    np.testing.assert_array_equal(kept, old)
  assert (int(new.step), int(new.bad_steps), int(new.skipped_steps)) == (1, 0, 1)  # skipped, not a bad step
  assert (float(new.loss_scale.scale), int(new.loss_scale.good_steps)) == (2.0 ** 99, 0)

  state, norms = scaled(new, 128.0), []
  for expected in (128.0, 256.0, 256.0):  # the window (2 finite steps) doubles the scale, then counts again
    state, metrics = step(state, batch)
    assert bool(metrics['finite']) and float(state.loss_scale.scale) == expected == float(metrics['loss_scale'])
    norms.append(float(metrics['grad_norm']))
  _, unscaled = step(scaled(new, 1.0), batch)  # the gradient is unscaled: the same with a scale of 1
  np.testing.assert_allclose(norms[0], float(unscaled['grad_norm']), rtol=1e-6)


def test_keeps_the_latest_and_the_best_by_bleu_across_restarts(tmp_path):
  state = {'w': np.arange(3, dtype=np.float32)}
  for steps in (range(1, 6), range(6, 10)):  # a new manager per range: a resumed run must still know the best
    checkpoints = checkpoint_lib.Checkpoints(str(tmp_path), keep=2, every_steps=2)
    for step in steps:
      bleu = {2: 30.0, 4: 10.0, 6: 20.0}.get(step)
      checkpoints.save(step, state, {'position': step}, {'note': 'x'},
                       metrics={checkpoint_lib.BLEU_METRIC: bleu} if bleu else None, force=step == 9)
    checkpoints.wait()
  assert checkpoints.steps() == [2, 8, 9] and checkpoints.best_step() == 2
  restored, data, meta = checkpoints.restore(2, {'w': jax.ShapeDtypeStruct((3,), np.float32)})
  np.testing.assert_array_equal(restored['w'], state['w'])
  assert data == {'position': 2} and meta == {'note': 'x'}
