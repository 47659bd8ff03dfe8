"""The speed table on one GPU, one process per run: `python -m benchmarks.speed_table --out=DIR [--smoke]`.

    python -m benchmarks.speed_table --out=DIR [--steps=10] [--run_timeout=SECONDS] [--stream_dtype=bfloat16]
        [--data=../shared/data/multi30k] [--runs=base6,big6,...] [--smoke]

Runs `admin_jax.bench` on configs/bench/ base6, big6, big18 scanned and big18 unrolled with the fastest settings the
project recommends for the card (README "Jobs", docs/PERF.md): the Pallas flash attention and residual
LayerNorm, rbg dropout keys, the residual stream in `--stream_dtype`; the scanned big18 with remat
dots, its first encoder layer unrolled and the XLA flags that suit that form. Then
benchmarks/inference_speed.py times an Admin profiling pass and a beam-4 decode of Multi30k's 1,000
test sentences with configs/multi30k.py's 18L-18L model. Each in its own process (peak memory is the
process's own) under `--run_timeout`; bench records tokens/s, MFU against the matmul peak it measures
in the same process, compile seconds and peak memory.

Each run's JSON line is appended to OUT/speed.jsonl as it ends, with `run`, `command` and
`wall_seconds` (a run that fails or runs out of time is a line with `error`), and OUT/speed.md (the
table) is rewritten, so a cut command keeps what finished; every run's stderr goes to OUT/runs.log.
`--smoke` runs the same runs on the CPU at their smallest: configs/bench/tiny.py without the GPU kernels and
XLA's GPU flags, and a tiny model on the synthetic corpus.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from scripts import depth_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEED_JSONL, SPEED_MD, RUNS_LOG = 'speed.jsonl', 'speed.md', 'runs.log'
GPU_KERNELS = ('--config.perf.attention_impl=flash', '--config.perf.layer_norm_impl=pallas')  # interpreted on CPUs
SCANNED = ('--config.perf.scan_layers=true', '--config.perf.remat=dots', '--config.perf.unrolled_encoder_layers=1')
# cuBLAS GEMMs read a scanned stack's layer in place; scans of unequal lengths leave their stacks unfilled.
SCANNED_XLA_FLAGS = '--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dus_accumulator_zero_init_elimination=true'
# On an H200, estimates until timed: each process starts and measures its matmul peak in about 10 s;
# compiles took 41.5 s (base6), 38.7 s (big6) and 22.8 s (big18 scanned) on an H200 (docs/PERF.md), and
# unrolled big18 compiles 2.4x big6's time deviceless, about 90 s; 13 steps take under 5 s; the
# profiling pass and the two decodes about 70 s: about 320 s in all. The longest compile runs last, so a
# command cut at 5 minutes loses the least, and `--runs=big18_unrolled` runs it alone.
GPU_STEPS = 10
GPU_INFERENCE_CONFIG = 'configs/multi30k.py:18,admin'


@dataclasses.dataclass(frozen=True)
class BenchRun:
  """One bench process: its name in the table, its config in configs/bench/, overrides beyond the fast
  settings, XLA flags."""
  name: str
  config: str
  options: tuple[str, ...] = ()
  xla_flags: str = ''


RUNS = (
    BenchRun('base6', 'base6'),
    BenchRun('big6', 'big6'),
    BenchRun('big18_scanned', 'big18', SCANNED, SCANNED_XLA_FLAGS),
    BenchRun('big18_unrolled', 'big18'),
)
DECODE = 'profile_decode'  # the inference_speed run, between the last two bench runs
ORDER = (*(run.name for run in RUNS[:-1]), DECODE, RUNS[-1].name)


def bench_command(run: BenchRun, args: argparse.Namespace) -> tuple[list[str], str]:
  """(command, extra XLA flags) of one bench process."""
  fast = ('--config.train.prng_impl=rbg', f'--config.perf.stream_dtype={args.stream_dtype}',
          *(() if args.smoke else GPU_KERNELS))
  config = 'tiny' if args.smoke else run.config
  command = [sys.executable, '-m', 'admin_jax.bench', f'--config=configs/bench/{config}.py', f'--steps={args.steps}',
             *fast, *run.options]
  return command, '' if args.smoke else run.xla_flags


def inference_command(args: argparse.Namespace, workdir: str) -> list[str]:
  if args.smoke:
    config, overrides = 'configs/multi30k.py:2,admin', depth_experiment.SCALES['smoke'].overrides
  else:
    config = GPU_INFERENCE_CONFIG
    overrides = (*depth_experiment.corpus_overrides(args.data), '--config.perf.attention_impl=flash',
                 '--config.perf.layer_norm_impl=pallas')
  return [sys.executable, '-m', 'benchmarks.inference_speed', f'--config={config}', f'--workdir={workdir}',
          f'--config.perf.stream_dtype={args.stream_dtype}', *overrides]


def run_process(name: str, command: list[str], xla_flags: str, args: argparse.Namespace) -> dict:
  """The JSON line a process printed last, with `run`, `command` and `wall_seconds`; or an `error` line."""
  env = dict(os.environ)
  if xla_flags:
    env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} {xla_flags}'.strip()
  shown = ' '.join(([f"XLA_FLAGS='{xla_flags}'"] if xla_flags else []) + ['python', *command[1:]])
  print(f'start {name}: {shown}', flush=True)
  start = time.time()
  with open(os.path.join(args.out, RUNS_LOG), 'a') as log:
    log.write(f'=== {name}: {shown}\n')
    log.flush()
    try:
      result = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                              timeout=args.run_timeout)
      error = None if result.returncode == 0 else f'exit status {result.returncode}'
      lines = result.stdout.strip().splitlines()
    except subprocess.TimeoutExpired:
      error, lines = f'timed out after {args.run_timeout:.0f} s', []
  record = {'run': name}
  if error is None:
    record.update(json.loads(lines[-1]))
  else:
    record['error'] = error
  record.update(command=shown, wall_seconds=round(time.time() - start, 1))
  print(json.dumps(record), flush=True)
  return record


def write_table(out: str, records: list[dict]) -> None:
  """OUT/speed.md: the bench rows, then the profiling pass and the decode."""
  lines = ['| run | config | device | tokens/s | step ms | MFU (matmul peak TFLOP/s) | compile s | peak memory GiB | '
           'jax |', '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in records:
    if 'error' in r:
      lines.append(f'| {r["run"]} | {r["error"]} | | | | | | | |')
    elif 'tokens_per_sec' in r:
      lines.append(f'| {r["run"]} | {r["config"]} | {r["device"]} | {r["tokens_per_sec"] / 1e3:.1f}k | '
                   f'{r["step_ms"]:.1f} | {r["mfu"]:.3f} ({r["matmul_peak_tflops"]:.3g}) | '
                   f'{r["compile_seconds"]:.1f} | '
                   f'{r["peak_memory_bytes"] / 2 ** 30:.2f} | {r["jax"]} |')
  for r in records:
    if 'sentences_per_sec' in r:
      lines += ['', f'{r["device"]}, jax {r["jax"]}, {r["layers"]}L-{r["layers"]}L Admin (d_model {r["d_model"]}): '
                f'profiling pass {r["profile_seconds"]:.1f} s ({r["profile_compile_seconds"]:.1f} s of it compiling, '
                f'{r["profile_rows"]} rows); beam-{r["beam_size"]} decode of {r["sentences"]} sentences '
                f'{r["decode_seconds"]:.1f} s, {r["sentences_per_sec"]:.1f} sentences/s (first pass, compiling, '
                f'{r["decode_first_pass_seconds"]:.1f} s; untrained weights, {r["mean_hypothesis_tokens"]:.1f} '
                'tokens per hypothesis).']
  with open(os.path.join(out, SPEED_MD), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='where speed.jsonl, speed.md and runs.log go')
  parser.add_argument('--steps', type=int, default=GPU_STEPS, help='timed steps per bench run')
  parser.add_argument('--run_timeout', type=float, default=150, help='seconds per process')
  parser.add_argument('--stream_dtype', choices=('float32', 'bfloat16'), default='bfloat16')
  parser.add_argument('--data', default=depth_experiment.DEFAULT_DATA, help='the Multi30k folder, for the decode')
  parser.add_argument('--smoke', action='store_true', help='the CPU at the smallest scale: tiny model, synthetic data')
  parser.add_argument('--runs', type=lambda text: text.split(','), default=list(ORDER),
                      help=f'comma-separated, run in this order: {",".join(ORDER)}')
  args = parser.parse_args(argv)
  unknown = set(args.runs) - set(ORDER)
  if unknown:
    parser.error(f'--runs: unknown {", ".join(sorted(unknown))}; choose from {",".join(ORDER)}')
  args.data = os.path.abspath(args.data)
  if not args.smoke:
    depth_experiment.check_corpus(args.data)
  os.makedirs(args.out, exist_ok=True)
  records = []

  def record(name: str, command: list[str], xla_flags: str = '') -> None:
    records.append(run_process(name, command, xla_flags, args))
    with open(os.path.join(args.out, SPEED_JSONL), 'a') as f:
      f.write(json.dumps(records[-1]) + '\n')
    write_table(args.out, records)

  bench_runs = {run.name: run for run in RUNS}
  for name in ORDER:
    if name not in args.runs:
      continue
    if name == DECODE:
      with tempfile.TemporaryDirectory() as workdir:  # its SentencePiece model and config: nothing to keep
        record(name, inference_command(args, workdir))
    else:
      record(name, *bench_command(bench_runs[name], args))
  with open(os.path.join(args.out, SPEED_MD)) as f:
    print(f.read())


if __name__ == '__main__':
  main(sys.argv[1:])
