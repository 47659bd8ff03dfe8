"""Output change |F(x, W) - F(x, W*)|_2^2 of the encoder at initialisation, vs depth (spec 7.1).

W* = W - 1e-4 sign(eps) with eps ~ N(0, 1) elementwise on the embeddings and every weight matrix
(not biases, LayerNorm or omega), on one fixed batch with dropout off. The paper's Theorem 2:
Post-LN's change grows linearly with the number of sublayers, Pre-LN's and Admin's
logarithmically (spec 7.4).

A stack's first n layers are themselves an initialised n-layer stack when the initialisation does
not depend on depth: Post-LN, Pre-LN, and profiled Admin, whose omegas depend only on the sublayers
before them. For those one forward of the deepest model gives every depth; admin_logn and DeepNorm
take their constants from the depth, so they are built once per depth.

    python -m admin_jax.analysis.output_change --config=configs/default.py --depths=1,2,4,8,16 --out=DIR
"""

import functools

from absl import flags
import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np
from tqdm import tqdm

from admin_jax import cli
from admin_jax import files
from admin_jax import plots
from admin_jax.analysis import command
from admin_jax.analysis import probe
from admin_jax.errors import UserError
from admin_jax.model import Transformer
from admin_jax.model import TransformerConfig

PERTURBATION = 1e-4
DEPTH_FREE_RESIDUALS = ('post_ln', 'pre_ln', 'admin')
HEADER = ('residual', 'encoder_layers', 'sublayers', 'output_change')

_DEPTHS = flags.DEFINE_list('depths', ['1', '2', '4', '8', '16', '32', '64', '100'],
                            'Encoder depths (layers) to sweep.')
_NUM_SEEDS = flags.DEFINE_integer('num_seeds', 3, 'Initialisations (seeds --seed, --seed+1, ...) averaged per depth.',
                                  lower_bound=1)


def is_perturbed(path: tuple, variable: nnx.Variable) -> bool:
  """Embeddings and weight matrices: the reference skips names with bias, layer_norm or ratio (omega)."""
  names = [str(p) for p in path]
  return (isinstance(variable, nnx.Param) and 'bias' not in names[-1] and names[-1] != 'omega'
          and not any(n.endswith('norm') for n in names))


def perturb(weights: nnx.State, seed: int) -> nnx.State:
  """W* = W - 1e-4 sign(eps), eps ~ N(0, 1) elementwise, drawn with NumPy so no RNG is compiled."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda w: np.asarray(w) - PERTURBATION * np.sign(rng.standard_normal(w.shape, np.float32)),
                      weights)


@functools.partial(jax.jit, static_argnums=0)
def _changes(graphdef: nnx.GraphDef, weights: nnx.State, perturbed: nnx.State, rest: nnx.State,
             batch: dict[str, jax.Array]) -> jax.Array:
  def encoder_states(weights):
    model = nnx.merge(graphdef, weights, rest)
    offsets = probe.zero_offsets(model.cfg, batch)['encoder']
    _, sublayers = model.trace_encoder(batch['inputs'], batch['inputs_segmentation'], batch['inputs_position'],
                                       offsets)
    x = sublayers.output
    return model.encoder_final_norm(x) if model.cfg.residual == 'pre_ln' else x

  both = jax.tree.map(lambda *pair: jnp.stack(pair), weights, perturbed)
  states = jax.vmap(encoder_states)(both)  # W and W* as one batch of two: one compiled stack
  return jnp.sum(jnp.square(states[0] - states[1]), axis=(2, 3, 4))


def sublayer_changes(model: Transformer, batch: dict[str, np.ndarray], seed: int) -> np.ndarray:
  """[2N]: the output change of the encoder cut after each sublayer, all from one perturbation.

  Entry 2n - 1 is the change of an n-layer encoder made of this model's first n layers (with the
  final LayerNorm for Pre-LN, as `encode` applies it).
  """
  graphdef, weights, rest = nnx.split(model, is_perturbed, ...)
  return np.asarray(_changes(graphdef, weights, perturb(weights, seed), rest, dict(batch))).reshape(-1)


def sweep(cfg: TransformerConfig, residuals: list[str], depths: list[int], seeds: list[int],
          batch: dict[str, np.ndarray]) -> list[tuple]:
  """CSV rows (residual, encoder_layers, sublayers, output_change), the change averaged over seeds."""
  tasks = [(r, s, d) for r in residuals for s in seeds
           for d in ([max(depths)] if r in DEPTH_FREE_RESIDUALS else depths)]
  changes = {}
  for residual, seed, depth in tqdm(tasks, desc='output change', unit='model'):
    model = probe.build_model(probe.probe_config(cfg, residual=residual, num_encoder_layers=depth), batch, seed)
    per_sublayer = sublayer_changes(model, batch, seed)
    for n in (depths if residual in DEPTH_FREE_RESIDUALS else [depth]):
      changes.setdefault((residual, n), []).append(per_sublayer[2 * n - 1])
  return [(r, n, 2 * n, float(np.mean(changes[r, n]))) for r in residuals for n in depths]


def write(rows: list[tuple], out: str) -> None:
  """DIR/output_change.csv and DIR/output_change.png."""
  files.write_csv(f'{out}/output_change.csv', HEADER, rows)
  curves = {}
  for residual, _, sublayers, change in rows:
    xs, ys = curves.setdefault(residual, ([], []))
    xs.append(sublayers)
    ys.append(change)
  plots.plot_output_change(curves, f'{out}/output_change.png')


def _depths() -> list[int]:
  try:
    depths = sorted({int(d) for d in _DEPTHS.value})
  except ValueError:
    raise UserError(f'--depths must be integers, got {",".join(_DEPTHS.value)}') from None
  if not depths or depths[0] < 1:
    raise UserError('--depths must be positive integers')
  return depths


def main(argv: list[str]) -> None:
  del argv
  out = command.output_dir()
  cfg = command.model_config()
  seeds = [command.SEED.value + i for i in range(_NUM_SEEDS.value)]
  rows = sweep(cfg, command.residuals(), _depths(), seeds, command.batch(cfg))
  write(rows, out)
  for row in rows:
    print(*row, sep='\t')


if __name__ == '__main__':
  cli.run(main)
