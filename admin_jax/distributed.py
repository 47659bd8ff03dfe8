"""Joining JAX's distributed runtime when more than one process takes part.

Cloud TPU pods and SLURM are detected by `jax.distributed.initialize()` itself; elsewhere the
coordinator comes from flags or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables. One global mesh then spans every process's devices.
"""

import json
import os

from absl import flags
import jax
import numpy as np
from jax.experimental import multihost_utils

COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-process runs.')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in a multi-process run.')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')


def _multi_host_environment() -> bool:
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True
  return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')


def initialize() -> None:
  coordinator = COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS')
  num_processes = NUM_PROCESSES.value or int(os.environ.get('JAX_NUM_PROCESSES', '0') or 0)
  process_id = PROCESS_ID.value if PROCESS_ID.value is not None else os.environ.get('JAX_PROCESS_ID')
  if coordinator and num_processes and num_processes > 1:
    if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator, num_processes, int(process_id))
  elif _multi_host_environment():
    jax.distributed.initialize()


def is_lead() -> bool:
  """Process 0 writes logs, metrics, plots and the tokenizer."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True on every process if it is true on any: stop decisions are taken together."""
  if jax.process_count() == 1:
    return flag
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray(flag))).any())


def allgather_json(value) -> list:
  """Every process's JSON-serialisable `value`, in process order, on every process."""
  if jax.process_count() == 1:
    return [value]
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
  length = int(np.asarray(multihost_utils.process_allgather(np.asarray(len(encoded)))).max())
  padded = np.zeros(length, np.uint8)
  padded[:len(encoded)] = encoded
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row).rstrip(b'\0').decode()) for row in gathered]
