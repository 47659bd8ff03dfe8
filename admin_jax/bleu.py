"""Corpus BLEU through sacreBLEU's API; nothing here re-implements a metric.

The BLEU settings every figure shares, fairseq's BPE removal, and BLEU's sufficient statistics.
Which figures a corpus gets (sacreBLEU, tokenized and compound-split BLEU) is `score.py`'s.

For evaluation split over processes, `bleu_stats` gives BLEU's sufficient statistics, which
sum over any split of the corpus, and `bleu_from_stats` scores the sum.
"""

import numpy as np
from sacrebleu.metrics import BLEU
from sacrebleu.metrics.bleu import MAX_NGRAM_ORDER

# What sacreBLEU's BLEU defaults to; bleu_from_stats must smooth like corpus_score does.
_SMOOTH_METHOD = 'exp'


def remove_bpe(text: str) -> str:
  """Joins subword-nmt units ("wi@@ ll" -> "will") exactly as fairseq's --remove-bpe does."""
  return (text + ' ').replace('@@ ', '').rstrip()


def sacrebleu_metric(tokenize: str, lowercase: bool, *, force: bool | None = None) -> BLEU:
  """sacreBLEU's BLEU as this project scores. `force` (default: for tokenize='none') silences the
  "looks tokenized" warning where tokenized text is intended."""
  force = tokenize == 'none' if force is None else force
  return BLEU(tokenize=tokenize, lowercase=lowercase, force=force, smooth_method=_SMOOTH_METHOD)


def bleu_stats(hypotheses: list[str], references: list[str], *, tokenize: str = '13a',
               lowercase: bool = False) -> np.ndarray:
  """BLEU's sufficient statistics [sys_len, ref_len, correct_1..4, total_1..4], int64.

  For tokenized BLEU pass `remove_bpe`'d text and tokenize='none'. The tokenisation warning
  is off: every process would repeat it for its shard.
  """
  if not hypotheses:
    return np.zeros(2 + 2 * MAX_NGRAM_ORDER, np.int64)
  score = sacrebleu_metric(tokenize, lowercase, force=True).corpus_score(hypotheses, [references])
  return np.asarray([score.sys_len, score.ref_len, *score.counts, *score.totals], np.int64)


def bleu_from_stats(stats: np.ndarray) -> float:
  """Corpus BLEU from (summed) `bleu_stats`, as sacreBLEU's corpus_score computes it."""
  stats = [int(x) for x in stats]
  return BLEU.compute_bleu(correct=stats[2:2 + MAX_NGRAM_ORDER], total=stats[2 + MAX_NGRAM_ORDER:],
                           sys_len=stats[0], ref_len=stats[1], smooth_method=_SMOOTH_METHOD).score
