"""A device trace of a few steps of the real run, as Flax's wmt example and big_vision capture one.

`train.trace_steps=N` (with `train.trace_first_step=S`) records steps S+1..S+N of training with
`jax.profiler` into `DIR/trace`, each step annotated, so a run on a TPU or GPU can be profiled as it
trains: open it with TensorBoard's profile plugin or XProf (`tensorboard --logdir=DIR/trace`).
The first steps are left out by default because they hold compilation and allocator warm-up.
"""

import jax
import ml_collections
from etils import epath

TRACE_DIR = 'trace'


class StepTracer:
  """Starts a trace before step `first + 1` and stops it after step `first + count`."""

  def __init__(self, train: ml_collections.ConfigDict, workdir: str, *, enabled: bool):
    self._first = train.trace_first_step
    self._last = train.trace_first_step + train.trace_steps
    self._directory = str(epath.Path(workdir) / TRACE_DIR)
    self._enabled = enabled and train.trace_steps > 0
    self._tracing = False

  def step(self, step: int) -> jax.profiler.StepTraceAnnotation:
    """Context around the work of step `step` (1-based): starts the trace at the first traced step."""
    if self._enabled and step == self._first + 1 and not self._tracing:
      jax.profiler.start_trace(self._directory)
      self._tracing = True
    return jax.profiler.StepTraceAnnotation('train', step_num=step)

  def stepped(self, step: int, outputs) -> None:
    """After step `step`: stops the trace once the last traced step's `outputs` are computed."""
    if self._tracing and step >= self._last:
      jax.block_until_ready(outputs)
      self.stop()
      print(f'traced steps {self._first + 1}..{step} -> {self._directory}')

  def stop(self) -> None:
    """Ends a trace cut short (the run stopped inside the traced steps)."""
    if self._tracing:
      jax.profiler.stop_trace()
      self._tracing = False
