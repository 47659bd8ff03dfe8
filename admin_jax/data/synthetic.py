"""A built-in toy language pair, so the Quickstart and tests need no download.

The pair is designed to be learnable by a small Transformer on a CPU in a few
minutes while still needing what translation needs, not a lookup table:

* Reordering: the source is SVO with adjectives before the noun and
  prepositions; the target is SOV with adjectives after the noun,
  postpositions and verb-final relative clauses.
* Agreement: target determiners and adjectives take a suffix for the noun's
  gender and number, and verbs a suffix for their subject's number, so the
  model must look across the sentence. Gender follows from the noun's last
  vowel, so it is a rule, not something to memorise per noun.
* Open vocabulary: every target stem is its source stem with the vowels
  shifted, so subword copying plus a rule generalises to rare words; word
  frequencies are Zipf-like so some words are rare.

Word classes are visible in the source form (adjectives end in -l, verbs in
-r, plural nouns in -s) because a small model should spend its capacity on
syntax, not on guessing parts of speech from a lexicon it saw a few times.

The corpus seed is fixed, not config.train.seed: the splits must be the same
sentences in every run so that BLEU numbers compare, and the splits are drawn
from one stream with duplicates removed so no pair is in two splits.
"""

import functools
import itertools
import random

CORPUS_SEED = 20200406
_CONSONANTS = 'bdfgkmnptvz'
_VOWELS = 'aeiou'
# Target stems are the source stems with every vowel shifted (no fixed points).
_CIPHER = str.maketrans(_VOWELS, 'eoiua')
_GENDER = {'a': 0, 'e': 1, 'i': 1, 'o': 2, 'u': 2}  # By the noun stem's last vowel.
_AGREEMENT = (('la', 'las'), ('ri', 'ris'), ('mo', 'mos'))  # [gender][plural].
_DETERMINERS = ('ta', 'ki', 'vo', 'ne')
_PREPOSITIONS = ('da', 'pu', 'ge', 'zo', 'bi')
_RELATIVE = 'ke'
_NUM_NOUNS, _NUM_ADJECTIVES, _NUM_VERBS = 800, 200, 200
_MIN_WORDS, _MAX_WORDS = 3, 20


def load_split(split: str, train_size: int, eval_size: int) -> list[tuple[str, str]]:
  """Returns the pairs of `split`: `train_size` for train, `eval_size` otherwise.

  Valid and test are drawn first, so they stay the same whatever the train size.
  """
  valid, test, train = _splits(train_size, eval_size)
  return {'train': train, 'valid': valid, 'test': test}[split]


@functools.lru_cache(maxsize=4)
def _splits(train_size: int, eval_size: int):
  stream = _unique_pairs(random.Random(CORPUS_SEED))
  valid = list(itertools.islice(stream, eval_size))
  test = list(itertools.islice(stream, eval_size))
  train = list(itertools.islice(stream, train_size))
  return valid, test, train


def _unique_pairs(rng: random.Random):
  lexicon = _Lexicon(rng)
  seen = set()
  while True:
    source, target = _sentence(rng, lexicon)
    if _MIN_WORDS <= len(source) <= _MAX_WORDS and (key := ' '.join(source)) not in seen:
      seen.add(key)
      yield key, ' '.join(target)


class _Lexicon:
  """Random stems of 2-3 CV syllables with Zipf-like sampling weights."""

  def __init__(self, rng: random.Random):
    stems = set()
    def new_stems(n):
      out = []
      while len(out) < n:
        stem = ''.join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS)
                       for _ in range(rng.choice((2, 2, 3))))
        if stem not in stems:
          stems.add(stem)
          out.append(stem)
      return out
    self.nouns = new_stems(_NUM_NOUNS)
    self.adjectives = new_stems(_NUM_ADJECTIVES)
    self.verbs = new_stems(_NUM_VERBS)

  def pick(self, rng: random.Random, words: list[str]) -> str:
    return rng.choices(words, cum_weights=_zipf_cum_weights(len(words)))[0]


@functools.cache
def _zipf_cum_weights(n: int) -> list[float]:
  return list(itertools.accumulate(1 / (rank + 20) for rank in range(n)))


def _sentence(rng, lex):
  """One (source words, target words) pair: S V O [PP] -> S [PP] O V."""
  subj_src, subj_tgt, subj_plural = _noun_phrase(rng, lex, rel_p=0.2, max_adjectives=2)
  obj_src, obj_tgt, _ = _noun_phrase(rng, lex, rel_p=0.2, max_adjectives=2)
  verb = lex.pick(rng, lex.verbs)
  source = subj_src + [verb + 'r'] + obj_src
  target = subj_tgt
  if rng.random() < 0.4:
    prep = rng.choice(_PREPOSITIONS)
    pp_src, pp_tgt, _ = _noun_phrase(rng, lex, rel_p=0.0, max_adjectives=1)
    source += [prep] + pp_src
    target = target + pp_tgt + [prep.translate(_CIPHER)]
  return source, target + obj_tgt + [_verb(verb, subj_plural)]


def _noun_phrase(rng, lex, rel_p, max_adjectives):
  """Det Adj* N [ke V NP] -> Det' N' Adj'* [ke' NP' V'], with agreement."""
  noun = lex.pick(rng, lex.nouns)
  plural = rng.random() < 0.3
  agreement = _AGREEMENT[_GENDER[noun[-1]]][plural]
  det = rng.choice(_DETERMINERS)
  adjectives = [lex.pick(rng, lex.adjectives)
                for _ in range(rng.choices(range(max_adjectives + 1), (6, 3, 1)[:max_adjectives + 1])[0])]
  source = [det] + [a + 'l' for a in adjectives] + [noun + ('s' if plural else '')]
  target = ([det.translate(_CIPHER) + agreement, noun.translate(_CIPHER) + ('n' if plural else '')]
            + [a.translate(_CIPHER) + agreement for a in adjectives])
  if rng.random() < rel_p:
    verb = lex.pick(rng, lex.verbs)
    obj_src, obj_tgt, _ = _noun_phrase(rng, lex, rel_p=0.0, max_adjectives=1)
    source += [_RELATIVE, verb + 'r'] + obj_src
    target += [_RELATIVE.translate(_CIPHER)] + obj_tgt + [_verb(verb, plural)]
  return source, target, plural


def _verb(stem: str, plural_subject: bool) -> str:
  return stem.translate(_CIPHER) + ('mi' if plural_subject else 'm')
