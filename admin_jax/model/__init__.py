"""The Admin Transformer as Flax NNX modules; `residual.py` is where the variants differ."""

from admin_jax.model.config import TransformerConfig
from admin_jax.model.transformer import DecodeCache
from admin_jax.model.transformer import Transformer

__all__ = ['DecodeCache', 'Transformer', 'TransformerConfig']
