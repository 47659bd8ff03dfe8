"""base6: Transformer-base (6+6 layers, d_model 512) on 256 fully packed rows of 256 tokens per step.

    python -m admin_jax.bench --config=configs/bench/base6.py [--config.perf.attention_impl=flash ...]

The benchmarks time the defaults' model (Admin, dropout 0.1, shared 32k vocabulary, bfloat16) at a
batch that fills an H200; the `perf` section and `train.prng_impl` are the levers docs/PERF.md measures.
"""

import ml_collections

from configs import default

ROWS = 256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.data.tokens_per_batch = ROWS * config.data.max_len
  return config
