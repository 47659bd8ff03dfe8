"""Orbax checkpoints: train state, data-iterator position and run metadata, saved asynchronously.

Kept: the latest `checkpoint.keep` steps plus the best by validation BLEU. Restoring takes the
target shardings from the current mesh, so a checkpoint written on one mesh loads on another.
A damaged latest checkpoint is reported and the one before it is used; nothing is deleted.
"""

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from admin_jax.errors import UserError

BLEU_METRIC = 'valid_bleu'


class Checkpoints:
  """One workdir's checkpoints/ folder."""

  def __init__(self, workdir: str, *, keep: int, every_steps: int):
    preservation = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m[BLEU_METRIC], n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps, preservation_policy=preservation, enable_async_checkpointing=True)
    self.directory = os.path.join(os.path.abspath(workdir) if '://' not in workdir else workdir, 'checkpoints')
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict, *, metrics: dict | None = None,
           force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, data-iterator state, metadata) of `step`, laid out as `abstract_state` says."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                              meta=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    return restored.state, restored.data, restored.meta

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_latest_intact(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
    """The newest checkpoint that loads; damaged newer ones are reported and left in place."""
    for step in reversed(self.steps()):
      try:
        return (step, *self.restore(step, abstract_state))
      except Exception as error:  # orbax raises many types for truncated or missing files
        logging.error('checkpoint %s/%d is damaged and skipped: %s', self.directory, step,
                      str(error).splitlines()[0] if str(error) else type(error).__name__)
        print(f'warning: checkpoint step {step} is damaged ({type(error).__name__}); trying the previous one')
    if self.steps():
      raise UserError(f'no intact checkpoint in {self.directory} (steps {self.steps()} all failed to load)')
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for restoring onto the current mesh."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
