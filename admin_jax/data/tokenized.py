"""The training corpus as token arrays, tokenized once.

fairseq binarizes its corpus once and then reads token arrays; this pipeline does the same: each
side's token ids one sentence after another in one array (uint16 where the vocabulary allows),
with every sentence's offset. That costs about 2 bytes a token instead of a Python string per
sentence, and lets packing work on lengths and batching gather from arrays. With `data.token_cache`
the arrays are written once per vocabulary and corpus as .npy files, which later runs map from disk
instead of tokenizing again.
"""

import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Iterable

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


def load_or_tokenize(pairs: Callable[[], Iterable[tuple[str, str]]], tokenizer: Tokenizer, *, cache_dir: str,
                     corpus: dict) -> TokenizedPairs:
  """The arrays from `cache_dir` if this vocabulary and `corpus` (what identifies it, corpora.describe)
  were tokenized there before, else `pairs()` tokenized, and written there when `cache_dir` is set."""
  if not cache_dir:
    return tokenize_pairs(pairs(), tokenizer)
  key = hashlib.sha256(tokenizer.model_proto + json.dumps(corpus, sort_keys=True).encode()).hexdigest()[:16]
  path = Path(cache_dir) / f'tokens-{key}'
  names = [(field, k) for field in ('ids', 'offsets') for k in FEATURES]
  if not path.is_dir():
    arrays = tokenize_pairs(pairs(), tokenizer)
    partial = path.with_name(f'{path.name}.partial-{os.getpid()}')
    partial.mkdir(parents=True, exist_ok=True)
    for field, k in names:
      np.save(partial / f'{field}-{k}.npy', getattr(arrays, field)[k])
    (partial / 'corpus.json').write_text(json.dumps(corpus, indent=2, sort_keys=True))
    try:
      partial.rename(path)  # whole, or not at all: a reader never sees a part
    except OSError:  # another process wrote the same arrays first
      for file in partial.iterdir():
        file.unlink()
      partial.rmdir()
    return arrays
  loaded = {field: {} for field in ('ids', 'offsets')}
  for field, k in names:
    loaded[field][k] = np.load(path / f'{field}-{k}.npy', mmap_mode='r')
  return TokenizedPairs(**loaded)
