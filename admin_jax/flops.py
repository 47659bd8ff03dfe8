"""Analytic training FLOPs of the encoder-decoder and the peak they are measured against.

MaxText's convention: matmul FLOPs only (2 per multiply-add), attention scores and context
counted over the full packed row, causal self-attention halved, embedding lookups free, and
x3 for forward plus backward (rematerialisation is not counted: this is model FLOPs).
"""

import time

import jax
import jax.numpy as jnp

from admin_jax import targets
from admin_jax.model import TransformerConfig


def attention_flops(cfg: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> float:
  """FLOPs of one training step's attention scores and context, the part a fused attention kernel
  does (the rest is `projection_flops`)."""
  d = cfg.d_model
  encoder_layer = 2 * 2 * batch * src_len * src_len * d
  decoder_layer = (2 * 2 * batch * tgt_len * tgt_len * d / 2  # causal
                   + 2 * 2 * batch * tgt_len * src_len * d)  # cross
  return 3.0 * (cfg.num_encoder_layers * encoder_layer + cfg.num_decoder_layers * decoder_layer)


def projection_flops(cfg: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> float:
  """FLOPs of one training step's matmuls with weights (projections, FFN, logits): what GEMMs do."""
  d, f, v = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
  s, t = batch * src_len, batch * tgt_len  # tokens per side
  ffn = 2 * 2 * d * f
  encoder_layer = s * (2 * d * 3 * d + 2 * d * d + ffn)
  decoder_layer = (t * (2 * d * 3 * d + 2 * d * d)  # self-attention projections
                   + t * 2 * d * d + s * 2 * d * 2 * d + t * 2 * d * d  # cross q, kv (per source token), out
                   + t * ffn)
  logits = t * 2 * d * v
  return 3.0 * (cfg.num_encoder_layers * encoder_layer + cfg.num_decoder_layers * decoder_layer + logits)


def training_flops(cfg: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> float:
  """FLOPs of one training step (forward + backward) on `batch` rows of the given lengths."""
  return projection_flops(cfg, batch, src_len, tgt_len) + attention_flops(cfg, batch, src_len, tgt_len)


def datasheet_peak(device: jax.Device | None = None) -> tuple[str, float] | None:
  """(device kind, dense bf16 TFLOP/s) from the data sheet targets.py cites, or None for a chip it lacks."""
  chip = targets.chip_of_kind((device or jax.devices()[0]).device_kind)
  return (chip.device_kind, chip.peak_tflops) if chip else None


def device_peak_tflops(device: jax.Device | None = None) -> tuple[float, str]:
  """(peak TFLOP/s, where it came from): the data sheet for known chips, else a measured matmul."""
  known = datasheet_peak(device)
  if known:
    return known[1], f'datasheet:{known[0]}'
  return measured_matmul_tflops(device), 'measured-matmul'


def measured_matmul_tflops(device: jax.Device | None = None, n: int | None = None, repeats: int = 5) -> float:
  """Best observed TFLOP/s of an n x n matmul in the compute dtype of the device."""
  device = device or jax.devices()[0]
  on_accelerator = device.platform != 'cpu'
  n = n or (8192 if on_accelerator else 512)
  dtype = jnp.bfloat16 if on_accelerator else jnp.float32
  # Random values, not ones: constant operands toggle fewer bits and draw less power, so they read
  # higher than real work can reach (zeros gave 13% more than random data on an H200).
  a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best / 1e12
