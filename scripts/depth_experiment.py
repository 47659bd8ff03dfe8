"""The depth experiment: Post-LN, Pre-LN and Admin at 6L-6L and 18L-18L on Multi30k En-De.

    python scripts/depth_experiment.py --out=runs/depth [--scale=cpu|gpu] [--data=../shared/data/multi30k]

Every run uses configs/multi30k.py with identical hyperparameters and only `model.residual` and
the depth changing; each is then scored on test_2016_flickr. Writes OUT/results.json,
OUT/results.md (the BLEU table) and OUT/curves.png (training loss of every run).
`--scale=cpu` shrinks the model and the number of steps so that the six runs fit a 2-core CPU
in well under an hour, keeping the paper's lr, warmup shape, dropout and optimizer.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESIDUALS = ('post_ln', 'pre_ln', 'admin')
DEPTHS = (6, 18)
CPU_SCALE = [
    '--config.model.d_model=64', '--config.model.ffn_dim=256', '--config.model.num_heads=4',
    '--config.model.dtype=float32', '--config.data.vocab_size=4000', '--config.data.max_len=48',
    '--config.data.tokens_per_batch=2304', '--config.train.num_steps=300', '--config.train.warmup_steps=100',
    '--config.train.log_every_steps=20', '--config.checkpoint.every_steps=300', '--config.eval.every_steps=0',
    '--config.eval.beam_size=1',
]


def run(out: str, residual: str, layers: int, data: str, scale: list[str]) -> dict:
  workdir = os.path.join(out, f'{residual}_{layers}L')
  command = [sys.executable, '-m', 'admin_jax.train', f'--config=configs/multi30k.py:{layers},{residual}',
             f'--workdir={workdir}', f'--config.data.train={data}/train', f'--config.data.valid={data}/val',
             f'--config.data.test={data}/test_2016_flickr', *scale]
  print(' '.join(command), flush=True)
  start = time.time()
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  seconds = time.time() - start
  with open(os.path.join(out, f'{residual}_{layers}L.log'), 'w') as f:
    f.write(result.stdout + result.stderr)
  records = []
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      records = [json.loads(line) for line in f if line.strip()]
  losses = [(r['step'], r['loss']) for r in records if 'loss' in r]
  bleu = next((r['test_bleu'] for r in reversed(records) if 'test_bleu' in r), None)
  final_loss = losses[-1][1] if losses else float('nan')
  # Diverged: non-finite loss, a stopped run, or a loss that never left the unigram plateau.
  diverged = result.returncode != 0 or not math.isfinite(final_loss) or final_loss > 0.9 * losses[0][1]
  return {'residual': residual, 'layers': layers, 'bleu': bleu, 'final_loss': final_loss, 'losses': losses,
          'diverged': diverged, 'seconds': round(seconds), 'command': ' '.join(command),
          'returncode': result.returncode}


def write_report(out: str, results: list[dict]) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  lines = ['| layers | ' + ' | '.join(RESIDUALS) + ' |', '| --- |' + ' --- |' * len(RESIDUALS)]
  for layers in DEPTHS:
    cells = []
    for residual in RESIDUALS:
      r = next(x for x in results if x['residual'] == residual and x['layers'] == layers)
      bleu = 'n/a' if r['bleu'] is None else f'{r["bleu"]:.2f}'
      cells.append(f'{bleu} (diverged)' if r['diverged'] else bleu)
    lines.append(f'| {layers}L-{layers}L | ' + ' | '.join(cells) + ' |')
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  fig, axes = plt.subplots(1, len(DEPTHS), figsize=(5 * len(DEPTHS), 3.5), sharey=True)
  for ax, layers in zip(axes, DEPTHS):
    for r in results:
      if r['layers'] == layers and r['losses']:
        steps, values = zip(*r['losses'])
        ax.plot(steps, values, label=r['residual'])
    ax.set_title(f'{layers}L-{layers}L')
    ax.set_xlabel('step')
    ax.legend()
  axes[0].set_ylabel('training loss (label-smoothed, nats/token)')
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'curves.png'), dpi=120)
  print('\n'.join(lines))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--scale', choices=('cpu', 'gpu'), default='cpu')
  parser.add_argument('--data', default=os.path.join(os.path.dirname(REPO), 'shared', 'data', 'multi30k'))
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.data, 'train.en.xz')) and not os.path.exists(
      os.path.join(args.data, 'train.en')):
    sys.exit(f'error: no Multi30k corpus at {args.data} (expected train.en[.xz])')
  os.makedirs(args.out, exist_ok=True)
  scale = CPU_SCALE if args.scale == 'cpu' else []
  results = [run(args.out, residual, layers, os.path.abspath(args.data), scale)
             for layers in DEPTHS for residual in RESIDUALS]
  write_report(args.out, results)


if __name__ == '__main__':
  main()
