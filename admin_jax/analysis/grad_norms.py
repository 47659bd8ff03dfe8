"""Per-sublayer gradient norms at initialisation, ||dL/dx_k||_F of every sublayer output (spec 7.3).

L is the token-level cross-entropy (mean over target tokens, no label smoothing) of the
teacher-forced logits on one batch, dropout off. The norm is taken over the whole batch tensor,
as the reference's backward hooks print it. The paper's finding: Post-LN decoders lose gradient
toward their lower layers, Post-LN encoders and Pre-LN do not; so vanishing gradients alone do not
explain why Post-LN is unstable.

    python -m admin_jax.analysis.grad_norms --config=configs/default.py --out=DIR
"""

import functools
from collections.abc import Mapping

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
from admin_jax.analysis import sublayers
from admin_jax.model import Transformer

HEADER = ('residual', 'stack', 'sublayer_index', 'kind', 'grad_norm')


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean negative log-likelihood of `targets` over the tokens where `weights` is 1."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)


@functools.partial(jax.jit, static_argnums=0)
def _offset_grads(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  model = nnx.merge(graphdef, state)

  def loss(offsets):
    logits, _ = model.trace(batch, offsets)
    return token_cross_entropy(logits, batch['targets'], (batch['targets_segmentation'] > 0).astype(jnp.float32))

  return jax.grad(loss)(probe.zero_offsets(model.cfg, batch))


def grad_norms(model: Transformer, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{'encoder': [2N], 'decoder': [3M]}: ||dL/dx_k||_F per sublayer output, forward order."""
  grads = _offset_grads(*nnx.split(model), dict(batch))
  return {stack: np.sqrt(np.square(np.asarray(grads[stack], np.float64)).sum(axis=(2, 3, 4))).reshape(-1)
          for stack in sublayers.KINDS}


def run(models: Mapping[str, Transformer], batch: Mapping[str, np.ndarray], out: str) -> list[tuple]:
  """Measures each labelled model; writes DIR/grad_norms.csv and .png; returns the CSV rows."""
  norms = {label: grad_norms(model, batch) for label, model in tqdm(models.items(), desc='grad norms')}
  rows = [(label, stack, k, sublayers.kind(stack, k), float(value))
          for label, per_stack in norms.items() for stack, values in per_stack.items()
          for k, value in enumerate(values, start=1)]
  files.write_csv(f'{out}/grad_norms.csv', HEADER, rows)
  plots.plot_grad_norms(norms, f'{out}/grad_norms.png')
  return rows


def main(argv: list[str]) -> None:
  del argv
  out = command.output_dir()
  cfg = command.model_config()
  batch = command.batch(cfg)
  models = {r: probe.build_model(probe.probe_config(cfg, residual=r), batch, command.SEED.value)
            for r in command.residuals()}
  run(models, batch, out)


if __name__ == '__main__':
  cli.run(main)
