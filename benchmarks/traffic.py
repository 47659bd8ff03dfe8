"""Memory traffic of an optimised XLA program, estimated from its text: a research tool.

  python -m benchmarks.traffic DIR/hlo.txt   # writes DIR/traffic.csv, prints the totals as JSON

The program is what `bench --trace_dir=DIR` (hlo.txt) or `compile --dump_dir=DIR` (train_step.hlo.txt)
writes. A program compiled for a GPU that this machine lacks (admin_jax/deviceless.py) cannot be timed,
and its `cost_analysis()` is empty; what it reads and writes is the next best guide to its speed,
since everything a train step does outside its matmuls is bound by memory bandwidth. The estimate
counts, for every top-level op that touches memory, the bytes of its operands and of its result:
an upper bound of HBM traffic that ignores caches, and exact for a fused elementwise op. Loop
bodies count once per iteration (XLA's known trip count), a fusion that only slices an operand
counts the slice, and an in-place dynamic-update-slice counts the update, not the whole buffer:
otherwise a scanned stack would be charged its stacked weights and residuals on every layer. An
asynchronous pair (`fusion-start`/`fusion-done`, which XLA 0.11 emits for some fusions in loops, or
`async-start`/`async-done` around a wrapped computation) counts as the op it runs, once: charged
its tuple of operands and result, twice over, it made a scanned big18 step look 4.6 TB. A custom
call's operand that an output aliases (`output_to_operand_aliasing`: a Pallas kernel writing into a
buffer that another filled in part) counts as written by that output, not read as well.
"""

import collections
import dataclasses
import json
import math
import pathlib
import re
import sys

from admin_jax import files

_COMPUTATION = re.compile(r'^(ENTRY )?%(\S+) .*\{$')
_INSTRUCTION = re.compile(r'^\s*(ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$')
_ARRAY = re.compile(r'\b(pred|[a-z]+\d+[a-z0-9]*)\[([\d,]*)\]')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ALIASING = re.compile(r'output_to_operand_aliasing=\{(.*?)\}(?:,|$)')
_ALIASED_OPERAND = re.compile(r'\{[\d,]*\}: \((\d+),')
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]*)"')

# Ops that move no data of their own: views, tuples and bookkeeping.
_FREE = frozenset({'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all', 'partition-id',
                   'replica-id', 'opt-barrier'})
# Custom calls that only name a buffer: XLA's uninitialised allocation (a loop's stack it overwrites whole).
_FREE_CUSTOM_CALL_TARGETS = frozenset({'AllocateBuffer'})
_SLICES = frozenset({'slice', 'dynamic-slice'})


def _custom_call_target(attributes: str) -> str:
  target = _CUSTOM_CALL_TARGET.search(attributes)
  return target.group(1) if target else '?'


def _array_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape (a tuple counts all its elements)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    bits = 8 if dtype == 'pred' else int(re.match(r'[a-z]+(\d+)', dtype).group(1))
    total += math.prod(int(d) for d in dims.split(',') if d) * bits // 8
  return total


@dataclasses.dataclass(frozen=True)
class _Instruction:
  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  attributes: str
  is_root: bool
  parameter_number: int | None


def _split_call(rest: str) -> tuple[str, str]:
  """(operand list, attributes) of the text after `opcode(`."""
  depth = 1
  for i, char in enumerate(rest):
    depth += {'(': 1, ')': -1}.get(char, 0)
    if depth == 0:
      return rest[:i], rest[i + 1:]
  return rest, ''


def _parse(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
  """The program's computations by name, and the entry computation's name."""
  computations, entry, current = {}, '', None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
      continue
    instruction = _INSTRUCTION.match(line) if current is not None else None
    if instruction:
      root, name, shape, opcode, rest = instruction.groups()
      operands, attributes = _split_call(rest)
      number = int(operands) if opcode == 'parameter' else None
      current.append(_Instruction(name, shape, opcode, tuple(re.findall(r'%([\w.\-]+)', operands)), attributes,
                                  bool(root), number))
  return computations, entry


def _called(attributes: str, key: str) -> list[str]:
  match = re.search(key + r'=\{?([^}\s]*)\}?', attributes)
  return re.findall(r'%([\w.\-]+)', match.group(1)) if match else []


@dataclasses.dataclass(frozen=True)
class OpTraffic:
  """The traffic of the ops that share a kind, a source op name (layer indices folded) and a result shape."""
  kind: str
  op_name: str
  shape: str
  count: int
  bytes: int


class _Estimator:
  """Walks a parsed program from its entry computation, accumulating bytes per (kind, op name, shape)."""

  def __init__(self, hlo_text: str):
    self.computations, self.entry = _parse(hlo_text)
    self.shapes = {i.name: i.shape for body in self.computations.values() for i in body}
    self.totals = collections.Counter()
    self.counts = collections.Counter()

  def _operand_and_result_bytes(self, instruction: _Instruction) -> int:
    """Each distinct operand once, less those an output aliases, and the result."""
    aliasing = _ALIASING.search(instruction.attributes)
    aliased = {instruction.operands[int(i)] for i in _ALIASED_OPERAND.findall(aliasing.group(1))} if aliasing else set()
    return _array_bytes(instruction.shape) + sum(_array_bytes(self.shapes.get(o, ''))
                                                 for o in dict.fromkeys(instruction.operands) if o not in aliased)

  def _callee(self, attributes: str) -> list[_Instruction]:
    """The computation an op's `calls=` names (a fusion's fused computation, an async start's
    wrapper); empty where it names none."""
    return self.computations.get(next(iter(_called(attributes, 'calls')), ''), [])

  def _fusion_bytes(self, instruction: _Instruction) -> int:
    """Operands and result of a fusion, with sliced operands counted as their slices and a root
    dynamic-update-slice in place (it writes only its update into the operand it aliases)."""
    fused = self._callee(instruction.attributes)
    if not fused:
      return self._operand_and_result_bytes(instruction)
    by_name = {i.name: i for i in fused}
    users = collections.defaultdict(list)
    for i in fused:
      for operand in i.operands:
        users[operand].append(i)

    def source(name: str) -> str:
      while by_name[name].opcode == 'bitcast':
        name = by_name[name].operands[0]
      return name

    def uses(name: str) -> list[_Instruction]:
      """The users of `name`, looking through bitcasts."""
      return [v for u in users[name] for v in (uses(u.name) if u.opcode == 'bitcast' else [u])]

    root = next((i for i in fused if i.is_root), None)
    outputs = [by_name[o] for o in root.operands] if root and root.opcode == 'tuple' else [root] if root else []
    in_place, moved = set(), 0
    for output in outputs:
      if output.opcode == 'dynamic-update-slice':
        in_place.add(source(output.operands[0]))
        moved += _array_bytes(by_name[output.operands[1]].shape)  # written in place; its sources are read below
      else:
        moved += _array_bytes(output.shape)
    parameters = sorted((i for i in fused if i.opcode == 'parameter'), key=lambda i: i.parameter_number)
    for operand, parameter in zip(instruction.operands, parameters):
      if parameter.name in in_place:
        continue
      readers = uses(parameter.name)
      if readers and all(u.opcode in _SLICES and source(u.operands[0]) == parameter.name for u in readers):
        moved += sum(_array_bytes(u.shape) for u in readers)
      else:
        moved += _array_bytes(self.shapes.get(operand, ''))
    return moved

  def _started(self, start: _Instruction) -> _Instruction:
    """The op an async start runs, with the start's operands: `fusion-start` names its fused
    computation itself; `async-start` calls a wrapper computation whose root is the op."""
    if start.opcode != 'async-start':
      return dataclasses.replace(start, opcode=start.opcode.removesuffix('-start'))
    wrapper = self._callee(start.attributes)
    root = next((i for i in wrapper if i.is_root), None)
    if root is None:
      return dataclasses.replace(start, opcode='async')
    parameters = {i.name: i.parameter_number for i in wrapper if i.opcode == 'parameter'}
    operands = tuple(start.operands[parameters[o]] if o in parameters else o for o in root.operands)
    return dataclasses.replace(root, name=start.name, operands=operands, attributes=root.attributes + start.attributes)

  def walk(self, computation: str, repeats: int) -> None:
    for instruction in self.computations.get(computation, []):
      if instruction.opcode.endswith('-done'):  # its start was charged for the op
        continue
      if instruction.opcode.endswith('-start') and 'calls=' in instruction.attributes:
        instruction = self._started(instruction)
      if instruction.opcode == 'while':
        trip = _TRIP_COUNT.search(instruction.attributes)
        for body in _called(instruction.attributes, 'body'):
          self.walk(body, repeats * (int(trip.group(1)) if trip else 1))
        continue
      if instruction.opcode in ('call', 'conditional'):  # a conditional counts all its branches: an upper bound
        for callee in _called(instruction.attributes, 'to_apply') + _called(instruction.attributes,
                                                                              'branch_computations'):
          self.walk(callee, repeats)
        continue
      if instruction.opcode in _FREE or (instruction.opcode == 'custom-call' and
                                         _custom_call_target(instruction.attributes) in _FREE_CUSTOM_CALL_TARGETS):
        continue
      if instruction.opcode == 'fusion':
        moved = self._fusion_bytes(instruction)
      elif instruction.opcode in _SLICES:
        moved = 2 * _array_bytes(instruction.shape)
      elif instruction.opcode == 'dynamic-update-slice':
        moved = 2 * _array_bytes(self.shapes.get(instruction.operands[1], ''))
      else:
        moved = self._operand_and_result_bytes(instruction)
      key = (self._kind(instruction), self._op_name(instruction), re.sub(r'\{[^}]*\}', '', instruction.shape))
      self.totals[key] += moved * repeats
      self.counts[key] += repeats

  def _kind(self, instruction: _Instruction) -> str:
    """What runs the op: 'gemm' (cuBLAS or a Triton GEMM fusion), 'fusion:kLoop'..., 'custom-call:TARGET',
    or the opcode (copy, dynamic-update-slice, ...). XLA's dynamic-slice fusion is a library call (a
    cuBLAS GEMM reading or writing one layer of a scanned stack in place) and counts as that call."""
    attributes = instruction.attributes
    if instruction.opcode == 'fusion':
      if 'gemm_fusion' in attributes or '__cublas' in attributes or '"kind":"__triton_gemm"' in attributes:
        return 'gemm'
      if '"name":"dynamic_slice_fusion"' in attributes:
        call = next((i for i in self._callee(attributes) if i.opcode == 'custom-call'), None)
        if call:
          return self._kind(call)
      kind = re.search(r'kind=(\w+)', attributes)
      return 'fusion:' + (kind.group(1) if kind else '?')
    if instruction.opcode == 'custom-call':
      target = _custom_call_target(attributes)
      return 'gemm' if 'gemm' in target or 'cublas' in target else 'custom-call:' + target
    return instruction.opcode

  @staticmethod
  def _op_name(instruction: _Instruction) -> str:
    name = _OP_NAME.search(instruction.attributes)
    return re.sub(r'\d+', '#', name.group(1)) if name else instruction.opcode


def estimate(hlo_text: str) -> list[OpTraffic]:
  """The program's estimated traffic, grouped by kind, source op and shape, largest first."""
  estimator = _Estimator(hlo_text)
  estimator.walk(estimator.entry, 1)
  return sorted((OpTraffic(kind, name, shape, estimator.counts[key], moved)
                 for key, moved in estimator.totals.items() for kind, name, shape in [key]),
                key=lambda op: -op.bytes)


def total_bytes(ops: list[OpTraffic]) -> int:
  """The whole program's estimated traffic."""
  return sum(op.bytes for op in ops)


def bytes_by_kind(ops: list[OpTraffic]) -> dict[str, int]:
  """Traffic per kind of op (gemm, fusion:kLoop, copy, ...), largest first."""
  kinds = collections.Counter()
  for op in ops:
    kinds[op.kind] += op.bytes
  return dict(kinds.most_common())


def write_table(hlo_path: str) -> dict:
  """Estimates the program at `hlo_path`, writes traffic.csv beside it; the totals."""
  ops = estimate(pathlib.Path(hlo_path).read_text())
  files.write_csv(str(pathlib.Path(hlo_path).with_name('traffic.csv')),
                  [f.name for f in dataclasses.fields(OpTraffic)], [dataclasses.astuple(op) for op in ops])
  return {'traffic_bytes': total_bytes(ops), 'traffic_bytes_by_kind': bytes_by_kind(ops)}


if __name__ == '__main__':
  for path in sys.argv[1:]:
    print(json.dumps({'program': path, **write_table(path)}))
