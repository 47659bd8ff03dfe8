"""Scores against sacreBLEU's own API on real files, and the split-corpus statistics."""

import numpy as np
import pytest
import sacrebleu

from admin_jax.bleu import bleu_from_stats
from admin_jax.bleu import bleu_stats
from admin_jax.bleu import corpus_scores
from admin_jax.bleu import remove_bpe

WORDS = ['the', 'The', 'cat', 'sat', 'on', 'mat', 'Berlin', 'will', 'newly', 'elected', 'council', 'meets', 'today',
         ',', '.', 'said', 'Mr', 'Smith', 'weather', 'Europe']


def corpus(seed: int, n: int = 40) -> tuple[list[str], list[str]]:
  """(hypotheses, references) as token lists: references perturbed by substitution and deletion."""
  rng = np.random.default_rng(seed)
  refs, hyps = [], []
  for _ in range(n):
    ref = list(rng.choice(WORDS, rng.integers(4, 14)))
    hyp = [w for w in ref if rng.random() > 0.1]
    hyp = [str(rng.choice(WORDS)) if rng.random() < 0.2 else w for w in hyp]
    refs.append([str(w) for w in ref])
    hyps.append(hyp)
  return hyps, refs


def bpe(words: list[str], rng: np.random.Generator) -> str:
  """subword-nmt style: some words split in two with the '@@' continuation marker."""
  units = []
  for w in words:
    if len(w) > 3 and rng.random() < 0.5:
      cut = int(rng.integers(1, len(w)))
      units += [w[:cut] + '@@', w[cut:]]
    else:
      units.append(w)
  return ' '.join(units)


def join_units(line: str) -> str:
  """BPE removal written independently of remove_bpe: glue each '@@' unit to the next."""
  words, pending = [], ''
  for unit in line.split():
    if unit.endswith('@@'):
      pending += unit[:-2]
    else:
      words.append(pending + unit)
      pending = ''
  return ' '.join(words + ([pending] if pending else []))


def write_and_read(tmp_path, name: str, lines: list[str]) -> list[str]:
  path = tmp_path / name
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return path.read_text(encoding='utf-8').rstrip('\n').split('\n')


@pytest.mark.parametrize('lowercase', [False, True])
def test_detokenized_scores_equal_sacrebleu(tmp_path, lowercase):
  hyp_words, ref_words = corpus(0)
  hyps = write_and_read(tmp_path, 'hyp.txt', [' '.join(h) for h in hyp_words])
  refs = write_and_read(tmp_path, 'ref.txt', [' '.join(r) for r in ref_words])
  scores = corpus_scores(hyps, refs, tokenized_bleu=False, lowercase=lowercase)
  assert set(scores) == {'bleu', 'bleu_signature', 'chrf', 'chrf_signature'}
  expected = sacrebleu.corpus_bleu(hyps, [refs], lowercase=lowercase)
  assert 10 < expected.score < 90  # a corpus where BLEU is informative
  assert scores['bleu'] == expected.score
  fold = str.lower if lowercase else str
  assert scores['chrf'] == sacrebleu.corpus_chrf([fold(h) for h in hyps], [[fold(r) for r in refs]]).score
  case = 'case:lc' if lowercase else 'case:mixed'
  assert 'tok:13a' in scores['bleu_signature'] and case in scores['bleu_signature']
  assert 'nrefs:1' in scores['chrf_signature'] and case in scores['chrf_signature']


def test_remove_bpe_matches_fairseq():
  assert remove_bpe('the wi@@ ll@@ ing cat') == 'the willing cat'
  assert remove_bpe('a trailing@@') == 'a trailing'  # fairseq appends a space before replacing
  assert remove_bpe('no markers here') == 'no markers here'


@pytest.mark.parametrize('lowercase', [False, True])
def test_tokenized_bleu_is_sacrebleu_none_on_joined_units(tmp_path, lowercase):
  hyp_words, ref_words = corpus(1)
  rng = np.random.default_rng(2)
  hyps = write_and_read(tmp_path, 'hyp.bpe', [bpe(h, rng) for h in hyp_words])
  refs = write_and_read(tmp_path, 'ref.bpe', [bpe(r, rng) for r in ref_words])
  assert any('@@ ' in h for h in hyps)
  scores = corpus_scores(hyps, refs, tokenized_bleu=True, lowercase=lowercase)
  joined_hyps, joined_refs = [join_units(h) for h in hyps], [join_units(r) for r in refs]
  assert joined_hyps == [' '.join(h) for h in hyp_words]
  expected = sacrebleu.corpus_bleu(joined_hyps, [joined_refs], tokenize='none', force=True, lowercase=lowercase)
  assert scores['tokenized_bleu'] == expected.score
  assert scores['tokenized_bleu'] != sacrebleu.corpus_bleu(hyps, [refs], tokenize='none', force=True).score
  assert 'tok:none' in scores['tokenized_bleu_signature']
  assert scores['bleu'] == sacrebleu.corpus_bleu(joined_hyps, [joined_refs], lowercase=lowercase).score


@pytest.mark.parametrize('tokenize', ['13a', 'none'])
def test_stats_summed_over_a_split_equal_whole_corpus_bleu(tokenize):
  hyp_words, ref_words = corpus(3, n=31)
  hyps, refs = [' '.join(h) for h in hyp_words], [' '.join(r) for r in ref_words]
  whole = sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize, force=True).score
  shards = [(0, 12), (12, 31), (31, 31)]  # uneven, and one process with nothing to score
  stats = sum(bleu_stats(hyps[a:b], refs[a:b], tokenize=tokenize) for a, b in shards)
  np.testing.assert_array_equal(stats, bleu_stats(hyps, refs, tokenize=tokenize))
  assert bleu_from_stats(stats) == pytest.approx(whole, abs=1e-9)
  assert bleu_from_stats(bleu_stats(hyps[:12], refs[:12], tokenize=tokenize)) != pytest.approx(whole)
