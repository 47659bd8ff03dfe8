"""tiny: a 2+2-layer model on 8 rows of 32 tokens, which a CPU compiles and steps in seconds (tests, smoke runs).

    python -m admin_jax.bench --config=configs/bench/tiny.py --steps=3
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model.update(num_encoder_layers=2, num_decoder_layers=2, d_model=64, ffn_dim=128, num_heads=4)
  config.perf.dtype = 'float32'  # bfloat16 matmuls are emulated, hence slow, on CPUs
  config.data.update(vocab_size=1000, max_len=32, tokens_per_batch=8 * 32)
  return config
