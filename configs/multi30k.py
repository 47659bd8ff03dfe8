"""Multi30k English-German as plain-text files; arg: layers and residual like wmt14_en_de.

Point data.train/valid/test at the corpus prefixes, e.g. with the shared copy:
  --config.data.train=../shared/data/multi30k/train --config.data.valid=../shared/data/multi30k/val
  --config.data.test=../shared/data/multi30k/test_2016_flickr
The paper's WMT settings scaled to 29k sentence pairs: a smaller vocabulary and batch, shorter
warmup, dropout 0.3 against overfitting; the same recipe for every residual.
"""

import ml_collections

from configs import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  layers, residual = recipes.parse_arg(arg, default_layers=6)
  config = recipes.paper_config(residual)
  config.model.num_encoder_layers = config.model.num_decoder_layers = layers
  config.model.d_model, config.model.ffn_dim, config.model.num_heads = 256, 1024, 4
  config.model.dropout = 0.3
  config.data.source = 'text'
  config.data.src_lang, config.data.tgt_lang = 'en', 'de'
  config.data.train = '../shared/data/multi30k/train'
  config.data.valid = '../shared/data/multi30k/val'
  config.data.test = '../shared/data/multi30k/test_2016_flickr'
  config.data.vocab_size = 8000
  config.data.max_len = 64
  config.data.tokens_per_batch = 8192
  config.train.lr = 1e-3
  config.train.warmup_steps = 1000
  config.train.num_steps = 8000
  config.checkpoint.every_steps = 1000
  config.eval.every_steps = 1000
  config.eval.beam_size, config.eval.length_penalty = 4, 0.6
  return config
