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

  `logits` [batch, length, vocab] (bfloat16 under bf16 compute, as fairseq's fp16 output layer),
  computed in float32; `weights` 1 at real target tokens, 0 at padding. Written with the
  log-partition function, -log p_v = lse - logit_v, so that the forward pass is one fused read of
  the logits (max, sum of exp, sum, target logit) and the backward pass one elementwise write;
  log-probabilities for the whole batch are never materialised.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  lse = jax.nn.logsumexp(logits, axis=-1)
  is_target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
  target_logit = jnp.where(is_target, logits, 0.0).sum(-1)
  nll = lse - target_logit
  loss = lse - (1.0 - smoothing) * target_logit - smoothing / vocab * logits.sum(-1)
  weights = weights.astype(jnp.float32)
  return TokenLosses((loss * weights).sum(), (nll * weights).sum(), weights.sum())


def chunked_label_smoothed_cross_entropy(states: jax.Array, table: jax.Array, targets: jax.Array,
                                         weights: jax.Array, smoothing: float, chunk_tokens: int) -> TokenLosses:
  """The same sums from decoder states, projecting `chunk_tokens` tokens onto the vocabulary at a time.

  Each chunk's logits are rematerialised in the backward pass, so at most one chunk of
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
    logits = jnp.einsum('td,vd->tv', hidden, table)
    return jnp.stack(label_smoothed_cross_entropy(logits, chunk_targets, chunk_weights, smoothing))

  return TokenLosses(*jax.lax.map(chunk_sums, tuple(chunks)).sum(0))
