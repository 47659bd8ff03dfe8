"""Only the Admin profiling pass that sets omega: `python -m admin_jax.profile_omega --config=... --workdir=DIR`
(also `python -m admin_jax.profile`, its former name).

Writes DIR/omega.json, DIR/profile.ratio.init and DIR/omega.png from exactly the batch and
dropout key that `admin_jax.train` would use for step 0, so a later training run in the same
workdir reuses this profile instead of measuring again.
"""

import ml_collections

from admin_jax import cli
from admin_jax import distributed
from admin_jax import omega_init
from admin_jax import train
from admin_jax.errors import UserError


def profile_workdir(config: ml_collections.ConfigDict, workdir: str) -> omega_init.Omegas:
  """Profiles omega as step 0 of a run of `config` in `workdir` would, and writes the profile files there."""
  if config.model.residual != 'admin':
    raise UserError(f"profiling applies to model.residual='admin', not {config.model.residual!r}")
  run = train.start_run(config, workdir)
  batch, rows = omega_init.profile_batch(next(run.train_iter), config.admin.profile_tokens, run.mesh)
  omegas = omega_init.profile_omegas(run.setup, run.state, batch, mask_padding=config.admin.mask_padding)
  run.train_iter.close()
  if distributed.is_lead():
    omega_init.write_profile(workdir, omegas, omega_init.batch_statistics(rows))
  return omegas


def main(argv):
  del argv
  config = cli.load_config()
  workdir = cli.require_workdir()
  distributed.initialize()
  omegas = profile_workdir(config, workdir)
  for stack in ('encoder', 'decoder'):
    print(f'{stack} omega: ' + ' '.join(f'{v:.3f}' for v in omegas[stack]))


if __name__ == '__main__':
  cli.run(main)
