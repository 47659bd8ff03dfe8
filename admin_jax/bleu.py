"""Corpus BLEU and chrF through sacreBLEU's API; nothing here re-implements a metric.

Two BLEU numbers, because the paper's tables and today's convention differ:
- sacreBLEU (13a tokenisation of the text as given, signature reported): the comparable number
  for detokenised output, e.g. the SentencePiece pipeline.
- Tokenized BLEU, for fairseq-style pre-tokenized corpora: `fairseq-generate --remove-bpe`
  scores BPE-joined, Moses-tokenized words as they are (multi-bleu style). Here that is
  sacreBLEU with tokenize='none' on the `remove_bpe` text, which is what the tables report.

`lowercase` makes every metric case-insensitive (IWSLT14 is scored lowercased); the
signatures record it.

For evaluation split over processes, `bleu_stats` gives BLEU's sufficient statistics, which
sum over any split of the corpus, and `bleu_from_stats` scores the sum.
"""

import numpy as np
from sacrebleu.metrics import BLEU
from sacrebleu.metrics import CHRF
from sacrebleu.metrics.bleu import MAX_NGRAM_ORDER

# What sacreBLEU's BLEU defaults to; bleu_from_stats must smooth like corpus_score does.
_SMOOTH_METHOD = 'exp'


def remove_bpe(text: str) -> str:
  """Joins subword-nmt units ("wi@@ ll" -> "will") exactly as fairseq's --remove-bpe does."""
  return (text + ' ').replace('@@ ', '').rstrip()


def _bleu(tokenize: str, lowercase: bool, *, force: bool) -> BLEU:
  """`force` silences sacreBLEU's "looks tokenized" warning where tokenized text is intended."""
  return BLEU(tokenize=tokenize, lowercase=lowercase, force=force, smooth_method=_SMOOTH_METHOD)


def corpus_scores(hypotheses: list[str], references: list[str], *, tokenized_bleu: bool,
                  lowercase: bool) -> dict[str, float | str]:
  """sacreBLEU BLEU and chrF with their signatures, plus tokenized BLEU if `tokenized_bleu`.

  With `tokenized_bleu` (a pre-tokenized, BPE'd corpus) BPE is removed from hypotheses and
  references before every metric. Keys: bleu, bleu_signature, chrf, chrf_signature and, with
  `tokenized_bleu`, tokenized_bleu and tokenized_bleu_signature.
  """
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses but {len(references)} references')
  if tokenized_bleu:
    hypotheses = [remove_bpe(h) for h in hypotheses]
    references = [remove_bpe(r) for r in references]
  metrics = {'bleu': _bleu('13a', lowercase, force=tokenized_bleu), 'chrf': CHRF(lowercase=lowercase)}
  if tokenized_bleu:
    metrics['tokenized_bleu'] = _bleu('none', lowercase, force=True)
  out = {}
  for name, metric in metrics.items():
    out[name] = metric.corpus_score(hypotheses, [references]).score
    out[f'{name}_signature'] = str(metric.get_signature())  # known only after scoring
  return out


def bleu_stats(hypotheses: list[str], references: list[str], *, tokenize: str = '13a',
               lowercase: bool = False) -> np.ndarray:
  """BLEU's sufficient statistics [sys_len, ref_len, correct_1..4, total_1..4], int64.

  For tokenized BLEU pass `remove_bpe`'d text and tokenize='none'. The tokenisation warning
  is off: every process would repeat it for its shard.
  """
  if not hypotheses:
    return np.zeros(2 + 2 * MAX_NGRAM_ORDER, np.int64)
  score = _bleu(tokenize, lowercase, force=True).corpus_score(hypotheses, [references])
  return np.asarray([score.sys_len, score.ref_len, *score.counts, *score.totals], np.int64)


def bleu_from_stats(stats: np.ndarray) -> float:
  """Corpus BLEU from (summed) `bleu_stats`, as sacreBLEU's corpus_score computes it."""
  stats = [int(x) for x in stats]
  return BLEU.compute_bleu(correct=stats[2:2 + MAX_NGRAM_ORDER], total=stats[2 + MAX_NGRAM_ORDER:],
                           sys_len=stats[0], ref_len=stats[1], smooth_method=_SMOOTH_METHOD).score
