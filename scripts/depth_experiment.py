"""The depth experiment: Post-LN, Pre-LN and Admin on Multi30k En-De, deep and shallow.

    python -m scripts.depth_experiment --out=DIR [--scale=smoke|cpu|gpu] [--data=../shared/data/multi30k]
        [--steps=N] [--tokens_per_batch=N] [--jobs=N] [--run_timeout=SECONDS] [--workdirs=DIR] [--config.KEY=VALUE ...]

Every run is `python -m admin_jax.train --config=configs/multi30k.py:LAYERS,RESIDUAL` with the same
recipe, seed and number of updates; only the depth and `model.residual` change. Each run is then
scored on test_2016_flickr with the config's beam (4): sacreBLEU, and tokenized BLEU (case-sensitive,
both sides Moses-tokenized with aggressive hyphen splitting, as the paper's tables), both from the run's own
test pass (admin_jax/score.py).
`--config.KEY=VALUE` flags go to every run (say `--config.perf.attention_impl=flash`).

OUT/results.jsonl gets one JSON line per run as the run ends, and OUT/results.md (the table) and
OUT/curves.png (every run's training loss) are rewritten then, so a cut experiment keeps what
finished. Started again with the same OUT, it skips the runs recorded there as finished or diverged;
a run cut short resumes from its last checkpoint in its workdir (WORKDIRS/RESIDUAL_LAYERSL). On
SIGTERM (`timeout -s TERM ...`) the runs in progress save a checkpoint and stop, and are recorded as
stopped with their curves so far.

Scales: `gpu` is configs/multi30k.py's full model (d_model 256, 4 heads, 8,192 tokens per update)
for 3,000 updates; `cpu` shrinks the model (d_model 64) so six runs fit a 2-core CPU in under an
hour; `smoke` runs every run of the gpu scale for a few updates of a tiny model on the synthetic
corpus, in seconds, to check the whole path.
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

from admin_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_JSONL, RESULTS_MD, CURVES_PNG = 'results.jsonl', 'results.md', 'curves.png'
STALL_TOLERANCE = 0.02  # a loss that never again falls 2% below its value has stopped improving
BLOWUP_FACTOR = 1.5  # a logged loss this far above the lowest before it: diverged without a NaN
ERROR_LINES = 5  # of a failed run's stderr kept in its record
SPLITS = {'train': 'train', 'valid': 'val', 'test': 'test_2016_flickr'}  # config key: Multi30k file prefix
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'multi30k')
FINAL = ('finished', 'diverged')  # a run with another status (stopped, timed out, failed) runs again

# GPU sizing, an estimate until a card times it. An update of the full model is 128 rows of 64 tokens;
# flops.training_flops counts 1.80e12 FLOPs for it at 18L-18L (2.2e8 per target token) and 0.67e12 at
# 6L-6L, so 3,000 updates are 5.4e15 and 2.0e15 FLOPs. At the rate base6 ran on an H200 (709.8k tokens/s
# of 3.86e8 FLOPs each, 274 TFLOP/s; docs/PERF.md) that is 20 s per 18L run and 7 s for 6L. A d_model-256
# model with 64-token rows keeps the card far less busy (small matmuls, many short kernels per layer):
# at a quarter of that rate, 80 s per 18L run and 30 s for 6L, 270 s for the four, plus each run's
# start, SentencePiece training, compiles and beam-4 test decode, which `--jobs=4` overlaps on the
# host's cores while the four share the card. `--steps` and `--tokens_per_batch` resize the runs for a
# slower card; 3,000 is the minimum number of updates.
GPU_STEPS = 3000


@dataclasses.dataclass(frozen=True)
class Scale:
  """The runs (layers each side, residual) of one scale, and the overrides every run of it gets."""
  runs: tuple[tuple[int, str], ...]
  steps: int
  overrides: tuple[str, ...]
  reads_corpus: bool = True  # False: the synthetic corpus, no data files needed


PAPER_RUNS = ((18, 'post_ln'), (18, 'pre_ln'), (18, 'admin'), (6, 'admin'))
SCALES = {
    'gpu': Scale(PAPER_RUNS, GPU_STEPS, (
        '--config.train.log_every_steps=50', '--config.checkpoint.every_steps=1000', '--config.eval.every_steps=0')),
    'cpu': Scale(tuple((layers, residual) for layers in (6, 18) for residual in ('post_ln', 'pre_ln', 'admin')), 300, (
        '--config.model.d_model=64', '--config.model.ffn_dim=256', '--config.model.num_heads=4',
        '--config.perf.dtype=float32', '--config.data.vocab_size=4000', '--config.data.max_len=48',
        '--config.data.tokens_per_batch=2304', '--config.train.warmup_steps=100',
        '--config.train.log_every_steps=20', '--config.checkpoint.every_steps=300', '--config.eval.every_steps=0',
        '--config.eval.beam_size=1')),
    # The gpu scale's runs at 2 and 1 layers, 4 updates of a d_model-16 model, 8 test sentences.
    'smoke': Scale(((2, 'post_ln'), (2, 'pre_ln'), (2, 'admin'), (1, 'admin')), 4, (
        '--config.data.source=synthetic', '--config.data.synthetic_train_size=300',
        '--config.data.synthetic_eval_size=8', '--config.data.eval_batch_size=8', '--config.data.vocab_size=200',
        '--config.data.max_len=32', '--config.data.tokens_per_batch=512', '--config.model.d_model=16',
        '--config.model.ffn_dim=32', '--config.model.num_heads=2', '--config.perf.dtype=float32',
        '--config.train.warmup_steps=2', '--config.train.log_every_steps=1', '--config.checkpoint.every_steps=4',
        '--config.eval.every_steps=0', '--config.eval.max_len_b=4'), reads_corpus=False),
}


def check_corpus(data: str) -> None:
  """Exits with one line naming the files of the Multi30k folder `data` that are missing."""
  missing = [f'{split}.{lang}' for split in SPLITS.values() for lang in ('en', 'de')
             if not any(os.path.exists(os.path.join(data, f'{split}.{lang}{x}')) for x in ('', '.xz'))]
  if missing:
    sys.exit(f'error: no Multi30k corpus at {data}: {", ".join(missing)}[.xz] missing')


def corpus_overrides(data: str) -> list[str]:
  """The config flags that point configs/multi30k.py's splits at the Multi30k folder `data`."""
  return [f'--config.data.{key}={os.path.join(data, split)}' for key, split in SPLITS.items()]


def run_name(layers: int, residual: str) -> str:
  return f'{residual}_{layers}L'


def stalled_since(losses: list[tuple[int, float]]) -> int | None:
  """The step from which the loss never again fell STALL_TOLERANCE below its value there, if that
  is within the first three quarters of the run (a loss that improves to the end has no such step)."""
  for i, (step, loss) in enumerate(losses):
    if all(later >= (1 - STALL_TOLERANCE) * loss for _, later in losses[i + 1:]):
      return step if step <= 0.75 * losses[-1][0] else None
  return None


def diverged_at(losses: list[tuple[int, float]]) -> int | None:
  """The first logged step whose loss is not finite or BLOWUP_FACTOR times the lowest before it."""
  lowest = math.inf
  for step, loss in losses:
    if not math.isfinite(loss) or loss > BLOWUP_FACTOR * lowest:
      return step
    lowest = min(lowest, loss)
  return None


def summarize(layers: int, residual: str, workdir: str, result: subprocess.CompletedProcess | None,
              seconds: float) -> dict:
  """The JSON line of one run from its metrics.jsonl and exit; `result` None: it ran past its time limit."""
  records = metrics.read_metrics(workdir)
  losses = [(r['step'], r['loss']) for r in records if 'loss' in r]
  scores = next((r for r in reversed(records) if 'test_bleu' in r), {})
  stopped = result is not None and 'stopped by' in result.stdout
  if result is None:
    status = 'timed out'
  elif result.returncode == 0:
    status = 'stopped' if stopped else 'finished'
  else:
    status = 'diverged' if 'training diverged' in result.stderr else 'failed'
  skipped = next((r['step'] for r in records if r.get('skipped_steps')), None)
  record = {
      'run': run_name(layers, residual), 'layers': layers, 'residual': residual, 'status': status,
      'test_bleu': scores.get('test_bleu'), 'test_bleu_signature': scores.get('test_bleu_signature'),
      # train's test pass scores both (admin_jax/score.py): sacreBLEU and the paper's tokenized BLEU.
      'test_tokenized_bleu': scores.get('test_tokenized_bleu'),
      'tokenized_bleu_signature': scores.get('test_tokenized_bleu_signature'),
      'last_step': losses[-1][0] if losses else None,
      'final_loss': losses[-1][1] if losses else None, 'diverged_step': diverged_at(losses),
      'first_skipped_step': skipped, 'stalled_since': stalled_since(losses) if losses else None,
      'compile_seconds': next((r['compile_seconds'] for r in records if 'compile_seconds' in r), None),
      'seconds': round(seconds, 1), 'losses': losses,
  }
  if status == 'diverged' and record['diverged_step'] is None:
    record['diverged_step'] = record['last_step']  # stopped by the NaN guard between two log steps
  if status == 'failed':
    record['error'] = '\n'.join(result.stderr.strip().splitlines()[-ERROR_LINES:])
  return record


def _cell(value, digits: int = 2) -> str:
  return 'n/a' if value is None else f'{value:.{digits}f}'


def _events(r: dict) -> str:
  events = [] if r['status'] == 'finished' else [r['status']]
  for key, label in (('diverged_step', 'diverged at'), ('first_skipped_step', 'non-finite step by'),
                     ('stalled_since', 'no progress from')):
    if r[key] is not None:
      events.append(f'{label} step {r[key]}')
  return ', '.join(events) or '-'


def write_report(out: str, results: list[dict], header: str) -> None:
  """OUT/results.md and OUT/curves.png from the runs' records so far."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  lines = [header, '', '| run | test BLEU (sacreBLEU) | tokenized BLEU | final loss (step) | divergence, stall | '
           'wall s |', '| --- | --- | --- | --- | --- | --- |']
  for r in sorted(results, key=lambda r: (-r['layers'], r['residual'])):
    loss = 'n/a' if r['final_loss'] is None else f'{r["final_loss"]:.3f} ({r["last_step"]})'
    lines.append(f'| {r["layers"]}L-{r["layers"]}L {r["residual"]} | {_cell(r["test_bleu"])} | '
                 f'{_cell(r["test_tokenized_bleu"])} | {loss} | {_events(r)} | {r["seconds"]:.0f} |')
  with open(os.path.join(out, RESULTS_MD), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  depths = sorted({r['layers'] for r in results}, reverse=True)
  fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 3.5), sharey=True, squeeze=False)
  for ax, layers in zip(axes[0], depths):
    for r in results:
      if r['layers'] == layers and r['losses']:
        steps, values = zip(*r['losses'])
        ax.plot(steps, values, label=r['residual'])
    ax.set_title(f'{layers}L-{layers}L')
    ax.set_xlabel('update')
    ax.legend()
  axes[0][0].set_ylabel('training loss (label-smoothed, nats/token)')
  fig.tight_layout()
  fig.savefig(os.path.join(out, CURVES_PNG), dpi=120)
  plt.close(fig)


def read_results(out: str) -> list[dict]:
  path = os.path.join(out, RESULTS_JSONL)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='where results.jsonl, results.md and curves.png go')
  parser.add_argument('--scale', choices=SCALES, default='gpu')
  parser.add_argument('--data', default=DEFAULT_DATA,
                      help='the Multi30k folder (train, val, test_2016_flickr .en/.de[.xz])')
  parser.add_argument('--steps', type=int, help="updates per run (default: the scale's)")
  parser.add_argument('--tokens_per_batch', type=int, help="tokens per update (default: the config's, 8192)")
  parser.add_argument('--jobs', type=int, default=1, help='runs at a time (sharing the device)')
  parser.add_argument('--run_timeout', type=float, default=0, help='seconds per run; 0: none')
  parser.add_argument('--workdirs', help='where the runs\' workdirs go (default: OUT/runs)')
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)} (only --config.KEY=VALUE flags go to the runs)')
  if args.jobs < 1 or (args.steps is not None and args.steps < 1):
    parser.error('--jobs and --steps must be at least 1')
  return args, rest


def main(argv: list[str]) -> None:
  args, config_flags = parse_args(argv)
  scale = SCALES[args.scale]
  data = os.path.abspath(args.data)
  if scale.reads_corpus:
    check_corpus(data)
  os.makedirs(args.out, exist_ok=True)
  workdirs = args.workdirs or os.path.join(args.out, 'runs')
  steps = args.steps or scale.steps
  overrides = [*scale.overrides, f'--config.train.num_steps={steps}']
  if args.tokens_per_batch:
    overrides.append(f'--config.data.tokens_per_batch={args.tokens_per_batch}')
  if scale.reads_corpus:
    overrides += corpus_overrides(data)
  overrides += config_flags
  header = (f'Scale {args.scale}, {steps} updates per run, jax {importlib.metadata.version("jax")}, '
            f'{datetime.date.today()}; every run: `python -m admin_jax.train '
            f'--config=configs/multi30k.py:LAYERS,RESIDUAL {" ".join(overrides)}`.')
  results = {r['run']: r for r in read_results(args.out)}  # a run's latest line
  pending = [(layers, residual) for layers, residual in scale.runs
             if results.get(run_name(layers, residual), {}).get('status') not in FINAL]
  env = dict(os.environ)
  if args.jobs > 1:  # each process takes its share of the device's memory, not the default 75%
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{0.9 / args.jobs:.2f}')
  stopping = threading.Event()
  children: set[subprocess.Popen] = set()
  lock = threading.Lock()

  def stop(*_) -> None:
    """SIGTERM: start no more runs; the running ones save a checkpoint and stop after one step."""
    stopping.set()
    with lock:
      for child in children:
        child.send_signal(signal.SIGTERM)

  signal.signal(signal.SIGTERM, stop)

  def run(layers: int, residual: str) -> None:
    workdir = os.path.join(workdirs, run_name(layers, residual))
    command = [sys.executable, '-m', 'admin_jax.train', f'--config=configs/multi30k.py:{layers},{residual}',
               f'--workdir={workdir}', *overrides]
    with lock:
      if stopping.is_set():
        return
      print(f'start {run_name(layers, residual)}: {" ".join(command)}', flush=True)
      child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      children.add(child)
    start = time.time()
    try:
      stdout, stderr = child.communicate(timeout=args.run_timeout or None)
      result = subprocess.CompletedProcess(command, child.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
      child.kill()
      stdout, stderr = child.communicate()
      result = None
    with lock:
      children.discard(child)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'train.log'), 'w') as f:
      f.write(stdout + stderr)
    record = summarize(layers, residual, workdir, result, time.time() - start)
    with lock:
      results[record['run']] = record
      with open(os.path.join(args.out, RESULTS_JSONL), 'a') as f:
        f.write(json.dumps(record) + '\n')
      write_report(args.out, list(results.values()), header)
      print(f'{record["run"]}: {record["status"]}, test BLEU {_cell(record["test_bleu"])}, tokenized '
            f'{_cell(record["test_tokenized_bleu"])}, {_events(record)}', flush=True)

  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for future in [pool.submit(run, layers, residual) for layers, residual in pending]:
      future.result()
  if os.path.exists(os.path.join(args.out, RESULTS_MD)):
    with open(os.path.join(args.out, RESULTS_MD)) as f:
      print(f.read())


if __name__ == '__main__':
  main(sys.argv[1:])
