"""Scores against sacreBLEU's own API and CLI on real files, hand-worked tokenized and compound-split
BLEU, and the split-corpus statistics."""

import json
import subprocess

import numpy as np
import pytest
import sacrebleu
from sacremoses import MosesDetokenizer

from admin_jax.bleu import bleu_from_stats
from admin_jax.bleu import bleu_stats
from admin_jax.bleu import remove_bpe
from admin_jax.score import compound_split
from admin_jax.score import corpus_scores
from conftest import REPO
from conftest import python
from conftest import subprocess_env

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
  scores = corpus_scores(hyps, refs, tgt_lang='en', lowercase=lowercase, pretokenized=False)
  assert set(scores) == {f'{name}{suffix}' for name in ('bleu', 'chrf', 'tokenized_bleu', 'compound_split_bleu')
                         for suffix in ('', '_signature')}
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
  scores = corpus_scores(hyps, refs, tgt_lang='en', lowercase=lowercase, pretokenized=True)
  joined_hyps, joined_refs = [join_units(h) for h in hyps], [join_units(r) for r in refs]
  assert joined_hyps == [' '.join(h) for h in hyp_words]
  expected = sacrebleu.corpus_bleu(joined_hyps, [joined_refs], tokenize='none', force=True, lowercase=lowercase)
  assert scores['tokenized_bleu'] == expected.score
  assert scores['tokenized_bleu'] != sacrebleu.corpus_bleu(hyps, [refs], tokenize='none', force=True).score
  assert 'tok:none' in scores['tokenized_bleu_signature']
  detokenize = MosesDetokenizer(lang='en').detokenize  # sacreBLEU scores plain text: fairseq's output detokenized
  plain_hyps, plain_refs = [detokenize(h.split()) for h in joined_hyps], [detokenize(r.split()) for r in joined_refs]
  assert plain_hyps != joined_hyps
  assert scores['bleu'] == sacrebleu.corpus_bleu(plain_hyps, [plain_refs], lowercase=lowercase).score


# One sentence, worked by hand. Moses -a makes "Ein E @-@ Mail kam ." against "ein E @-@ Mail kam .": only the
# first of 6 tokens differs (case is kept), so the n-gram precisions are 5/6, 4/5, 3/4, 2/3 with no brevity
# penalty: BLEU = (1/3) ** (1/4). Compound splitting then rewrites the token "@-@" itself ("@" "-" "@"), giving
# 8 tokens and precisions 7/8, 6/7, 5/6, 4/5: BLEU = (1/2) ** (1/4). Lowercased, the sentences are equal.
HAND_HYP, HAND_REF = 'Ein E-Mail kam.', 'ein E-Mail kam.'


@pytest.mark.parametrize('lowercase, tokenized, compound', [(False, 100 * (1 / 3) ** 0.25, 100 * (1 / 2) ** 0.25),
                                                            (True, 100.0, 100.0)])
def test_tokenized_and_compound_split_bleu_equal_hand_worked_values(lowercase, tokenized, compound):
  scores = corpus_scores([HAND_HYP], [HAND_REF], tgt_lang='de', lowercase=lowercase, pretokenized=False)
  assert scores['tokenized_bleu'] == pytest.approx(tokenized, abs=1e-9)
  assert scores['compound_split_bleu'] == pytest.approx(compound, abs=1e-9)
  # Already tokenized (fairseq's route, BPE'd): the same text after BPE removal scores the same.
  pretokenized = corpus_scores(['Ein E @-@ Ma@@ il kam .'], ['ein E @-@ Mail kam .'], tgt_lang='de',
                               lowercase=lowercase, pretokenized=True)
  assert pretokenized['tokenized_bleu'] == pytest.approx(tokenized, abs=1e-9)
  assert pretokenized['compound_split_bleu'] == pytest.approx(compound, abs=1e-9)


def test_compound_split_is_the_perl_rule_without_overlapping_matches():
  # perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g' <<< 'a-b-c x-y -z'
  assert compound_split('a-b-c x-y -z') == 'a ##AT##-##AT## b-c x ##AT##-##AT## y -z'


def test_score_job_prints_one_json_line_whose_sacrebleu_is_the_sacrebleu_cli(tmp_path):
  hyp_words, ref_words = corpus(4)
  (tmp_path / 'hyp.txt').write_text('\n'.join(' '.join(h) for h in hyp_words) + f'\n{HAND_HYP}\n')
  (tmp_path / 'ref.txt').write_text('\n'.join(' '.join(r) for r in ref_words) + f'\n{HAND_REF}\n')
  env = subprocess_env()
  ours = subprocess.run([python(), '-m', 'admin_jax.score', f'--hyp={tmp_path / "hyp.txt"}',
                         f'--ref={tmp_path / "ref.txt"}', '--tgt_lang=de'], cwd=REPO, env=env,
                        capture_output=True, text=True, check=True)
  theirs = subprocess.run([python(), '-m', 'sacrebleu', str(tmp_path / 'ref.txt'), '-i', str(tmp_path / 'hyp.txt'),
                           '-w', '6'], env=env, capture_output=True, text=True, check=True)
  line, = ours.stdout.splitlines()
  scores, cli = json.loads(line), json.loads(theirs.stdout)
  assert {'sacrebleu', 'sacrebleu_signature', 'tokenized_bleu', 'compound_split_bleu'} <= set(scores)
  assert scores['sacrebleu'] == pytest.approx(cli['score'], abs=1e-6)
  assert scores['sacrebleu_signature'] == cli['signature']
  assert scores['tokenized_bleu'] != pytest.approx(scores['sacrebleu'], abs=0.01)
  misaligned = subprocess.run([python(), '-m', 'admin_jax.score', f'--hyp={tmp_path / "hyp.txt"}',
                               f'--ref={tmp_path / "hyp.txt"}.missing', '--tgt_lang=de'], cwd=REPO, env=env,
                              capture_output=True, text=True)
  assert misaligned.returncode == 2 and misaligned.stderr.count('\n') == 1 and 'hyp.txt.missing' in misaligned.stderr


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
