"""Times the flash attention kernels' Triton tilings at the attention shapes of configs/bench/.

base6 (256 sequences x 8 heads) and big6/big18 (128 x 16) give the kernels the same problem: 2048
(sequence, head) pairs of 256 queries and keys with head_dim 64, the paper's attention dropout 0.1.
The kernels read Q, K and V from one [batch, length, 3, heads, head_dim] projection with its bias, and
write their gradient into that projection's, as the model calls them.
Each tiling is timed forward only and forward + backward (the train step runs both), without
(encoder self- and cross-attention) and with a causal mask (decoder self-attention), and printed as
one JSON line; the last line names the fastest tiling per layer (two unmasked calls and one causal).

  python benchmarks/flash_sweep.py                  # on a GPU: every tiling below
  python benchmarks/flash_sweep.py --batch=2 --tiling=64,64,4,2  # anywhere: a quick check
"""

import functools
import json

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from admin_jax.model.flash_attention import Part
from admin_jax.model.flash_attention import flash_attention
import sweeps

_FIELDS = ('block_q', 'block_k', 'num_warps', 'num_stages')
# The first is the kernels' default (docs/PERF.md has the H200's times of the first eight).
TILINGS = ('64,64,4,3', '64,64,4,2', '64,64,8,2', '32,64,4,2', '64,128,4,2', '128,64,4,2', '128,64,4,3',
           '64,64,4,4', '128,64,8,2', '128,128,8,2', '128,128,4,2')

_TILINGS = flags.DEFINE_multi_string('tiling', list(TILINGS), 'block_q,block_k,num_warps,num_stages; repeat '
                                      'the flag for several.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Sequences per call.')
_HEADS = flags.DEFINE_integer('heads', 16, 'Attention heads.')
_LENGTH = flags.DEFINE_integer('length', 256, 'Queries and keys per sequence.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'Width of a head.')
_CALLS = flags.DEFINE_integer('calls', 10, 'Calls per timed sample (five samples, the median reported).')


def main(argv):
  del argv
  batch, length, heads, head_dim = _BATCH.value, _LENGTH.value, _HEADS.value, _HEAD_DIM.value
  rng = np.random.default_rng(0)
  qkv = jnp.asarray(rng.normal(size=(batch, length, 3, heads, head_dim)), jnp.bfloat16)
  bias = jnp.asarray(rng.normal(size=(3, heads, head_dim)) * 0.1, jnp.bfloat16)
  cotangent = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.bfloat16)
  segments = jnp.ones((batch, length), jnp.int32)
  seed = jnp.uint32(1)
  timed_ms = functools.partial(sweeps.timed_ms, calls=_CALLS.value)
  per_layer = {}
  for tiling in (sweeps.tiling(entry, _FIELDS) for entry in _TILINGS.value):
    block_q, block_k, num_warps, num_stages = tiling
    record = dict(zip(_FIELDS, tiling))
    for causal in (False, True):
      # Every array is an argument: closed over, XLA would constant-fold them for seconds per compile.
      def attention(qkv, bias, segments, seed):
        parts = (Part(qkv, i, bias) for i in range(3))
        return flash_attention(*parts, segments, segments, causal=causal, dropout_rate=0.1, seed=seed,
                               scale=head_dim ** -0.5, block_q=block_q, block_k=block_k, num_warps=num_warps,
                               num_stages=num_stages)

      def train(qkv, bias, segments, seed, cotangent):
        out, vjp = jax.vjp(lambda qkv, bias: attention(qkv, bias, segments, seed), qkv, bias)
        return out, vjp(cotangent)

      name = 'causal' if causal else 'full'
      try:
        record[f'{name}_forward_ms'] = timed_ms(jax.jit(attention), qkv, bias, segments, seed)
        record[f'{name}_train_ms'] = timed_ms(jax.jit(train), qkv, bias, segments, seed, cotangent)
      except Exception as error:  # a tiling Triton cannot build (registers, shared memory) costs its line only
        record['error'] = f'{type(error).__name__}: {str(error).splitlines()[0][:200]}'
        break
    if 'error' not in record:
      record['layer_train_ms'] = per_layer[tiling] = 2 * record['full_train_ms'] + record['causal_train_ms']
    print(json.dumps(record), flush=True)
  if per_layer:
    best = min(per_layer, key=per_layer.get)
    print(json.dumps({'fastest': dict(zip(_FIELDS, best)),
                      'layer_train_ms': per_layer[best], 'device': jax.devices()[0].device_kind}))


if __name__ == '__main__':
  app.run(main)
