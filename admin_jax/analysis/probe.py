"""The model and batch an analysis measures: float32, no dropout, omegas profiled for Admin.

The analyses compare residual variants on the same footing, so every probe model computes in
float32 (a 1e-4 weight perturbation drowns in bfloat16 rounding) with all dropout off (two
forwards must differ only in what is being measured, spec 7.1).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np

from admin_jax.model import Transformer
from admin_jax.model import TransformerConfig
from admin_jax.model.residual import DECODER_SUBLAYERS_PER_LAYER
from admin_jax.model.residual import ENCODER_SUBLAYERS_PER_LAYER
from admin_jax.special_tokens import EOS_ID

FIRST_WORD_ID = 3  # after PAD, EOS and UNK


def probe_config(cfg: TransformerConfig, **overrides) -> TransformerConfig:
  """`cfg` in float32 with every dropout off, plus `overrides` (e.g. residual, depth)."""
  return dataclasses.replace(cfg, dtype='float32', dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                             **overrides)


def random_batch(vocab_size: int, batch_size: int, length: int, seed: int) -> dict[str, np.ndarray]:
  """A fixed batch of random full-length sentences (no padding) on both sides, ending in EOS."""
  rng = np.random.default_rng(seed)
  batch = {}
  for side in ('inputs', 'targets'):
    tokens = rng.integers(FIRST_WORD_ID, vocab_size, (batch_size, length), dtype=np.int32)
    tokens[:, -1] = EOS_ID
    batch[side] = tokens
    batch[f'{side}_segmentation'] = np.ones((batch_size, length), np.int32)
    batch[f'{side}_position'] = np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length)).copy()
  return batch


def build_model(cfg: TransformerConfig, batch: dict[str, np.ndarray], seed: int) -> Transformer:
  """A freshly initialised model; Admin's omegas are set by one profiling pass over `batch` (spec 2.2)."""
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  if cfg.residual == 'admin':
    omegas = _profile(*nnx.split(model), dict(batch))
    model.set_omegas(omegas['encoder'], omegas['decoder'])
  return model


@functools.partial(jax.jit, static_argnums=0)
def _profile(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return nnx.merge(graphdef, state).profile_omegas(batch, rng=None)


def zero_offsets(cfg: TransformerConfig, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """The zero per-sublayer offsets `Transformer.trace` adds to every sublayer output."""
  batch_size, src_len = batch['inputs'].shape
  tgt_len = batch['targets'].shape[1]
  return {
      'encoder': jnp.zeros((cfg.num_encoder_layers, ENCODER_SUBLAYERS_PER_LAYER, batch_size, src_len, cfg.d_model)),
      'decoder': jnp.zeros((cfg.num_decoder_layers, DECODER_SUBLAYERS_PER_LAYER, batch_size, tgt_len, cfg.d_model)),
  }
