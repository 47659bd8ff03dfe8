"""Translation speed of a trained run: our `translate` beside its CTranslate2 export (float32, int8).

Exports the checkpoint twice into a temporary folder, then translates the run's test split with
each, the run's beam size and length penalty, `data.eval_batch_size` sentences a batch, on this
machine's CPU with every core, and prints one JSON line per engine (sentences/s over the median
of three passes; ours after one untimed pass that compiles) and how many translations equal ours.

  python benchmarks/ctranslate2_speed.py --workdir=workdirs/demo [--checkpoint=latest] [--threads=N]
"""

import json
import os
import statistics
import tempfile
import time

from absl import app, flags
import ctranslate2
import sentencepiece as spm

from admin_jax import cli
from admin_jax import corpus_eval
from admin_jax import export
from admin_jax import inference_flags
from admin_jax import trained_run
from admin_jax.data import corpora

_THREADS = flags.DEFINE_integer('threads', os.cpu_count(), "CTranslate2's intra_threads.")
_PASSES = 3


def _median_rate(translate, sentences: list[str]) -> tuple[float, list[str]]:
  times, out = [], []
  for _ in range(_PASSES):
    start = time.perf_counter()
    out = translate(sentences)
    times.append(time.perf_counter() - start)
  return len(sentences) / statistics.median(times), out


def main(argv):
  del argv
  cli.quiet_logging()
  workdir = cli.require_workdir()  # --workdir and --checkpoint: the flags export.py uses
  config = trained_run.saved_config(workdir)
  sources = [source for source, _ in corpora.load_pairs(config, 'test')]
  model = trained_run.load_for_inference(workdir, inference_flags.CHECKPOINT.value, config)
  evaluator = corpus_eval.Evaluator(model.config, model.tokenizer, model.setup, model.mesh)
  evaluator.translate(model.params, sources)  # compiles
  rate, ours = _median_rate(lambda s: evaluator.translate(model.params, s), sources)
  common = {'sentences': len(sources), 'beam_size': config.eval.beam_size, 'host_cpus': os.cpu_count()}
  print(json.dumps({'engine': 'admin_jax.translate', 'sentences_per_s': round(rate, 1), **common}))

  sp = spm.SentencePieceProcessor(model_proto=model.tokenizer.model_proto)
  options = dict(export.decoding_options(config), max_batch_size=config.data.eval_batch_size,
                 max_decoding_length=config.data.max_len)
  with tempfile.TemporaryDirectory() as folder:
    for quantization in ('float32', 'int8'):
      out = os.path.join(folder, quantization)
      export.export(workdir, inference_flags.CHECKPOINT.value, out, quantization, config)
      translator = ctranslate2.Translator(out, device='cpu', inter_threads=1, intra_threads=_THREADS.value)

      def translate(sentences, translator=translator):
        results = translator.translate_batch([sp.encode(s, out_type=str) for s in sentences], **options)
        return [sp.decode(r.hypotheses[0]) for r in results]

      rate, theirs = _median_rate(translate, sources)
      print(json.dumps({'engine': f'ctranslate2 {ctranslate2.__version__} {quantization}',
                        'sentences_per_s': round(rate, 1), 'threads': _THREADS.value,
                        'same_as_ours': sum(a == b for a, b in zip(theirs, ours)), **common}))


if __name__ == '__main__':
  app.run(main)
