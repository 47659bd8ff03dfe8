"""Will a config train on a slice? `python -m admin_jax.compile --config=configs/X.py[:arg] --target=v4-32`.

Compiles the config's own train step (its mesh, its micro-batch of `data.tokens_per_batch //
data.max_len` rows, `train.grad_accum` of them per update, its dtype, scan, remat and kernels, its
optimizer) and Admin's profiling pass on one micro-batch, for a Cloud TPU slice or GPUs that this
machine need not have (admin_jax/deviceless.py), as MaxText's train_compile.py does. Prints one JSON
line on stdout (XLA's memory plan per chip against what a chip offers, compile time, FLOPs, the
collectives, days for `train.num_steps` at `--mfu` of the chips' bf16 peak) and a summary on
stderr. Exits 0 when the plan fits and 1, with one line saying what lowers it, when it does not.
"""

import collections
import functools
import json
import re
import sys
import time

from absl import flags
import jax
import ml_collections
import numpy as np

from admin_jax import cli
from admin_jax import deviceless
from admin_jax import files
from admin_jax import flops
from admin_jax import optim
from admin_jax import omega_init
from admin_jax import sharding
from admin_jax import targets
from admin_jax import train_step as train_step_lib
from admin_jax.errors import UserError
from admin_jax.model import TransformerConfig

_TARGET = flags.DEFINE_string('target', None, 'A Cloud TPU accelerator type (v4-8, v5litepod-16 or v5e-16, '
                              'v5p-8, v6e-4, ...) or GPUs (h100, h200-8: eight on one host).', required=True)
_MFU = flags.DEFINE_float('mfu', 0.4, "Fraction of the chips' bf16 peak that the days estimate assumes.",
                          lower_bound=0.01, upper_bound=1.0)
_DUMP_DIR = flags.DEFINE_string('dump_dir', '', 'Also write the optimised programs here (train_step.hlo.txt, '
                                'profiling_pass.hlo.txt).')

SLOW_UNROLLED_LAYERS = 24  # encoder + decoder layers beyond which an unrolled stack compiles for tens of minutes
BATCH_KEYS = ('inputs', 'inputs_segmentation', 'inputs_position', 'targets', 'targets_segmentation',
              'targets_position')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_COLLECTIVE = re.compile(r'= (.+?) (' + '|'.join(COLLECTIVES) + r')(-start)?\(')
_ARRAY = re.compile(r'\b(pred|[a-z]+\d+\w*)\[([\d,]*)\]')  # f32[512,2048], bf16[8], s32[], pred[4]
_COMPUTATION = re.compile(r'^(ENTRY )?%([\w.-]+) .*\{$')  # a computation's first line
_CALLEES = re.compile(r'\b(?:calls|to_apply|body|branch_computations|true_computation|false_computation)=\{?'
                      r'(%[\w.-]+(?:, %[\w.-]+)*)')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION = re.compile(r'\bcondition=%([\w.-]+)')
_COUNTER_BOUND = re.compile(r'= s32\[\]\S* constant\((\d+)\)')  # a scan's `i < N`, its counter from 0


class DoesNotFit(Exception):
  """XLA refused a program for want of memory on the target."""


def _array_bytes(dtype: str, dims: str) -> int:
  bits = 8 if dtype == 'pred' else int(re.match(r'[a-z]+(\d+)', dtype).group(1))
  return max(1, bits // 8) * int(np.prod([int(d) for d in dims.split(',') if d]))


def _collective_bytes(result: str, kind: str, asynchronous: bool) -> int:
  """Bytes of a collective's output, from its result shape; an asynchronous start's result also holds
  scalar contexts, and a gather's or a permute's its operands before its outputs."""
  arrays = _ARRAY.findall(result)
  if asynchronous:
    arrays = [array for array in arrays if array[1]]
    if kind in ('all-gather', 'collective-permute'):
      arrays = arrays[len(arrays) // 2:]
  return sum(_array_bytes(dtype, dims) for dtype, dims in arrays)


def collectives(program: str) -> dict[str, dict[str, int]]:
  """How many collectives of each kind one step runs per chip, and the bytes of their outputs, in an
  optimised HLO program: each counts as often as it runs, a loop body's (a scan over layers or over
  micro-batches) once per iteration, by XLA's known trip count or the loop condition's `i < N`."""
  found_in, calls, entry, current = collections.defaultdict(list), collections.defaultdict(list), None, None
  bounds, loops = collections.defaultdict(list), []  # counter bounds by computation; (caller, body, trips, cond)
  for line in program.splitlines():
    if header := _COMPUTATION.match(line):
      current = header.group(2)
      entry = current if header.group(1) else entry
      continue
    if current is None:
      continue
    if collective := _COLLECTIVE.search(line):
      result, kind, start = collective.groups()
      found_in[current].append((kind, _collective_bytes(result, kind, bool(start))))
    if bound := _COUNTER_BOUND.search(line):
      bounds[current].append(int(bound.group(1)))
    if ' while(' in line:
      trips = _TRIP_COUNT.search(line)
      loops.append((current, _CALLEES.search(line).group(1).lstrip('%'), int(trips.group(1)) if trips else None,
                    _CONDITION.search(line).group(1)))
      continue
    for callees in _CALLEES.findall(line):
      calls[current] += [(callee.lstrip('%'), 1) for callee in callees.split(', ')]
  for caller, body, trips, condition in loops:  # without XLA's count, the condition's one bound, else once
    calls[caller].append((body, trips or (bounds[condition][0] if len(bounds[condition]) == 1 else 1)))
  totals = collections.defaultdict(lambda: {'count': 0, 'bytes': 0})

  @functools.cache
  def holds_collectives(computation: str) -> bool:
    return bool(found_in[computation]) or any(holds_collectives(callee) for callee, _ in calls[computation])

  def visit(computation: str, runs: int) -> None:
    for kind, size in found_in[computation]:
      totals[kind]['count'] += runs
      totals[kind]['bytes'] += runs * size
    for callee, times in calls[computation]:
      if holds_collectives(callee):
        visit(callee, runs * times)

  if entry:
    visit(entry, 1)
  return dict(totals)


def _compiled(part: str, function, *args) -> tuple[jax.stages.Compiled, float]:
  start = time.perf_counter()
  try:
    compiled = function.lower(*args).compile()
  except jax.errors.JaxRuntimeError as error:
    first = str(error).splitlines()[0]
    if 'RESOURCE_EXHAUSTED' in first:
      raise DoesNotFit(f'the {part} does not fit: {first.removeprefix("RESOURCE_EXHAUSTED: ")}') from None
    raise UserError(f'XLA could not compile the {part}: {first}') from None
  return compiled, time.perf_counter() - start


def _needed_bytes(compiled: jax.stages.Compiled) -> int:
  """XLA's plan per chip: working memory, arguments and outputs, less the outputs that reuse donated arguments."""
  plan = compiled.memory_analysis()
  return int(plan.temp_size_in_bytes + plan.argument_size_in_bytes + plan.output_size_in_bytes
             - plan.alias_size_in_bytes)


def _ways_to_lower(config: ml_collections.ConfigDict, target: targets.Target) -> str:
  """The settings that lower memory per chip that this config does not use yet."""
  ways = ['fewer data.tokens_per_batch with more train.grad_accum (the same tokens per update)']
  if config.perf.remat != 'full':
    ways.append('perf.remat=full' if config.perf.remat == 'dots' else 'perf.remat=dots or full')
  if config.mesh.fsdp == 1 and target.chips > 1:
    ways.append('mesh.fsdp>1 (parameters and optimizer state split over chips)')
  if not config.train.loss_chunk_tokens:
    ways.append('train.loss_chunk_tokens=8192')
  return ', '.join(ways) + ', or a larger slice'


def check_micro_batch(config: ml_collections.ConfigDict, target: targets.Target) -> None:
  """What the first batch of a real run on `target` would refuse, before any compiling."""
  rows = config.data.tokens_per_batch // config.data.max_len  # at least one: cli.validate refuses fewer
  mesh = jax.sharding.AbstractMesh(sharding.mesh_sizes(config.mesh, target.chips), sharding.MESH_AXES)
  sharding.check_batch_rows(rows, mesh, target.hosts)


def plan(config: ml_collections.ConfigDict, target: targets.Target, devices: list[jax.Device],
         mfu: float, dump_dir: str = '') -> dict:
  """Compiles the config's train step (and Admin's profiling pass) for `devices` of `target`; the record."""
  model_cfg = TransformerConfig.from_config(config, config.data.vocab_size)
  mesh = sharding.make_mesh(config.mesh, devices)
  length, accum = config.data.max_len, config.train.grad_accum
  rows = config.data.tokens_per_batch // length
  profile_rows = min(rows, config.admin.profile_tokens // length) if config.admin.profile_tokens else rows
  print(f'compiling for {target.name} ({target.chips} x {devices[0].device_kind}, mesh {dict(mesh.shape)})...',
        file=sys.stderr, flush=True)
  if (layers := model_cfg.num_encoder_layers + model_cfg.num_decoder_layers) > SLOW_UNROLLED_LAYERS and not \
      model_cfg.scan_layers:
    print(f'note: {layers} unrolled layers take long to compile (18L-18L: 20 minutes and 18 GB of host memory on a '
          '2-core host); --config.perf.scan_layers=true compiles in minutes', file=sys.stderr, flush=True)
  tx, schedule = optim.make_optimizer(config.train)
  setup, abstract_state = train_step_lib.abstract_train_state(model_cfg, tx, schedule, mesh, config.train.seed,
                                                              config.train.prng_impl)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                       setup.state_shardings)

  def batch(shape, micro_batched):
    spec = sharding.batch_sharding(mesh, shape, micro_batched=micro_batched)
    return spec, {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=spec) for k in BATCH_KEYS}

  micro_sharding, micro_batches = batch((accum, rows, length), True)
  programs, needed, seconds = {}, {}, {}
  with jax.set_mesh(mesh):
    compiled, seconds['train_step'] = _compiled('train step', train_step_lib.jit_train_step(
        setup, config.train, micro_sharding), state, micro_batches)
    programs['train_step'], needed['train_step'] = compiled.as_text(), _needed_bytes(compiled)
    if config.model.residual == 'admin':
      compiled, seconds['profiling_pass'] = _compiled('profiling pass', omega_init.profile_pass(
          setup, mask_padding=config.admin.mask_padding), state, batch((profile_rows, length), False)[1])
      programs['profiling_pass'], needed['profiling_pass'] = compiled.as_text(), _needed_bytes(compiled)
  for name, program in programs.items() if dump_dir else ():
    files.write_text(f'{dump_dir}/{name}.hlo.txt', program)

  available = deviceless.available_bytes(target)
  step_flops = accum * flops.training_flops(model_cfg, rows, length, length)
  step_seconds = step_flops / (target.chips * target.chip.peak_tflops * 1e12 * mfu)
  by_epochs = bool(config.train.num_epochs)  # then the number of updates depends on the corpus
  return {
      'target': target.name,
      'device_kind': devices[0].device_kind,
      'chips': target.chips,
      'hosts': target.hosts,
      'topology': target.topology,
      'mesh': dict(mesh.shape),
      'rows_per_micro_batch': rows,
      'max_len': length,
      'grad_accum': accum,
      'memory_needed_bytes': max(needed.values()),
      'memory_needed_bytes_by_program': needed,
      'memory_available_bytes': available,
      'fits': max(needed.values()) <= available,
      'compile_seconds': sum(seconds.values()),
      'compile_seconds_by_program': seconds,
      'flops_per_step': step_flops,
      'collectives': collectives(programs['train_step']),
      'num_steps': None if by_epochs else config.train.num_steps,
      'num_epochs': config.train.num_epochs or None,
      'mfu': mfu,
      'peak_tflops_per_chip': target.chip.peak_tflops,
      'estimated_step_seconds': step_seconds,
      'estimated_days': None if by_epochs else config.train.num_steps * step_seconds / 86400,
      'params': sum(x.size for x in jax.tree.leaves(abstract_state.params)),
      'jax': jax.__version__,
  }


def _summary(record: dict) -> str:
  gib = lambda b: f'{b / 2 ** 30:.2f} GiB'
  needed = ', '.join(f'{name} {gib(b)}' for name, b in record['memory_needed_bytes_by_program'].items())
  return (f"{record['target']} ({record['chips']} x {record['device_kind']}, mesh {record['mesh']}): "
          f"{'fits' if record['fits'] else 'does NOT fit'}, {needed} of {gib(record['memory_available_bytes'])} "
          f"per chip; compiled in {record['compile_seconds']:.0f} s; {_duration(record)} at {record['mfu']:.0%} MFU")


def _duration(record: dict) -> str:
  per_step = f"{record['flops_per_step']:.3g} FLOPs a step, {record['estimated_step_seconds']:.2f} s"
  if record['estimated_days'] is None:
    return f"{per_step} (stops after {record['num_epochs']} epochs: the updates depend on the corpus)"
  return f"{record['num_steps']:,} steps of {per_step}, about {record['estimated_days'] * 24:.1f} hours"


def main(argv):
  del argv
  config = cli.load_config()
  try:
    target = targets.resolve(_TARGET.value)
  except ValueError as error:
    raise UserError(str(error)) from None
  targets.refuse_gpu_kernels(config.perf, target.platform, target.name)
  check_micro_batch(config, target)
  devices = deviceless.compile_only_devices(target)  # before anything starts JAX's backends
  try:
    record = plan(config, target, devices, _MFU.value, _DUMP_DIR.value)
  except DoesNotFit as error:
    print(f'error: {target.name}: {error}; lower it with {_ways_to_lower(config, target)}', file=sys.stderr)
    sys.exit(1)
  print(json.dumps(record), flush=True)
  print(_summary(record), file=sys.stderr)
  if not record['fits']:
    gib = lambda b: f'{b / 2 ** 30:.2f} GiB'
    print(f"error: {target.name}: needs {gib(record['memory_needed_bytes'])} per chip, "
          f"{gib(record['memory_available_bytes'])} available; lower it with {_ways_to_lower(config, target)}",
          file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)
