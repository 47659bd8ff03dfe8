"""The encoder-decoder Transformer: layers, scanned stacks, encode, decode and cached decoding.

Dropout is driven by explicit PRNG keys (`rng=None` means deterministic), so that training,
the profiling pass and analysis can replay exactly the same masks.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np

from admin_jax.model import dropout
from admin_jax.model import flash_attention
from admin_jax.model import layers
from admin_jax.model.attention import Attention
from admin_jax.model.attention import KVCache
from admin_jax.model.attention import Visibility
from admin_jax.model.config import TransformerConfig
from admin_jax.model.residual import ADMIN_RESIDUALS
from admin_jax.model.residual import DECODER_SUBLAYERS_PER_LAYER
from admin_jax.model.residual import ENCODER_SUBLAYERS_PER_LAYER
from admin_jax.model.residual import Profile
from admin_jax.model.residual import Residual
from admin_jax.model.residual import Stream
from admin_jax.model.residual import Sublayer
from admin_jax.model.residual import Tap
from admin_jax.model.residual import deepnorm_constants
from admin_jax.model.residual import logn_omega
from admin_jax.sharding import constrain
from admin_jax.special_tokens import EOS_ID

# Each layer's residuals in forward order: the order of omega.json and of the analysis tools.
ENCODER_RESIDUALS = ('self_attention_residual', 'ffn_residual')
DECODER_RESIDUALS = ('self_attention_residual', 'cross_attention_residual', 'ffn_residual')


def _split(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
  return [None] * n if rng is None else list(jax.random.split(rng, n))


def decoder_inputs(targets: jax.Array, positions: jax.Array, segments: jax.Array) -> jax.Array:
  """fairseq's prev_output_tokens for packed rows: shifted right per segment, EOS as BOS."""
  shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  return jnp.where(positions == 0, EOS_ID, shifted) * (segments > 0)


def _measuring(profile: Profile | None, offsets: Any) -> bool:
  """Whether a pass measures the stream (profiling, analysis), whose statistics pool padding
  positions: there, queries that see no key average their row's values, as the XLA path does."""
  return profile is not None or offsets is not None


def _layer_outputs(profile: Profile | None, omegas: list[Any], tap: Tap | None) -> tuple[Any, Any]:
  """One scan step's outputs: the profiled omegas and the tapped sublayers, each None when unused."""
  return (jnp.stack(omegas) if profile is not None else None), (None if tap is None else tap.stacked())


def _sublayer(residual: Residual, x: Stream, branch: Callable[[jax.Array], layers.Branch], *,
              cfg: TransformerConfig, rng: jax.Array | None, profile: Profile | None, omegas: list[Any],
              tap: Tap | None) -> tuple[Stream, Profile | None]:
  """x_k from x_{k-1}: the branch on what the residual feeds it, then the residual, which applies
  the branch's last bias and output dropout.

  While profiling, records the running scalar r as this sublayer's omega before it is used.
  """
  omegas.append(None if profile is None else profile.r)
  f = branch(residual.branch_input(x, cfg.compute_dtype))
  return residual(x, f, dropout_rate=cfg.dropout, rng=rng, profile=profile, tap=tap)


def _residual(cfg: TransformerConfig, shortcut: float, rngs: nnx.Rngs) -> Residual:
  """The residual around one sublayer, as the config makes every one of them."""
  return Residual(cfg.residual, cfg.d_model, shortcut=shortcut, layer_norm_impl=cfg.layer_norm_impl, rngs=rngs)


class EncoderLayer(nnx.Module):
  """Self-attention and FFN sublayers, each wrapped in its residual."""

  def __init__(self, cfg: TransformerConfig, *, shortcut: float, gain: float | None, rngs: nnx.Rngs):
    self.self_attention = Attention(cfg.d_model, cfg.num_heads, gain=gain, impl=cfg.attention_impl, rngs=rngs)
    self.self_attention_residual = _residual(cfg, shortcut, rngs)
    self.ffn = layers.FeedForward(cfg.d_model, cfg.ffn_dim, gain=gain, rngs=rngs)
    self.ffn_residual = _residual(cfg, shortcut, rngs)
    self.cfg = cfg

  def __call__(self, x: Stream, visibility: Visibility, rng: jax.Array | None, profile: Profile | None,
               tap: Tap | None = None) -> tuple[Stream, Profile | None, list[Any]]:
    cfg = self.cfg
    attn_rng, attn_out_rng, act_rng, ffn_out_rng = _split(rng, 4)
    omegas = []
    x, profile = _sublayer(
        self.self_attention_residual, x,
        lambda h: self.self_attention(h, visibility, dropout_rate=cfg.attention_dropout, rng=attn_rng),
        cfg=cfg, rng=attn_out_rng, profile=profile, omegas=omegas, tap=tap)
    x, profile = _sublayer(
        self.ffn_residual, x, lambda h: self.ffn(h, activation_dropout=cfg.activation_dropout, rng=act_rng),
        cfg=cfg, rng=ffn_out_rng, profile=profile, omegas=omegas, tap=tap)
    return x, profile, omegas


class DecoderLayer(nnx.Module):
  """Causal self-attention, cross-attention over the encoder output, and FFN."""

  def __init__(self, cfg: TransformerConfig, *, shortcut: float, gain: float | None, rngs: nnx.Rngs):
    self.self_attention = Attention(cfg.d_model, cfg.num_heads, gain=gain, impl=cfg.attention_impl, rngs=rngs)
    self.self_attention_residual = _residual(cfg, shortcut, rngs)
    self.cross_attention = Attention(cfg.d_model, cfg.num_heads, gain=gain, impl=cfg.attention_impl, rngs=rngs)
    self.cross_attention_residual = _residual(cfg, shortcut, rngs)
    self.ffn = layers.FeedForward(cfg.d_model, cfg.ffn_dim, gain=gain, rngs=rngs)
    self.ffn_residual = _residual(cfg, shortcut, rngs)
    self.cfg = cfg

  def _cross_and_ffn(self, x, memory_kv: KVCache, cross: Visibility, rngs, profile, omegas, tap=None):
    """The sublayers after self-attention, shared by the full forward and cached decoding."""
    cfg = self.cfg
    attn_rng, attn_out_rng, act_rng, ffn_out_rng = rngs
    x, profile = _sublayer(
        self.cross_attention_residual, x,
        lambda h: self.cross_attention.attend_to(h, memory_kv, cross, dropout_rate=cfg.attention_dropout,
                                                 rng=attn_rng),
        cfg=cfg, rng=attn_out_rng, profile=profile, omegas=omegas, tap=tap)
    x, profile = _sublayer(
        self.ffn_residual, x, lambda h: self.ffn(h, activation_dropout=cfg.activation_dropout, rng=act_rng),
        cfg=cfg, rng=ffn_out_rng, profile=profile, omegas=omegas, tap=tap)
    return x, profile

  def __call__(self, x: Stream, memory: jax.Array, causal: Visibility, cross: Visibility,
               rng: jax.Array | None, profile: Profile | None,
               tap: Tap | None = None) -> tuple[Stream, Profile | None, list[Any]]:
    """One layer; `memory` is the encoder output in the compute dtype."""
    cfg = self.cfg
    rngs = _split(rng, 6)
    omegas = []
    x, profile = _sublayer(
        self.self_attention_residual, x,
        lambda h: self.self_attention(h, causal, dropout_rate=cfg.attention_dropout, rng=rngs[0]),
        cfg=cfg, rng=rngs[1], profile=profile, omegas=omegas, tap=tap)
    x, profile = self._cross_and_ffn(x, self.cross_attention.key_value(memory), cross, rngs[2:], profile,
                                     omegas, tap)
    return x, profile, omegas

  def decode_step(self, x: Stream, cache: KVCache, memory_kv: KVCache, cross: Visibility,
                  index: jax.Array) -> tuple[Stream, KVCache]:
    dtype = self.cfg.compute_dtype
    h = self.self_attention_residual.branch_input(x, dtype)
    f, cache = self.self_attention.cached_self_attention(h, cache, index)
    x, _ = self.self_attention_residual(x, f)
    x, _ = self._cross_and_ffn(x, memory_kv, cross, [None] * 4, None, [])
    return x, cache


# remat='dots': the outputs of weight matmuls, of the flash attention kernels and the FFN's hidden
# activation are saved, the rest (LayerNorms, softmax, XLA attention's batched matmuls) recomputed in
# the backward pass.
_SAVE_MATMUL_OUTPUTS = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(flash_attention.OUTPUT_NAME, flash_attention.LOGSUMEXP_NAME,
                                                  layers.FFN_HIDDEN_NAME))


class LayerStack(nnx.Module):
  """N identical layers whose parameters are stacked on a leading 'layers' axis.

  With `scan` the stack runs as one `lax.scan`, so compile time stays nearly flat in depth;
  otherwise a Python loop applies the same per-layer weights. `unrolled` layers of a scanned stack
  run in that loop before the scan: each is faster than a scanned layer, whose saved activations
  are copied into and out of stacks, and adds to compile time what an unrolled layer does.
  """

  def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *,
               scan: bool, remat: str, rngs: nnx.Rngs, unrolled: int = 0):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
      return make_layer(nnx.Rngs(params=key))

    self.layers = make(jax.random.split(rngs.params(), num_layers))
    for _, variable in nnx.iter_graph(self.layers):
      if isinstance(variable, nnx.Variable) and 'logical_axes' in variable.get_metadata():
        variable.set_metadata(logical_axes=('layers',) + tuple(variable.get_metadata()['logical_axes']))
    self.num_layers = num_layers
    self.scanned = num_layers - min(unrolled, num_layers) if scan else 0
    self.remat = remat

  def _body(self, step: Callable, graphdef: nnx.GraphDef, in_scan: bool) -> Callable:
    def body(carry, xs):
      layer_params, layer_xs = xs
      return step(nnx.merge(graphdef, layer_params), carry, layer_xs)

    if self.remat == 'none':
      return body
    policy = _SAVE_MATMUL_OUTPUTS if self.remat == 'dots' else None
    return jax.checkpoint(body, policy=policy, prevent_cse=not in_scan)

  def apply(self, step: Callable, carry: Any, per_layer: Any = None) -> tuple[Any, Any]:
    """Runs `step(layer, carry, per_layer_slice) -> (carry, output)` over the layers in order."""
    graphdef, params = nnx.split(self.layers)
    xs = (params, per_layer)
    unrolled = self.num_layers - self.scanned
    parts = []
    if unrolled:
      body, outputs = self._body(step, graphdef, in_scan=False), []
      for i in range(unrolled):
        carry, out = body(carry, jax.tree.map(lambda a: a[i], xs))
        outputs.append(out)
      parts.append(jax.tree.map(lambda *layer_outputs: jnp.stack(layer_outputs), *outputs))
    if self.scanned:
      rest = jax.tree.map(lambda a: a[unrolled:], xs) if unrolled else xs
      carry, out = jax.lax.scan(self._body(step, graphdef, in_scan=True), carry, rest)
      parts.append(out)
    return carry, jax.tree.map(lambda *stacked: jnp.concatenate(stacked), *parts)


class Transformer(nnx.Module):
  """Encoder-decoder Transformer with the residual variant chosen by `cfg.residual`."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    enc_shortcut = dec_shortcut = 1.0
    enc_gain = dec_gain = None
    if cfg.residual == 'admin_logn':
      enc_shortcut = logn_omega(ENCODER_SUBLAYERS_PER_LAYER * cfg.num_encoder_layers)
      dec_shortcut = logn_omega(DECODER_SUBLAYERS_PER_LAYER * cfg.num_decoder_layers)
    elif cfg.residual == 'deepnorm':
      c = deepnorm_constants(cfg.num_encoder_layers, cfg.num_decoder_layers)
      enc_shortcut, enc_gain, dec_shortcut, dec_gain = c.encoder_alpha, c.encoder_beta, c.decoder_alpha, c.decoder_beta

    self.embedding = layers.Embedding(cfg.vocab_size, cfg.d_model, rngs=rngs)
    if not cfg.share_embeddings:
      self.decoder_embedding = layers.Embedding(cfg.vocab_size, cfg.d_model, rngs=rngs)
      self.output_embedding = layers.Embedding(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.encoder = LayerStack(lambda r: EncoderLayer(cfg, shortcut=enc_shortcut, gain=enc_gain, rngs=r),
                              cfg.num_encoder_layers, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs,
                              unrolled=cfg.unrolled_encoder_layers)
    self.decoder = LayerStack(lambda r: DecoderLayer(cfg, shortcut=dec_shortcut, gain=dec_gain, rngs=r),
                              cfg.num_decoder_layers, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs,
                              unrolled=cfg.unrolled_decoder_layers)
    if cfg.residual == 'pre_ln':
      self.encoder_final_norm = layers.LayerNorm(cfg.d_model, rngs=rngs)
      self.decoder_final_norm = layers.LayerNorm(cfg.d_model, rngs=rngs)

  # -- embeddings ------------------------------------------------------------------------------

  def _embed(self, table: layers.Embedding, tokens, positions, segments, rng) -> Stream:
    """(sqrt(d) * E[token] + sinusoid) with dropout, computed in float32: the start of the residual stream."""
    x = table(tokens, jnp.float32) + layers.sinusoidal_positions(positions, segments, self.cfg.d_model)
    return Stream.of(constrain(dropout.apply(x, self.cfg.dropout, rng), ('batch', 'length', 'embed')),
                     self.cfg.stream, self.cfg.compute_dtype)

  def _decoder_table(self) -> layers.Embedding:
    return self.embedding if self.cfg.share_embeddings else self.decoder_embedding

  def output_table(self) -> layers.Embedding:
    """The matrix the decoder's states are projected on to get logits (x @ E^T)."""
    return self.embedding if self.cfg.share_embeddings else self.output_embedding

  def _output_states(self, x: Stream) -> jax.Array:
    if self.cfg.residual == 'pre_ln':
      return self.decoder_final_norm(x.value).astype(self.cfg.compute_dtype)
    return x.compute

  def _logits(self, x: Stream) -> jax.Array:
    return constrain(self.output_table().logits(self._output_states(x)), ('batch', 'length', 'vocab'))

  # -- encoder and decoder ---------------------------------------------------------------------

  def _profile_start(self, segments: jax.Array, profile: bool, mask_padding: bool) -> Profile | None:
    if not profile:
      return None
    return Profile(jnp.ones((), jnp.float32), (segments > 0) if mask_padding else None)

  def _encode(self, inputs, segments, positions, rng, profile: Profile | None, offsets=None):
    emb_rng, layers_rng = _split(rng, 2)
    x = self._embed(self.embedding, inputs, positions, segments, emb_rng)
    visibility = Visibility(segments, segments, blind_queries_average=_measuring(profile, offsets))
    keys = None if layers_rng is None else jax.random.split(layers_rng, self.cfg.num_encoder_layers)

    def step(layer, carry, xs):
      (x, profile), (key, offsets) = carry, xs
      tap = None if offsets is None else Tap(offsets)
      x, profile, omegas = layer(x, visibility, key, profile, tap)
      return (x, profile), _layer_outputs(profile, omegas, tap)

    (x, _), (omegas, sublayers) = self.encoder.apply(step, (x, profile), (keys, offsets))
    if self.cfg.residual == 'pre_ln':
      x = Stream.of(self.encoder_final_norm(x.value), self.cfg.stream, self.cfg.compute_dtype)
    return x, omegas, sublayers

  def _decode(self, targets_in, segments, positions, memory, memory_segments, rng, profile: Profile | None,
              offsets=None):
    """The decoder's output stream; `memory` is the encoder output in the compute dtype."""
    emb_rng, layers_rng = _split(rng, 2)
    x = self._embed(self._decoder_table(), targets_in, positions, segments, emb_rng)
    measuring = _measuring(profile, offsets)
    causal = Visibility(segments, segments, causal=True, blind_queries_average=measuring)
    cross = Visibility(segments, memory_segments, blind_queries_average=measuring)
    keys = None if layers_rng is None else jax.random.split(layers_rng, self.cfg.num_decoder_layers)

    def step(layer, carry, xs):
      (x, profile), (key, offsets) = carry, xs
      tap = None if offsets is None else Tap(offsets)
      x, profile, omegas = layer(x, memory, causal, cross, key, profile, tap)
      return (x, profile), _layer_outputs(profile, omegas, tap)

    (x, _), (omegas, sublayers) = self.decoder.apply(step, (x, profile), (keys, offsets))
    return x, omegas, sublayers

  def encode(self, inputs: jax.Array, segments: jax.Array, positions: jax.Array, *,
             rng: jax.Array | None = None) -> jax.Array:
    """Encoder output [batch, src_len, d_model] as the decoder reads it: the stream's copy in the
    compute dtype."""
    return self._encode(inputs, segments, positions, rng, None)[0].compute

  def decode(self, targets_in: jax.Array, segments: jax.Array, positions: jax.Array, memory: jax.Array,
             memory_segments: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    """Logits [batch, tgt_len, vocab] (compute dtype) for teacher-forced decoder inputs."""
    return self._logits(self._decode(targets_in, segments, positions, memory.astype(self.cfg.compute_dtype),
                                     memory_segments, rng, None)[0])

  def final_states(self, batch: dict[str, jax.Array], *, rng: jax.Array | None = None) -> jax.Array:
    """Teacher-forced decoder states right before the output projection [batch, tgt_len, d_model].

    For losses that project onto the vocabulary a chunk of tokens at a time.
    """
    enc_rng, dec_rng = _split(rng, 2)
    memory = self._encode(batch['inputs'], batch['inputs_segmentation'], batch['inputs_position'], enc_rng, None)[0]
    targets_in = decoder_inputs(batch['targets'], batch['targets_position'], batch['targets_segmentation'])
    x = self._decode(targets_in, batch['targets_segmentation'], batch['targets_position'], memory.compute,
                     batch['inputs_segmentation'], dec_rng, None)[0]
    return self._output_states(x)

  def __call__(self, batch: dict[str, jax.Array], *, rng: jax.Array | None = None) -> jax.Array:
    """Teacher-forced logits for a packed batch (the keys the input pipeline yields)."""
    states = self.final_states(batch, rng=rng)
    return constrain(self.output_table().logits(states), ('batch', 'length', 'vocab'))

  # -- Admin profiling -------------------------------------------------------------------------

  def profile_omegas(self, batch: dict[str, jax.Array], *, rng: jax.Array | None,
                     mask_padding: bool = False) -> dict[str, jax.Array]:
    """One training-mode forward that assigns each sublayer's omega from the running variance.

    The same RNG splits as `__call__`, so with the first step's key it replays that step's
    dropout masks. Returns {'encoder': [2N], 'decoder': [3M]} in forward order.
    """
    enc_rng, dec_rng = _split(rng, 2)
    memory, enc, _ = self._encode(batch['inputs'], batch['inputs_segmentation'], batch['inputs_position'],
                                  enc_rng, self._profile_start(batch['inputs_segmentation'], True, mask_padding))
    targets_in = decoder_inputs(batch['targets'], batch['targets_position'], batch['targets_segmentation'])
    _, dec, _ = self._decode(targets_in, batch['targets_segmentation'], batch['targets_position'], memory.compute,
                             batch['inputs_segmentation'], dec_rng,
                             self._profile_start(batch['targets_segmentation'], True, mask_padding))
    return {'encoder': enc.reshape(-1), 'decoder': dec.reshape(-1)}

  def trace_encoder(self, inputs: jax.Array, segments: jax.Array, positions: jax.Array,
                    offsets: jax.Array) -> tuple[jax.Array, Sublayer]:
    """Deterministic encoder output and every encoder sublayer's tensors, for the analysis tools.

    `offsets` are zeros [N, 2, batch, src_len, d_model] added to the sublayer outputs, so the
    gradient with respect to them is dL/dx_k (spec 7.3); the tensors have the same leading axes.
    """
    x, _, sublayers = self._encode(inputs, segments, positions, None, None, offsets)
    return x.value.astype(jnp.float32), sublayers

  def trace(self, batch: dict[str, jax.Array],
            offsets: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, Sublayer]]:
    """Deterministic teacher-forced logits and every sublayer's tensors: `trace_encoder` for both
    stacks, with offsets {'encoder': [N, 2, ...], 'decoder': [M, 3, batch, tgt_len, d_model]}."""
    memory, _, enc = self._encode(batch['inputs'], batch['inputs_segmentation'], batch['inputs_position'], None,
                                  None, offsets['encoder'])
    targets_in = decoder_inputs(batch['targets'], batch['targets_position'], batch['targets_segmentation'])
    x, _, dec = self._decode(targets_in, batch['targets_segmentation'], batch['targets_position'], memory.compute,
                             batch['inputs_segmentation'], None, None, offsets['decoder'])
    return self._logits(x), {'encoder': enc, 'decoder': dec}

  def set_omegas(self, encoder: Any, decoder: Any) -> None:
    """Fills every sublayer's omega vector with its scalar, in forward order (admin only)."""
    if self.cfg.residual not in ADMIN_RESIDUALS:
      raise ValueError(f'residual {self.cfg.residual!r} has no omega')
    for stack, values, per_layer, names in (
        (self.encoder, encoder, ENCODER_SUBLAYERS_PER_LAYER, ENCODER_RESIDUALS),
        (self.decoder, decoder, DECODER_SUBLAYERS_PER_LAYER, DECODER_RESIDUALS)):
      values = jnp.asarray(values, jnp.float32).reshape(stack.num_layers, per_layer)
      for j, name in enumerate(names):
        omega = getattr(stack.layers, name).omega
        omega[...] = jnp.broadcast_to(values[:, j:j + 1], omega[...].shape)

  def get_omegas(self) -> dict[str, np.ndarray]:
    """Mean of each sublayer's omega vector, forward order (what omega.png plots)."""
    out = {}
    for key, stack, names in (('encoder', self.encoder, ENCODER_RESIDUALS),
                              ('decoder', self.decoder, DECODER_RESIDUALS)):
      per_sublayer = [np.asarray(getattr(stack.layers, n).omega[...]).mean(-1) for n in names]
      out[key] = np.stack(per_sublayer, axis=1).reshape(-1)
    return out

  # -- cached decoding -------------------------------------------------------------------------

  def init_cache(self, memory: jax.Array, memory_segments: jax.Array, max_len: int) -> 'DecodeCache':
    """Self-attention caches for `max_len` steps and every layer's cross-attention keys/values."""
    cfg, dtype = self.cfg, self.cfg.compute_dtype
    graphdef, params = nnx.split(self.decoder.layers)

    def cross_kv(layer_params):
      return nnx.merge(graphdef, layer_params).cross_attention.key_value(memory.astype(dtype)).arrays()

    cross = jax.lax.map(cross_kv, params)
    shape = (cfg.num_decoder_layers, memory.shape[0], max_len, cfg.num_heads, cfg.head_dim)
    empty = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return DecodeCache(empty, cross, memory_segments > 0, jnp.zeros((), jnp.int32))

  def decode_step(self, tokens: jax.Array, cache: 'DecodeCache') -> tuple[jax.Array, 'DecodeCache']:
    """Logits [batch, vocab] for the next token after `tokens` [batch] at position `cache.index`."""
    index = cache.index
    segments = jnp.ones((tokens.shape[0], 1), jnp.int32)
    x = self._embed(self._decoder_table(), tokens[:, None], jnp.full_like(segments, index), segments, None)
    cross = Visibility(segments, cache.memory_mask.astype(jnp.int32))

    def step(layer, x, xs):
      self_cache, memory_kv = xs
      return layer.decode_step(x, self_cache, memory_kv, cross, index)

    x, self_cache = self.decoder.apply(step, x, (cache.self_attention, cache.cross_attention))
    logits = self._logits(x)[:, 0]
    return logits, cache._replace(self_attention=self_cache, index=index + 1)


class DecodeCache(NamedTuple):
  self_attention: KVCache  # [layers, batch, max_len, heads, head_dim] each
  cross_attention: KVCache  # [layers, batch, src_len, heads, head_dim] each
  memory_mask: jax.Array  # [batch, src_len] True at real source tokens
  index: jax.Array  # next position to write
