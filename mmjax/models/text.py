"""CoCa text side: a unimodal causal decoder with an appended CLS token, and a multimodal
decoder that cross-attends to image tokens."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers


def unimodal_mask(valid: jax.Array) -> jax.Array:
  """Causal mask where no query attends to padding.

  valid: bool [B, S], True at prefix, real tokens and the final CLS slot.
  Returns bool [B, 1, S, S]. Real tokens precede padding, so causality alone keeps them
  off padding; the CLS (last slot) sees every real token and no padding.
  """
  length = valid.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  return causal[None, None] & valid[:, None, None, :]


def legacy_cls_key_valid(valid: jax.Array) -> jax.Array:
  """open_clip's legacy (pre `correct_cls_mask`) key mask, which its CoCa weights were
  trained with: the validity of [tokens..., CLS] shifted right by one slot, slot 0 always
  valid. So the key after a real token is visible and the last real token's successor (the
  first pad, or the CLS when there is no padding) too; the CLS itself is masked whenever the
  text has padding. Used as `unimodal_mask(legacy_cls_key_valid(valid))`.

  valid: bool [B, S] (S includes the final CLS slot). Returns bool [B, S].
  """
  return jnp.concatenate([jnp.ones_like(valid[:, :1]), valid[:, :-1]], axis=1)


class CrossAttentionBlock(nn.Module):
  """open_clip's cross-attention residual block: x + attn(ln_q(x), ln_kv(context)), then
  x + mlp(ln_mlp(x)). x: [B, T, D]; context: [B, S, D]. Returns [B, T, D].
  `decode=True`: the image K/V are cached; context None reads them from the cache."""
  num_heads: int
  mlp_dim: int
  stack: layers.Stack = layers.Stack()
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
    s = self.stack
    if context is not None or not self.decode:
      context = layers.norm(s, "ln_kv")(context)
    x = x + layers.Attention(self.num_heads, **s.dtypes, decode=self.decode,
                             implementation=s.attention_impl, name="attn")(
        layers.norm(s, "ln_q")(x), context, cross=True)
    return x + layers.Mlp(self.mlp_dim, s.activation, **s.dtypes, name="mlp")(
        layers.norm(s, "ln_mlp")(x))


class OpenClipMultimodalBlock(nn.Module):
  """One layer of open_clip's MultimodalTransformer: a causal self-attention block with its
  own MLP, then a CrossAttentionBlock (second MLP). Same fields and signature as
  `layers.TransformerBlock` so `layers.TransformerStack(block=...)` scans it."""
  num_heads: int
  mlp_dim: int
  causal: bool = True
  cross_attention: bool = True
  stack: layers.Stack = layers.Stack()
  decode: bool = False  # K/V caches, as layers.TransformerBlock

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               context: jax.Array | None = None) -> tuple[jax.Array, None]:
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, stack=self.stack,
              decode=self.decode)
    x, _ = layers.TransformerBlock(**kw, causal=self.causal, name="self_block")(x, mask)
    x = CrossAttentionBlock(**kw, name="cross_block")(x, context)
    return layers.constrain(x, ("batch", "length", "embed")), None


class UnimodalDecoder(nn.Module):
  """Causal text decoder (no image). A learned prefix per text type is prepended (prefix
  conditioning) and a learned CLS is appended in the final slot; its normalised output is
  the text embedding.

  Inputs: embedded tokens [B, T, D], `valid` bool [B, T] (False at padding), `text_type`
  int32 [B] (0 caption, 1 label prompt). Returns (token features [B, P+T, D], cls [B, D]).

  `decode=True` (same parameters): no CLS (causal, so no token attends to it), K/V cached
  per layer, positions continue from a cached index, and `valid` is ignored (decoded
  tokens are all real). The first call (`continuation=False`) prepends the prefix and
  returns ([B, P+T, D], None); later calls (`continuation=True`) feed only the next
  tokens and return ([B, T, D], None). Token t thus sits at position P+t as in training.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  max_len: int  # tokens T, excluding prefix and CLS
  prefix_length: int = 0
  num_text_types: int = 2
  stack: layers.Stack = layers.Stack()
  cls_mask: str = "correct"  # "correct" | "legacy" (open_clip's shipped CoCa weights)
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None, text_type: jax.Array | None, *,
               continuation: bool = False) -> tuple[jax.Array, jax.Array | None]:
    if self.decode:
      return self._decode(x, text_type, continuation), None
    batch, length, width = x.shape
    dtype, param_dtype = self.stack.dtype, self.stack.param_dtype
    init = nn.initializers.normal(0.02)
    pieces, valid_pieces = [], []
    if self.prefix_length:
      prefix = self.param("prefix", layers.partitioned(init, (None, None, "embed")),
                          (self.num_text_types, self.prefix_length, width), param_dtype)
      pieces.append(prefix[text_type].astype(dtype))
      valid_pieces.append(jnp.ones((batch, self.prefix_length), bool))
    cls = self.param("cls", layers.partitioned(init, ("embed",)), (width,), param_dtype)
    pieces += [x.astype(dtype), jnp.broadcast_to(cls.astype(dtype), (batch, 1, width))]
    valid_pieces += [valid, jnp.ones((batch, 1), bool)]
    x = jnp.concatenate(pieces, axis=1)
    total = self.prefix_length + self.max_len + 1
    pos = self.param("pos_embed", layers.partitioned(init, (None, "embed")), (total, width),
                     param_dtype)
    x = x + pos[:x.shape[1]].astype(dtype)
    key_valid = jnp.concatenate(valid_pieces, axis=1)
    if self.cls_mask == "legacy":
      key_valid = legacy_cls_key_valid(key_valid)
    elif self.cls_mask != "correct":
      raise ValueError(f"config model.text.cls_mask={self.cls_mask!r}: choose 'correct' or "
                       "'legacy'")
    x = layers.TransformerStack(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        causal=True, stack=self.stack, name="decoder")(x, unimodal_mask(key_valid))
    cls_out = layers.norm(self.stack, "ln_cls")(x[:, -1])
    return x[:, :-1], cls_out

  def _decode(self, x: jax.Array, text_type: jax.Array | None, continuation: bool) -> jax.Array:
    """x [B, T, D] -> features [B, P+T, D] (first call) or [B, T, D] (continuation).

    Same parameter declarations as the training path (decoding only applies them).
    """
    width = x.shape[-1]
    dtype, param_dtype = self.stack.dtype, self.stack.param_dtype
    init = nn.initializers.normal(0.02)
    x = x.astype(dtype)
    if self.prefix_length and not continuation:
      prefix = self.param("prefix", layers.partitioned(init, (None, None, "embed")),
                          (self.num_text_types, self.prefix_length, width), param_dtype)
      x = jnp.concatenate([prefix[text_type].astype(dtype), x], axis=1)
    # The position of the next input; 0 in a fresh cache.
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    total = self.prefix_length + self.max_len + 1
    pos = self.param("pos_embed", layers.partitioned(init, (None, "embed")), (total, width),
                     param_dtype)
    x = x + jax.lax.dynamic_slice_in_dim(pos, index.value, x.shape[1]).astype(dtype)
    index.value = index.value + x.shape[1]
    return layers.TransformerStack(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        causal=True, stack=self.stack, decode=True, name="decoder")(x)


class MultimodalDecoder(nn.Module):
  """Causal decoder layers with cross-attention to image tokens.

  x: unimodal token features [B, S, D]; image_tokens: [B, Q, Di]. Returns [B, S, D] after a
  final LayerNorm (the captioning head's input).
  `block`: "fused" (self-attn, cross-attn, MLP per layer) or "openclip"
  (`OpenClipMultimodalBlock`: self-attn + MLP, then LayerNormed cross-attn + MLP).
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  stack: layers.Stack = layers.Stack()
  block: str = "fused"
  decode: bool = False  # K/V caches; image_tokens=None then reuses the cached image K/V

  @nn.compact
  def __call__(self, x: jax.Array, image_tokens: jax.Array | None) -> jax.Array:
    if image_tokens is not None:
      image_tokens = image_tokens.astype(self.stack.dtype)
    x = layers.TransformerStack(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        causal=True, cross_attention=True, stack=self.stack,
        block=_MULTIMODAL_BLOCKS[self.block], decode=self.decode,
        name="decoder")(x, None, image_tokens)
    return layers.norm(self.stack, "ln_final")(x)


_MULTIMODAL_BLOCKS = {"fused": None, "openclip": OpenClipMultimodalBlock}
