"""The omega of every sublayer, as the Admin profiling pass wrote it to DIR/omega.json.

omega.json is {"encoder": [...], "decoder": [...]}, one float per sublayer in forward order
(encoder: self-attention, FFN per layer; decoder: self-attention, cross-attention, FFN).

    python -m admin_jax.analysis.omega --workdir=DIR --out=DIR
"""

import json
import math
from collections.abc import Mapping, Sequence

from etils import epath

from admin_jax import cli
from admin_jax import files
from admin_jax import plots
from admin_jax.analysis import command
from admin_jax.analysis import sublayers
from admin_jax.errors import UserError

HEADER = ('stack', 'sublayer_index', 'kind', 'omega')


def read_omegas(workdir: str) -> dict[str, list[float]]:
  """DIR/omega.json, checked: both stacks, finite numbers, whole layers."""
  path = epath.Path(workdir) / 'omega.json'
  try:
    data = json.loads(path.read_text())
  except FileNotFoundError:
    raise UserError(f'{path} not found: run the Admin profiling pass for this workdir first') from None
  except (OSError, ValueError) as error:
    raise UserError(f'{path}: cannot read omegas ({error})') from None
  if not isinstance(data, dict):
    raise UserError(f'{path}: expected an object with "encoder" and "decoder" lists')
  omegas = {}
  for stack, kinds in sublayers.KINDS.items():
    values = data.get(stack)
    if (not isinstance(values, list) or not values
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
      raise UserError(f'{path}: "{stack}" must be a non-empty list of finite numbers')
    if len(values) % len(kinds):
      raise UserError(f'{path}: "{stack}" has {len(values)} omegas, not a multiple of its {len(kinds)} sublayers '
                      'per layer')
    omegas[stack] = [float(v) for v in values]
  return omegas


def run(omegas: Mapping[str, Sequence[float]], out: str) -> list[tuple]:
  """Writes DIR/omega.csv and DIR/omega.png; returns the CSV rows."""
  rows = [(stack, k, sublayers.kind(stack, k), value)
          for stack, values in omegas.items() for k, value in enumerate(values, start=1)]
  files.write_csv(f'{out}/omega.csv', HEADER, rows)
  plots.plot_omegas(omegas, f'{out}/omega.png')
  return rows


def main(argv: list[str]) -> None:
  del argv
  run(read_omegas(cli.require_workdir()), command.output_dir())


if __name__ == '__main__':
  cli.run(main)
