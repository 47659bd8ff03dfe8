"""`python -m admin_jax.profile`: the former name of `admin_jax.profile_omega`, kept for the commands users type."""

from admin_jax import cli
from admin_jax.profile_omega import main

if __name__ == '__main__':
  cli.run(main)
