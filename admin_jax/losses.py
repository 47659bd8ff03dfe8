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


def chunked_label_smoothed_cross_entropy(states: jax.Array, table: jax.Array, targets: jax.Array,
                                         weights: jax.Array, smoothing: float, chunk_tokens: int) -> TokenLosses:
  """The same sums from decoder states, projecting `chunk_tokens` tokens onto the vocabulary at a time.

  Each chunk's float32 logits are rematerialised in the backward pass, so at most one chunk of
  [chunk_tokens, vocab] logits is ever alive instead of the whole batch's.
  """
  d_model = states.shape[-1]
  flat = (states.reshape(-1, d_model), targets.reshape(-1), weights.reshape(-1).astype(jnp.float32))
  padding = -flat[0].shape[0] % chunk_tokens
  chunks = [jnp.pad(x, ((0, padding),) + ((0, 0),) * (x.ndim - 1)).reshape(-1, chunk_tokens, *x.shape[1:])
            for x in flat]
  table = table.astype(states.dtype)

  @jax.checkpoint
  def chunk_sums(chunk):
    hidden, chunk_targets, chunk_weights = chunk
    logits = jnp.einsum('td,vd->tv', hidden, table, preferred_element_type=jnp.float32)
    return jnp.stack(label_smoothed_cross_entropy(logits, chunk_targets, chunk_weights, smoothing))

  return TokenLosses(*jax.lax.map(chunk_sums, tuple(chunks)).sum(0))
