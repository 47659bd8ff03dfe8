"""`admin_jax.compile`: a config's train step planned for a TPU slice or GPUs this machine does not have."""

import collections
import importlib.metadata
import json
import re

import pytest

from admin_jax import compile as compile_job
from admin_jax import deviceless
from admin_jax import flops
from admin_jax import targets
from admin_jax.errors import UserError
from admin_jax.model import TransformerConfig
from configs import demo
from configs.bench import tiny
from conftest import REPO
from conftest import finish
from conftest import python
from conftest import spawn
from conftest import subprocess_env

TINY = ('--config=configs/bench/tiny.py',)  # 2+2 layers of 64, 8 rows of 32 tokens, vocabulary 1000, float32
TINY_PARAMS = 232064  # what `bench --config=configs/bench/tiny.py` counted
SMALLER = ('--config.model.num_encoder_layers=1', '--config.model.num_decoder_layers=1')  # a TPU's compile is slower

# The plugins, kept out of the test environment in gitignored folders (as .ci/run installs them).
TPU_PLUGIN = REPO / deviceless.TPU_PLUGIN_DIR
CUDA_PLUGIN = REPO / deviceless.CUDA_PLUGIN_DIR
needs_libtpu = pytest.mark.skipif(not TPU_PLUGIN.is_dir(), reason='no .tpu-plugin/: no libtpu to compile for a TPU')
needs_cuda_plugin = pytest.mark.skipif(not CUDA_PLUGIN.is_dir(),
                                       reason='no .cuda-plugin/: no CUDA PJRT plugin to compile for a GPU')

FIELDS = {'target', 'chips', 'mesh', 'memory_needed_bytes', 'memory_available_bytes', 'fits', 'compile_seconds',
          'flops_per_step', 'collectives', 'estimated_days'}


def _compile(*args: str, env: dict[str, str] | None = None):
  return spawn([python(), '-m', 'admin_jax.compile', *args], env or subprocess_env())


@pytest.fixture(scope='module')
def tpu_plans(tmp_path_factory) -> dict[str, tuple]:
  """The tiny config with one layer a side for a v4-8 (with Admin's profiling pass) and a v5litepod-4 (Pre-LN:
  the train step alone), and a micro-batch too large for a v5litepod-1, compiled at once; each job's result
  and dump folder."""
  jobs = {'v4-8': ('--config.model.residual=admin',), 'v5litepod-4': ('--config.model.residual=pre_ln',),
          'oversized': ('--config.model.residual=pre_ln', '--config.data.tokens_per_batch=8388608')}
  dumps = {name: tmp_path_factory.mktemp(name) for name in jobs}
  children = {name: _compile(*TINY, *SMALLER, *extra, f'--target={"v5litepod-1" if name == "oversized" else name}',
                             f'--dump_dir={dumps[name]}') for name, extra in jobs.items()}
  return {name: (finish(child), dumps[name]) for name, child in children.items()}


@needs_libtpu
@pytest.mark.parametrize('name', ['v4-8', 'v5litepod-4'])
def test_tiny_config_fits_a_tpu_slice(tpu_plans, name):
  result, dump = tpu_plans[name]
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(result.stdout)
  assert FIELDS <= set(record), FIELDS - set(record)
  target = targets.resolve(name)
  assert record['target'] == name and record['chips'] == 4 == record['mesh']['data']
  assert record['device_kind'] == target.chip.device_kind
  assert 0 < record['memory_needed_bytes'] <= record['memory_available_bytes'] == target.chip.usable_bytes
  assert target.chip.usable_bytes <= target.chip.memory_bytes and record['fits']
  programs = {'train_step', 'profiling_pass'} if name == 'v4-8' else {'train_step'}
  assert set(record['memory_needed_bytes_by_program']) == programs
  assert record['memory_needed_bytes'] == max(record['memory_needed_bytes_by_program'].values())
  assert {f.name.removesuffix('.hlo.txt') for f in dump.iterdir()} == programs
  config = tiny.get_config()
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1
  step_flops = flops.training_flops(TransformerConfig.from_config(config, config.data.vocab_size), 8, 32, 32)
  assert record['flops_per_step'] == step_flops
  seconds = config.train.num_steps * step_flops / (4 * target.chip.peak_tflops * 1e12 * 0.4)
  assert record['estimated_days'] == pytest.approx(seconds / 86400)
  # Data parallel over 4 chips: every float32 gradient is all-reduced.
  assert record['collectives']['all-reduce']['bytes'] >= 4 * record['params']
  assert record['collectives'] == compile_job.collectives((dump / 'train_step.hlo.txt').read_text())


@needs_libtpu
def test_a_micro_batch_too_large_for_the_chip_is_one_line_error(tpu_plans):
  """XLA's TPU compiler refuses a program over the chip's HBM: exit 1, needed against available and what
  lowers it, in one line."""
  result, _ = tpu_plans['oversized']
  assert result.returncode == 1 and result.stdout == '' and 'Traceback' not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, result.stderr
  assert re.fullmatch(r'error: v5litepod-1: the train step does not fit: .*exceeds available HBM \(15\.75G\).*; '
                      r'lower it with fewer data\.tokens_per_batch with more train\.grad_accum .*', errors[0]), errors


@needs_libtpu
def test_rows_that_do_not_split_over_the_slice_are_refused_before_compiling():
  """6 rows over the 4 chips of a v4-8: the error the first batch of a real run gives, before any compile."""
  result = finish(_compile(*TINY, '--config.data.tokens_per_batch=192', '--target=v4-8'), timeout=120)
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.strip().splitlines()[-1] == (
      "error: a batch of 6 rows does not split over the 4 batch shards of mesh {'data': 4, 'fsdp': 1, 'tensor': 1}: "
      'make data.tokens_per_batch // data.max_len a multiple of it')
  assert 'compiling' not in result.stderr


def test_rows_split_over_every_host_of_a_slice():
  """Each host of a v5e-16 (4 of them) reads its own rows, even where the mesh splits no batch (all tensor)."""
  config = demo.get_config()
  config.mesh.data, config.mesh.tensor = 1, 16
  config.data.tokens_per_batch = 6 * config.data.max_len
  with pytest.raises(UserError, match=r'^a batch of 6 rows does not split over the 4 batch shards of mesh'):
    compile_job.check_micro_batch(config, targets.resolve('v5e-16'))
  config.data.tokens_per_batch = 8 * config.data.max_len
  compile_job.check_micro_batch(config, targets.resolve('v5e-16'))


def test_gpu_only_kernels_are_refused_on_a_tpu():
  perf = demo.get_config().perf
  perf.attention_impl, perf.layer_norm_impl = 'flash', 'pallas'
  with pytest.raises(UserError) as error:
    targets.refuse_gpu_kernels(perf, 'tpu', 'v4-8')
  assert str(error.value) == ("perf.attention_impl='flash' and perf.layer_norm_impl='pallas' are GPU kernels, not "
                              'for v4-8: use the default xla on a TPU')
  perf.layer_norm_impl = 'xla'
  for kernel in ('flash', 'cudnn'):
    perf.attention_impl = kernel
    with pytest.raises(UserError, match=f"^perf.attention_impl='{kernel}' is a GPU kernel, not for v6e-4"):
      targets.refuse_gpu_kernels(perf, 'tpu', 'v6e-4')
    targets.refuse_gpu_kernels(perf, 'gpu', 'h100')  # what they are written for


@pytest.mark.parametrize('name, chips, hosts, topology', [
    ('v4-8', 4, 1, 'v4:2x2x1'), ('v4-64', 32, 8, 'v4:2x4x4'), ('v5p-8', 4, 1, 'v5p:2x2x1'),
    ('v5litepod-1', 1, 1, 'v5e:1x1'), ('v5e-16', 16, 4, 'v5e:4x4'), ('v5litepod-256', 256, 64, 'v5e:16x16'),
    ('v6e-8', 8, 1, 'v6e:2x4'), ('h100', 1, 1, '1x1x1'), ('h200-8', 8, 1, '1x1x8'), ('h100-16', 16, 2, '1x2x8'),
])
def test_target_names_give_their_chips_and_topology(name, chips, hosts, topology):
  target = targets.resolve(name)
  assert (target.chips, target.hosts, target.topology) == (chips, hosts, topology)


@pytest.mark.parametrize('name', ['v4-6', 'v4-4', 'v5litepod-2', 'v6e-512', 'h100-12', 'h100-0', 'v7-8', 'h100x8'])
def test_unknown_targets_are_refused(name):
  with pytest.raises(ValueError, match=re.escape(name)):
    targets.resolve(name)


def test_a_devices_data_sheet_peak_is_its_chips_in_the_table_of_targets():
  """MFU's peak comes from targets.py's one table, by exact device kind: v5p chips report 'TPU v5', and a
  PCIe H100 (756 TFLOP/s, not the SXM card's 989) has no data sheet there, so it is measured instead."""
  device = lambda kind: type('Device', (), {'device_kind': kind})()
  assert flops.datasheet_peak(device('TPU v5')) == ('TPU v5', targets.TPU_CHIPS['v5p'].peak_tflops) == ('TPU v5', 459.0)
  assert flops.datasheet_peak(device('NVIDIA H200')) == ('NVIDIA H200', 989.0)
  assert flops.datasheet_peak(device('TPU v5 lite')) == ('TPU v5 lite', 197.0)
  assert flops.datasheet_peak(device('NVIDIA H100 PCIe')) is None and flops.datasheet_peak(device('cpu')) is None


def test_collectives_count_each_run_and_its_output_bytes():
  """A loop body's collectives run once per iteration (a scan over 6 layers, by XLA's count, inside one over
  3 micro-batches, by its condition);
  an asynchronous start's result holds scalar contexts, and a gather's its operands before its outputs."""
  program = '''HloModule m

%layer (p: f32[8]) -> f32[8] {
  %ar = bf16[1024]{0} all-reduce(bf16[1024]{0} %x), replica_groups={}, to_apply=%add
  %f = f32[1024]{0} fusion(bf16[1024]{0} %ar), kind=kLoop, calls=%gather
}

%gather (p: f32[4,8]) -> f32[16,8] {
  %ags = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(f32[4,8]{1,0} %p), dimensions={0}
  %agd = f32[16,8]{1,0} all-gather-done((f32[4,8]{1,0}, f32[16,8]{1,0}) %ags)
}

%micro_batch (p: f32[8]) -> f32[8] {
  %w = f32[8] while(f32[8] %p), condition=%cond, body=%layer, backend_config={"known_trip_count":{"n":"6"}}
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(3)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %c), direction=LT
}

%add (a: f32[], b: f32[]) -> f32[] {
  %s = f32[] add(f32[] %a, f32[] %b)
}

ENTRY %main (p: f32[8]) -> f32[8] {
  %w = f32[8] while(f32[8] %p), condition=%cond, body=%micro_batch
  %cps = (s32[2,3]{1,0}, s32[2,3]{1,0}, u32[], u32[]) collective-permute-start(s32[2,3]{1,0} %q)
  %rs = (f32[2]{0}, pred[8]{0}) reduce-scatter(f32[8]{0} %a, pred[32]{0} %b), dimensions={0}
  %f = f32[1024]{0} fusion(bf16[1024]{0} %rs), calls=%all-reduce.1
}
'''
  assert compile_job.collectives(program) == {
      'all-reduce': {'count': 18, 'bytes': 18 * 2 * 1024}, 'all-gather': {'count': 18, 'bytes': 18 * 4 * 16 * 8},
      'collective-permute': {'count': 1, 'bytes': 4 * 6}, 'reduce-scatter': {'count': 1, 'bytes': 4 * 2 + 8}}


def test_a_missing_plugin_is_one_line_saying_how_to_install_it(monkeypatch, tmp_path):
  monkeypatch.setattr(deviceless, 'PLUGIN_ROOT', tmp_path)
  monkeypatch.setattr(deviceless, 'plugin_installed', lambda: False)
  monkeypatch.setattr(deviceless.importlib.util, 'find_spec', lambda name: None)
  jaxlib = importlib.metadata.version('jaxlib')
  with pytest.raises(UserError) as error:
    deviceless.compile_only_devices(targets.resolve('h100'))
  assert str(error.value) == (f'--target=h100 needs the CUDA PJRT plugin of jax {jaxlib} (no GPU or CUDA): '
                              f'pip install --target .cuda-plugin jax-cuda12-plugin=={jaxlib}')
  with pytest.raises(UserError) as error:
    deviceless.compile_only_devices(targets.resolve('v4-8'))
  assert str(error.value) == ('--target=v4-8 needs libtpu (no TPU): pip install --no-deps --target .tpu-plugin '
                              f'"{deviceless.libtpu_requirement()}" (at the repository root)')
  assert deviceless.libtpu_requirement().startswith('libtpu==')


def test_a_cuda_plugin_of_another_jaxlib_is_one_line_error(monkeypatch):
  """jaxlib skips a plugin built for another release with a warning, and the deviceless compile
  then crashed (SIGSEGV); the mismatch is named before JAX is touched."""
  monkeypatch.setattr(deviceless, 'plugin_installed', lambda: True)
  monkeypatch.setattr(deviceless, 'plugin_version', lambda: '0.0.1')
  with pytest.raises(UserError) as error:
    deviceless.compile_only_devices(targets.resolve('h100'))
  wanted = importlib.metadata.version('jaxlib')
  assert str(error.value) == (f'--target=h100 needs the CUDA PJRT plugin of jaxlib {wanted}, not the installed '
                              f'0.0.1: pip install --target .cuda-plugin jax-cuda12-plugin=={wanted}')


def test_gpu_memory_available_follows_jax_memory_fraction(monkeypatch):
  h100 = targets.resolve('h100')
  assert deviceless.available_bytes(h100) == int(0.75 * h100.chip.memory_bytes)
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')
  assert deviceless.available_bytes(h100) == h100.chip.memory_bytes // 2


@pytest.fixture(scope='module')
def h100_plans(tmp_path_factory) -> dict[str, tuple]:
  """The tiny config, scanned, compiled for an H100 by two jobs at once (each compiles on one core): with
  the Pallas kernels, and with a bf16 stream through XLA's LayerNorm; each job's result and dump folder."""
  found = deviceless.plugin_version([str(CUDA_PLUGIN)])
  jaxlib = importlib.metadata.version('jaxlib')
  # A plugin of another release crashes the jobs' `import jax` (jaxlib 0.11.2 with 0.10.2's) before they can refuse it.
  assert found == jaxlib, (f'{CUDA_PLUGIN} holds the CUDA plugin of jaxlib {found}, not {jaxlib}: reinstall it '
                           'as .ci/run does')
  env = subprocess_env()
  env.pop('JAX_PLATFORMS')  # the job must keep the plugin from looking for a GPU by itself
  options = {'pallas': ('--config.perf.attention_impl=flash', '--config.perf.layer_norm_impl=pallas'),
             'bfloat16_stream': ('--config.perf.stream_dtype=bfloat16',)}
  dumps = {name: tmp_path_factory.mktemp(name) for name in options}
  children = {name: _compile(*TINY, '--target=h100', '--config.perf.scan_layers=true', *extra,
                             f'--dump_dir={dumps[name]}', env=env) for name, extra in options.items()}
  return {name: (finish(child), dumps[name]) for name, child in children.items()}


@needs_cuda_plugin
def test_compiles_for_a_gpu_this_machine_does_not_have(h100_plans):
  """--target=h100 on a CPU-only machine: XLA's memory plan for the card and its program (with the
  Pallas kernels compiled by Triton for it), no step run."""
  result, dump = h100_plans['pallas']
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(result.stdout)
  assert record['device_kind'] == targets.GPU_CHIPS['h100'].device_kind and record['params'] == TINY_PARAMS
  assert 0 < record['memory_needed_bytes'] < record['memory_available_bytes'] == int(0.75 * 81_559 * 2 ** 20)
  assert record['fits'] and record['chips'] == 1 and record['collectives'] == {}
  program = (dump / 'train_step.hlo.txt').read_text()
  assert 'while(' in program  # the scanned layers
  # The Pallas kernels as Triton, not the interpreter that runs them on this CPU, in the scan bodies:
  # flash forward, dQ and dK/dV for the encoder's and the decoder's self-attention and the
  # cross-attention; the residual LayerNorm forward and backward for the 2 + 3 sublayers.
  kernels = collections.Counter(re.search(r'(\w+)/pallas_call', line).group(1) for line in program.splitlines()
                                if 'custom_call_target="__gpu$xla.gpu.triton"' in line)
  assert kernels == {'flash_attention_forward': 3, 'flash_attention_dq': 3, 'flash_attention_dkv': 3,
                     'residual_layer_norm_forward': 5, 'residual_layer_norm_backward': 5}, kernels


@needs_cuda_plugin
def test_a_bfloat16_stream_stays_bfloat16_in_the_gpu_program(h100_plans):
  """perf.stream_dtype=bfloat16 under float32 compute with XLA's LayerNorm: the GPU program holds the
  stream as bf16 [batch, length, d_model] arrays. XLA's GPU compiler, allowed excess precision, drops a
  rounding to bf16 and its reverse, and so kept none before the stream was stored as rounded
  (`layers.stream_and_copy`); a CPU program keeps them either way."""
  result, dump = h100_plans['bfloat16_stream']
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout)['fits']
  assert (dump / 'train_step.hlo.txt').read_text().count('bf16[8,32,64]') > 10

