"""What the kernel sweeps share: parsing a tiling flag and timing a jitted call on the device."""

import statistics
import time

from absl import app
import jax


def tiling(entry: str, names: tuple[str, ...]) -> tuple[int, ...]:
  """'a,b,...' as integers, one per name; a usage error naming the fields otherwise."""
  numbers = tuple(int(n) for n in entry.split(','))
  if len(numbers) != len(names):
    raise app.UsageError(f'--tiling={entry}: expected {",".join(names)}')
  return numbers


def timed_ms(fn, *args, calls: int) -> float:
  """Median wall time of one call over five samples of `calls` calls each, after one warm-up call."""
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) * 1e3 / calls)
  return statistics.median(samples)
