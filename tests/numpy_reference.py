"""Independent float64 NumPy versions of the model's pieces, written from the spec, for tests."""

import math

import numpy as np


def layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * p['scale'] + p['bias']


def attention(x, memory, p, mask):
  """x [q, d], memory [k, d]; p holds qkv [d, 3, h, hd], qkv_bias, out [h, hd, d], out_bias."""
  w, b = p['qkv'], p['qkv_bias']
  head_dim = w.shape[-1]
  q = (np.einsum('ld,dhk->lhk', x, w[:, 0]) + b[0]) * head_dim ** -0.5
  k = np.einsum('ld,dhk->lhk', memory, w[:, 1]) + b[1]
  v = np.einsum('ld,dhk->lhk', memory, w[:, 2]) + b[2]
  logits = np.einsum('qhk,shk->hqs', q, k)
  logits = np.where(mask[None], logits, -1e9)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ctx = np.einsum('hqs,shk->qhk', probs, v)
  return np.einsum('qhk,hkd->qd', ctx, p['out']) + p['out_bias']


def ffn(x, p):
  return np.maximum(x @ p['fc1'] + p['fc1_bias'], 0) @ p['fc2'] + p['fc2_bias']


def sinusoid(positions, d):
  """fairseq: concat[sin, cos], freq_k = exp(-k ln(10000) / (d/2 - 1)), positions from 2."""
  half = d // 2
  freq = np.exp(-np.arange(half) * math.log(10000.0) / (half - 1))
  angle = (positions[..., None] + 2.0) * freq
  return np.concatenate([np.sin(angle), np.cos(angle)], -1)


def sublayer(kind, x, branch, p_res, shortcut):
  if kind == 'pre_ln':
    return x + branch(layer_norm(x, p_res['norm']))
  scale = p_res['omega'] if kind in ('admin', 'admin_logn') else shortcut
  return layer_norm(scale * x + branch(x), p_res['norm'])
