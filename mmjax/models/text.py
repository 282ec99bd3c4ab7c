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
  activation: str = "gelu"
  scan: bool = True
  remat_policy: str = "none"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None, text_type: jax.Array | None, *,
               continuation: bool = False) -> tuple[jax.Array, jax.Array | None]:
    if self.decode:
      return self._decode(x, text_type, continuation), None
    batch, length, width = x.shape
    init = nn.initializers.normal(0.02)
    pieces, valid_pieces = [], []
    if self.prefix_length:
      prefix = self.param("prefix", layers.partitioned(init, (None, None, "embed")),
                          (self.num_text_types, self.prefix_length, width), self.param_dtype)
      pieces.append(prefix[text_type].astype(self.dtype))
      valid_pieces.append(jnp.ones((batch, self.prefix_length), bool))
    cls = self.param("cls", layers.partitioned(init, ("embed",)), (width,), self.param_dtype)
    pieces += [x.astype(self.dtype), jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, width))]
    valid_pieces += [valid, jnp.ones((batch, 1), bool)]
    x = jnp.concatenate(pieces, axis=1)
    total = self.prefix_length + self.max_len + 1
    pos = self.param("pos_embed", layers.partitioned(init, (None, "embed")), (total, width),
                     self.param_dtype)
    x = x + pos[:x.shape[1]].astype(self.dtype)
    x = layers.TransformerStack(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        causal=True, activation=self.activation, scan=self.scan,
        remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype,
        name="decoder")(x, unimodal_mask(jnp.concatenate(valid_pieces, axis=1)))
    cls_out = layers.LayerNorm(self.dtype, self.param_dtype, name="ln_cls")(x[:, -1])
    return x[:, :-1], cls_out

  def _decode(self, x: jax.Array, text_type: jax.Array | None, continuation: bool) -> jax.Array:
    """x [B, T, D] -> features [B, P+T, D] (first call) or [B, T, D] (continuation).

    Same parameter declarations as the training path (decoding only applies them).
    """
    width = x.shape[-1]
    init = nn.initializers.normal(0.02)
    x = x.astype(self.dtype)
    if self.prefix_length and not continuation:
      prefix = self.param("prefix", layers.partitioned(init, (None, None, "embed")),
                          (self.num_text_types, self.prefix_length, width), self.param_dtype)
      x = jnp.concatenate([prefix[text_type].astype(self.dtype), x], axis=1)
    # The position of the next input; 0 in a fresh cache.
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    total = self.prefix_length + self.max_len + 1
    pos = self.param("pos_embed", layers.partitioned(init, (None, "embed")), (total, width),
                     self.param_dtype)
    x = x + jax.lax.dynamic_slice_in_dim(pos, index.value, x.shape[1]).astype(self.dtype)
    index.value = index.value + x.shape[1]
    return layers.TransformerStack(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        causal=True, activation=self.activation, scan=self.scan, dtype=self.dtype,
        param_dtype=self.param_dtype, decode=True, name="decoder")(x)


class MultimodalDecoder(nn.Module):
  """Causal decoder layers with cross-attention to image tokens.

  x: unimodal token features [B, S, D]; image_tokens: [B, Q, Di]. Returns [B, S, D] after a
  final LayerNorm (the captioning head's input).
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  scan: bool = True
  remat_policy: str = "none"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  decode: bool = False  # K/V caches; image_tokens=None then reuses the cached image K/V

  @nn.compact
  def __call__(self, x: jax.Array, image_tokens: jax.Array | None) -> jax.Array:
    if image_tokens is not None:
      image_tokens = image_tokens.astype(self.dtype)
    x = layers.TransformerStack(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        causal=True, cross_attention=True, activation=self.activation, scan=self.scan,
        remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype,
        decode=self.decode, name="decoder")(x, None, image_tokens)
    return layers.LayerNorm(self.dtype, self.param_dtype, name="ln_final")(x)
