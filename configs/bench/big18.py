"""big18: big6 with 18+18 layers, the paper's deep WMT14 En-De model at Transformer-big width.

    python -m admin_jax.bench --config=configs/bench/big18.py [--config.perf.scan_layers=true]
"""

import ml_collections

from configs.bench import big6


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = big6.get_config(arg)
  config.model.update(num_encoder_layers=18, num_decoder_layers=18)
  return config
