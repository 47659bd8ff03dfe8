"""The training corpus as token arrays, tokenized once when training starts.

fairseq binarizes its corpus once and then reads token arrays; this pipeline does the same in
memory: each side's token ids one sentence after another in one array (uint16 where the
vocabulary allows), with every sentence's offset. That costs about 2 bytes a token instead of a
Python string per sentence, and lets packing work on lengths and batching gather from arrays.
"""

import dataclasses
import itertools
from typing import Iterable

import numpy as np
from tqdm import tqdm

from admin_jax.data.packing import FEATURES
from admin_jax.data.tokenizer import Tokenizer

_CHUNK = 65536  # sentences encoded per SentencePiece call


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
  """Pair i's `feature` ids are ids[feature][offsets[feature][i]:offsets[feature][i + 1]], EOS last."""
  ids: dict[str, np.ndarray]
  offsets: dict[str, np.ndarray]

  def __len__(self) -> int:
    return len(self.offsets[FEATURES[0]]) - 1

  def lengths(self) -> dict[str, np.ndarray]:
    return {k: np.diff(v).astype(np.int32) for k, v in self.offsets.items()}

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in (*self.ids.values(), *self.offsets.values()))


def tokenize_pairs(pairs: Iterable[tuple[str, str]], tokenizer: Tokenizer) -> TokenizedPairs:
  """Both sides of every pair, read and encoded a chunk at a time: neither all the strings nor all the
  token lists are ever held, only the arrays."""
  dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
  chunks = {k: [] for k in FEATURES}
  lengths = {k: [] for k in FEATURES}
  pairs = iter(pairs)
  with tqdm(unit='pair', desc='tokenizing the training pairs', leave=False) as progress:
    while chunk := list(itertools.islice(pairs, _CHUNK)):
      for side, k in enumerate(FEATURES):
        encoded = tokenizer.encode_batch([pair[side] for pair in chunk])
        lengths[k].append(np.fromiter(map(len, encoded), np.int64, len(encoded)))
        chunks[k].append(np.fromiter(itertools.chain.from_iterable(encoded), dtype, int(lengths[k][-1].sum())))
      progress.update(len(chunk))
  # One feature at a time, each chunk list dropped once joined: the peak is the arrays and a half, not twice.
  offsets = {k: np.concatenate([[0], np.cumsum(np.concatenate(lengths.pop(k)))]) for k in FEATURES}
  return TokenizedPairs(ids={k: np.concatenate(chunks.pop(k)) for k in FEATURES}, offsets=offsets)
