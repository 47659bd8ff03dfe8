"""Names of each stack's sublayers in forward order: the row labels of every per-sublayer table."""

KINDS = {'encoder': ('self_attn', 'ffn'), 'decoder': ('self_attn', 'cross_attn', 'ffn')}


def kind(stack: str, index: int) -> str:
  """The kind of the 1-based `index`-th sublayer of `stack` ('encoder' or 'decoder')."""
  kinds = KINDS[stack]
  return kinds[(index - 1) % len(kinds)]
