"""Beam search over the cached decoder, compiled as one `lax.while_loop`.

The search follows fairseq's `SequenceGenerator`, because the paper's decoding settings
(beam 4 / lenpen 0.6 En-De, beam 5 / lenpen 1.0 IWSLT, beam 5 / lenpen 0.8 En-Fr) are
fairseq's and only mean the same thing under its conventions:

- A finished hypothesis scores sum(log p) / len ** length_penalty, with len counting the EOS.
- The alive beams are the `beam_size` best non-EOS extensions; an EOS extension is finished
  only when it ranks among the `beam_size` best extensions of its sentence, so beam size 1 is
  exactly greedy decoding when the length penalty is 0.
- PAD is never produced and an empty output (EOS first) is not allowed.
- A sentence emits at most int(max_len_a * src_len + max_len_b) tokens before its EOS, with
  src_len its source tokens other than EOS and PAD; the output, EOS included, is capped at
  `max_decode_len`. A hypothesis reaching its limit is forced to end.

One deliberate difference: fairseq stops a sentence as soon as `beam_size` hypotheses are
finished, whereas here it stops only when no alive beam can still beat the worst finished one
(an upper bound that holds because log-probabilities only decrease). Both keep the same alive
beams, so this can only return hypotheses that score at least as well as fairseq's.

Layout as in the Flax WMT example: alive and finished hypotheses are [batch, beam, ...]; the
decoder runs on batch * beam rows, beams of one sentence adjacent.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np

from admin_jax.model import DecodeCache
from admin_jax.model import Transformer
from admin_jax.special_tokens import EOS_ID
from admin_jax.special_tokens import PAD_ID


class _BeamState(NamedTuple):
  step: jax.Array  # index of the output token the next iteration chooses
  alive_seqs: jax.Array  # [batch, beam, max_decode_len] tokens so far, PAD after
  alive_logprobs: jax.Array  # [batch, beam] sum of log-probabilities, best first; -inf = no hypothesis
  finished_seqs: jax.Array  # [batch, beam, max_decode_len] ending in EOS, PAD after
  finished_scores: jax.Array  # [batch, beam] length-normalised, best first; -inf = empty slot
  cache: DecodeCache  # over batch * beam rows


def _length_limits(inputs: jax.Array, segments: jax.Array, max_len_a: float, max_len_b: int,
                   max_decode_len: int) -> jax.Array:
  """[batch] maximum output length, EOS included.

  The table over every possible source length is built in Python (float64) so that
  int(a * n + b) rounds exactly as fairseq's does, not as float32 would.
  """
  table = [min(max(int(max_len_a * n + max_len_b), 0) + 1, max_decode_len) for n in range(inputs.shape[1] + 1)]
  src_len = jnp.sum((segments > 0) & (inputs != EOS_ID), axis=1)
  return jnp.asarray(np.asarray(table, np.int32))[src_len]


def _expand_cache(cache: DecodeCache, beam_size: int) -> DecodeCache:
  """Repeats each sentence's cache for its beams (batch is axis 1 of the KV caches)."""
  repeat = lambda x: jnp.repeat(x, beam_size, axis=1)
  return DecodeCache(jax.tree.map(repeat, cache.self_attention), jax.tree.map(repeat, cache.cross_attention),
                     jnp.repeat(cache.memory_mask, beam_size, axis=0), cache.index)


def _gather_beams(x: jax.Array, beam_indices: jax.Array) -> jax.Array:
  """x [batch, beam, ...] -> x[b, beam_indices[b, j], ...]."""
  return jax.vmap(lambda xb, ib: xb[ib])(x, beam_indices)


def _reorder_cache(cache: DecodeCache, beam_indices: jax.Array) -> DecodeCache:
  """Moves each surviving beam's self-attention keys/values to its new slot.

  The cross-attention keys/values are the same for every beam of a sentence, so they stay.
  """
  batch, beam = beam_indices.shape

  def reorder(kv: jax.Array) -> jax.Array:  # [layers, batch * beam, ...]
    per_beam = kv.reshape(kv.shape[0], batch, beam, *kv.shape[2:])
    return jax.vmap(_gather_beams, in_axes=(0, None))(per_beam, beam_indices).reshape(kv.shape)

  return cache._replace(self_attention=jax.tree.map(reorder, cache.self_attention))


def _allowed_tokens(step: jax.Array, limits: jax.Array, vocab_size: int) -> jax.Array:
  """[batch, 1, vocab]: no PAD, no EOS as the first token, only EOS at a sentence's limit."""
  vocab = jnp.arange(vocab_size)
  free = (vocab != PAD_ID) & ((vocab != EOS_ID) | (step > 0))
  return jnp.where((step + 1 >= limits)[:, None, None], vocab == EOS_ID, free)


def _top_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Best k of [batch, beam, vocab] extensions: (scores, source beam, token), each [batch, k]."""
  vocab_size = scores.shape[-1]
  top, flat = jax.lax.top_k(scores.reshape(scores.shape[0], -1), k)
  return top, flat // vocab_size, flat % vocab_size


def _append(seqs: jax.Array, beams: jax.Array, tokens: jax.Array, step: jax.Array) -> jax.Array:
  """The chosen beams' sequences with `tokens` written at position `step`."""
  return jax.lax.dynamic_update_slice_in_dim(_gather_beams(seqs, beams), tokens[..., None], step, axis=2)


def _can_improve(state: _BeamState, limits: jax.Array, length_penalty: jax.Array) -> jax.Array:
  """[batch]: whether some alive beam could still finish above the worst finished hypothesis.

  Extending only lowers the log-probability sum (<= 0), so its best normalised score is that
  sum over the largest len ** length_penalty among the lengths still reachable.
  """
  shortest = (state.step + 1).astype(jnp.float32)
  longest = limits.astype(jnp.float32)
  bound = state.alive_logprobs[:, 0] / jnp.maximum(shortest ** length_penalty, longest ** length_penalty)
  return bound > state.finished_scores[:, -1]


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=('beam_size', 'max_len_a', 'max_len_b', 'max_decode_len'))
def _beam_search(graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array, segments: jax.Array,
                 positions: jax.Array, length_penalty: jax.Array, *, beam_size: int, max_len_a: float,
                 max_len_b: int, max_decode_len: int) -> tuple[jax.Array, jax.Array]:
  model: Transformer = nnx.merge(graphdef, state)
  batch, k = inputs.shape[0], beam_size
  limits = _length_limits(inputs, segments, max_len_a, max_len_b, max_decode_len)
  memory = model.encode(inputs, segments, positions)
  cache = _expand_cache(model.init_cache(memory, segments, max_decode_len), k)

  def body(s: _BeamState) -> _BeamState:
    previous = jax.lax.dynamic_index_in_dim(s.alive_seqs, jnp.maximum(s.step - 1, 0), axis=2, keepdims=False)
    previous = jnp.where(s.step == 0, EOS_ID, previous)
    logits, cache = model.decode_step(previous.reshape(-1), s.cache)
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, -1)
    allowed = _allowed_tokens(s.step, limits, logprobs.shape[-1])
    candidates = jnp.where(allowed, s.alive_logprobs[..., None] + logprobs, -jnp.inf)

    # EOS extensions among the k best extensions join the finished pool; ties keep the old.
    top, beams, tokens = _top_k(candidates, k)
    length = (s.step + 1).astype(jnp.float32)
    new_scores = jnp.where(tokens == EOS_ID, top / length ** length_penalty, -jnp.inf)
    pool_scores = jnp.concatenate([s.finished_scores, new_scores], axis=1)
    pool_seqs = jnp.concatenate([s.finished_seqs, _append(s.alive_seqs, beams, tokens, s.step)], axis=1)
    finished_scores, keep = jax.lax.top_k(pool_scores, k)

    alive_logprobs, beams, tokens = _top_k(jnp.where(jnp.arange(logprobs.shape[-1]) == EOS_ID, -jnp.inf,
                                                     candidates), k)
    return _BeamState(step=s.step + 1,
                      alive_seqs=_append(s.alive_seqs, beams, tokens, s.step),
                      alive_logprobs=alive_logprobs,
                      finished_seqs=_gather_beams(pool_seqs, keep),
                      finished_scores=finished_scores,
                      cache=_reorder_cache(cache, beams))

  def cond(s: _BeamState) -> jax.Array:
    return (s.step < max_decode_len) & jnp.any(_can_improve(s, limits, length_penalty))

  seqs = jnp.full((batch, k, max_decode_len), PAD_ID, jnp.int32)
  first = jnp.full((batch, k), -jnp.inf).at[:, 0].set(0.0)
  init = _BeamState(jnp.zeros((), jnp.int32), seqs, first, seqs, jnp.full((batch, k), -jnp.inf), cache)
  final = jax.lax.while_loop(cond, body, init)
  empty = final.finished_scores[..., None] == -jnp.inf
  return jnp.where(empty, PAD_ID, final.finished_seqs), final.finished_scores


def beam_search_nbest(model: Transformer | tuple[nnx.GraphDef, nnx.State], inputs: jax.Array,
                      inputs_segmentation: jax.Array, inputs_position: jax.Array, *, beam_size: int,
                      length_penalty: float, max_len_a: float, max_len_b: int,
                      max_decode_len: int) -> tuple[jax.Array, jax.Array]:
  """The `beam_size` best finished hypotheses per source sentence (one per row of `inputs`).

  Returns tokens [batch, beam_size, max_decode_len] int32 (each ending in EOS, PAD after) and
  their length-normalised scores [batch, beam_size], best first; slots left empty (fewer
  hypotheses finished) score -inf and hold only PAD. Compiled once per model structure, beam
  size, length limits and input shape; the length penalty is traced, so sweeping it does not
  recompile.
  """
  if beam_size < 1 or max_decode_len < 1:
    raise ValueError(f'beam_size and max_decode_len must be >= 1, got {beam_size} and {max_decode_len}')
  graphdef, state = nnx.split(model) if isinstance(model, nnx.Module) else model
  return _beam_search(graphdef, state, inputs, inputs_segmentation, inputs_position,
                      jnp.asarray(length_penalty, jnp.float32), beam_size=beam_size,
                      max_len_a=float(max_len_a), max_len_b=int(max_len_b), max_decode_len=max_decode_len)


def beam_search(model: Transformer | tuple[nnx.GraphDef, nnx.State], inputs: jax.Array,
                inputs_segmentation: jax.Array, inputs_position: jax.Array, *, beam_size: int,
                length_penalty: float, max_len_a: float, max_len_b: int,
                max_decode_len: int) -> tuple[jax.Array, jax.Array]:
  """Best hypothesis per source sentence: tokens [batch, max_decode_len], scores [batch].

  See `beam_search_nbest` for the arguments.
  """
  tokens, scores = beam_search_nbest(model, inputs, inputs_segmentation, inputs_position, beam_size=beam_size,
                                     length_penalty=length_penalty, max_len_a=max_len_a, max_len_b=max_len_b,
                                     max_decode_len=max_decode_len)
  return tokens[:, 0], scores[:, 0]
