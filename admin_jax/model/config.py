"""The model's static hyperparameters, frozen so that jit can treat them as constants.

They are the config's `model` section (what the model is) and `perf` section (how it is
computed) side by side; configs/default.py states every default once, and `from_config` is the
way to make one.
"""

import dataclasses

import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int
  # config.model
  residual: str
  num_encoder_layers: int
  num_decoder_layers: int
  d_model: int
  ffn_dim: int
  num_heads: int
  dropout: float
  attention_dropout: float
  activation_dropout: float
  share_embeddings: bool
  # config.perf
  dtype: str
  stream_dtype: str  # the residual stream x_k between sublayers
  scan_layers: bool
  unrolled_encoder_layers: int  # of a scanned encoder, run before its scan
  unrolled_decoder_layers: int  # of a scanned decoder, run before its scan
  remat: str
  attention_impl: str  # model/attention.py
  layer_norm_impl: str  # model/layer_norm_kernel.py: the Post-LN/Admin residual LayerNorm

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def stream(self) -> jnp.dtype:
    return jnp.dtype(self.stream_dtype)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, vocab_size: int) -> 'TransformerConfig':
    return cls(vocab_size=vocab_size, **config.model, **config.perf)
