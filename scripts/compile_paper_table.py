"""Compiles every row of docs/PAPER.md "Reproducing the paper" for the hardware it names; rewrites the rows' last cell.

    python scripts/compile_paper_table.py [--plans=workdirs/compile_plans] [--only=v4-8,...] [--table_only]

Each row's recipe (residual `admin`: its train step and profiling pass) goes through `python -m
admin_jax.compile` for its TPU slice and its GPUs, one compile at a time: a deep model takes
minutes and gigabytes of host memory. Each plan is kept as PLANS/<row>-<target>.json (or .err, the
job's one-line refusal), so a rerun compiles only what has no plan yet; the table's cells then
show memory per chip, compile time on this host and the estimated days at 40% MFU, or say that a
plan is missing.
"""

import dataclasses
import json
import pathlib
import re
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER = REPO / 'docs' / 'PAPER.md'

_PLANS = flags.DEFINE_string('plans', str(REPO / 'workdirs' / 'compile_plans'), 'Where the plans are kept.')
_ONLY = flags.DEFINE_list('only', [], 'Compile only these targets (the table is rewritten from every plan kept).')
_TABLE_ONLY = flags.DEFINE_bool('table_only', False, 'Compile nothing: rewrite the table from the plans kept.')


@dataclasses.dataclass(frozen=True)
class Row:
  """One table row: its first two cells, its config, and the slice and GPUs it names. Each row compiles its
  recipe as it trains (6L unrolled, deeper stacks scanned)."""
  dataset: str
  layers: str
  config: str
  tpu: str
  gpus: str

  @property
  def slug(self) -> str:
    return re.sub(r'\W+', '_', f'{self.dataset}_{self.layers}').strip('_').lower()


ROWS = (
    Row('IWSLT14 De-En', '6L-6L small', 'configs/iwslt14_de_en.py:admin', 'v5litepod-1', 'h100'),
    Row('WMT14 En-De', '6L-6L', 'configs/wmt14_en_de.py:6,admin', 'v4-8', 'h100-8'),
    Row('WMT14 En-De', '12L-12L', 'configs/wmt14_en_de.py:12,admin', 'v4-16', 'h100-8'),
    Row('WMT14 En-De', '18L-18L', 'configs/wmt14_en_de.py:18,admin', 'v4-16', 'h100-8'),
    Row('WMT14 En-Fr', '6L-6L', 'configs/wmt14_en_fr.py:6,admin', 'v4-32', 'h100-8'),
    Row('WMT14 En-Fr', '60L-12L', 'configs/wmt14_en_fr.py:60,admin', 'v4-64', 'h100-8'),
)


def _plan_path(row: Row, target: str, suffix: str) -> pathlib.Path:
  return pathlib.Path(_PLANS.value) / f'{row.slug}-{target}.{suffix}'


def compile_row(row: Row, target: str) -> None:
  """Runs the compile job for one row and target; keeps its JSON, or its error line."""
  command = [sys.executable, '-m', 'admin_jax.compile', f'--config={row.config}', f'--target={target}']
  print(f'{row.dataset} {row.layers} on {target}: {" ".join(command[1:])}', flush=True)
  start = time.perf_counter()
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  print(f'  {time.perf_counter() - start:.0f} s, exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}',
        flush=True)
  if result.stdout.strip():
    _plan_path(row, target, 'json').write_text(result.stdout)
  if result.returncode:
    _plan_path(row, target, 'err').write_text(result.stderr.strip().splitlines()[-1] + '\n')


def _describe(row: Row, target: str) -> str:
  """What the row's cell says about one target's plan."""
  plan, error = _plan_path(row, target, 'json'), _plan_path(row, target, 'err')
  if error.exists():
    return f'{target}: does not compile here ({error.read_text().strip()})'
  if not plan.exists():
    return f'{target}: no plan compiled yet'
  record = json.loads(plan.read_text())
  chips = f"{record['chips']} chip{'s' if record['chips'] > 1 else ''}"
  return (f"{target} ({chips}): {record['memory_needed_bytes'] / 2 ** 30:.1f} of "
          f"{record['memory_available_bytes'] / 2 ** 30:.2f} GiB per chip, compiled in "
          f"{_seconds(record['compile_seconds'])}, {_training_time(record)}")


def _seconds(seconds: float) -> str:
  return f'{seconds:.0f} s' if seconds < 120 else f'{seconds / 60:.0f} min'


def _training_time(record: dict) -> str:
  days = record['estimated_days']
  if days is None:  # a recipe that stops by epochs
    return f"{record['estimated_step_seconds']:.2f} s per update for {record['num_epochs']} epochs"
  return f'about {days:.1f} days' if days >= 1 else f'about {days * 24:.1f} hours'



def rewrite_readme() -> None:
  """Replaces the last cell of each row of the table with its plans."""
  lines = PAPER.read_text().splitlines(keepends=True)
  for row in ROWS:
    prefix = f'| {row.dataset} | {row.layers} |'
    index = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    cells = lines[index].rstrip('\n').split(' | ')
    cells[-1] = f'{_describe(row, row.tpu)}; {_describe(row, row.gpus)} |'
    lines[index] = ' | '.join(cells) + '\n'
  PAPER.write_text(''.join(lines))


def main(argv):
  del argv
  pathlib.Path(_PLANS.value).mkdir(parents=True, exist_ok=True)
  # Every slice before any GPU, the largest recipes (the table's last rows) first.
  for row, target in [(row, row.tpu) for row in ROWS[::-1]] + [(row, row.gpus) for row in ROWS[::-1]]:
    done = _plan_path(row, target, 'json').exists() or _plan_path(row, target, 'err').exists()
    if not (done or _TABLE_ONLY.value) and (not _ONLY.value or target in _ONLY.value):
      compile_row(row, target)
      rewrite_readme()
  rewrite_readme()


if __name__ == '__main__':
  app.run(main)
