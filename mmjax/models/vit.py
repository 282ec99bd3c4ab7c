"""Vision Transformer image encoder (patch embedding, learned positions, pre-LN blocks)."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers


class ViT(nn.Module):
  """images [B, H, W, 3] -> tokens [B, N, width], N = (H/p)*(W/p) (+1 with `class_token`).

  The defaults are mmjax's ViT: biased patch embedding, no class token, a final LayerNorm.
  open_clip's (OpenAI CLIP's) ViT: bias-free patch embedding, a class token first in the
  sequence (its position embedding is row 0), `ln_pre` before the blocks, and for CoCa no
  final LayerNorm (its attentional pooler normalises keys with its own LayerNorm).

  `mask_token=True` adds a learned `mask_token` parameter (BEiT, FLAVA's MIM / MMM): where
  `patch_mask` [B, N] is True the patch embedding is replaced by it before the class token
  and positions are added, so the blocks must infer the patch from its context. Without it
  (the default) the parameter tree is unchanged and `patch_mask` must be None.
  """
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  activation: str = "gelu"
  scan: bool = True
  remat_policy: str = "none"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  norm_eps: float = 1e-6
  patch_bias: bool = True
  class_token: bool = False
  ln_pre: bool = False
  ln_post: bool = True
  mask_token: bool = False
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, images: jax.Array, patch_mask: jax.Array | None = None) -> jax.Array:
    p = self.patch_size
    norm = lambda name: layers.LayerNorm(self.dtype, self.param_dtype, epsilon=self.norm_eps,
                                         name=name)
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, use_bias=self.patch_bias,
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                               (None, None, None, "embed")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
                name="patch_embed")(images.astype(self.dtype))
    batch, h, w, width = x.shape
    x = x.reshape(batch, h * w, width)
    if self.mask_token:
      token = self.param("mask_token",
                         layers.partitioned(nn.initializers.normal(0.02), ("embed",)),
                         (width,), self.param_dtype)
      if patch_mask is not None:
        x = jnp.where(patch_mask[..., None], token.astype(self.dtype), x)
    elif patch_mask is not None:
      raise ValueError("ViT(mask_token=False) was given a patch_mask: build it with "
                       "mask_token=True to mask patches")
    if self.class_token:
      cls = self.param("cls", layers.partitioned(nn.initializers.normal(0.02), ("embed",)),
                       (width,), self.param_dtype)
      x = jnp.concatenate(
          [jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, width)), x], axis=1)
    pos = self.param("pos_embed",
                     layers.partitioned(nn.initializers.normal(0.02), (None, "embed")),
                     (x.shape[1], width), self.param_dtype)
    x = x + pos.astype(self.dtype)
    if self.ln_pre:
      x = norm("ln_pre")(x)
    x = layers.TransformerStack(
        num_layers=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        activation=self.activation, scan=self.scan, remat_policy=self.remat_policy,
        dtype=self.dtype, param_dtype=self.param_dtype, norm_eps=self.norm_eps,
        attention_impl=self.attention_impl, name="encoder")(x)
    return norm("ln_post")(x) if self.ln_post else x
