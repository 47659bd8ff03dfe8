"""Label-smoothed cross-entropy as fairseq computes it, summed so callers normalise per token."""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenLosses(NamedTuple):
  """Sums over non-padding target tokens; divide by `tokens` for per-token values."""
  loss: jax.Array
  nll: jax.Array
  tokens: jax.Array


def label_smoothed_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                                 smoothing: float) -> TokenLosses:
  """fairseq's label_smoothed_cross_entropy: (1 - eps) * nll + eps / V * sum_v(-log p_v).

  `logits` [batch, length, vocab] float32, `weights` 1 at real target tokens, 0 at padding.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  smooth = -log_probs.sum(-1)
  loss = (1.0 - smoothing) * nll + smoothing / logits.shape[-1] * smooth
  weights = weights.astype(jnp.float32)
  return TokenLosses((loss * weights).sum(), (nll * weights).sum(), weights.sum())
