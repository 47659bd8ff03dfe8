"""big6: Transformer-big (6+6 layers, d_model 1024) on 128 fully packed rows of 256 tokens per step.

    python -m admin_jax.bench --config=configs/bench/big6.py
"""

import ml_collections

from configs import default

ROWS = 128


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model.update(d_model=1024, ffn_dim=4096, num_heads=16)
  config.data.tokens_per_batch = ROWS * config.data.max_len
  return config
