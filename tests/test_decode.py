"""Beam search against exhaustive search, greedy decoding and itself on mixed-length batches.

The references all use the uncached, teacher-forced `model.decode`, so they also check that
the cached `decode_step` path beam search runs on agrees with it.
"""

import itertools

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np
import pytest

from admin_jax.decode import beam_search
from admin_jax.decode import beam_search_nbest
from admin_jax.model import Transformer
from admin_jax.special_tokens import EOS_ID
from admin_jax.special_tokens import PAD_ID
from conftest import model_config

VOCAB = 6  # PAD, EOS and 4 tokens that can be emitted (UNK included, as in fairseq)
FREE_TOKENS = list(range(2, VOCAB))
ROWS, WIDTH = 96, 10  # the largest reference batch: 84 outputs of up to 4 tokens; sources up to 10


@pytest.fixture(scope='module')
def model():
  cfg = model_config(VOCAB, num_encoder_layers=1, num_decoder_layers=1, d_model=16, ffn_dim=32,
                     num_heads=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, dtype='float32')
  return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def teacher_forced(model):
  """log-probs [n, T, V] of decoder inputs [n, T] given sources [n, S].

  Inputs are padded to one shape (at most ROWS x WIDTH) so that the reference compiles once.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(sources, decoder_in):
    m = nnx.merge(graphdef, state)
    src_seg = (sources != PAD_ID).astype(jnp.int32)
    src_pos = jnp.broadcast_to(jnp.arange(sources.shape[1]), sources.shape)
    memory = m.encode(sources, src_seg, src_pos)
    seg = jnp.ones_like(decoder_in)
    pos = jnp.broadcast_to(jnp.arange(decoder_in.shape[1]), decoder_in.shape)
    return jax.nn.log_softmax(m.decode(decoder_in, seg, pos, memory, src_seg))

  def padded(x):
    return np.pad(x, ((0, ROWS - x.shape[0]), (0, WIDTH - x.shape[1])), constant_values=PAD_ID)

  def logprobs(sources, decoder_in):
    n, t = decoder_in.shape
    return np.array(run(padded(sources), padded(decoder_in)))[:n, :t]

  return logprobs


def sources(lengths: list[int], width: int, seed: int = 0) -> np.ndarray:
  """Rows of random tokens ending in EOS, PAD-padded to `width`."""
  rng = np.random.default_rng(seed)
  out = np.zeros((len(lengths), width), np.int32)
  for r, n in enumerate(lengths):
    out[r, :n] = rng.integers(2, VOCAB, n)
    out[r, n - 1] = EOS_ID
  return out


def search(model, src: np.ndarray, **kw) -> tuple[np.ndarray, np.ndarray]:
  """beam_search_nbest on PAD-padded source rows: tokens [B, beam, L], scores [B, beam]."""
  seg = (src != PAD_ID).astype(np.int32)
  pos = np.where(seg, np.arange(src.shape[1]), 0).astype(np.int32)
  tokens, scores = beam_search_nbest(model, src, seg, pos, **kw)
  best_tokens, best_scores = beam_search(model, src, seg, pos, **kw)
  np.testing.assert_array_equal(best_tokens, tokens[:, 0])
  np.testing.assert_array_equal(best_scores, scores[:, 0])
  return np.asarray(tokens), np.asarray(scores)


def limit(src_row: np.ndarray, a: float, b: int, max_decode_len: int) -> int:
  """fairseq's length limit, EOS included, written independently of admin_jax.decode."""
  n = int(np.sum((src_row != PAD_ID) & (src_row != EOS_ID)))
  return min(int(a * n + b) + 1, max_decode_len)


def scores_of(teacher_forced, src_row: np.ndarray, outputs: list[list[int]], length_penalty: float) -> np.ndarray:
  """sum log p / len ** length_penalty of each output (ending in EOS), teacher-forced."""
  width = max(map(len, outputs))
  decoder_in = np.zeros((len(outputs), width), np.int32)
  for i, out in enumerate(outputs):
    decoder_in[i, :len(out)] = [EOS_ID] + out[:-1]
  logprobs = teacher_forced(np.repeat(src_row[None], len(outputs), 0), decoder_in)
  return np.array([sum(logprobs[i, t, tok] for t, tok in enumerate(out)) / len(out) ** length_penalty
                   for i, out in enumerate(outputs)])


def strip(tokens: np.ndarray) -> list[int]:
  """Output tokens up to and including EOS; everything after must be PAD."""
  tokens = tokens.tolist()
  end = tokens.index(EOS_ID) + 1
  assert all(t == PAD_ID for t in tokens[end:]), tokens
  return tokens[:end]


def assert_rescored(teacher_forced, src_row: np.ndarray, tokens: np.ndarray, scores: np.ndarray,
                    length_penalty: float) -> list[list[int]]:
  """Every found hypothesis (score > -inf) has the score teacher forcing gives it; best first."""
  found = [strip(t) for t, s in zip(tokens, scores) if s > -np.inf]
  n = len(found)
  assert (scores[n:] == -np.inf).all() and (tokens[n:] == PAD_ID).all()
  assert (np.diff(scores[:n]) <= 0).all()
  np.testing.assert_allclose(scores[:n], scores_of(teacher_forced, src_row, found, length_penalty),
                             rtol=1e-5, atol=1e-5)
  return found


@pytest.mark.parametrize('length_penalty', [0.0, 1.0, 2.0])
def test_large_beam_is_exhaustive_search(model, teacher_forced, length_penalty):
  # Limits 3 and 4 tokens (EOS included). A beam of 84 never prunes: no step has more than
  # 4**2 prefixes * 5 extensions = 80 candidates and there are 4 + 16 + 64 = 84 outputs, so
  # the n-best list must hold every output with its exact score, in order.
  src = sources([3, 5], 6)
  max_len_a, max_len_b, max_decode_len = 1.0, 0, 4
  tokens, scores = search(model, src, beam_size=84, length_penalty=length_penalty, max_len_a=max_len_a,
                          max_len_b=max_len_b, max_decode_len=max_decode_len)
  for r in range(len(src)):
    n = limit(src[r], max_len_a, max_len_b, max_decode_len)
    outputs = [list(p) + [EOS_ID] for m in range(1, n) for p in itertools.product(FREE_TOKENS, repeat=m)]
    found = assert_rescored(teacher_forced, src[r], tokens[r], scores[r], length_penalty)
    assert sorted(found) == sorted(outputs)
    exhaustive = scores_of(teacher_forced, src[r], outputs, length_penalty)
    second, first = np.sort(exhaustive)[-2:]
    assert first - second > 1e-4  # a unique best, so the next line is sharp
    assert found[0] == outputs[int(np.argmax(exhaustive))]


def reference_greedy(teacher_forced, src: np.ndarray, limits: list[int], max_decode_len: int) -> np.ndarray:
  """argmax until EOS with the uncached decoder, under beam search's token rules."""
  out = np.zeros((len(src), max_decode_len), np.int32)
  done = np.zeros(len(src), bool)
  for t in range(max_decode_len):
    decoder_in = np.concatenate([np.full((len(src), 1), EOS_ID, np.int32), out[:, :-1]], axis=1)
    logprobs = teacher_forced(src, decoder_in)[:, t]
    logprobs[:, PAD_ID] = -np.inf
    if t == 0:
      logprobs[:, EOS_ID] = -np.inf
    for r in range(len(src)):
      if done[r]:
        continue
      out[r, t] = EOS_ID if t + 1 >= limits[r] else int(np.argmax(logprobs[r]))
      done[r] = out[r, t] == EOS_ID
  return out


def test_beam_size_one_is_greedy(model, teacher_forced):
  src = sources([4, 9, 2], 9, seed=1)
  kw = dict(max_len_a=1.0, max_len_b=2, max_decode_len=8)
  tokens, scores = search(model, src, beam_size=1, length_penalty=0.0, **kw)
  limits = [limit(row, kw['max_len_a'], kw['max_len_b'], kw['max_decode_len']) for row in src]
  np.testing.assert_array_equal(tokens[:, 0], reference_greedy(teacher_forced, src, limits, kw['max_decode_len']))
  for r in range(len(src)):
    assert len(assert_rescored(teacher_forced, src[r], tokens[r], scores[r], 0.0)[0]) <= limits[r]


def test_mixed_length_batch_equals_one_by_one(model, teacher_forced):
  kw = dict(beam_size=3, length_penalty=0.6, max_len_a=1.0, max_len_b=1, max_decode_len=10)
  batch = sources([2, 10], 10, seed=2)
  tokens, scores = search(model, batch, **kw)
  for r in range(len(batch)):
    alone_tokens, alone_scores = search(model, batch[r:r + 1], **kw)
    np.testing.assert_array_equal(tokens[r], alone_tokens[0])
    np.testing.assert_allclose(scores[r], alone_scores[0], rtol=1e-5, atol=1e-5)
    found = assert_rescored(teacher_forced, batch[r], tokens[r], scores[r], kw['length_penalty'])
    assert max(map(len, found)) <= limit(batch[r], kw['max_len_a'], kw['max_len_b'], kw['max_decode_len'])
