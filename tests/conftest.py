"""Shared fixtures: a tiny model config and packed batches built by hand."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
sys.path.insert(0, str(REPO))  # configs/ is imported as a package, as jobs do from the repository root
from admin_jax.model import TransformerConfig  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position

# Tests run tiny models, where XLA's optimisation passes cost far more time than they save; the
# numerics compared here do not depend on them (Flax's own examples test this way).
jax.config.update('jax_disable_most_optimizations', True)
# So do XLA 0.10's CPU fusion emitters: a tiny train step compiles in 2.9 s without them, 3.7 s with
# them, and the suite is mostly compiling. XLA 0.11 no longer has the flag (and refuses unknown ones).
if jax.__version_info__ < (0, 11):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_fusion_emitters=false".strip()


def model_config(vocab_size: int, **keys) -> TransformerConfig:
  """configs/default.py's model with `keys` set, each in the section (model or perf) that holds it.
  In float32 unless a test says otherwise: tests compare with NumPy references."""
  config = default.get_config()
  config.perf.dtype = 'float32'
  for key, value in keys.items():
    config['model' if key in config.model else 'perf'][key] = value
  return TransformerConfig.from_config(config, vocab_size)


def subprocess_env(devices: int | None = None) -> dict[str, str]:
  """Environment for a job run in a child process (with this process's XLA flags), optionally
  with N host CPU devices."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  if devices:
    env['XLA_FLAGS'] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  return env


def python() -> str:
  return sys.executable


def spawn(command: list[str], env: dict[str, str], cwd: pathlib.Path = REPO) -> subprocess.Popen:
  """Starts a job without waiting for it: tests start several before waiting for any (`finish`),
  since XLA compiles each program on one core."""
  return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(child: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
  """Waits for a job from `spawn`: its exit status and text output, as subprocess.run returns them."""
  stdout, stderr = child.communicate(timeout=timeout)
  return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def packed_batch(rng: np.random.Generator, batch: int, length: int, vocab: int,
                 lengths: list[list[int]]) -> dict[str, np.ndarray]:
  """A packed batch: row r holds sentences of the given lengths on both sides, then padding."""
  out = {k: np.zeros((batch, length), np.int32) for k in (
      'inputs', 'inputs_segmentation', 'inputs_position', 'targets', 'targets_segmentation', 'targets_position')}
  for r, row in enumerate(lengths):
    start = 0
    for seg, n in enumerate(row, start=1):
      for side in ('inputs', 'targets'):
        out[side][r, start:start + n] = rng.integers(3, vocab, n)
        out[side][r, start + n - 1] = 1  # EOS
        out[f'{side}_segmentation'][r, start:start + n] = seg
        out[f'{side}_position'][r, start:start + n] = np.arange(n)
      start += n
  return out


@pytest.fixture
def np_rng():
  return np.random.default_rng(0)


def shared_data_or_skip() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f'real corpora not present at {SHARED_DATA} (a fresh clone has no ../shared/data)')
  return SHARED_DATA
