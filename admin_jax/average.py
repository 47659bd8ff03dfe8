"""Checkpoint averaging: `python -m admin_jax.average --workdir=DIR [--last=10] [--output_dir=OUT]`.

Writes the mean parameters of the checkpoints of DIR's last N epochs (a run that saves per epoch,
checkpoint.every_epochs; the paper averages the last 10 epochs), else of its last N checkpoints, as a
workdir of its own, OUT (default DIR/averaged): config.json, spm.model and one checkpoint at the
newest averaged step, which holds only {'params': ...} and, in its meta, the run's SentencePiece
model. Translate or evaluate it like any run, `--workdir=DIR/averaged`; it cannot resume training
(no optimizer state). To score an average without writing it, `--checkpoint=avg:N` in
translate/evaluate computes the same mean in memory.
"""

from absl import flags
from etils import epath

from admin_jax import checkpoint as checkpoint_lib
from admin_jax import cli
from admin_jax import distributed
from admin_jax import files
from admin_jax import trained_run
from admin_jax.data import tokenizer
from admin_jax.errors import UserError

LAST = flags.DEFINE_integer('last', 10, 'How many of the last epochs\' checkpoints (a run saving per epoch) or '
                            'else of the newest checkpoints to average.', lower_bound=1)
OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Workdir to write the average to; default: DIR/averaged.')


def write_average(workdir: str, last: int, output_dir: str) -> list[int]:
  """Averages the last `last` checkpoints of `workdir` into `output_dir`; returns the steps averaged."""
  model = trained_run.load_for_inference(workdir, f'avg:{last}')
  out = checkpoint_lib.Checkpoints(output_dir, keep=1, every_steps=1)
  if out.steps():
    raise UserError(f'{out.directory} already holds an average (step {out.latest_step()}); '
                    'remove it or choose another --output_dir')
  if distributed.is_lead():
    cli.write_config(model.config, output_dir)
    files.write_bytes(epath.Path(output_dir) / tokenizer.MODEL_NAME, model.tokenizer.model_proto)
  meta = {**checkpoint_lib.run_meta(model.config, model.tokenizer), 'averaged_steps': model.steps,
          'workdir': workdir}  # the checkpoint carries its vocabulary, as training's do
  out.save(model.steps[-1], {'params': model.params}, {}, meta, force=True)
  out.wait()
  out.close()
  return model.steps


def main(argv):
  del argv
  workdir = cli.require_workdir()
  distributed.initialize()
  output_dir = OUTPUT_DIR.value or str(epath.Path(workdir) / 'averaged')
  steps = write_average(workdir, LAST.value, output_dir)
  if distributed.is_lead():
    print(f'averaged steps {", ".join(map(str, steps))} -> {output_dir}')


if __name__ == '__main__':
  cli.run(main)
