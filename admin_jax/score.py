"""Paper-comparable BLEU: `python -m admin_jax.score --hyp=FILE --ref=FILE --tgt_lang=de [--lowercase]`.

Prints one JSON line holding three BLEU figures of one corpus, because papers quote different ones:
- `sacrebleu`: sacreBLEU (13a) on detokenized text, with its signature: today's comparable number.
- `tokenized_bleu`: what the Admin paper's tables report. fairseq-generate --remove-bpe scores the
  Moses-tokenized text (`tokenizer.perl -a`: hyphens split into `@-@`, case kept) as it is, which is
  sacreBLEU with tokenize='none' on that text.
- `compound_split_bleu`: tokenized BLEU after fairseq's compound_split_bleu.sh, which rewrites every
  `(\\S)-(\\S)` as `\\1 ##AT##-##AT## \\2` in both files: the En-De figure many papers quote.
Plus chrF on the detokenized text. `evaluate` and in-training evaluation use `corpus_scores` too.

Detokenized input (the SentencePiece route) is Moses-tokenized here with sacremoses; pre-tokenized
input (`--pretokenized`, data.pretokenized: fairseq-prepared, Moses-tokenized and BPE'd text) has BPE
removed and is used as it was prepared for the tokenized figures (IWSLT14's was tokenized without
`-a`), and Moses-detokenized for sacreBLEU and chrF.
`--lowercase` makes every figure case-insensitive (IWSLT14 is scored lowercased).
"""

import functools
import json
import re

from absl import flags
from etils import epath
from sacrebleu.metrics import CHRF

from admin_jax import bleu
from admin_jax import cli
from admin_jax.errors import UserError

_COMPOUND = re.compile(r'(\S)-(\S)')


@functools.cache
def _moses(lang: str):
  from sacremoses import MosesDetokenizer  # pylint: disable=g-import-not-at-top  (only scoring needs it)
  from sacremoses import MosesTokenizer  # pylint: disable=g-import-not-at-top
  return MosesTokenizer(lang=lang), MosesDetokenizer(lang=lang)


def moses_tokenize(lines: list[str], lang: str) -> list[str]:
  """`tokenizer.perl -a -l LANG` as fairseq's WMT preparation runs it: aggressive dash splitting,
  XML special characters escaped (its default)."""
  tokenizer, _ = _moses(lang)
  return [tokenizer.tokenize(line, aggressive_dash_splits=True, return_str=True, escape=True) for line in lines]


def moses_detokenize(lines: list[str], lang: str) -> list[str]:
  """`detokenizer.perl -l LANG`: tokenized text back to plain text (`@-@` joined, escapes undone)."""
  _, detokenizer = _moses(lang)
  return [detokenizer.detokenize(line.split(), unescape=True) for line in lines]


def compound_split(line: str) -> str:
  """fairseq's compound_split_bleu.sh rule, perl's `s{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g` (matches do not overlap)."""
  return _COMPOUND.sub(r'\1 ##AT##-##AT## \2', line)


def corpus_scores(hypotheses: list[str], references: list[str], *, tgt_lang: str, lowercase: bool,
                  pretokenized: bool) -> dict[str, float | str]:
  """Keys: bleu (sacreBLEU), chrf, tokenized_bleu, compound_split_bleu, each with a `_signature`."""
  if len(hypotheses) != len(references):
    raise UserError(f'{len(hypotheses)} hypotheses but {len(references)} references')
  if pretokenized:
    tokenized = {'hyp': [bleu.remove_bpe(h) for h in hypotheses], 'ref': [bleu.remove_bpe(r) for r in references]}
    plain = {k: moses_detokenize(v, tgt_lang) for k, v in tokenized.items()}
  else:
    plain = {'hyp': hypotheses, 'ref': references}
    tokenized = {k: moses_tokenize(v, tgt_lang) for k, v in plain.items()}
  split = {k: [compound_split(line) for line in v] for k, v in tokenized.items()}
  figures = {'bleu': (bleu.sacrebleu_metric('13a', lowercase), plain),
             'chrf': (CHRF(lowercase=lowercase), plain),
             'tokenized_bleu': (bleu.sacrebleu_metric('none', lowercase), tokenized),
             'compound_split_bleu': (bleu.sacrebleu_metric('none', lowercase), split)}
  out = {}
  for name, (metric, texts) in figures.items():
    out[name] = metric.corpus_score(texts['hyp'], [texts['ref']]).score
    out[f'{name}_signature'] = str(metric.get_signature())  # known only after scoring
  return out


# The standalone scorer's JSON names sacreBLEU explicitly.
_JSON_NAMES = {'bleu': 'sacrebleu', 'bleu_signature': 'sacrebleu_signature'}

HYP = flags.DEFINE_string('hyp', None, 'Hypotheses, one sentence per line.')
REF = flags.DEFINE_string('ref', None, 'References, one sentence per line, aligned with --hyp.')
TGT_LANG = flags.DEFINE_string('tgt_lang', None, 'Target language code for Moses (de, fr, en, ...).')
LOWERCASE = flags.DEFINE_bool('lowercase', False, 'Case-insensitive figures (IWSLT14).')
PRETOKENIZED = flags.DEFINE_bool('pretokenized', False,
                                 'The files are Moses-tokenized, possibly BPE\'d (fairseq output), not plain text.')


def _read_lines(path: str, flag: str) -> list[str]:
  try:
    text = epath.Path(path).read_text(encoding='utf-8')
  except (OSError, UnicodeDecodeError) as error:
    raise UserError(f'--{flag}={path}: {getattr(error, "strerror", None) or error}') from None
  return text.rstrip('\n').split('\n') if text else []


def main(argv):
  del argv
  for flag in (HYP, REF, TGT_LANG):
    if not flag.value:
      raise UserError(f'--{flag.name} is required')
  hypotheses, references = _read_lines(HYP.value, 'hyp'), _read_lines(REF.value, 'ref')
  if len(hypotheses) != len(references):
    raise UserError(f'--hyp has {len(hypotheses)} lines but --ref has {len(references)}: the files must be aligned')
  scores = corpus_scores(hypotheses, references, tgt_lang=TGT_LANG.value, lowercase=LOWERCASE.value,
                         pretokenized=PRETOKENIZED.value)
  print(json.dumps({_JSON_NAMES.get(k, k): v for k, v in scores.items()}))


if __name__ == '__main__':
  cli.run(main)
