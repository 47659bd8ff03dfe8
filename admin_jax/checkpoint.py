"""Orbax checkpoints: train state, data-iterator position and run metadata, saved asynchronously.

A step folder checkpoints/STEP holds three items: `state` (parameters with omega, optimizer
state, step, dropout RNG key and the non-finite step counters), `data` (the training iterator's
position, JSON) and `meta` (JSON: the config, the vocabulary size and the SentencePiece model as
base64, so a checkpoint alone says how to tokenize; see `run_meta`).

Saved every `checkpoint.every_steps` steps, at the end of every `checkpoint.every_epochs`-th epoch
(its metrics then hold the epoch, as fairseq's checkpoint{EPOCH}.pt) and when forced (the last
step, a stop signal); kept: the latest `checkpoint.keep` steps, the checkpoints of the last
`checkpoint.keep` epochs, and the best by validation BLEU. Restoring takes the target
shardings from the current mesh, so a checkpoint written on one mesh loads on another.
A damaged checkpoint is reported and moved aside to STEP.damaged (orbax then ignores it and the
step can be saved again). Only retention deletes checkpoints; orbax's own cleanup of unfinished
temporary folders is off, so the one a killed save leaves stays until that step is saved again.
"""

import base64
import math
import os
import sys
import textwrap
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from admin_jax import files
from admin_jax.data.tokenizer import Tokenizer
from admin_jax.errors import UserError

BLEU_METRIC = 'valid_bleu'
EPOCH_METRIC = 'epoch'  # in the metrics of a checkpoint saved at the end of an epoch: which one (from 1)
DAMAGED_SUFFIX = '.damaged'


class Checkpoints:
  """One workdir's checkpoints/ folder."""

  def __init__(self, workdir: str, *, keep: int, every_steps: int):
    preservation = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(keep),
        checkpoint_managers.BestN(get_metric_fn=_bleu, n=1, keep_checkpoints_without_metrics=False),
        checkpoint_managers.BestN(get_metric_fn=_epoch, n=keep, keep_checkpoints_without_metrics=False),
    ])
    # Only the interval: orbax's default also saves the first step of every run, resumed ones too.
    interval = [checkpoint_managers.FixedIntervalPolicy(every_steps)] if every_steps > 0 else []
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=checkpoint_managers.AnySavePolicy(interval), preservation_policy=preservation,
        best_fn=_bleu, best_mode='max',  # without a best_fn, orbax writes no metrics and BestN forgets on restart
        enable_async_checkpointing=True, cleanup_tmp_directories=False)
    self.directory = os.path.join(workdir if files.is_remote(workdir) else os.path.abspath(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The kept step with the highest validation BLEU; None if none has one.

    Not `manager.best_step()`, which returns a step saved without validation when none has one.
    """
    scores = {step: metrics[BLEU_METRIC] for step in self.steps()
              if (metrics := self.manager.metrics(step)) and BLEU_METRIC in metrics}
    return max(scores, key=scores.get) if scores else None

  def epoch_steps(self) -> dict[int, int]:
    """{step: epoch} of the kept checkpoints saved at the end of an epoch."""
    return {step: int(metrics[EPOCH_METRIC]) for step in self.steps()
            if (metrics := self.manager.metrics(step)) and EPOCH_METRIC in metrics}

  def due(self, step: int) -> bool:
    """Whether `save` writes `step` unforced: on the interval and newer than every saved step."""
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_state: dict, meta: dict, *, metrics: dict | None = None,
           force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    # {} for a step without validation: orbax warns on every save that lacks metrics.
    return self.manager.save(step, args=args, metrics=metrics or {}, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, data-iterator state, metadata) of `step`, laid out as `abstract_state` says."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                              meta=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    return restored.state, restored.data, restored.meta

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """The parameters of checkpoint `step` alone, laid out as `abstract_params` says.

    A partial restore of the 'state' item: the optimizer moments (twice the parameters) are not
    read. The manager then has a PyTree handler for 'state', so this object must not also be
    used for a full `restore`.
    """
    target = {'params': abstract_params}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    return self.manager.restore(step, args=ocp.args.Composite(state=args)).state['params']

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_latest_intact(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
    """The newest checkpoint that loads; damaged newer ones are reported and moved aside, not deleted.

    Moving them aside lets the resumed run save those steps again; left in place, orbax would
    refuse to (the step exists) and would count them among the `keep` latest. When no step
    loads, nothing is moved: that points at the code or the config rather than at the files.
    """
    damaged = []
    for step in reversed(self.steps()):
      try:
        restored = self.restore(step, abstract_state)
      except Exception as error:  # orbax raises many types for truncated or missing files
        damaged.append((step, _first_line(error)))
        continue
      for bad_step, reason in damaged:
        self._set_aside(bad_step, reason)
      return (step, *restored)
    if damaged:
      raise UserError(f'no checkpoint in {self.directory} loads; step {damaged[0][0]}: {damaged[0][1]}')
    return None

  def _set_aside(self, step: int, reason: str) -> None:
    """Renames a damaged step folder to STEP.damaged (STEP.damaged.N if taken), reporting it once."""
    if jax.process_index() == 0:
      source = epath.Path(self.directory) / str(step)
      target, copies = source.with_name(source.name + DAMAGED_SUFFIX), 0
      while target.exists():
        copies += 1
        target = source.with_name(f'{source.name}{DAMAGED_SUFFIX}.{copies}')
      source.rename(target)
      print(f'warning: checkpoint {source} is damaged ({reason}); moved to {target}, trying the previous one',
            file=sys.stderr)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint {step} set aside')
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _bleu(metrics: dict) -> float:
  """Ranks checkpoints for BestN; those saved without validation rank last."""
  return metrics.get(BLEU_METRIC, -math.inf)


def _epoch(metrics: dict) -> float:
  """Ranks checkpoints for the epoch window: the later the epoch, the better; others last."""
  return metrics.get(EPOCH_METRIC, -math.inf)


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {textwrap.shorten(lines[0], 160)}' if lines else type(error).__name__


def abstract_like(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for restoring onto the current mesh."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def run_meta(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> dict:
  """The `meta` item: what a checkpoint needs besides arrays to be used on its own.

  The SentencePiece model travels as base64 inside the JSON (about 1 MiB for 32k pieces) rather
  than as a file item, so every checkpoint stays three orbax items of standard types.
  """
  return {'config': config.to_dict(), 'vocab_size': tokenizer.vocab_size,
          'spm_model': base64.b64encode(tokenizer.model_proto).decode('ascii')}


def tokenizer_from_meta(meta: dict) -> Tokenizer | None:
  """The SentencePiece model a `meta` item carries; None for one written before metas held it."""
  return Tokenizer(base64.b64decode(meta['spm_model'])) if 'spm_model' in meta else None


def check_same_tokenizer(meta: dict, tokenizer: Tokenizer, step: int) -> None:
  """Refuses to resume with a SentencePiece model other than the one the checkpoint was trained with."""
  if base64.b64decode(meta['spm_model']) != tokenizer.model_proto:
    raise UserError(f'checkpoint step {step} was trained with a different SentencePiece model than this run '
                    'loads (data.spm_model or DIR/spm.model); resume with the original one')
