"""The residual connection of every sublayer: where Post-LN, Pre-LN, Admin and DeepNorm differ.

    post_ln     x_i = LN(x_{i-1} + f_i(x_{i-1}))
    pre_ln      x_i = x_{i-1} + f_i(LN(x_{i-1}))            (+ one final LN per stack)
    admin       x_i = LN(omega_i * x_{i-1} + f_i(x_{i-1}))   omega_i profiled, trainable
    admin_logn  the same with omega_i = sqrt((N+1)/ln(N+1) - 1) for all N sublayers of a stack
    deepnorm    x_i = LN(alpha * x_{i-1} + f_i(x_{i-1}))     alpha fixed, branch init scaled by beta

f_i is the branch output after its last bias and its dropout, which the residual applies (see
`layers.Branch`); the shortcut is never dropped out.
omega multiplies the shortcut, not the branch (spec 1.1), and is one float32 vector of length
d_model per sublayer, so it can be folded into the LayerNorm after training.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from admin_jax.model import layers

RESIDUALS = ('post_ln', 'pre_ln', 'admin', 'admin_logn', 'deepnorm')
ADMIN_RESIDUALS = ('admin', 'admin_logn')
ENCODER_SUBLAYERS_PER_LAYER = 2  # self-attention, FFN
DECODER_SUBLAYERS_PER_LAYER = 3  # self-attention, cross-attention, FFN


def logn_omega(num_sublayers: int) -> float:
  """admin-torch's profiling-free omega, chosen so the output change grows as O(log N)."""
  n = num_sublayers
  return math.sqrt((n + 1) / math.log(n + 1) - 1)


class DeepNormConstants(NamedTuple):
  encoder_alpha: float
  encoder_beta: float
  decoder_alpha: float
  decoder_beta: float


def deepnorm_constants(num_encoder_layers: int, num_decoder_layers: int) -> DeepNormConstants:
  """The encoder-decoder row of DeepNet's table, as Transformer-Clinic's `deepnet` init (spec 9)."""
  n, m = num_encoder_layers, num_decoder_layers
  return DeepNormConstants(
      encoder_alpha=0.81 * (n ** 4 * m) ** (1 / 16),
      encoder_beta=0.87 * (n ** 4 * m) ** (-1 / 16),
      decoder_alpha=(3 * m) ** 0.25,
      decoder_beta=(12 * m) ** -0.25)


@jax.tree_util.register_pytree_node_class
class Stream:
  """The residual stream between sublayers: x_k in the stream dtype (float32 by default), and its
  copy in the compute dtype, which the next Post-LN branch reads; where the two dtypes are the same
  the copy is the same array. The residual LayerNorm writes both in one pass and sums both
  gradients in its backward pass (`layers.residual_layer_norm`), so neither the cast nor the
  gradient sum costs a pass of its own over the stream.

  As a pytree it holds one leaf where the copy is the value: a scanned stack then carries, and
  saves for its backward pass, one array per layer instead of two equal ones."""

  def __init__(self, value: jax.Array, compute: jax.Array):
    self.value = value
    self.compute = compute

  @classmethod
  def of(cls, x: jax.Array, stream_dtype: jnp.dtype, compute_dtype: jnp.dtype) -> 'Stream':
    """The stream starting from x (embeddings, or a Pre-LN sum), copy made by a cast."""
    return cls(*layers.stream_and_copy(x, stream_dtype, compute_dtype))

  def _shared(self) -> bool:
    dtype = getattr(self.value, 'dtype', None)
    return self.value is self.compute or (dtype is not None and dtype == getattr(self.compute, 'dtype', None))

  def tree_flatten(self) -> tuple[tuple[jax.Array, ...], bool]:
    shared = self._shared()
    return ((self.value,) if shared else (self.value, self.compute)), shared

  @classmethod
  def tree_unflatten(cls, shared: bool, leaves) -> 'Stream':
    return cls(leaves[0], leaves[0]) if shared else cls(*leaves)


class Profile(NamedTuple):
  """State of the omega profiling recurrence, carried through one stack (spec 2.2).

  `r` is the running scalar that becomes the next sublayer's omega; `mask` ([batch, length],
  or None to pool every element of the padded tensor like the reference) selects the positions
  whose variance counts.
  """
  r: jax.Array
  mask: jax.Array | None


def _variance(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Population variance of all elements in float32, optionally over unmasked positions only."""
  x = x.astype(jnp.float32)
  if mask is None:
    return jnp.var(x)
  weight = jnp.broadcast_to(mask[..., None].astype(jnp.float32), x.shape)
  count = jnp.maximum(weight.sum(), 1.0)
  mean = (x * weight).sum() / count
  return (jnp.square(x - mean) * weight).sum() / count


class Sublayer(NamedTuple):
  """One sublayer's float32 [batch, length, d_model] tensors, as the analysis tools read them."""
  input: jax.Array  # x_{k-1}, the shortcut before omega (or alpha) scales it
  branch: jax.Array  # f_k, after its output dropout
  output: jax.Array  # x_k, the tap's offset included


class Tap:
  """Analysis hook on the sublayers of one layer, visited in forward order (spec 7.2, 7.3).

  Adds `offsets[k]` to sublayer k's output: with zero offsets the forward is unchanged and the
  gradient with respect to them is dL/dx_k. Also records each sublayer's tensors. Only the
  analysis passes one; with `tap=None` (training, decoding) nothing extra is computed.
  """

  def __init__(self, offsets: jax.Array):
    self.offsets = offsets
    self.sublayers: list[Sublayer] = []

  def __call__(self, x: jax.Array, branch: jax.Array, output: jax.Array) -> jax.Array:
    output = output + self.offsets[len(self.sublayers)]
    self.sublayers.append(Sublayer(x, branch, output))
    return output

  def stacked(self) -> Sublayer:
    """The records with a leading sublayer axis, ready to be a scan output."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *self.sublayers)


class Residual(nnx.Module):
  """The shortcut and normalisation around one sublayer's branch."""

  def __init__(self, kind: str, d_model: int, *, shortcut: float = 1.0, layer_norm_impl: str = 'xla',
               rngs: nnx.Rngs):
    if kind not in RESIDUALS:
      raise ValueError(f'unknown residual {kind!r}; expected one of {RESIDUALS}')
    self.kind = kind
    self.layer_norm_impl = layer_norm_impl
    self.norm = layers.LayerNorm(d_model, rngs=rngs)
    if kind in ADMIN_RESIDUALS:
      self.omega = nnx.Param(jnp.full((d_model,), shortcut, jnp.float32), logical_axes=('norm',))
    else:
      self.shortcut = shortcut

  def branch_input(self, x: Stream, dtype: jnp.dtype) -> jax.Array:
    """What the branch f_i reads: LN(x) for Pre-LN, x itself (its compute copy) for every Post-LN form."""
    return self.norm(x.value).astype(dtype) if self.kind == 'pre_ln' else x.compute

  def shortcut_scale(self) -> jax.Array | float:
    """What multiplies x_{k-1}: omega for Admin, alpha for DeepNorm, 1 for Post-LN and Pre-LN."""
    return self.omega[...] if self.kind in ADMIN_RESIDUALS else self.shortcut

  def __call__(self, x: Stream, branch: layers.Branch, *, dropout_rate: float = 0.0, rng: jax.Array | None = None,
               profile: Profile | None = None, tap: Tap | None = None) -> tuple[Stream, Profile | None]:
    """Adds the branch output f_k (its bias and dropout applied here; `rng=None`: no dropout) to the
    shortcut; returns the new stream and profile state.

    While profiling, omega_k := r is used at once in this same pass and then
    r := sqrt(Var[omega_k * x_{k-1}] + Var[f_k]) (spec 2.2). A `tap` (analysis only) records
    (x_{k-1}, f_k, x_k) and adds its offset to x_k. Only these and Pre-LN need f_k as an array of
    its own; the residual LayerNorm applies the bias and dropout as it reads the branch output.
    """
    x = x.value
    dtype = branch.value.dtype
    float32 = lambda a: a.astype(jnp.float32)
    f = branch.dropped(dropout_rate, rng) if self.kind == 'pre_ln' or profile is not None or tap is not None else None
    if self.kind == 'pre_ln':
      output = Stream.of(float32(x) + float32(f), x.dtype, dtype)
    else:
      shortcut = self.shortcut_scale() if profile is None else profile.r
      if profile is not None:
        r = jnp.sqrt(_variance(shortcut * x, profile.mask) + _variance(f, profile.mask))
        profile = Profile(r, profile.mask)
      output = Stream(*layers.residual_layer_norm(
          x, branch.value, jnp.asarray(shortcut, jnp.float32), self.norm.scale[...], self.norm.bias[...],
          self.layer_norm_impl, branch_bias=branch.bias, dropout_rate=dropout_rate, rng=rng))
    if tap is not None:
      output = Stream.of(tap(float32(x), float32(f), float32(output.value)), x.dtype, dtype)
    return output, profile
