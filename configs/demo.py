"""A small Admin model on the built-in synthetic corpus: trains, evaluates and scores on a 2-core CPU.

    python -m admin_jax.train --config=configs/demo.py --workdir=/tmp/admin-demo

The hyperparameters keep the paper's recipe (RAdam, inverse-sqrt warmup, label smoothing,
dropout 0.1) with the model, warmup and batch shrunk to fit a few CPU minutes.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)

  config.model.num_encoder_layers = 3
  config.model.num_decoder_layers = 3
  config.model.d_model = 128
  config.model.ffn_dim = 256
  config.model.num_heads = 4
  config.perf.dtype = 'float32'  # bfloat16 matmuls are emulated, hence slow, on CPUs

  config.data.source = 'synthetic'
  config.data.src_lang = 'src'
  config.data.tgt_lang = 'tgt'
  config.data.train = 'train'
  config.data.valid = 'valid'
  config.data.test = 'test'
  config.data.vocab_size = 1000
  config.data.max_len = 64
  config.data.tokens_per_batch = 2048
  config.data.eval_batch_size = 100
  config.data.synthetic_train_size = 20000
  config.data.synthetic_eval_size = 300

  config.train.num_steps = 500
  config.train.lr = 2e-3
  config.train.warmup_steps = 150
  config.train.log_every_steps = 50

  config.checkpoint.every_steps = 250
  config.checkpoint.keep = 2

  config.eval.every_steps = 250
  config.eval.beam_size = 4
  config.eval.max_sentences = 100
  return config
