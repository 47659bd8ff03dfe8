"""How much each encoder sublayer output depends on each residual branch, beta_{i,j} (spec 7.2).

Every sublayer output x_i is split into components: the embedding x_0 and the branch outputs
a_1..a_i. A Post-LN-style LayerNorm is affine per token once its statistics are fixed, so each
one maps every earlier component c to gamma * (s * c - mean(s * c)) / std and the new branch f to
gamma * (f - mean(f)) / std, where s is the shortcut scale (omega for Admin, alpha for DeepNorm)
and std the token's LayerNorm std; Pre-LN's stream is the plain sum. The LayerNorm biases are a
constant offset, not a branch, and are left out (zero at initialisation). s_{i,j} is the
component's std over channels averaged over real tokens, and
beta_{i,j} = s_{i,j} / sqrt(sum_k s_{i,k}^2), the sum including the embedding.

Targets: Post-LN at initialisation has beta_{i,i} ~ 0.5 everywhere; Pre-LN, and Admin at
initialisation, decay like 1/sqrt(i).

    python -m admin_jax.analysis.dependency --config=configs/default.py --config.model.num_encoder_layers=6 --out=DIR
    python -m admin_jax.analysis.dependency --workdir=RUN --out=DIR   # a trained run and its initialisation
"""

import functools
from collections.abc import Mapping

import jax
from flax import nnx
import numpy as np
from tqdm import tqdm

from admin_jax import cli
from admin_jax import files
from admin_jax import plots
from admin_jax import trained_run
from admin_jax import train_step
from admin_jax.analysis import command
from admin_jax.analysis import probe
from admin_jax.model import Transformer
from admin_jax.model.layers import LN_EPS
from admin_jax.model.residual import Sublayer
from admin_jax.model.transformer import ENCODER_RESIDUALS

HEADER = ('model', 'layer_i', 'component_j', 'beta')


def _centred(x: np.ndarray) -> np.ndarray:
  return x - x.mean(-1, keepdims=True)


@functools.partial(jax.jit, static_argnums=0)
def _trace_encoder(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array]) -> Sublayer:
  model = nnx.merge(graphdef, state)
  return model.trace_encoder(batch['inputs'], batch['inputs_segmentation'], batch['inputs_position'],
                             probe.zero_offsets(model.cfg, batch)['encoder'])[1]


def components(model: Transformer, batch: Mapping[str, np.ndarray]) -> list[list[np.ndarray]]:
  """For each encoder sublayer output x_i, its components [x_0 part, a_1 part, ..., a_i part].

  Each component is float64 [batch, length, d_model]; at initialisation they sum to x_i.
  """
  traced = jax.tree.map(lambda a: np.asarray(a, np.float64), _trace_encoder(*nnx.split(model), dict(batch)))
  residuals = [getattr(model.encoder.layers, name) for name in ENCODER_RESIDUALS]
  current = [traced.input[0, 0]]
  stages = []
  for layer in range(model.cfg.num_encoder_layers):
    for j, residual in enumerate(residuals):
      x, branch = traced.input[layer, j], traced.branch[layer, j]
      if residual.kind == 'pre_ln':
        current = current + [branch]
      else:
        scale = np.asarray(residual.shortcut_scale(), np.float64)
        scale = scale[layer] if scale.ndim else scale
        z = scale * x + branch
        gain = np.asarray(residual.norm.scale[...][layer], np.float64) / np.sqrt(z.var(-1, keepdims=True) + LN_EPS)
        current = [gain * _centred(scale * c) for c in current] + [gain * _centred(branch)]
      stages.append(current)
  return stages


def dependency(model: Transformer, batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """beta [2N, 2N + 1]: row i - 1 is x_i, column j is a_j (column 0 the embedding); 0 above j > i."""
  tokens = np.asarray(batch['inputs_segmentation']) > 0
  stages = components(model, batch)
  strength = np.zeros((len(stages), len(stages) + 1))
  for i, parts in enumerate(stages):
    strength[i, :len(parts)] = [c.std(-1)[tokens].mean() for c in parts]
  return strength / np.sqrt(np.square(strength).sum(axis=1, keepdims=True))


def run(models: Mapping[str, Transformer], batch: Mapping[str, np.ndarray], out: str) -> dict[str, np.ndarray]:
  """beta of each labelled model; writes DIR/dependency.csv (long format) and the heatmaps .png.

  Takes models, not configs, so a trained checkpoint can be measured beside the initialisations.
  """
  betas = {label: dependency(model, batch) for label, model in tqdm(models.items(), desc='dependency')}
  rows = [(label, i, j, float(beta[i - 1, j]))
          for label, beta in betas.items() for i in range(1, beta.shape[0] + 1) for j in range(i + 1)]
  files.write_csv(f'{out}/dependency.csv', HEADER, rows)
  plots.plot_dependency(betas, f'{out}/dependency.png')
  return betas


def trained_and_initial(workdir: str, seed: int) -> tuple[dict[str, Transformer], dict[str, np.ndarray]]:
  """The workdir's latest checkpoint beside the same architecture freshly initialised (spec 7.2's pair)."""
  inference = trained_run.load_for_inference(workdir)
  trained = train_step.model_from(inference.setup, inference.params)
  cfg = probe.probe_config(trained.cfg)
  batch = command.batch(cfg)
  models = {f'{cfg.residual} (init)': probe.build_model(cfg, batch, seed),
            f'{cfg.residual} (step {inference.steps[-1]})': trained}
  return models, batch


def main(argv: list[str]) -> None:
  """With --workdir, the run's latest checkpoint and its initialisation; else --config per --residuals."""
  del argv
  out = command.output_dir()
  if cli.WORKDIR.value:
    models, batch = trained_and_initial(cli.WORKDIR.value, command.SEED.value)
  else:
    cfg = command.model_config()
    batch = command.batch(cfg)
    models = {f'{r} (init)': probe.build_model(probe.probe_config(cfg, residual=r), batch, command.SEED.value)
              for r in command.residuals()}
  run(models, batch, out)


if __name__ == '__main__':
  cli.run(main)
