"""The model's static hyperparameters, frozen so that jit can treat them as constants."""

import dataclasses

import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int
  residual: str = 'admin'
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  d_model: int = 512
  ffn_dim: int = 2048
  num_heads: int = 8
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.1
  share_embeddings: bool = True
  dtype: str = 'float32'
  stream_dtype: str = 'float32'  # the residual stream x_k between sublayers
  scan_layers: bool = True
  unrolled_encoder_layers: int = 0  # of a scanned encoder, run before its scan
  unrolled_decoder_layers: int = 0  # of a scanned decoder, run before its scan
  remat: str = 'none'
  attention_impl: str = 'xla'  # xla | cudnn | flash (model/attention.py)
  layer_norm_impl: str = 'xla'  # xla | pallas (model/layer_norm_kernel.py): the Post-LN/Admin residual LayerNorm
  max_len: int = 256

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
    fields = {f.name for f in dataclasses.fields(cls)} - {'vocab_size', 'max_len'}
    return cls(vocab_size=vocab_size, max_len=config.data.max_len,
               **{name: config.model[name] for name in fields})
