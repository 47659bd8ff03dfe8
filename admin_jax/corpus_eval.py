"""Validation loss, translation of whole corpora, and BLEU, on the training mesh.

Every process builds the same list of padded batches and feeds its own rows of each, so all
processes run the same number of steps with the same shapes and never wait on one another
(the hang MaxText and T5X hit with uneven shards); results come back to every process.
"""

from etils import epath
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from admin_jax import decode
from admin_jax import distributed
from admin_jax import files
from admin_jax import score as score_lib
from admin_jax import sharding
from admin_jax import train_step as train_step_lib
from admin_jax.data import corpora
from admin_jax.data import pipeline
from admin_jax.data.tokenizer import Tokenizer


def _process_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's share of a batch that every process holds whole."""
  rows = next(iter(batch.values())).shape[0]
  per_process = rows // jax.process_count()
  start = jax.process_index() * per_process
  return {k: v[start:start + per_process] for k, v in batch.items()}


def _gather(array: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(array))
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def write_outputs(workdir: str, split: str, hypotheses: list[str], scores: dict) -> None:
  """DIR/eval/<split>.hyp (one translation per line) and DIR/eval/<split>.scores (`key: value` lines)."""
  folder = epath.Path(workdir) / 'eval'
  files.write_text(folder / f'{split}.hyp', '\n'.join(hypotheses) + '\n')
  files.write_text(folder / f'{split}.scores', ''.join(f'{k}: {v}\n' for k, v in scores.items()))


class Evaluator:
  """Scores a model on the valid and test splits of the configured corpus."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer,
               setup: train_step_lib.Setup, mesh: jax.sharding.Mesh):
    self.config = config
    self.tokenizer = tokenizer
    self.setup = setup
    self.mesh = mesh
    self.batch_size = sharding.round_to_batch_shards(config.data.eval_batch_size, mesh)
    self._splits: dict[str, list[tuple[str, str]]] = {}
    eval_step = train_step_lib.make_eval_step(setup, config.train.label_smoothing)
    self._eval_step = jax.jit(eval_step)
    self._beam_search = jax.jit(self._search)

  def pairs(self, split: str) -> list[tuple[str, str]]:
    if split not in self._splits:
      pairs = corpora.load_pairs(self.config, split)
      limit = self.config.eval.max_sentences
      self._splits[split] = pairs[:limit] if split == 'valid' and limit else pairs
    return self._splits[split]

  def _search(self, params, batch):
    ev = self.config.eval
    return decode.beam_search(
        (self.setup.graphdef, params), batch['inputs'], batch['inputs_segmentation'], batch['inputs_position'],
        beam_size=ev.beam_size, length_penalty=ev.length_penalty, max_len_a=ev.max_len_a,
        max_len_b=ev.max_len_b, max_decode_len=self.config.data.max_len)[0]

  def _batches(self, sources, targets=None):
    return pipeline.eval_batches(sources, self.tokenizer, batch_size=self.batch_size,
                                 max_len=self.config.data.max_len, targets=targets)

  def translate(self, params, sources: list[str], progress: bool = False) -> list[str]:
    """Detokenised translations of `sources`, in input order."""
    out = [''] * len(sources)
    batches = list(self._batches(sources))
    for batch, indices in tqdm(batches, disable=not (progress and distributed.is_lead()), unit='batch',
                               desc='translating'):
      local = sharding.global_batch(_process_rows({k: v for k, v in batch.items() if k.startswith('inputs')}),
                                    self.mesh)
      with jax.set_mesh(self.mesh):
        tokens = _gather(self._beam_search(params, local))
      for row, index in enumerate(indices):
        if index >= 0:
          out[index] = self.tokenizer.decode(tokens[row])
    return out

  def loss(self, params, split: str) -> dict[str, float]:
    pairs = self.pairs(split)
    totals = np.zeros(3)
    for batch, _ in self._batches([s for s, _ in pairs], [t for _, t in pairs]):
      with jax.set_mesh(self.mesh):
        sums = self._eval_step(params, sharding.global_batch(_process_rows(batch), self.mesh))
      totals += np.asarray(jax.device_get(list(sums)))
    tokens = max(totals[2], 1.0)
    return {f'{split}_loss': totals[0] / tokens, f'{split}_nll': totals[1] / tokens}

  def score(self, hypotheses: list[str], references: list[str]) -> dict:
    """sacreBLEU, chrF, tokenized and compound-split BLEU (score.py), as `python -m admin_jax.score` gives them."""
    data = self.config.data
    return score_lib.corpus_scores(hypotheses, references, tgt_lang=data.tgt_lang, lowercase=data.lowercase,
                                   pretokenized=data.pretokenized)

  def validate(self, params) -> dict[str, float]:
    pairs = self.pairs('valid')
    scores = self.score(self.translate(params, [s for s, _ in pairs]), [t for _, t in pairs])
    return {**self.loss(params, 'valid'), 'valid_bleu': float(scores['bleu'])}

  def test(self, params, workdir: str, split: str = 'test') -> dict:
    """Translates a whole split, writes DIR/eval/<split>.hyp and .scores, returns the scores."""
    pairs = self.pairs(split)
    hypotheses = self.translate(params, [s for s, _ in pairs], progress=True)
    scores = self.score(hypotheses, [t for _, t in pairs])
    if distributed.is_lead():
      write_outputs(workdir, split, hypotheses, scores)
    return {f'{split}_{k}': v for k, v in scores.items()}
