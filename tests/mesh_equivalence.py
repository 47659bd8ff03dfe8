"""Runs the profiling pass and 5 train steps of a tiny model on several meshes; prints JSON.

Executed by test_meshes.py in child processes with 8 host CPU devices each: `mesh_equivalence.py
INDEX COUNT` runs every COUNT-th run from the INDEX-th, so that the runs compile in parallel.
Each plain mesh run also profiles on admin.profile_tokens ('profile_tokens/MESH'). Runs named
'IMPL/ATTENTION_DROPOUT/MESH' check the implementations under a mesh ('kernels': the
Pallas flash attention and residual LayerNorm together, as GPUs train), and 'PRNG_IMPL/MESH' the
dropout keys of another PRNG.
"""

import dataclasses
import json
import sys

import jax
import ml_collections
import numpy as np

from admin_jax import optim
from admin_jax import omega_init
from admin_jax import sharding
from admin_jax import train_step as train_step_lib
from conftest import model_config
from conftest import packed_batch

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
IMPLEMENTATION_RUNS = [('xla', 0.0, (2, 2, 2)), ('kernels', 0.0, (2, 2, 2)), ('kernels', 0.1, (2, 2, 2))]
KERNELS = {'xla': {}, 'kernels': {'attention_impl': 'flash', 'layer_norm_impl': 'pallas'}}
PRNG_RUNS = [('rbg', (1, 1, 1)), ('rbg', (2, 2, 2))]
PROFILE_TOKENS = 3 * 16  # three rows of the 16-token batch


def main() -> None:
  train = ml_collections.ConfigDict(dict(optimizer='adam', lr=1e-3, warmup_steps=2, warmup_init_lr=1e-7, b1=0.9,
                                         b2=0.98, eps=1e-8, weight_decay=0.0, clip_norm=0.0, label_smoothing=0.1,
                                         loss_chunk_tokens=0))
  model_cfg = model_config(64, residual='admin', num_encoder_layers=2, num_decoder_layers=2,
                           d_model=32, ffn_dim=64, num_heads=4, dtype='float32')
  rng = np.random.default_rng(0)
  batches = [packed_batch(rng, 8, 16, 64, [[5, 11], [16], [7, 9], [3, 4, 9], [16], [12], [2, 14], [8, 8]])
             for _ in range(5)]
  runs = [('x'.join(map(str, shape)), shape, model_cfg, 'threefry2x32') for shape in MESHES]
  runs += [(f'{impl}/{rate}/{"x".join(map(str, shape))}', shape,
            dataclasses.replace(model_cfg, attention_dropout=rate, **KERNELS[impl]), 'threefry2x32')
           for impl, rate, shape in IMPLEMENTATION_RUNS]
  runs += [(f'{impl}/{"x".join(map(str, shape))}', shape, model_cfg, impl) for impl, shape in PRNG_RUNS]
  index, count = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 1 else (0, 1)
  results = {}
  for name, shape, cfg, prng_impl in runs[index::count]:
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))), devices)
    tx, schedule = optim.make_optimizer(train)
    setup, state = train_step_lib.create_train_state(cfg, tx, schedule, mesh, seed=0, prng_impl=prng_impl)
    omegas = omega_init.profile_omegas(setup, state, sharding.global_batch(batches[0], mesh), mask_padding=False)
    if prng_impl == 'threefry2x32' and cfg is model_cfg:  # admin.profile_tokens: 3 of the 8 rows, split or not
      few, _ = omega_init.profile_batch(batches[0], PROFILE_TOKENS, mesh)
      results[f'profile_tokens/{name}'] = {k: v.tolist() for k, v in omega_init.profile_omegas(
          setup, state, few, mask_padding=False).items()}
    state = omega_init.with_omegas(setup, state, omegas)
    micro = sharding.global_batch({k: v[None] for k, v in batches[0].items()}, mesh, micro_batched=True)
    step = train_step_lib.jit_train_step(setup, train, jax.tree.map(lambda a: a.sharding, micro))
    losses = []
    for batch in batches:
      micro = sharding.global_batch({k: v[None] for k, v in batch.items()}, mesh, micro_batched=True)
      with jax.set_mesh(mesh):
        state, metrics = step(state, micro)
      losses.append(float(metrics['loss']))
    specs = {'/'.join(str(p) for p in path): str(v.sharding.spec)
             for path, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    results[name] = {'omegas': {k: v.tolist() for k, v in omegas.items()}, 'losses': losses, 'specs': specs}
  json.dump(results, sys.stdout)


if __name__ == '__main__':
  main()
