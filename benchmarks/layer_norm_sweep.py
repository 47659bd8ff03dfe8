"""Times the residual LayerNorm kernels' Triton tilings at the shapes of configs/bench/.

One call is one sublayer's residual LayerNorm of a step: LN(omega * x + dropout(branch + bias)) over
[rows, d_model] (big6 and big18: 32,768 rows of 1024; base6: 65,536 of 512), float32 stream (or
`--stream_dtype`'s), bf16 branch, the paper's dropout 0.1. Each tiling is timed forward only and
forward + backward (both gradients' cotangents given, as the model gives them), and printed as one
JSON line with the bandwidth its traffic implies; the last line names the fastest forward + backward.

  python benchmarks/layer_norm_sweep.py                                 # on a GPU: every tiling below
  python benchmarks/layer_norm_sweep.py --rows=256 --tiling=4096,16,4,8  # anywhere: a quick check
"""

import functools
import json

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from admin_jax.model import dropout
from admin_jax.model import layer_norm_kernel
from admin_jax.model import layers
import sweeps

_FIELDS = ('block_elements', 'backward_blocks', 'forward_warps', 'backward_warps')
# The first is the kernels' default.
TILINGS = ('4096,16,4,8', '4096,16,4,4', '4096,16,8,8', '4096,8,4,8', '4096,32,4,8', '8192,16,8,8', '8192,8,8,16',
           '2048,16,4,4', '2048,32,4,8', '16384,4,8,16')

_TILINGS = flags.DEFINE_multi_string('tiling', list(TILINGS), ','.join(_FIELDS) + '; repeat the flag for several.')
_ROWS = flags.DEFINE_integer('rows', 32768, 'Tokens per call (rows of the residual stream).')
_D_MODEL = flags.DEFINE_integer('d_model', 1024, 'Width of the residual stream.')
_STREAM_DTYPE = flags.DEFINE_enum('stream_dtype', 'float32', ['float32', 'bfloat16'],
                                   'dtype of the residual stream x and its gradient (perf.stream_dtype).')
_CALLS = flags.DEFINE_integer('calls', 20, 'Calls per timed sample (five samples, the median reported).')


def main(argv):
  del argv
  rows, d = _ROWS.value, _D_MODEL.value
  rng = np.random.default_rng(0)
  x, grad = (jnp.asarray(rng.normal(size=(rows, d)), _STREAM_DTYPE.value) for _ in range(2))
  branch, grad_copy = (jnp.asarray(rng.normal(size=(rows, d)), jnp.bfloat16) for _ in range(2))
  vectors = [jnp.asarray(rng.uniform(0.5, 1.5, d), jnp.float32) for _ in range(4)]  # branch bias, omega, gain, bias
  seed = jnp.int32(1)
  stream, half = x.nbytes, branch.nbytes  # bytes of the stream's and of a bf16 [rows, d] array
  copy = half if x.dtype != branch.dtype else 0  # the forward kernel's bf16 copy of its output, where separate
  forward_bytes, backward_bytes = 2 * stream + half + copy, 3 * stream + 3 * half  # reads and writes of each kernel
  timed_ms = functools.partial(sweeps.timed_ms, calls=_CALLS.value)
  per_call = {}
  for tiling in (sweeps.tiling(entry, _FIELDS) for entry in _TILINGS.value):
    options = dict(zip(_FIELDS, tiling))

    def norm(x, branch, branch_bias, omega, gain, bias, seed):
      return layer_norm_kernel.residual_layer_norm(
          x, branch, branch_bias.astype(branch.dtype), omega, gain, bias, eps=layers.LN_EPS, seed=seed,
          drop_threshold=dropout.threshold(0.1), **options)

    def train(x, branch, branch_bias, omega, gain, bias, seed, grad, grad_copy):
      outputs, vjp = jax.vjp(lambda *a: norm(*a, seed), x, branch, branch_bias, omega, gain, bias)
      return outputs, vjp((grad, grad_copy))

    record = dict(options)
    try:
      forward_ms = timed_ms(jax.jit(norm), x, branch, *vectors, seed)
      train_ms = timed_ms(jax.jit(train), x, branch, *vectors, seed, grad, grad_copy)
    except Exception as error:  # a tiling Triton cannot build (registers, shared memory) costs its line only
      record['error'] = f'{type(error).__name__}: {str(error).splitlines()[0][:200]}'
    else:
      record.update(forward_ms=forward_ms, train_ms=train_ms, forward_tb_per_s=forward_bytes / forward_ms / 1e9,
                    backward_tb_per_s=backward_bytes / max(train_ms - forward_ms, 1e-9) / 1e9)
      per_call[tiling] = train_ms
    print(json.dumps(record), flush=True)
  if per_call:
    best = min(per_call, key=per_call.get)
    print(json.dumps({'fastest': dict(zip(_FIELDS, best)), 'train_ms': per_call[best],
                      'device': jax.devices()[0].device_kind}))


if __name__ == '__main__':
  app.run(main)
