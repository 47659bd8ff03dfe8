"""One joint SentencePiece vocabulary for source and target.

A joint vocabulary is what lets `model.share_embeddings` tie the encoder,
decoder and output embeddings, as in the paper's WMT14 setup.

Fairseq-style corpora (`data.pretokenized`) arrive already Moses-tokenized and
BPE'd ("wi@@ ll"); their BPE units are the vocabulary the published numbers were
obtained with, so they must not be re-segmented. For those we train a
SentencePiece *word* model with the identity normaliser: every
whitespace-separated BPE unit is one piece, decode() gives back the BPE'd text
exactly, and removing "@@ " then gives the tokenized words that BLEU is
computed on. Staying inside SentencePiece keeps one file format (spm.model)
and one code path for both cases.
"""

import io
import os
import time
from typing import Iterable

from absl import logging
from etils import epath
import ml_collections
import numpy as np
import sentencepiece as spm

from admin_jax import files
from admin_jax.data import corpora
from admin_jax.errors import UserError

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
MODEL_NAME = 'spm.model'
_POLL_SECONDS = 5


class Tokenizer:
  """SentencePiece with this project's conventions: EOS appended, PAD dropped."""

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size: int = self._sp.vocab_size()
    self.model_proto = model_proto  # the serialized model, which checkpoints carry (checkpoint.run_meta)

  @classmethod
  def load(cls, path: epath.PathLike) -> 'Tokenizer':
    """Reads the model's bytes, so `path` may be a bucket (SentencePiece itself opens local files only)."""
    path = epath.Path(path)
    if not path.is_file():
      raise UserError(f'No such SentencePiece model: {path}')
    try:
      return cls(path.read_bytes())
    except RuntimeError as e:
      raise UserError(f'Not a SentencePiece model: {path}') from e

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text) + [EOS_ID]

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """`encode` of each text, in SentencePiece's own threads (twice as fast as one by one on one core)."""
    return [ids + [EOS_ID] for ids in self._sp.encode(texts, num_threads=os.cpu_count() or 1)]

  def pieces(self) -> list[str]:
    """Every piece, by id."""
    return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes up to the first EOS; ids past the vocabulary (padded embedding rows) become UNK."""
    kept = []
    for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
      if i == EOS_ID:
        break
      if i != PAD_ID:
        kept.append(i if 0 <= i < self.vocab_size else UNK_ID)
    return self._sp.decode(kept)


def load_or_train_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """The configured model, else the workdir's (a resumed run), else a new one.

  With several JAX processes only process 0 trains; the others wait for the
  file, so every process ends up with the same vocabulary.
  """
  if config.data.spm_model:
    return Tokenizer.load(config.data.spm_model)
  path = epath.Path(workdir) / MODEL_NAME
  if path.is_file():
    return Tokenizer.load(path)
  import jax  # Only needed here; keeps the tokenizer importable without JAX set up.
  if jax.process_index() == 0:
    files.write_bytes(path, _train(config))  # whole: the waiting processes never see a partial file
    logging.info('Wrote SentencePiece model %s', path)
  else:
    while not path.is_file():
      logging.log_every_n_seconds(logging.INFO, 'Waiting for process 0 to write %s', 60, path)
      time.sleep(_POLL_SECONDS)
  return Tokenizer.load(path)


def _train(config: ml_collections.ConfigDict) -> bytes:
  """Trains on both sides of the training pairs; returns the serialized model."""
  data = config.data
  if data.pretokenized:
    options = dict(model_type='word', normalization_rule_name='identity',
                   max_sentencepiece_length=512, split_by_number=False,
                   split_by_unicode_script=False)
  else:
    options = dict(model_type=data.spm_model_type)
  corpus_errors = []  # a bad corpus file, found while SentencePiece reads, which wraps it in its own error

  def sentences():
    try:
      for pair in corpora.stream_pairs(config, 'train'):
        yield from pair
    except UserError as error:
      corpus_errors.append(error)
      raise

  model = io.BytesIO()
  start = time.time()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),  # streamed: SentencePiece keeps a sample of input_sentence_size
        model_writer=model,
        vocab_size=data.vocab_size,
        # A small corpus gets a smaller vocabulary instead of an error.
        hard_vocab_limit=False,
        character_coverage=1.0,
        input_sentence_size=data.spm_max_sentences,
        shuffle_input_sentence=True,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
        **options)
  except RuntimeError as e:
    if corpus_errors:
      raise corpus_errors[0] from None
    reason = str(e).strip().partition('\n')[0]
    raise UserError(f'SentencePiece training failed: {reason}') from e
  logging.info('Trained a %s SentencePiece model in %.1fs', options['model_type'],
               time.time() - start)
  return model.getvalue()
