"""Only the Admin profiling pass: `python -m admin_jax.profile --config=... --workdir=DIR`.

Writes DIR/omega.json, DIR/profile.ratio.init and DIR/omega.png from exactly the batch and
dropout key that `admin_jax.train` would use for step 0, so a later training run in the same
workdir reuses this profile instead of measuring again.
"""

import jax

from admin_jax import cli
from admin_jax import distributed
from admin_jax import optim
from admin_jax import profiling
from admin_jax import sharding
from admin_jax import train_step as train_step_lib
from admin_jax.data import pipeline
from admin_jax.data import tokenizer as tokenizer_lib
from admin_jax.errors import UserError
from admin_jax.model import TransformerConfig


def main(argv):
  del argv
  config = cli.load_config()
  workdir = cli.require_workdir()
  distributed.initialize()
  if config.model.residual != 'admin':
    raise UserError(f"profiling applies to model.residual='admin', not {config.model.residual!r}")
  if distributed.is_lead():
    cli.write_config(config, workdir)
  tokenizer = tokenizer_lib.load_or_train_tokenizer(config, workdir)
  model_cfg = TransformerConfig.from_config(config, tokenizer.vocab_size)
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = optim.make_optimizer(config.train)
  setup, state = train_step_lib.create_train_state(model_cfg, tx, schedule, mesh, config.train.seed)
  batch = next(pipeline.train_iterator(config, tokenizer, seed=config.train.seed,
                                       process_index=jax.process_index(), process_count=jax.process_count()))
  omegas = profiling.profile_omegas(setup, state, sharding.global_batch(batch, mesh),
                                    mask_padding=config.admin.mask_padding)
  if distributed.is_lead():
    profiling.write_profile(workdir, omegas, profiling.batch_statistics(batch))
  for stack in ('encoder', 'decoder'):
    print(f'{stack} omega: ' + ' '.join(f'{v:.3f}' for v in omegas[stack]))


if __name__ == '__main__':
  cli.run(main)
