"""Training: `python -m admin_jax.train --config=configs/demo.py --workdir=DIR`.

Read top to bottom: set up (tokenizer, mesh, sharded state), resume or profile omega, compile
the step ahead of time, then loop: step, log, evaluate, checkpoint, stop when told to.
"""

import signal
import time
from typing import NamedTuple

from etils import epath
import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from admin_jax import checkpoint as checkpoint_lib
from admin_jax import cli
from admin_jax import distributed
from admin_jax import corpus_eval
from admin_jax import flops
from admin_jax import metrics as metrics_lib
from admin_jax import optim
from admin_jax import omega_init
from admin_jax import sharding
from admin_jax import targets
from admin_jax import tracing
from admin_jax import train_step as train_step_lib
from admin_jax.data import pipeline
from admin_jax.data import tokenizer as tokenizer_lib
from admin_jax.errors import UserError
from admin_jax.model import TransformerConfig


class StopSignal:
  """Turns SIGTERM/SIGINT (preemption) into a request to save and exit after the current step."""

  def __init__(self):
    self.received: str | None = None
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name


# Keys besides model.* that a resume must keep: the vocabulary, the languages and the PRNG of the saved dropout key.
_FIXED_KEYS = (('data', 'vocab_size'), ('data', 'src_lang'), ('data', 'tgt_lang'), ('train', 'prng_impl'))


def check_workdir_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir whose saved config describes a different model, naming the keys.

  model.* is what the checkpoints hold and train, so a resume keeps it; perf.* is how it is computed,
  which a resume may change, save a switch into or out of float16 (whose state holds a loss scale).
  """
  saved = cli.read_config(workdir)
  if saved is None:
    return
  keys = [('model', key) for key in config.model] + list(_FIXED_KEYS)
  differing = [f'{section}.{key} ({saved[section][key]!r} -> {config[section][key]!r})'
               for section, key in keys if saved[section][key] != config[section][key]]
  if (saved.perf.dtype == 'float16') != (config.perf.dtype == 'float16'):  # the state holds a loss scale or not
    differing.append(f'perf.dtype ({saved.perf.dtype!r} -> {config.perf.dtype!r})')
  if differing:
    raise UserError(f'workdir {workdir} was created with a different config: {", ".join(differing)}; '
                    'use a new --workdir')


def all_data_states(local: dict) -> dict:
  """Every process's data-shard positions in one iterator state.

  Orbax writes JSON items from process 0 only, and a resume on another number of processes takes
  its shards from the whole set (TrainIterator.set_state picks its own).
  """
  return {'shards': [shard for state in distributed.allgather_json(local) for shard in state['shards']]}


def stack_micro_batches(iterator, count: int) -> dict[str, np.ndarray]:
  batches = [next(iterator) for _ in range(count)]
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def initial_omegas(config, workdir, setup, state, train_iter, mesh) -> train_step_lib.TrainState:
  """Admin: reuse a given or existing profile, else profile the first training batch."""
  model = config.model
  existing = omega_init.find_existing_profile(workdir, config.admin.profile_path)
  if existing:
    omegas = omega_init.read_profile(existing, model.num_encoder_layers, model.num_decoder_layers)
    print(f'omega from {existing} (not profiling again)')
  else:
    position = train_iter.get_state()
    first = next(train_iter)
    train_iter.set_state(position)  # step 0 trains on the same batch
    start = time.perf_counter()
    batch, rows = omega_init.profile_batch(first, config.admin.profile_tokens, mesh)
    omegas = omega_init.profile_omegas(setup, state, batch, mask_padding=config.admin.mask_padding)
    if distributed.is_lead():
      omega_init.write_profile(workdir, omegas, omega_init.batch_statistics(rows))
    print(f'profiled omega in {time.perf_counter() - start:.1f}s: encoder '
          f'{omegas["encoder"][0]:.3f}..{omegas["encoder"][-1]:.3f}, decoder '
          f'{omegas["decoder"][0]:.3f}..{omegas["decoder"][-1]:.3f} -> {epath.Path(workdir) / omega_init.OMEGA_JSON}')
  return omega_init.with_omegas(setup, state, omegas)


def completed_epochs(train_iter: pipeline.TrainIterator) -> int:
  """Epochs that every data shard, of every process, has finished, counted by the input pipeline.

  Read after fetching a step's batches: it grows at the step after an epoch's last batch, the same
  way whether or not the run was resumed, since the iterator's position is checkpointed. On several
  processes that is a small all-gather per step, which waits for the step before: only runs that
  count epochs (train.num_epochs, checkpoint.every_epochs) read it.
  """
  return min(distributed.allgather_json(train_iter.epoch))


def compile_step(step_fn, state, micro_batches, mesh):
  """Compiles the train step before step 0 and logs how long it took and how much memory it needs."""
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step_fn.lower(state, micro_batches).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  footprint = {}
  if memory is not None:
    for field in ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
                  'generated_code_size_in_bytes'):
      footprint[field.replace('_size_in_bytes', '_mib')] = round(getattr(memory, field, 0) / 2 ** 20, 1)
  print(f'compiled train step in {seconds:.1f}s; memory (MiB): {footprint}')
  return compiled, {'compile_seconds': seconds, **{f'memory_{k}': v for k, v in footprint.items()}}


class Run(NamedTuple):
  """What a training-side job builds before its first step."""
  tokenizer: tokenizer_lib.Tokenizer
  mesh: jax.sharding.Mesh
  setup: train_step_lib.Setup
  state: train_step_lib.TrainState
  train_iter: pipeline.TrainIterator


def start_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Checks and records the config, then the tokenizer, mesh, sharded initial state and data."""
  if distributed.is_lead():
    check_workdir_compatible(config, workdir)
    cli.write_config(config, workdir)
  tokenizer = tokenizer_lib.load_or_train_tokenizer(config, workdir)
  model_cfg = TransformerConfig.from_config(config, tokenizer.vocab_size)
  mesh = sharding.make_mesh(config.mesh)
  targets.refuse_gpu_kernels(config.perf, jax.devices()[0].platform, jax.devices()[0].device_kind)
  tx, schedule = optim.make_optimizer(config.train)
  setup, state = train_step_lib.create_train_state(model_cfg, tx, schedule, mesh, config.train.seed,
                                                   config.train.prng_impl)
  train_iter = pipeline.train_iterator(config, tokenizer, seed=config.train.seed,
                                       process_index=jax.process_index(), process_count=jax.process_count())
  return Run(tokenizer, mesh, setup, state, train_iter)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  stop = StopSignal()  # first thing: a signal during setup, profiling or compilation stops after one step
  lead = distributed.is_lead()
  tokenizer, mesh, setup, state, train_iter = start_run(config, workdir)
  model_cfg = setup.model_cfg
  checkpoints = checkpoint_lib.Checkpoints(workdir, keep=config.checkpoint.keep,
                                           every_steps=config.checkpoint.every_steps)
  meta = checkpoint_lib.run_meta(config, tokenizer)

  abstract = checkpoint_lib.abstract_like(jax.eval_shape(lambda: state), setup.state_shardings)
  restored = checkpoints.restore_latest_intact(abstract)
  if restored:
    step, state, data_state, saved_meta = restored
    checkpoint_lib.check_same_tokenizer(saved_meta, tokenizer, step)
    train_iter.set_state(data_state)
    print(f'resumed from {checkpoints.directory}/{step}')
  elif model_cfg.residual == 'admin':
    state = initial_omegas(config, workdir, setup, state, train_iter, mesh)

  accum = config.train.grad_accum
  first = stack_micro_batches(train_iter, accum)
  micro_batches = sharding.global_batch(first, mesh, micro_batched=True)
  micro_sharding = jax.tree.map(lambda a: a.sharding, micro_batches)
  step_fn, compile_info = compile_step(train_step_lib.jit_train_step(setup, config.train, micro_sharding),
                                       state, micro_batches, mesh)
  rows, length = micro_batches['targets'].shape[1:]
  step_flops = accum * flops.training_flops(model_cfg, rows, length, length)
  peak, peak_source = flops.device_peak_tflops()
  writer = metrics_lib.MetricsWriter(workdir, enabled=lead)
  writer.write(int(state.step), {**compile_info, 'peak_tflops': peak, 'peak_source': peak_source})

  evaluator = corpus_eval.Evaluator(config, tokenizer, setup, mesh)
  start_step = int(state.step)
  num_steps = config.train.num_steps
  window = []
  window_start = time.perf_counter()
  data_wait = 0.0  # seconds of the window spent waiting for the next batch
  progress = tqdm(total=num_steps, initial=start_step, disable=not lead, unit='step', dynamic_ncols=True)
  tracer = tracing.StepTracer(config.train, workdir, enabled=lead)
  step = start_step
  preempted = False
  num_epochs, every_epochs = config.train.num_epochs, config.checkpoint.every_epochs
  counts_epochs = bool(num_epochs or every_epochs)  # else no per-step agreement between processes
  epochs = completed_epochs(train_iter) if counts_epochs else 0
  while step < num_steps and not (num_epochs and epochs >= num_epochs):
    with jax.set_mesh(mesh), tracer.step(step + 1):
      state, step_metrics = step_fn(state, micro_batches)
    step += 1
    tracer.stepped(step, step_metrics)
    window.append(step_metrics)
    progress.update(1)
    data_state = train_iter.get_state()  # where the batches of step + 1 start: a resume must fetch them again
    ended_epoch = 0  # the epoch this step ended, counted from 1; 0: none
    if step < num_steps:
      fetch_start = time.perf_counter()
      micro_batches = sharding.global_batch(stack_micro_batches(train_iter, accum), mesh, micro_batched=True)
      data_wait += time.perf_counter() - fetch_start
      if counts_epochs and (now := completed_epochs(train_iter)) > epochs:
        ended_epoch = epochs = now
    finishing = step == num_steps or bool(num_epochs and epochs >= num_epochs)

    if step % config.train.log_every_steps == 0 or finishing:
      fetched = jax.device_get(window)
      seconds = time.perf_counter() - window_start
      tokens = sum(float(m['tokens']) for m in fetched)
      weights = [float(m['tokens']) for m in fetched]
      loss = float(np.average([m['loss'] for m in fetched], weights=weights))
      nll = float(np.average([m['nll'] for m in fetched], weights=weights))
      tflops = len(fetched) * step_flops / seconds / 1e12 / jax.device_count()
      record = {'loss': loss, 'nll': nll, 'ppl': float(np.exp(nll)), 'lr': float(fetched[-1]['lr']),
                'grad_norm': float(fetched[-1]['grad_norm']), 'tokens_per_sec': tokens / seconds,
                'tflops_per_device': tflops, 'mfu': tflops / peak,
                'skipped_steps': int(state.skipped_steps)}
      record['data_wait_fraction'] = data_wait / seconds  # near 1: the input pipeline, not the step, sets the pace
      if state.loss_scale is not None:
        record['loss_scale'] = float(fetched[-1]['loss_scale'])
      writer.write(step, record)
      progress.set_postfix(loss=f'{loss:.3f}', tok_s=f'{tokens / seconds:,.0f}')
      window, window_start = [], time.perf_counter()
      data_wait = 0.0
      threshold = config.train.loss_scale_threshold
      low = [i for i, m in enumerate(fetched) if 'loss_scale' in m and float(m['loss_scale']) < threshold]
      diverged = None
      if not all(bool(m['finite']) for m in fetched) and int(state.bad_steps) >= config.train.max_bad_steps:
        diverged = f'{int(state.bad_steps)} consecutive non-finite steps up to step {step}'
      elif low:
        diverged = (f'the float16 loss scale fell below train.loss_scale_threshold={threshold} at step '
                    f'{step - len(fetched) + 1 + low[0]} (gradients overflow at every scale)')
      if diverged:
        progress.close()  # else the error would share the progress bar's line
        checkpoints.wait()
        last = checkpoints.latest_step()
        raise UserError(f'training diverged: {diverged}; last good checkpoint: {last if last is not None else "none"}')

    eval_metrics = None
    if config.eval.every_steps > 0 and step % config.eval.every_steps == 0:
      eval_metrics = evaluator.validate(state.params)
      writer.write(step, eval_metrics)
      tqdm.write(f'step {step}: ' + ', '.join(f'{k} {v:.3f}' for k, v in eval_metrics.items()))
    if jax.process_count() == 1 or step % config.train.log_every_steps == 0 or checkpoints.due(step):
      # Agreeing across processes is a blocking collective: on pods only at log and save steps.
      preempted = distributed.any_process(stop.received is not None)
    epoch_save = bool(every_epochs and ended_epoch and ended_epoch % every_epochs == 0)
    force = preempted or finishing or epoch_save
    if force or checkpoints.due(step):
      saved_metrics = {checkpoint_lib.BLEU_METRIC: eval_metrics['valid_bleu']} if eval_metrics else {}
      if epoch_save:
        saved_metrics[checkpoint_lib.EPOCH_METRIC] = ended_epoch
      checkpoints.save(step, state, all_data_states(data_state), meta, metrics=saved_metrics or None, force=force)
    if preempted:
      break

  progress.close()
  tracer.stop()
  checkpoints.wait()
  if preempted:
    writer.close()
    print(f'stopped by {stop.received or "another process"} at step {step}; saved {checkpoints.directory}/{step}')
    return {'step': step, 'preempted': True}
  results = {'step': step}
  if config.eval.every_steps >= 0:
    results.update(evaluator.test(state.params, workdir))
    writer.write(step, results)
    print(f'test BLEU {results["test_bleu"]:.2f} ({results["test_bleu_signature"]})')
  writer.close()
  if lead:
    metrics_lib.plot_training_curves(workdir)
  return results


def main(argv):
  del argv
  config = cli.load_config()
  workdir = cli.require_workdir()
  distributed.initialize()
  train_and_evaluate(config, workdir)


if __name__ == '__main__':
  cli.run(main)
