"""A bare gs:// workdir: every file a run writes besides orbax's checkpoints goes through etils.epath.

There is no bucket offline, so etils' own test hook (`epath.testing.mock_epath`) routes
gs://bucket/... to a local folder with an object store's rules: objects need no folders,
and there is no append and no rename. The working directory is a fresh folder, so a write
that bypasses epath would leave a local path named 'gs:' there, which every test refuses.
"""

import json
import os
import struct

from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from admin_jax import cli
from admin_jax import corpus_eval
from admin_jax import files
from admin_jax import metrics
from admin_jax import omega_init
from admin_jax import trained_run
from admin_jax import train
from admin_jax.analysis import omega
from admin_jax.data import tokenizer
from admin_jax.errors import UserError
from configs import default

WORKDIR = 'gs://bucket/run'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class FakeBucket:
  """The epath backend functions, with gs:// paths mapped into `root` under an object store's rules."""

  def __init__(self, root):
    self.root = root

  def local(self, path) -> str:
    path = os.fspath(path)
    return str(self.root / path.removeprefix('gs://')) if files.is_remote(path) else path

  def open(self, original, path, mode):
    if files.is_remote(path) and 'a' in mode:
      raise OSError(f'object stores cannot append: {path}')
    if files.is_remote(path) and 'w' in mode:
      os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
    return original(self.local(path), mode)

  def no_rename(self, original, path, dst):
    if files.is_remote(path) or files.is_remote(dst):
      raise OSError(f'object stores cannot rename: {path} -> {dst}')
    return original(path, dst)

  def passthrough(self, original, path, *args, **kwargs):
    return original(self.local(path), *args, **kwargs)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://bucket is tmp_path/bucket while the test runs; the test's working directory stays empty.

  mock_epath replaces the backends etils chooses by URL scheme, but etils takes TensorFlow's for
  gs:// whenever TensorFlow is installed (requirements-tfds.txt), so that choice is turned off too.
  """
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  fake = FakeBucket(tmp_path)
  same = fake.passthrough
  with epath_testing.mock_epath(open=fake.open, rename=fake.no_rename, replace=fake.no_rename, exists=same,
                                isdir=same, listdir=same, makedirs=same, mkdir=same, stat=same, remove=same):
    yield tmp_path / 'bucket' / 'run'
  assert not list(cwd.iterdir()), 'a gs:// path was written as a local path'


def test_config_json_is_written_and_checked_on_resume(bucket):
  config = default.get_config()
  cli.write_config(config, WORKDIR)
  assert json.loads((bucket / 'config.json').read_text()) == config.to_dict()
  train.check_workdir_compatible(config, WORKDIR)
  assert trained_run.saved_config(WORKDIR).to_dict() == config.to_dict()  # what translate and evaluate read
  config.model.d_model *= 2
  with pytest.raises(UserError, match='model.d_model'):
    train.check_workdir_compatible(config, WORKDIR)


def test_metrics_are_rewritten_whole_and_a_resume_keeps_earlier_records(bucket):
  writer = metrics.MetricsWriter(WORKDIR, enabled=True)
  writer.write(10, {'loss': 5.0, 'lr': np.float32(0.5)})
  writer.write(20, {'loss': 4.0, 'valid_loss': 4.5, 'valid_bleu': 1.0})
  writer.close()
  assert [r['step'] for r in metrics.read_metrics(WORKDIR)] == [10, 20]
  assert _tensorboard_steps(bucket / 'tensorboard') == {'loss': [10, 20], 'lr': [10], 'valid_loss': [20],
                                                        'valid_bleu': [20]}
  resumed = metrics.MetricsWriter(WORKDIR, enabled=True)
  resumed.write(30, {'loss': 3.0})
  resumed.close()
  lines = (bucket / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
      {'step': 10, 'loss': 5.0, 'lr': 0.5}, {'step': 20, 'loss': 4.0, 'valid_loss': 4.5, 'valid_bleu': 1.0},
      {'step': 30, 'loss': 3.0}]
  assert metrics.read_metrics(WORKDIR) == [json.loads(line) for line in lines]


def test_damaged_metric_lines_are_skipped_with_a_warning(bucket, caplog):
  """A run that resumes into, or finishes over, a metrics.jsonl with a damaged line still plots the
  rest instead of ending in a traceback."""
  good = [{'step': 10, 'loss': 5.0}, {'step': 20, 'loss': 4.0}]
  bucket.mkdir(parents=True)
  (bucket / 'metrics.jsonl').write_text(f'{json.dumps(good[0])}\n[1, 2]\n\n{json.dumps(good[1])}\n{{"step": 30, "lo')
  with caplog.at_level('WARNING'):
    assert metrics.read_metrics(WORKDIR) == good
  assert 'metrics.jsonl: skipped lines 2, 5, holding no record' in caplog.text
  assert metrics.plot_training_curves(WORKDIR) == f'{WORKDIR}/curves.png'


def test_training_curves_plot_into_the_bucket(bucket):
  writer = metrics.MetricsWriter(WORKDIR, enabled=True)
  writer.write(10, {'loss': 5.0, 'valid_loss': 4.0, 'valid_bleu': 2.0})
  writer.close()
  assert metrics.plot_training_curves(WORKDIR) == f'{WORKDIR}/curves.png'
  assert (bucket / 'curves.png').read_bytes().startswith(PNG_SIGNATURE)


def test_profile_is_written_found_and_read_back(bucket):
  omegas = {'encoder': np.array([1.0, 1.25, 1.5, 1.625]), 'decoder': np.array([1.0, 1.5, 1.75, 2.0, 2.25, 2.5])}
  omega_init.write_profile(WORKDIR, omegas, {'inputs_tokens': 3})
  assert (bucket / 'profile.ratio.init').read_text().splitlines()[:2] == ['1 1.0', '2 1.25']
  assert (bucket / 'omega.png').read_bytes().startswith(PNG_SIGNATURE)
  found = omega_init.find_existing_profile(WORKDIR, '')
  assert found == f'{WORKDIR}/omega.json'
  for path in (found, f'{WORKDIR}/profile.ratio.init'):
    back = omega_init.read_profile(path, 2, 2)
    for stack in omegas:
      np.testing.assert_array_equal(back[stack], omegas[stack])
  rows = omega.run(omega.read_omegas(WORKDIR), f'{WORKDIR}/analysis')
  assert (bucket / 'analysis' / 'omega.csv').read_text().splitlines()[1] == 'encoder,1,self_attn,1.0'
  assert len(rows) == 10 and (bucket / 'analysis' / 'omega.png').read_bytes().startswith(PNG_SIGNATURE)


def test_eval_outputs_are_written(bucket):
  corpus_eval.write_outputs(WORKDIR, 'test', ['ein Haus', 'zwei'], {'bleu': 12.5, 'signature': 'nrefs:1'})
  assert (bucket / 'eval' / 'test.hyp').read_text() == 'ein Haus\nzwei\n'
  assert (bucket / 'eval' / 'test.scores').read_text() == 'bleu: 12.5\nsignature: nrefs:1\n'


def test_tokenizer_is_trained_into_and_reloaded_from_the_bucket(bucket):
  config = default.get_config()
  config.data.update(dict(source='synthetic', synthetic_train_size=200, synthetic_eval_size=10, vocab_size=200))
  trained = tokenizer.load_or_train_tokenizer(config, WORKDIR)
  assert (bucket / 'spm.model').read_bytes() == trained.model_proto
  config.data.vocab_size = 100  # ignored: the workdir's model wins
  assert tokenizer.load_or_train_tokenizer(config, WORKDIR).model_proto == trained.model_proto


def test_local_writes_replace_whole_files_and_leave_no_temporary(tmp_path):
  path = tmp_path / 'new' / 'file.txt'
  files.write_text(path, 'first')
  files.write_text(str(path), 'second')
  assert path.read_text() == 'second' and [p.name for p in path.parent.iterdir()] == ['file.txt']
  assert not files.is_remote(path) and files.is_remote(epath.Path(WORKDIR) / 'x')


def _tensorboard_steps(logdir) -> dict[str, list[int]]:
  """The steps of each scalar tag in a folder of TensorBoard event files.

  A record is its length (8 bytes), the length's CRC, an Event proto and the proto's CRC.
  """
  steps = {}
  for event_file in logdir.iterdir():
    data, offset = event_file.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack_from('<Q', data, offset)
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      for value in event.summary.value:
        steps.setdefault(value.tag, []).append(event.step)
      offset += 12 + length + 4
  return steps
