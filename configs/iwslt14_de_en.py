"""IWSLT14 De-En, `transformer_iwslt_de_en` (6L-6L, 512/1024/4 heads); arg: the residual.

Recipe (spec 5): lr 7e-4, warmup 6000, dropout 0.3, decoupled weight decay 1e-4, 4096 tokens per
update on 1 GPU, 100k updates, beam 5, lowercased tokenized BLEU on the fairseq-prepared BPE'd test
set. Point data.train/valid/test at the fairseq-prepared files (e.g. .../train reads train.de/.en).
"""

import ml_collections

from configs import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  _, residual = recipes.parse_arg(arg, default_layers=6)
  config = recipes.paper_config(residual)
  config.model.d_model, config.model.ffn_dim, config.model.num_heads = 512, 1024, 4
  config.model.dropout = 0.3
  config.data.source = 'text'
  config.data.src_lang, config.data.tgt_lang = 'de', 'en'
  config.data.train, config.data.valid, config.data.test = 'train', 'valid', 'test'
  config.data.pretokenized = True
  config.data.lowercase = True
  config.data.vocab_size = 10000 + 200  # 10k joint BPE merges plus symbols
  config.data.tokens_per_batch = 4096
  config.train.lr = 7e-4
  config.train.warmup_steps = 6000
  config.train.weight_decay = 1e-4
  config.train.num_steps = 100_000  # --max-update 100000, about 90 epochs: avg:10 averages epochs 81-90
  config.admin.profile_tokens = 4096  # the profiling run's --max-tokens, on one GPU
  config.eval.beam_size, config.eval.length_penalty = 5, 1.0
  return config
