"""Export to CTranslate2: `python -m admin_jax.export --workdir=DIR [--checkpoint=latest|best|avg:N|STEP]
--out=DIR2 [--quantization=int8|float16] [--beam_size=K] [--length_penalty=X]`.

Writes a CTranslate2 model directory built with CTranslate2's own spec API (its quantization
included), the run's SentencePiece model (`spm.model`) and a README naming the run, its config,
its BLEU and the decoding options that reproduce our beam search. `ctranslate2.Translator(DIR2)`
then translates the pieces of `spm.encode(text, out_type=str)`: the end-of-source token and the
decoder's start token (EOS, fairseq's convention) are set in the model's config.json.

CTranslate2 runs standard Post-LN and Pre-LN Transformers. Pre-LN and Post-LN models are written as
they are; Admin's omega, admin_logn's constant omega and DeepNorm's alpha are folded into the
weights (`fold_shortcuts`), so that the exported Post-LN model computes exactly the same function.
"""

import dataclasses
import os
import sys

from absl import flags
from etils import epath
from flax import nnx
import jax
import ml_collections
import numpy as np

from admin_jax import cli
from admin_jax import files
from admin_jax import inference_flags
from admin_jax import trained_run
from admin_jax import train_step as train_step_lib
from admin_jax.errors import UserError
from admin_jax.model import layers
from admin_jax.model import Transformer
from admin_jax.model.transformer import DECODER_RESIDUALS
from admin_jax.model.transformer import ENCODER_RESIDUALS
from admin_jax.special_tokens import EOS_ID
from admin_jax.special_tokens import PAD_ID
from admin_jax.special_tokens import UNK_ID

QUANTIZATIONS = ('float32', 'int8', 'float16')
QUANTIZATION = flags.DEFINE_enum('quantization', 'float32', QUANTIZATIONS,
                                 'Weight type, quantized by CTranslate2 itself.')
flags.adopt_module_key_flags(inference_flags)  # --help lists the shared flags too

# Rows of sinusoidal position encodings written: CTranslate2's default max_input_length.
MIN_POSITIONS = 1024
# The branch inputs of each sublayer kind that read the sublayer's input x_{k-1}: self-attention's
# Q, K and V; cross-attention's Q only (its K and V read the encoder output); the FFN's fc1.
_BRANCH_INPUTS = {'self_attention_residual': ('self_attention', 'qkv', slice(0, 3)),
                  'cross_attention_residual': ('cross_attention', 'qkv', slice(0, 1)),
                  'ffn_residual': ('ffn', 'fc1', None)}
_STACKS = (('encoder', ENCODER_RESIDUALS), ('decoder', DECODER_RESIDUALS))
_SPM_NAME = 'spm.model'
# CTranslate2 (as its fairseq converter) names the padding token '<blank>'.
_CT2_PAD = '<blank>'


@dataclasses.dataclass
class Stack:
  """One stack's weights as float64 NumPy arrays, layers on the leading axis.

  `embedding` and `positions` make the stack's input sqrt(d) * embedding[token] + positions[p]
  (p from 0); `layers` maps '<sublayer module>/<parameter>' to an array [layers, ...] in our layout
  (qkv [L, d, 3, heads, head_dim], fc1 [L, d, ffn], ...)."""
  embedding: np.ndarray
  positions: np.ndarray
  layers: dict[str, np.ndarray]
  final_norm: tuple[np.ndarray, np.ndarray] | None  # Pre-LN's (scale, bias)


@dataclasses.dataclass
class PlainWeights:
  """A standard (omega-free) encoder-decoder Transformer; `output` projects states to logits."""
  encoder: Stack
  decoder: Stack
  output: np.ndarray
  pre_norm: bool


def _f64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def _stack_layers(stack, residual_names: tuple[str, ...]) -> dict[str, np.ndarray]:
  out = {}
  stacked = stack.layers
  for branch in ('self_attention', 'cross_attention'):
    if hasattr(stacked, branch):
      attention = getattr(stacked, branch)
      for name in ('qkv', 'qkv_bias', 'out', 'out_bias'):
        out[f'{branch}/{name}'] = _f64(getattr(attention, name)[...])
  for name in ('fc1', 'fc1_bias', 'fc2', 'fc2_bias'):
    out[f'ffn/{name}'] = _f64(getattr(stacked.ffn, name)[...])
  for residual in residual_names:
    norm = getattr(stacked, residual).norm
    out[f'{residual}/scale'], out[f'{residual}/bias'] = _f64(norm.scale[...]), _f64(norm.bias[...])
  return out


def plain_weights(model: Transformer, num_positions: int) -> PlainWeights:
  """The model's weights, omega and alpha left out (see `shortcut_scales` and `fold_shortcuts`)."""
  cfg = model.cfg
  positions = np.arange(num_positions)
  sinusoid = _f64(layers.sinusoidal_positions(positions, np.ones_like(positions), cfg.d_model))
  decoder_table = model.embedding if cfg.share_embeddings else model.decoder_embedding
  pre_norm = cfg.residual == 'pre_ln'

  def final_norm(name: str):
    return (_f64(getattr(model, name).scale[...]), _f64(getattr(model, name).bias[...])) if pre_norm else None

  return PlainWeights(
      encoder=Stack(_f64(model.embedding.table[...]), sinusoid.copy(), _stack_layers(model.encoder, ENCODER_RESIDUALS),
                    final_norm('encoder_final_norm')),
      decoder=Stack(_f64(decoder_table.table[...]), sinusoid.copy(), _stack_layers(model.decoder, DECODER_RESIDUALS),
                    final_norm('decoder_final_norm')),
      output=_f64(model.output_table().table[...]), pre_norm=pre_norm)


def shortcut_scales(model: Transformer) -> dict[str, np.ndarray] | None:
  """What multiplies each sublayer's shortcut, [layers, sublayers per layer, d_model] per stack in
  forward order: omega (admin, admin_logn), alpha (deepnorm), 1 (post_ln); None for Pre-LN."""
  if model.cfg.residual == 'pre_ln':
    return None
  scales = {}
  for key, names in _STACKS:
    stack = getattr(model, key)
    shape = (stack.num_layers, model.cfg.d_model)
    scales[key] = np.stack([np.broadcast_to(_f64(getattr(stack.layers, name).shortcut_scale()), shape)
                            for name in names], axis=1)
  return scales


def fold_shortcuts(weights: PlainWeights, scales: dict[str, np.ndarray]) -> None:
  """Rewrites `weights` in place so that the standard Post-LN model computes what the model with
  shortcut scales computes.

  Number a stack's sublayers k = 1..S in forward order. The model computes

      x_k = LN_k(s_k * x_{k-1} + f_k(x_{k-1})),   x_0 = sqrt(d) E[token] + P[position],

  with s_k omega_k (Admin), alpha (DeepNorm) or 1 (Post-LN), elementwise over d_model, and LN_k(z)
  = g_k * norm(z) + b_k. Write x'_{k-1} = s_k * x_{k-1}. Then

      x_k = LN_k(x'_{k-1} + f_k(x'_{k-1} / s_k)),

  a standard Post-LN sublayer over x'_{k-1} whose branch f'_k(y) = f_k(y / s_k) divides its input:
  every input projection W of the branch that reads x_{k-1} (y W = (y / s_k) W) becomes
  W' = W / s_k[:, None], row by row. x'_{k-1} itself is the previous sublayer's output scaled:
  for k > 1, x'_{k-1} = (s_k g_{k-1}) * norm(.) + s_k b_{k-1}, so LN_{k-1}'s gain and bias are
  multiplied by s_k; for k = 1, x'_0 = sqrt(d) (s_1 E)[token] + (s_1 P)[position], so the stack's
  embedding table and position encodings are multiplied by s_1 (column by column). Each equality
  is exact in real arithmetic; in float64 then float32 it rounds at the level of float32.

  What reads x_{k-1} besides sublayer k is left as it is, because it reads the unscaled x:

  - cross-attention: its queries read the decoder's x_{k-1} (divided by s_k), but its keys and
    values read the encoder output x_{2N}, which no shortcut scales (it is the encoder's last
    sublayer), so only the Q third of the fused QKV kernel is divided;
  - the encoder output and the decoder's last output (which the output projection reads) are the
    unchanged LN_S outputs: no sublayer follows them inside their stack;
  - shared embeddings: the encoder's table becomes s_1^enc E and the decoder's s_1^dec E, while the
    output projection keeps E, so the exported model carries up to three tables (CTranslate2 stores
    equal ones once).

  admin_logn is the same fold with one constant omega per stack, DeepNorm with s_k = alpha; Post-LN
  (s_k = 1) is unchanged. A zero in any s_k has no inverse: refused.
  """
  for key, names in _STACKS:
    stack, stack_scales = getattr(weights, key), scales[key]
    if not np.all(np.isfinite(stack_scales)) or np.any(stack_scales == 0):
      bad = 'zeros' if np.all(np.isfinite(stack_scales)) else 'non-finite values'
      raise UserError(f'the {key} shortcut scales (omega or alpha) hold {bad}: they cannot be folded into '
                      'a standard Transformer for CTranslate2')
    num_layers = stack_scales.shape[0]
    for layer in range(num_layers):
      for j, residual in enumerate(names):
        s = stack_scales[layer, j]
        module, kernel, parts = _BRANCH_INPUTS[residual]
        weight = stack.layers[f'{module}/{kernel}'][layer]  # [d, ...]: the input dimension first
        divisor = s.reshape((-1,) + (1,) * (weight.ndim - 1))
        if parts is None:
          weight /= divisor
        else:
          weight[:, parts] /= divisor
        if layer == 0 and j == 0:
          stack.embedding *= s
          stack.positions *= s
        else:
          previous_layer, previous = (layer, names[j - 1]) if j else (layer - 1, names[-1])
          for name in ('scale', 'bias'):
            stack.layers[f'{previous}/{name}'][previous_layer] *= s


def _linear(spec, weight: np.ndarray, bias: np.ndarray | None = None) -> None:
  """weight [in, ...out] in our layout, as CTranslate2's [out, in] float32 matrix."""
  spec.weight = np.ascontiguousarray(weight.reshape(weight.shape[0], -1).T, np.float32)
  if bias is not None:
    spec.bias = np.asarray(bias.reshape(-1), np.float32)


def _norm(spec, scale: np.ndarray, bias: np.ndarray) -> None:
  spec.gamma, spec.beta = np.asarray(scale, np.float32), np.asarray(bias, np.float32)


def _fill_attention(spec, p: dict[str, np.ndarray], name: str, layer: int, self_attention: bool) -> None:
  qkv, qkv_bias = p[f'{name}/qkv'][layer], p[f'{name}/qkv_bias'][layer]  # [d, 3, h, k], [3, h, k]
  if self_attention:
    _linear(spec.linear[0], qkv, qkv_bias)
  else:
    _linear(spec.linear[0], qkv[:, 0], qkv_bias[0])
    _linear(spec.linear[1], qkv[:, 1:], qkv_bias[1:])
  out = p[f'{name}/out'][layer]  # [h, k, d]
  _linear(spec.linear[-1], out.reshape(-1, out.shape[-1]), p[f'{name}/out_bias'][layer])


def _fill_stack(spec, stack: Stack, names: tuple[str, ...]) -> None:
  embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
  embeddings.weight = np.asarray(stack.embedding, np.float32)
  spec.scale_embeddings = True  # sqrt(d_model)
  spec.position_encodings.encodings = np.asarray(stack.positions, np.float32)
  p = stack.layers
  for layer, layer_spec in enumerate(spec.layer):
    _fill_attention(layer_spec.self_attention, p, 'self_attention', layer, self_attention=True)
    _norm(layer_spec.self_attention.layer_norm, p['self_attention_residual/scale'][layer],
          p['self_attention_residual/bias'][layer])
    if 'cross_attention_residual' in names:
      _fill_attention(layer_spec.attention, p, 'cross_attention', layer, self_attention=False)
      _norm(layer_spec.attention.layer_norm, p['cross_attention_residual/scale'][layer],
            p['cross_attention_residual/bias'][layer])
    _linear(layer_spec.ffn.linear_0, p['ffn/fc1'][layer], p['ffn/fc1_bias'][layer])
    _linear(layer_spec.ffn.linear_1, p['ffn/fc2'][layer], p['ffn/fc2_bias'][layer])
    _norm(layer_spec.ffn.layer_norm, p['ffn_residual/scale'][layer], p['ffn_residual/bias'][layer])
  if stack.final_norm is not None:
    _norm(spec.layer_norm, *stack.final_norm)


def ctranslate2_vocabulary(pieces: list[str]) -> list[str]:
  """The SentencePiece pieces by id, PAD renamed to CTranslate2's padding token."""
  return [_CT2_PAD if i == PAD_ID else piece for i, piece in enumerate(pieces)]


def transformer_spec(weights: PlainWeights, num_heads: int, pieces: list[str]):
  """The filled `ctranslate2.specs.TransformerSpec`, with the conventions in its config."""
  from ctranslate2.specs import transformer_spec as ct2_transformer  # optional dependency: [serve]

  spec = ct2_transformer.TransformerSpec.from_config(
      (len(weights.encoder.layers['ffn/fc1']), len(weights.decoder.layers['ffn/fc1'])), num_heads,
      pre_norm=weights.pre_norm)
  _fill_stack(spec.encoder, weights.encoder, ENCODER_RESIDUALS)
  _fill_stack(spec.decoder, weights.decoder, DECODER_RESIDUALS)
  spec.decoder.projection.weight = np.asarray(weights.output, np.float32)
  vocabulary = ctranslate2_vocabulary(pieces)
  spec.register_source_vocabulary(vocabulary)
  spec.register_target_vocabulary(vocabulary)
  config = spec.config
  config.layer_norm_epsilon = layers.LN_EPS
  config.eos_token = config.bos_token = config.decoder_start_token = pieces[EOS_ID]  # EOS doubles as BOS
  config.unk_token = pieces[UNK_ID]
  config.add_source_eos = True  # our Tokenizer.encode appends EOS to every source
  return spec


def build_spec(model: Transformer, pieces: list[str], num_positions: int):
  """The model as a CTranslate2 spec, shortcut scales folded (see `fold_shortcuts`).

  Refuses non-finite weights (a diverged run), which no engine can run."""
  if not all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))):
    raise UserError('the checkpoint has non-finite weights (a diverged run): CTranslate2 cannot run it')
  weights = plain_weights(model, num_positions)
  scales = shortcut_scales(model)
  if scales is not None:
    fold_shortcuts(weights, scales)
  return transformer_spec(weights, model.cfg.num_heads, pieces)


def decoding_options(config: ml_collections.ConfigDict) -> dict:
  """`Translator.translate_batch` options for the run's beam search. CTranslate2 (4.8.5) scores a
  finished hypothesis as fairseq and admin_jax.decode do: sum(log p) / len ** length_penalty, the
  end token counted in both, so the run's length penalty carries over unchanged."""
  return {'beam_size': config.eval.beam_size, 'length_penalty': config.eval.length_penalty}


def max_decoding_length(config: ml_collections.ConfigDict, source_pieces: int) -> int:
  """Our output limit for a source of `source_pieces` pieces, as CTranslate2's `max_decoding_length`
  (which counts tokens without the end token): int(max_len_a * n + max_len_b), within data.max_len
  with the end token. Ours ends a sentence there with EOS, CTranslate2 there without: the same tokens."""
  return min(int(config.eval.max_len_a * source_pieces + config.eval.max_len_b), config.data.max_len - 1)


def save(spec, out: str, quantization: str) -> None:
  """Validates, quantizes and writes the spec as CTranslate2's converters do."""
  from ctranslate2 import converters  # optional dependency: [serve]

  class _Converter(converters.Converter):
    def _load(self):
      return spec

  _Converter().convert(out, quantization=quantization)


def _bleu_lines(workdir: str) -> list[str]:
  """The run's own test scores (DIR/eval/test.scores), as evaluation wrote them."""
  scores = epath.Path(workdir) / 'eval' / 'test.scores'
  if not scores.exists():
    return ['not evaluated on a test set (no eval/test.scores in the run)']
  return [line for line in scores.read_text().splitlines() if line.strip()]


def _readme(workdir: str, checkpoint: str, inference: trained_run.Inference, quantization: str, options: dict) -> str:
  model = inference.config.model
  run = workdir if files.is_remote(workdir) else os.path.abspath(workdir)
  command = (f'python -m admin_jax.export --workdir={run} --checkpoint={checkpoint} --out=DIR '
             f'--quantization={quantization} --beam_size={options["beam_size"]} '
             f'--length_penalty={options["length_penalty"]}')
  arguments = ', '.join(f'{k}={v!r}' for k, v in options.items())
  return '\n'.join([
      '# CTranslate2 export of an admin-jax run', '',
      f'- run: `{run}`, '
      f'checkpoint steps {", ".join(map(str, inference.steps))}',
      f'- model: residual `{model.residual}` (exported as '
      f'{"Pre-LN" if model.residual == "pre_ln" else "Post-LN, shortcut scales folded into the weights"}), '
      f'{model.num_encoder_layers}+{model.num_decoder_layers} layers, d_model {model.d_model}, '
      f'ffn {model.ffn_dim}, {model.num_heads} heads; weights {quantization}',
      '- the run\'s test scores (our decoder):', *[f'  - {line}' for line in _bleu_lines(workdir)],
      f'- made by: `{command}`',
      '- the run\'s config: `admin_jax_config.json`', '',
      '```python',
      'import ctranslate2, sentencepiece as spm',
      f'sp, translator = spm.SentencePieceProcessor(model_file="{_SPM_NAME}"), ctranslate2.Translator(".")',
      f'print(sp.decode(translator.translate_batch([sp.encode("...", out_type=str)], {arguments})'
      '[0].hypotheses[0]))',
      '```', '',
      "The options are the run's beam search: CTranslate2's `length_penalty` divides the same sum of "
      'log-probabilities by the same length (the end token counted) as ours. Our decoder also ends a '
      f'translation of n source pieces after int({inference.config.eval.max_len_a} * n + '
      f'{inference.config.eval.max_len_b}) pieces; CTranslate2 takes one `max_decoding_length` per call.', ''])


def export(workdir: str, checkpoint: str, out: str, quantization: str,
           config: ml_collections.ConfigDict | None = None) -> trained_run.Inference:
  """Writes the model of `workdir` at `checkpoint` to the CTranslate2 directory `out`."""
  if epath.Path(out).exists():
    raise UserError(f'--out={out} already exists')
  inference = trained_run.load_for_inference(workdir, checkpoint, config)
  model = train_step_lib.model_from(inference.setup, inference.params)
  tokenizer = inference.tokenizer
  num_positions = max(MIN_POSITIONS, inference.config.data.max_len)
  spec = build_spec(model, tokenizer.pieces(), num_positions)
  save(spec, out, quantization)
  out_path = epath.Path(out)
  (out_path / _SPM_NAME).write_bytes(tokenizer.model_proto)
  (out_path / 'admin_jax_config.json').write_text(inference.config.to_json(indent=2, sort_keys=True) + '\n')
  (out_path / 'README.md').write_text(_readme(workdir, checkpoint, inference, quantization,
                                              decoding_options(inference.config)))
  return inference


def main(argv):
  del argv
  workdir = cli.require_workdir()
  if not cli.OUT.value:
    raise UserError('--out is required: the CTranslate2 model directory to write')
  config = inference_flags.config_from_flags(workdir)
  inference = export(workdir, inference_flags.CHECKPOINT.value, cli.OUT.value, QUANTIZATION.value, config)
  print(f'wrote {cli.OUT.value}: {inference.config.model.residual} model, checkpoint step'
        f'{"s" * (len(inference.steps) > 1)} {", ".join(map(str, inference.steps))}, {QUANTIZATION.value}',
        file=sys.stderr)


if __name__ == '__main__':
  cli.run(main)
