"""Tests of the launch scripts in launch/, through their --dry-run output.

No gcloud, srun or TPU/GPU is needed: fake `gcloud`, `srun`, `sbatch` and `tar`
on PATH record any call, and every test checks that a dry run made none.
`scontrol` is faked to print fixed hostnames so the SLURM dry run is
deterministic.
"""

import glob
import os
import pathlib
import shlex
import shutil
import stat
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / 'launch'
TPU = LAUNCH / 'tpu_vm.sh'
LOCAL = LAUNCH / 'local.sh'
SLURM = LAUNCH / 'gpu_slurm.sbatch'

# Environment variables the scripts read as defaults; cleared for determinism.
_SCRIPT_ENV_VARS = (
    'TPU_NAME', 'TPU_ZONE', 'TPU_ACCELERATOR_TYPE', 'TPU_RUNTIME_VERSION',
    'JAX_VERSION', 'CONFIG', 'WORKDIR', 'COORDINATOR_PORT', 'PYTHON',
    'JAX_PLATFORMS', 'TMPDIR')

FAKE_HOSTS = ('gpu-node-07', 'gpu-node-08', 'gpu-node-09')


def _write_executable(path: pathlib.Path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def sandbox(tmp_path):
  """Fake tools on PATH, an empty TMPDIR and a clean environment."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  calls = tmp_path / 'calls.log'
  for tool in ('gcloud', 'srun', 'sbatch', 'tar'):
    _write_executable(
        bin_dir / tool, f'#!/bin/sh\necho "{tool} $*" >> {shlex.quote(str(calls))}\nexit 1\n')
  hosts = ''.join(f'echo {h}\n' for h in FAKE_HOSTS)
  _write_executable(bin_dir / 'scontrol', f'#!/bin/sh\n{hosts}')
  tmp = tmp_path / 'tmp'
  tmp.mkdir()

  env = {k: v for k, v in os.environ.items()
         if k not in _SCRIPT_ENV_VARS and not k.startswith('SLURM_')}
  env['PATH'] = f'{bin_dir}{os.pathsep}{env.get("PATH", "")}'
  env['TMPDIR'] = str(tmp)

  class Sandbox:
    pass

  box = Sandbox()
  box.env = env
  box.tmp = tmp
  box.calls = calls
  yield box
  # A dry run must never call the real tools, nor write temporary files.
  assert not calls.exists(), calls.read_text()
  assert not list(tmp.iterdir())


def _run(script, args, env, extra_env=None):
  if extra_env:
    env = {**env, **extra_env}
  return subprocess.run(
      ['bash', str(script), *args], env=env, cwd=REPO,
      capture_output=True, text=True, timeout=60)


def _dry_run(script, args, env, extra_env=None):
  """Runs `script --dry-run args` and returns its stdout lines, one command each."""
  proc = _run(script, ['--dry-run', *args], env, extra_env)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.splitlines()


def _remote_command(line):
  """The --command argument of a `gcloud compute tpus tpu-vm ssh` line."""
  words = shlex.split(line)
  assert words[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'], line
  return words[words.index('--command') + 1]


# ----- launch/tpu_vm.sh ------------------------------------------------------

_TPU_ARGS = (
    '--accelerator-type=v4-32', '--zone', 'europe-west4-a', '--name=admin-v4',
    '--workdir=gs://bucket/runs/admin6l', '--jax-version=0.4.35',
    '--config=configs/default.py:big', '--config.train.num_steps=100')


def test_tpu_all_runs_every_step_on_all_workers(sandbox):
  lines = _dry_run(TPU, ['all', *_TPU_ARGS, '--no-check'], sandbox.env)
  tarball = f'{sandbox.tmp}/admin-jax-src-admin-v4.tar.gz'
  assert lines[0] == (
      'gcloud compute tpus tpu-vm create admin-v4 --zone=europe-west4-a '
      '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base')
  assert shlex.split(lines[1])[:3] == ['tar', '-czf', tarball]
  assert shlex.split(lines[1])[-3:] == ['-C', str(REPO), '.']
  assert lines[2] == (
      f'gcloud compute tpus tpu-vm scp {tarball} admin-v4:admin-jax-src.tar.gz '
      '--zone=europe-west4-a --worker=all')
  assert lines[3] == f'rm -f {tarball}'

  install = shlex.split(lines[4])
  assert install[5:8] == ['admin-v4', '--zone=europe-west4-a', '--worker=all']
  assert _remote_command(lines[4]) == (
      'rm -rf admin-jax && mkdir admin-jax && tar -xzf admin-jax-src.tar.gz -C admin-jax'
      ' && rm admin-jax-src.tar.gz'
      ' && if ! command -v python3.11 >/dev/null; then sudo apt-get update -qq'
      ' && sudo apt-get install -y -qq python3.11 python3.11-venv; fi'
      ' && cd admin-jax && python3.11 -m venv .venv'
      " && .venv/bin/python -m pip install 'jax[tpu]==0.4.35'"
      ' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html'
      " && .venv/bin/python -m pip install -e '.[gcs]'")

  train = shlex.split(lines[5])
  assert train[5:8] == ['admin-v4', '--zone=europe-west4-a', '--worker=all']
  assert _remote_command(lines[5]) == (
      '(cd admin-jax && exec nohup .venv/bin/python -m admin_jax.train'
      ' --config=configs/default.py:big --workdir=gs://bucket/runs/admin6l'
      ' --config.train.num_steps=100)'
      ' >admin-jax-train.log 2>&1 </dev/null & echo $! >admin-jax-train.pid')

  assert lines[6] == (
      'gcloud compute tpus tpu-vm ssh admin-v4 --zone=europe-west4-a --worker=0 --command '
      '\'tail -n +1 -F --pid="$(cat admin-jax-train.pid)" admin-jax-train.log\'')
  assert len(lines) == 7
  assert not any(' delete ' in line for line in lines)
  for line in lines[4:]:  # the remote command lines are valid bash
    subprocess.run(['bash', '-n', '-c', _remote_command(line)], check=True)


def test_tpu_all_first_compiles_the_config_for_the_slice_here(sandbox):
  """`check` (the first step of `all`) compiles the run's config, overrides included, for the slice on this
  machine; a config that does not fit stops the script before `create`."""
  check = ('python3 -m admin_jax.compile --config=configs/default.py:big --target=v4-32 '
           '--config.train.num_steps=100')
  lines = _dry_run(TPU, ['all', *_TPU_ARGS, '--', '--extra'], sandbox.env)
  assert lines[0] == check and lines[1].startswith('gcloud compute tpus tpu-vm create ')
  assert _dry_run(TPU, ['check', *_TPU_ARGS, '--python=python3.11'], sandbox.env) == [
      check.replace('python3', 'python3.11', 1)]
  fake_python = sandbox.tmp.parent / 'bin' / 'python3'
  fake_python.write_text(f'#!/bin/sh\necho "python3 $*" >> {shlex.quote(str(sandbox.calls))}\n'
                         'echo "error: v4-32: needs 40.00 GiB per chip, 30.75 GiB available" >&2\nexit 1\n')
  fake_python.chmod(0o755)
  proc = _run(TPU, ['all', *_TPU_ARGS], sandbox.env)
  assert proc.returncode == 1 and 'needs 40.00 GiB per chip' in proc.stderr
  assert sandbox.calls.read_text().splitlines() == [check]  # no gcloud call: nothing created
  sandbox.calls.unlink()


def test_tpu_delete_only_when_asked(sandbox):
  delete = 'gcloud compute tpus tpu-vm delete admin-v4 --zone=europe-west4-a --quiet'
  lines = _dry_run(TPU, ['all', *_TPU_ARGS, '--delete'], sandbox.env)
  assert lines[-1] == delete
  assert lines[-2].startswith('gcloud compute tpus tpu-vm ssh admin-v4 ')  # the log stream
  assert len(lines) == 9  # the check, then the steps on the slice
  for args in (['delete'], ['--delete']):
    lines = _dry_run(TPU, [*args, '--name=admin-v4', '--zone=europe-west4-a'], sandbox.env)
    assert lines == [delete]
  for command in ('create', 'train', 'logs', 'stop'):
    lines = _dry_run(TPU, [command, *_TPU_ARGS], sandbox.env)
    assert not any(' delete ' in line for line in lines), command


def test_tpu_delete_needs_the_log_stream(sandbox):
  proc = _run(TPU, ['--dry-run', 'all', *_TPU_ARGS, '--no-follow', '--delete'], sandbox.env)
  assert proc.returncode != 0
  assert '--no-follow' in proc.stderr


def test_tpu_train_passes_overrides_through_two_levels_of_quoting(sandbox):
  odd = "--config.data.train=/data/my corpus's $HOME"
  lines = _dry_run(
      TPU, ['train', *_TPU_ARGS, odd, '--no-follow', '--', '--extra', 'a b'], sandbox.env)
  assert len(lines) == 1
  assert '--worker=all' in shlex.split(lines[0])
  remote = shlex.split(_remote_command(lines[0]))
  start = remote.index('.venv/bin/python')
  end = remote.index('>admin-jax-train.log')
  assert remote[start:end] == [
      '.venv/bin/python', '-m', 'admin_jax.train', '--config=configs/default.py:big',
      '--workdir=gs://bucket/runs/admin6l', '--config.train.num_steps=100', odd,
      '--extra', 'a b)']  # the ) closing the subshell follows the last word


def test_tpu_train_needs_workdir(sandbox):
  proc = _run(TPU, ['--dry-run', 'train', '--jax-version=1'], sandbox.env)
  assert proc.returncode != 0
  assert '--workdir' in proc.stderr


def test_tpu_logs_and_stop(sandbox):
  logs = _dry_run(TPU, ['logs', '--name=t'], sandbox.env)
  assert logs == [
      'gcloud compute tpus tpu-vm ssh t --zone=us-central2-b --worker=0 --command '
      '\'tail -n +1 -F --pid="$(cat admin-jax-train.pid)" admin-jax-train.log\'']
  stop = _dry_run(TPU, ['stop', '--name=t'], sandbox.env)
  assert len(stop) == 1
  assert '--worker=all' in shlex.split(stop[0])
  assert _remote_command(stop[0]) == 'kill "$(cat admin-jax-train.pid)" || true'


@pytest.mark.parametrize('accelerator, runtime', [
    ('v4-8', 'tpu-ubuntu2204-base'),
    ('v3-32', 'tpu-ubuntu2204-base'),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-8', 'v2-alpha-tpuv5'),
    ('v6e-8', 'v2-alpha-tpuv6e'),
])
def test_tpu_runtime_version_follows_accelerator(sandbox, accelerator, runtime):
  lines = _dry_run(TPU, ['create', f'--accelerator-type={accelerator}'], sandbox.env)
  assert lines == [
      f'gcloud compute tpus tpu-vm create admin-jax --zone=us-central2-b '
      f'--accelerator-type={accelerator} --version={runtime}']


def test_tpu_create_options_and_project_on_every_gcloud_line(sandbox):
  lines = _dry_run(
      TPU, ['create', '--name', 'n', '--zone=z', '--runtime-version=custom', '--spot',
            '--project=my-proj'], sandbox.env)
  assert lines == [
      'gcloud compute tpus tpu-vm create n --zone=z --project=my-proj '
      '--accelerator-type=v4-8 --version=custom --spot']
  lines = _dry_run(TPU, ['all', *_TPU_ARGS, '--project=my-proj', '--delete'], sandbox.env)
  gcloud_lines = [line for line in lines if line.startswith('gcloud ')]
  assert len(gcloud_lines) == 6
  assert all('--project=my-proj' in shlex.split(line) for line in gcloud_lines)


def test_tpu_install_from_git(sandbox):
  lines = _dry_run(
      TPU, ['install', '--name=t', '--jax-version=0.4.35',
            '--repo-url=https://example.com/admin-jax.git', '--ref=v1.0'], sandbox.env)
  assert len(lines) == 1  # no local tarball to pack or copy
  assert _remote_command(lines[0]).startswith(
      'rm -rf admin-jax && git clone https://example.com/admin-jax.git admin-jax'
      ' && git -C admin-jax checkout v1.0 && if ')


def test_tpu_install_with_another_python(sandbox):
  lines = _dry_run(TPU, ['install', '--jax-version=1', '--remote-python=python3.12'], sandbox.env)
  remote = _remote_command(lines[-1])
  assert ('if ! command -v python3.12 >/dev/null; then sudo apt-get update -qq'
          ' && sudo apt-get install -y -qq python3.12 python3.12-venv; fi') in remote
  assert ' && python3.12 -m venv .venv && ' in remote


@pytest.mark.parametrize('file, text, version', [
    ('requirements.txt', 'jaxlib==9.9\n# jax==0.0.1\njax[cuda12] == 0.4.38  # pinned\n', '0.4.38'),
    ('pyproject.toml', '[project]\ndependencies = ["flax>=0.8", "jax==0.5.0"]\n', '0.5.0'),
])
def test_tpu_install_reads_the_jax_pin(sandbox, tmp_path, file, text, version):
  src = tmp_path / 'src'
  src.mkdir()
  (src / file).write_text(text)
  lines = _dry_run(TPU, ['install', f'--src={src}'], sandbox.env)
  assert shlex.split(lines[0])[-3:] == ['-C', str(src), '.']
  assert f".venv/bin/python -m pip install 'jax[tpu]=={version}' " in _remote_command(lines[-1])
  # --jax-version wins over the pin.
  lines = _dry_run(TPU, ['install', f'--src={src}', '--jax-version=1.2.3'], sandbox.env)
  assert "'jax[tpu]==1.2.3'" in _remote_command(lines[-1])


def test_tpu_install_without_pin_asks_for_version(sandbox, tmp_path):
  proc = _run(TPU, ['--dry-run', 'install', f'--src={tmp_path}'], sandbox.env)
  assert proc.returncode != 0
  assert '--jax-version' in proc.stderr
  assert proc.stdout == ''


def test_tpu_rejects_bad_arguments(sandbox):
  for args in ([], ['create', 'delete'], ['create', '--bogus'], ['create', '--zone']):
    proc = _run(TPU, ['--dry-run', *args], sandbox.env)
    assert proc.returncode != 0, args
    assert 'error:' in proc.stderr, args


# ----- launch/local.sh -------------------------------------------------------

def test_local_cpu_train_then_evaluate(sandbox):
  lines = _dry_run(
      LOCAL, ['--cpu', '--workdir', 'workdirs/my run', '--config=configs/default.py:tiny',
              '--config.model.d_model=64', '--evaluate', '--', '--extra'], sandbox.env)
  assert lines == [
      "env JAX_PLATFORMS=cpu python -m admin_jax.train --config=configs/default.py:tiny "
      "'--workdir=workdirs/my run' --config.model.d_model=64 --extra",
      "env JAX_PLATFORMS=cpu python -m admin_jax.evaluate --config=configs/default.py:tiny "
      "'--workdir=workdirs/my run' --config.model.d_model=64",
  ]


def test_local_gpu_and_default_platform(sandbox):
  assert _dry_run(LOCAL, ['--gpu', '--workdir=w'], sandbox.env) == [
      'env JAX_PLATFORMS=cuda python -m admin_jax.train --config=configs/default.py --workdir=w']
  assert _dry_run(LOCAL, ['--workdir=w', '--python=python3.11'], sandbox.env) == [
      'python3.11 -m admin_jax.train --config=configs/default.py --workdir=w']


def test_local_needs_workdir(sandbox):
  proc = _run(LOCAL, ['--dry-run'], sandbox.env)
  assert proc.returncode != 0
  assert '--workdir' in proc.stderr


# ----- launch/gpu_slurm.sbatch -----------------------------------------------

_SLURM_ENV = {'SLURM_JOB_NODELIST': 'gpu-node-[07-09]', 'SLURM_NNODES': '3'}


def test_slurm_header():
  header = [line.split()[1] for line in SLURM.read_text().splitlines()
            if line.startswith('#SBATCH')]
  options = [h.split('=')[0] for h in header]
  assert '--ntasks-per-node=1' in header
  for option in ('--nodes', '--gpus-per-node', '--time'):
    assert option in options


def test_slurm_srun_line(sandbox):
  lines = _dry_run(
      SLURM, ['--workdir=/shared/runs/a', '--config=configs/default.py:big',
              '--config.train.num_steps=10'], sandbox.env, _SLURM_ENV)
  assert lines == [
      'srun --nodes=3 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
      "'exec python -m admin_jax.train --config=configs/default.py:big "
      '--workdir=/shared/runs/a --coordinator_address=gpu-node-07:12345 '
      "--num_processes=3 --process_id=$SLURM_PROCID --config.train.num_steps=10'"]


def test_slurm_env_defaults_and_port(sandbox):
  env = {**_SLURM_ENV, 'CONFIG': 'configs/x.py', 'WORKDIR': 'gs://b/r', 'COORDINATOR_PORT': '4000'}
  lines = _dry_run(SLURM, [], sandbox.env, env)
  task = shlex.split(lines[0])[-1]
  assert task == (
      'exec python -m admin_jax.train --config=configs/x.py --workdir=gs://b/r '
      '--coordinator_address=gpu-node-07:4000 --num_processes=3 --process_id=$SLURM_PROCID')
  lines = _dry_run(SLURM, ['--port=5555'], sandbox.env, env)
  assert '--coordinator_address=gpu-node-07:5555' in lines[0]


def test_slurm_task_reads_its_own_procid(sandbox, tmp_path):
  """Each task's `bash -c` expands $SLURM_PROCID and keeps odd overrides intact."""
  fake_python = tmp_path / 'fake_python'
  _write_executable(fake_python, '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
  odd = "--config.data.train=/data/my corpus's"
  lines = _dry_run(
      SLURM, ['--workdir=/w', f'--python={fake_python}', odd, '--', '--x'], sandbox.env,
      _SLURM_ENV)
  words = shlex.split(lines[0])
  assert words[-3:-1] == ['bash', '-c']
  task = subprocess.run(
      ['bash', '-c', words[-1]], env={**sandbox.env, 'SLURM_PROCID': '2'},
      capture_output=True, text=True, check=True)
  assert task.stdout.splitlines() == [
      '-m', 'admin_jax.train', '--config=configs/default.py', '--workdir=/w',
      '--coordinator_address=gpu-node-07:12345', '--num_processes=3', '--process_id=2',
      odd, '--x']


def test_slurm_outside_allocation_fails(sandbox):
  proc = _run(SLURM, ['--dry-run', '--workdir=/w'], sandbox.env)
  assert proc.returncode != 0
  assert 'sbatch' in proc.stderr
  assert proc.stdout == ''


# ----- All scripts ------------------------------------------------------------

@pytest.mark.parametrize('script', [TPU, LOCAL, SLURM], ids=lambda p: p.name)
def test_help(sandbox, script):
  proc = _run(script, ['--help'], sandbox.env)
  assert proc.returncode == 0
  assert proc.stdout.startswith('Usage:')
  assert '--dry-run' in proc.stdout


def test_shellcheck():
  shellcheck = shutil.which('shellcheck')
  if shellcheck is None:
    pytest.skip('shellcheck is not installed')
  scripts = sorted(glob.glob('launch/*.sh', root_dir=REPO) + glob.glob('launch/*.sbatch', root_dir=REPO))
  assert 'launch/common.sh' in scripts
  proc = subprocess.run(
      [shellcheck, *scripts], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
