"""translate, evaluate and checkpoint averaging, on one tiny run trained once for the module."""

import gzip
import io
import pathlib
import re
import shutil
import subprocess

import jax
import numpy as np
import pytest
import sacrebleu
import sentencepiece as spm

from admin_jax import checkpoint as checkpoint_lib
from admin_jax import corpus_eval
from admin_jax import trained_run
from admin_jax import sharding
from admin_jax.data import corpora
from conftest import REPO
from conftest import python
from conftest import subprocess_env

TINY = ('--config.model.d_model=32', '--config.model.ffn_dim=64', '--config.model.num_encoder_layers=1',
        '--config.model.num_decoder_layers=1', '--config.data.synthetic_train_size=1000',
        '--config.data.synthetic_eval_size=8', '--config.data.tokens_per_batch=512', '--config.data.max_len=32',
        '--config.data.vocab_size=200', '--config.train.num_steps=6', '--config.checkpoint.every_steps=2',
        '--config.checkpoint.keep=5', '--config.eval.every_steps=-1')  # -1: no test-set pass after training


def _run(module: str, *args: str, stdin: str = '') -> subprocess.CompletedProcess:
  return subprocess.run([python(), '-m', f'admin_jax.{module}', *args], cwd=REPO, env=subprocess_env(),
                        input=stdin, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  proc = _run('train', '--config=configs/demo.py', f'--workdir={workdir}', *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(workdir)


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_checkpoint_names_resolve_to_steps(workdir):
  checkpoints = trained_run.open_checkpoints(workdir, trained_run.saved_config(workdir))
  steps = checkpoints.steps()
  assert steps[-3:] == [2, 4, 6]
  assert trained_run.resolve_steps(checkpoints, 'latest') == [6]
  assert trained_run.resolve_steps(checkpoints, '4') == [4]
  assert trained_run.resolve_steps(checkpoints, 'avg:2') == [4, 6]
  assert trained_run.resolve_steps(checkpoints, f'avg:{len(steps)}') == steps


def test_average_is_the_mean_of_restored_params(workdir, tmp_path):
  config = trained_run.saved_config(workdir)
  checkpoints = trained_run.open_checkpoints(workdir, config)
  tokenizer = trained_run.load_tokenizer(config, workdir)
  _, abstract = trained_run.model_setup(config, tokenizer.vocab_size, sharding.make_mesh(config.mesh))
  early, late = (_leaves(checkpoints.restore_params(step, abstract)) for step in (2, 6))
  assert any(not np.array_equal(a, b) for a, b in zip(early, late))

  for single, original in zip(_leaves(trained_run.average_params(checkpoints, [6], abstract)), late):
    np.testing.assert_array_equal(single, original)
  copies = _leaves(trained_run.average_params(checkpoints, [6, 6, 6], abstract))
  for average, original in zip(copies, late):
    np.testing.assert_allclose(average, original, rtol=1e-6, atol=0)
  mean = _leaves(trained_run.average_params(checkpoints, [2, 6], abstract))
  for average, a, b in zip(mean, early, late):
    np.testing.assert_allclose(average, np.mean([a, b], axis=0), rtol=1e-6, atol=1e-7)

  output_dir = tmp_path / 'averaged'
  proc = _run('average', f'--workdir={workdir}', '--last=2', f'--output_dir={output_dir}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  written = trained_run.open_checkpoints(str(output_dir), trained_run.saved_config(str(output_dir)))
  assert written.steps() == [6]
  for saved, expected in zip(_leaves(written.restore_params(6, abstract)),
                             _leaves(trained_run.average_params(checkpoints, [4, 6], abstract))):
    np.testing.assert_array_equal(saved, expected)
  # The average carries the run's SentencePiece model in its meta, as training's checkpoints do.
  run_model = (pathlib.Path(workdir) / 'spm.model').read_bytes()
  assert (output_dir / 'spm.model').read_bytes() == run_model
  (output_dir / 'spm.model').unlink()
  assert trained_run.load_for_inference(str(output_dir)).tokenizer.model_proto == run_model
  assert checkpoint_lib.tokenizer_from_meta({'config': {}}) is None  # older metas: restore falls back to the file


def test_translations_come_back_in_input_order(workdir, tmp_path):
  config = trained_run.saved_config(workdir)
  words = ' '.join(source for source, _ in corpora.load_pairs(config, 'test')).split()
  by_length = {n: ' '.join(words[i % len(words)] for i in range(n)) for n in (1, 8, 40)}
  lines = [by_length[n] for n in (1, 40, 8, 1, 40, 8, 1)]
  source = tmp_path / 'source.txt.gz'
  with gzip.open(source, 'wt') as f:
    f.write('\n'.join(lines) + '\n')
  output = tmp_path / 'translations.txt'
  proc = _run('translate', f'--workdir={workdir}', f'--input={source}', f'--output={output}', '--batch_size=4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  translations = output.read_text().split('\n')[:-1]
  assert len(translations) == len(lines)

  config.data.eval_batch_size = 1
  model = trained_run.load_for_inference(workdir, 'latest', config)
  evaluator = corpus_eval.Evaluator(model.config, model.tokenizer, model.setup, model.mesh)
  alone = {text: evaluator.translate(model.params, [text])[0] for text in by_length.values()}
  assert translations == [alone[line] for line in lines]
  assert len(set(alone.values())) == len(alone)  # the comparison can tell the lines apart


def _other_spm_model(sentences: list[str]) -> bytes:
  """A valid SentencePiece model unlike the run's: another vocabulary, from reversed text."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=(s[::-1] for s in sentences), model_writer=model,
                                 vocab_size=60, hard_vocab_limit=False, minloglevel=2)
  return model.getvalue()


@pytest.mark.parametrize('spm_file, checkpoint', [('deleted', 'avg:2'), ('replaced', 'latest')])
def test_translate_uses_the_checkpoints_own_tokenizer(workdir, tmp_path, spm_file, checkpoint):
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  sources = [source for source, _ in corpora.load_pairs(trained_run.saved_config(workdir), 'test')]
  if spm_file == 'deleted':
    (copy / 'spm.model').unlink()
  else:
    (copy / 'spm.model').write_bytes(_other_spm_model(sources))
  source, output = tmp_path / 'source.txt', tmp_path / 'translations.txt'
  source.write_text('\n'.join(sources) + '\n')
  proc = _run('translate', f'--workdir={copy}', f'--checkpoint={checkpoint}', f'--input={source}',
              f'--output={output}')
  assert proc.returncode == 0, proc.stderr[-3000:]

  model = trained_run.load_for_inference(workdir, checkpoint)  # the untouched run, with its own spm.model
  evaluator = corpus_eval.Evaluator(model.config, model.tokenizer, model.setup, model.mesh)
  assert output.read_text().split('\n')[:-1] == evaluator.translate(model.params, sources)


@pytest.mark.parametrize('flag', ['--input=source.txt', '--output=translations.txt'])
def test_evaluate_refuses_translate_only_flags(workdir, flag):
  proc = _run('evaluate', f'--workdir={workdir}', flag)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error:') and flag.split('=')[0][2:] in lines[0], proc.stderr


@pytest.mark.parametrize('case', ['no_checkpoints', 'unknown_checkpoint'])
def test_errors_are_one_line(workdir, tmp_path, case):
  if case == 'no_checkpoints':
    for name in ('config.json', 'spm.model'):
      shutil.copy(f'{workdir}/{name}', tmp_path / name)
    args = (f'--workdir={tmp_path}',)
  else:
    args = (f'--workdir={workdir}', '--checkpoint=newest')
  proc = _run('translate', *args)
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error:'), proc.stderr
  assert ('no checkpoints' if case == 'no_checkpoints' else 'avg:N') in lines[0]


def test_evaluate_prints_and_writes_sacrebleu(workdir):
  proc = _run('evaluate', f'--workdir={workdir}', '--split=test', '--checkpoint=avg:2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = re.search(r'^sacreBLEU = (\S+) \((nrefs:\S+)\)$', proc.stdout, re.MULTILINE)
  assert printed, proc.stdout
  for label in ('tokenized BLEU (paper tables)', 'compound-split BLEU'):
    assert re.search(rf'^{re.escape(label)} = \S+ \(nrefs:\S+tok:none', proc.stdout, re.MULTILINE), proc.stdout
  printed_chrf = re.search(r'^chrF2 = (\S+) \(nrefs:', proc.stdout, re.MULTILINE)
  assert printed_chrf, proc.stdout

  hypotheses = corpora.read_lines(f'{workdir}/eval/test.hyp')
  references = [target for _, target in corpora.load_pairs(trained_run.saved_config(workdir), 'test')]
  assert len(hypotheses) == len(references)
  # The 6-step model's BLEU is 0 (no word in common with the references); its chrF is not.
  assert float(printed.group(1)) == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score, abs=0.005)
  assert float(printed_chrf.group(1)) == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score,
                                                       abs=0.005)
  assert f'bleu_signature: {printed.group(2)}' in pathlib.Path(workdir, 'eval', 'test.scores').read_text()


def test_dependency_of_a_trained_checkpoint_beside_its_initialisation(workdir, tmp_path):
  proc = _run('analysis.dependency', f'--workdir={workdir}', f'--out={tmp_path}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = (tmp_path / 'dependency.csv').read_text().splitlines()
  labels = {row.split(',')[0] for row in rows[1:]}
  assert labels == {'admin (init)', 'admin (step 6)'}, labels
  betas = np.array([float(row.split(',')[-1]) for row in rows[1:]])
  assert np.isfinite(betas).all() and (betas >= 0).all() and (betas <= 1 + 1e-6).all()
  assert (tmp_path / 'dependency.png').stat().st_size > 0
