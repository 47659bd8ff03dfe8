"""The memory-traffic estimate of compiled programs (benchmarks/traffic.py), on programs compiled for
this CPU whose traffic is known by construction: what an op must read and write at the least."""

import re

from absl import app
import jax
import jax.numpy as jnp
import pytest

from admin_jax.model import TransformerConfig
from benchmarks import traffic
from configs.bench import big18

MIB = 2 ** 20


def estimated_bytes(function, *args) -> int:
  return traffic.total_bytes(traffic.estimate(jax.jit(function).lower(*args).compile().as_text()))


def test_an_elementwise_op_reads_its_operand_and_writes_its_result():
  x = jnp.ones((512, 1024), jnp.float32)  # 2 MiB
  assert estimated_bytes(lambda x: x * 2 + 1, x) == 4 * MIB
  assert estimated_bytes(lambda x: (x * 2).astype(jnp.bfloat16), x) == 3 * MIB


def test_a_loop_counts_its_body_once_per_iteration():
  carry = jnp.ones((256, 256), jnp.float32)  # 256 KiB

  def loop(length):
    return lambda c: jax.lax.fori_loop(0, length, lambda i, c: jnp.sin(c) * 2, c)

  per_10 = [estimated_bytes(loop(n), carry) for n in (10, 20, 30)]
  assert per_10[2] - per_10[1] == per_10[1] - per_10[0]  # linear in the trip count
  assert per_10[1] - per_10[0] >= 10 * 512 * 2 ** 10  # at least the carry read and written per iteration


def test_a_slice_counts_the_slice_not_the_array():
  stacked = jnp.ones((64, 1024, 256), jnp.float32)  # 64 MiB, 1 MiB per row
  moved = estimated_bytes(lambda s, i: jax.lax.dynamic_index_in_dim(s, i, keepdims=False) * 2, stacked, 3)
  assert 2 * MIB <= moved < 3 * MIB


def test_a_scan_writes_each_layer_output_into_its_stack_in_place():
  """The stacked outputs of a scan cost one layer's output per iteration, not the whole stack."""
  carry = jnp.ones((256, 256), jnp.float32)  # 256 KiB

  def stack(length):
    return lambda c: jax.lax.scan(lambda c, _: (jnp.sin(c), jnp.cos(c)), c, length=length)

  short, long = estimated_bytes(stack(32), carry), estimated_bytes(stack(64), carry)
  per_iteration = (long - short) / 32
  # sin and cos each read and write one carry, the CPU's loop copies the carry, and the stack is
  # zeroed before the loop (one carry per iteration): 7 carries. A dynamic-update-slice charged its
  # whole buffer would cost 32 to 64 carries per iteration.
  assert per_iteration <= 7 * carry.nbytes + 64


@pytest.mark.parametrize('text, kind', [
    ('%f = bf16[8,8]{1,0} fusion(%a), kind=kCustom, calls=%gemm_fusion_dot.1_computation', 'gemm'),
    ('%f = bf16[8,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_add', 'fusion:kLoop'),
    ('%f = (bf16[8,8]{1,0}, s8[4]{0}) custom-call(%a), custom_call_target="__cublas$gemm"', 'gemm'),
    ('%f = bf16[8,8]{1,0} custom-call(%a), custom_call_target="__gpu$xla.gpu.triton"',
     'custom-call:__gpu$xla.gpu.triton'),
    ('%f = bf16[8,8]{1,0} copy(%a)', 'copy'),
])
def test_ops_are_grouped_by_what_runs_them(text, kind):
  program = (f'HloModule m\n\nENTRY %main (a: bf16[8,8]) -> bf16[8,8] {{\n'
             f'  %a = bf16[8,8]{{1,0}} parameter(0)\n  ROOT {text}\n}}\n')
  ops = traffic.estimate(program)
  assert [op.kind for op in ops] == [kind]
  assert ops[0].count == 1 and ops[0].bytes >= 2 * 8 * 8 * 2


def test_an_uninitialised_buffer_moves_nothing():
  """XLA's AllocateBuffer (a scan's stack that the loop overwrites whole, left unfilled) reserves
  memory and runs no kernel; the copy beside it is charged as usual."""
  program = ('HloModule m\n\nENTRY %main (a: bf16[8,8]) -> (bf16[64,8,8], bf16[8,8]) {\n'
             '  %a = bf16[8,8]{1,0} parameter(0)\n'
             '  %s = bf16[64,8,8]{2,1,0} custom-call(), custom_call_target="AllocateBuffer"\n'
             '  %c = bf16[8,8]{1,0} copy(%a)\n'
             '  ROOT %t = (bf16[64,8,8]{2,1,0}, bf16[8,8]{1,0}) tuple(%s, %c)\n}\n')
  assert [(op.kind, op.bytes) for op in traffic.estimate(program)] == [('copy', 2 * 8 * 8 * 2)]


def test_an_async_fusion_counts_as_the_fusion_it_runs():
  """XLA may run a fusion as a start/done pair, printed as `fusion-start` or as `async-start` of a
  wrapper computation; either way it moves what the fusion moves (here: one row into a stack)."""
  update_row = jax.jit(lambda s, u, i: jax.lax.dynamic_update_index_in_dim(s, u * 2, i, 0), donate_argnums=0)
  program = update_row.lower(jnp.ones((64, 1024)), jnp.ones((1024,)), 3).compile().as_text()
  fusion = re.search(r'^(\s*)ROOT (%\S+) = (\S+) fusion\(([^)]*)\)(, kind=\w+, calls=%\S+?),(.*)$', program,
                     re.MULTILINE)
  indent, name, shape, operands, attributes, rest = fusion.groups()
  operand_shapes = ', '.join(re.search(rf'{re.escape(o)} = (\S+) parameter', program).group(1)
                             for o in operands.split(', '))
  start_shape = f'(({operand_shapes}), {shape}, s32[])'
  done = f'{indent}ROOT {name} = {shape} fusion-done(%start)'
  sugared = program.replace(fusion.group(0),
                            f'{indent}%start = {start_shape} fusion-start({operands}){attributes},{rest}\n{done}')
  shapes = operand_shapes.split(', ')
  parameters = ''.join(f'  %p{n} = {s} parameter({n})\n' for n, s in enumerate(shapes))
  wrapper = (f'%wrapped ({", ".join(f"p{n}: {s}" for n, s in enumerate(shapes))}) -> {shape} {{\n{parameters}'
             f'  ROOT %inner = {shape} fusion({", ".join(f"%p{n}" for n in range(len(shapes)))}){attributes}\n}}\n\n')
  wrapped = sugared.replace(f'fusion-start({operands}){attributes}', f'async-start({operands}), calls=%wrapped')
  wrapped = wrapped.replace('ENTRY', wrapper + 'ENTRY', 1).replace('fusion-done(', 'async-done(')

  plain, *asynchronous = (traffic.estimate(text) for text in (program, sugared, wrapped))
  assert traffic.total_bytes(plain) < 64 * 1024 * 4  # the row, not the stack
  for ops in asynchronous:
    assert traffic.total_bytes(ops) == traffic.total_bytes(plain)
    assert [op.kind for op in ops] == [op.kind for op in plain] == ['fusion:kLoop']


@pytest.mark.parametrize('aliasing', ['', ', output_to_operand_aliasing={{}: (2, {})}'])
def test_a_kernel_reads_a_repeated_operand_once_and_writes_into_an_aliased_one(aliasing):
  """A Pallas kernel called with one buffer as several operands (Q, K and V parts of one projection)
  reads it once; one whose output aliases an operand (a gradient another kernel filled in part)
  writes that buffer instead of reading it too."""
  program = f'''HloModule kernel

ENTRY %main (p0: f32[1024,256], p1: f32[1024,256]) -> f32[1024,256] {{
  %p0 = f32[1024,256]{{1,0}} parameter(0)
  %p1 = f32[1024,256]{{1,0}} parameter(1)
  ROOT %k = f32[1024,256]{{1,0}} custom-call(%p0, %p0, %p1), custom_call_target="__gpu$xla.gpu.triton"{aliasing}
}}
'''
  ops = traffic.estimate(program)
  assert [op.kind for op in ops] == ['custom-call:__gpu$xla.gpu.triton']
  assert traffic.total_bytes(ops) == (2 if aliasing else 3) * MIB


def test_a_gemm_reading_one_layer_of_a_stack_in_place_is_a_gemm_that_reads_the_layer():
  """XLA's dynamic-slice fusion (cuBLAS reading one layer of a scanned stack where it lies, as the
  GPU compiler of jax 0.11 plans a scanned backward pass) is a GEMM, and it reads the layer, not the
  stack."""
  program = '''HloModule stacked

%dynamic-slice-fusion (p0: bf16[16,1024,256], p1: s32[], p2: bf16[256,1024]) -> (bf16[256,256], s8[64]) {
  %p2 = bf16[256,1024]{1,0} parameter(2)
  %p0 = bf16[16,1024,256]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %layer = bf16[1,1024,256]{2,1,0} dynamic-slice(%p0, %p1, %zero, %zero), dynamic_slice_sizes={1,1024,256}
  %x = bf16[1024,256]{1,0} bitcast(%layer)
  ROOT %gemm = (bf16[256,256]{1,0}, s8[64]{0}) custom-call(%p2, %x), custom_call_target="__cublas$lt$matmul"
}

ENTRY %main (stack: bf16[16,1024,256], i: s32[], w: bf16[256,1024]) -> (bf16[256,256], s8[64]) {
  %stack = bf16[16,1024,256]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %w = bf16[256,1024]{1,0} parameter(2)
  ROOT %f = (bf16[256,256]{1,0}, s8[64]{0}) fusion(%stack, %i, %w), kind=kCustom, calls=%dynamic-slice-fusion, \
backend_config={"fusion_backend_config":{"kind":"__custom_fusion",\
"custom_fusion_config":{"name":"dynamic_slice_fusion"}}}
}
'''
  ops = traffic.estimate(program)
  assert [op.kind for op in ops] == ['gemm']
  layer, weight, product = 1024 * 256 * 2, 256 * 1024 * 2, 256 * 256 * 2
  assert traffic.total_bytes(ops) == layer + 4 + weight + product + 64


def test_step_estimate_prices_each_part_of_a_plan_at_its_rate():
  """benchmarks/step_estimate.py: matmul FLOPs at the GEMMs' rate (their bytes are in that rate),
  flash kernels per layer, LayerNorm kernels' and XLA fusions' bytes at their own bandwidths."""
  from benchmarks import step_estimate  # pylint: disable=g-import-not-at-top
  triton = 'custom-call:__gpu$xla.gpu.triton'
  rows = [{'kind': 'gemm', 'op_name': 'dot_general', 'bytes': '7000000000'},
          {'kind': triton, 'op_name': 'jit(_forward)/flash_attention_forward/pallas_call', 'bytes': '5000000000'},
          {'kind': triton, 'op_name': 'jit(_backward)/residual_layer_norm_backward/pallas_call', 'bytes': '3000000000'},
          {'kind': 'fusion:kLoop', 'op_name': 'select_n', 'bytes': '2000000000'},
          {'kind': 'copy', 'op_name': 'copy', 'bytes': '1000000000'}]
  config = big18.get_config()
  record = step_estimate.estimate(config, rows, flash_ms_per_layer=2.5)
  cfg = TransformerConfig.from_config(config, config.data.vocab_size)
  # big18's matmuls by hand, per token forward: encoder QKV + out + FFN, decoder self QKV + out, cross q + kv +
  # out, FFN; tied logits.
  d, f = cfg.d_model, cfg.ffn_dim
  per_token = 18 * (4 * d * d + 2 * d * f) + 18 * (4 * d * d + 4 * d * d + 2 * d * f) + d * cfg.vocab_size
  matmul_flops = 3 * 2 * per_token * config.data.tokens_per_batch
  expected_ms = {'gemm': 1e3 * matmul_flops / step_estimate.GEMM_FLOPS_PER_S, 'flash': 18 * 2.5,
                 'layer_norm': 1e3 * 3e9 / step_estimate.LAYER_NORM_BYTES_PER_S,
                 'fusions': 1e3 * 3e9 / step_estimate.FUSION_BYTES_PER_S,
                 'gaps': 1e3 * 18 * step_estimate.GAP_S_PER_LAYER}
  assert record['parts_ms'] == pytest.approx(expected_ms, abs=0.05)
  assert record['step_ms'] == pytest.approx(sum(expected_ms.values()), abs=0.05)
  assert record['tokens_per_sec'] == pytest.approx(config.data.tokens_per_batch / (record['step_ms'] / 1e3), rel=1e-3)
  with pytest.raises(app.UsageError, match='no flash attention or Pallas LayerNorm'):
    step_estimate.estimate(config, rows[:1] + rows[3:], flash_ms_per_layer=2.5)
  config.data.max_len = 128  # not the shape the flash kernels were timed at
  with pytest.raises(app.UsageError, match='the flash time holds for 2048 rows x heads of 256 tokens'):
    step_estimate.estimate(config, rows, flash_ms_per_layer=2.5)
