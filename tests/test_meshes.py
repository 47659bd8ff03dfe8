"""One tiny model profiled and trained on meshes of 8 CPU devices (data x fsdp x tensor): the same
omegas and losses as on one device, parameters sharded as the rules say, and the Pallas kernels and
the rbg dropout keys under a mesh. The runs are in mesh_equivalence.py, executed in child processes."""

import json
import math

import numpy as np
import pytest

from conftest import REPO
from conftest import finish
from conftest import python
from conftest import spawn
from conftest import subprocess_env

PARALLEL_CHILDREN = 2  # the runs compile single-threaded: two children keep two cores busy
SHARDED_MESHES = ['8x1x1', '2x4x1', '2x2x2', '1x1x8']  # mesh_equivalence.MESHES less one device


@pytest.fixture(scope='module')
def mesh_results():
  """Profiling omegas, 5 train-step losses and parameter shardings of each run, by run name."""
  children = [spawn([python(), str(REPO / 'tests' / 'mesh_equivalence.py'), str(i), str(PARALLEL_CHILDREN)],
                     subprocess_env(devices=8), cwd=REPO / 'tests')
              for i in range(PARALLEL_CHILDREN)]
  results = {}
  for child in children:
    run = finish(child, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results.update(json.loads(run.stdout))
  return results


@pytest.mark.parametrize('mesh', SHARDED_MESHES)
def test_meshes_give_single_device_omegas(mesh_results, mesh):
  for stack in ('encoder', 'decoder'):
    np.testing.assert_allclose(mesh_results[mesh]['omegas'][stack], mesh_results['1x1x1']['omegas'][stack],
                               rtol=1e-5)


@pytest.mark.parametrize('mesh', SHARDED_MESHES)
def test_profile_tokens_give_single_device_omegas_on_every_mesh(mesh_results, mesh):
  """3 rows: replicated on 8x1x1 and 2x4x1, which they do not divide; the whole batch gives other omegas."""
  few, single = mesh_results[f'profile_tokens/{mesh}'], mesh_results['profile_tokens/1x1x1']
  for stack in ('encoder', 'decoder'):
    np.testing.assert_allclose(few[stack], single[stack], rtol=1e-5)
    assert not np.allclose(few[stack][1:], mesh_results['1x1x1']['omegas'][stack][1:], rtol=1e-3)


@pytest.mark.parametrize('mesh', SHARDED_MESHES)
def test_meshes_give_single_device_losses(mesh_results, mesh):
  np.testing.assert_allclose(mesh_results[mesh]['losses'], mesh_results['1x1x1']['losses'], rtol=1e-5)


def test_parameters_sharded_as_the_rules_say(mesh_results):
  specs = {k.replace("['", '').replace("']", '').replace('/.value', ''): v
           for k, v in mesh_results['2x2x2']['specs'].items()}
  assert specs['encoder/layers/ffn/fc1'] == "P(None, 'fsdp', 'tensor')"  # layers, embed, mlp
  assert specs['encoder/layers/ffn/fc2'] == "P(None, 'tensor', 'fsdp')"
  assert specs['decoder/layers/self_attention/qkv'] == "P(None, 'fsdp', None, 'tensor', None)"
  assert specs['decoder/layers/cross_attention/out'] == "P(None, 'tensor', None, 'fsdp')"
  assert specs['embedding/table'] == "P('tensor', 'fsdp')"  # vocab, embed
  assert specs['encoder/layers/ffn_residual/omega'] == 'P(None, None)'  # small: replicated
  tensor_only = mesh_results['1x1x8']['specs']
  assert all('fsdp' not in spec for spec in tensor_only.values())


def test_dropout_masks_are_the_same_on_every_mesh_with_rbg_keys(mesh_results):
  """The masks hash each element's global index from a scalar seed, so keys from rbg too train
  alike on one device and on a 2x2x2 mesh; other keys, other masks."""
  one = mesh_results['rbg/1x1x1']['losses']
  np.testing.assert_allclose(mesh_results['rbg/2x2x2']['losses'], one, rtol=1e-5)
  assert one != mesh_results['1x1x1']['losses']


def test_pallas_kernels_train_under_a_mesh(mesh_results):
  """The flash attention and residual LayerNorm kernels run per shard under shard_map, the LayerNorm's
  parameter gradients summed over the shards. Without attention dropout they give the XLA path's
  omegas and losses (the LayerNorm kernel applying the same hidden-dropout masks); with it, losses
  of the same model under other attention masks (the seed folds in the shard)."""
  xla, kernels = mesh_results['xla/0.0/2x2x2'], mesh_results['kernels/0.0/2x2x2']
  np.testing.assert_allclose(kernels['losses'], xla['losses'], rtol=1e-5)
  for stack, omegas in xla['omegas'].items():
    np.testing.assert_allclose(kernels['omegas'][stack], omegas, rtol=1e-5)
  dropped = mesh_results['kernels/0.1/2x2x2']['losses']
  assert all(math.isfinite(x) for x in dropped) and dropped != xla['losses']
  np.testing.assert_allclose(dropped, mesh_results['2x2x2']['losses'], rtol=0.05)
