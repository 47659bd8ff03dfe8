"""One Admin profiling pass and one beam search over a whole test split, timed.

    python -m benchmarks.inference_speed --config=configs/multi30k.py:18,admin --workdir=DIR [--config.KEY=VALUE ...]

Builds the run as `admin_jax.train` does (SentencePiece fitted into DIR, the model at its initial
parameters, the first training batch), then times
- the profiling pass on that batch, compile included, which is what a training run pays for it;
- a beam search (the config's beam size, length penalty and length limits) over every sentence of
  data.test: a first pass compiles the few padded batch shapes, the second is timed.
The parameters are untrained, so hypotheses seldom end before their length limit (max_len_a x
source length + max_len_b): more decoding steps than a trained model takes, so sentences_per_sec
is a lower bound on a trained model's. Prints one JSON line.
"""

import contextlib
import json
import time

import jax
import numpy as np

from admin_jax import cli
from admin_jax import corpus_eval
from admin_jax import omega_init
from admin_jax import sharding
from admin_jax import train
from admin_jax.errors import UserError

_COMPILE_EVENTS = '/jax/core/compile/'  # tracing, lowering and XLA's compile, as jax.monitoring reports them


@contextlib.contextmanager
def compile_seconds():
  """Yields a one-element list that holds, on exit, the seconds JAX spent compiling inside the block."""
  total = [0.0]

  def listen(event: str, seconds: float, **kwargs) -> None:
    del kwargs
    if event.startswith(_COMPILE_EVENTS):
      total[0] += seconds

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield total
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def time_profiling_pass(run: train.Run, mask_padding: bool) -> dict:
  batch = sharding.global_batch(next(run.train_iter), run.mesh)
  with compile_seconds() as compiling:
    start = time.perf_counter()
    omegas = omega_init.profile_omegas(run.setup, run.state, batch, mask_padding=mask_padding)
    seconds = time.perf_counter() - start
  return {'profile_seconds': seconds, 'profile_compile_seconds': compiling[0],
          'profile_rows': int(batch['targets'].shape[0]), 'omega_max': float(max(np.max(v) for v in omegas.values()))}


def time_decoding(run: train.Run, config) -> dict:
  evaluator = corpus_eval.Evaluator(config, run.tokenizer, run.setup, run.mesh)
  sources = [source for source, _ in evaluator.pairs('test')]
  with compile_seconds() as compiling:
    start = time.perf_counter()
    evaluator.translate(run.state.params, sources)
    first = time.perf_counter() - start
  start = time.perf_counter()
  hypotheses = evaluator.translate(run.state.params, sources)
  seconds = time.perf_counter() - start
  return {'sentences': len(sources), 'beam_size': config.eval.beam_size, 'decode_seconds': seconds,
          'sentences_per_sec': len(sources) / seconds, 'decode_first_pass_seconds': first,
          'decode_compile_seconds': compiling[0], 'eval_batch_size': evaluator.batch_size,
          'mean_source_tokens': float(np.mean([len(run.tokenizer.encode(s)) for s in sources])),
          'mean_hypothesis_tokens': float(np.mean([len(run.tokenizer.encode(h)) for h in hypotheses]))}


def main(argv):
  del argv
  config = cli.load_config()
  workdir = cli.require_workdir()
  if config.model.residual != 'admin':
    raise UserError(f"the profiling pass applies to model.residual='admin', not {config.model.residual!r}")
  run = train.start_run(config, workdir)
  model = config.model
  record = {'device': jax.devices()[0].device_kind, 'jax': jax.__version__, 'layers': model.num_encoder_layers,
            'd_model': model.d_model, 'residual': model.residual, 'dtype': config.perf.dtype,
            'attention_impl': config.perf.attention_impl, 'layer_norm_impl': config.perf.layer_norm_impl,
            **time_profiling_pass(run, config.admin.mask_padding), **time_decoding(run, config)}
  print(json.dumps(record), flush=True)


if __name__ == '__main__':
  cli.run(main)
