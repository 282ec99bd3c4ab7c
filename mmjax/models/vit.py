"""Vision Transformer image encoder (patch embedding, learned positions, pre-LN blocks)."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers


class ViT(nn.Module):
  """images [B, H, W, 3] -> patch tokens [B, (H/p)*(W/p), width] after a final LayerNorm."""
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

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                               (None, None, None, "embed")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
                name="patch_embed")(images.astype(self.dtype))
    batch, h, w, width = x.shape
    x = x.reshape(batch, h * w, width)
    pos = self.param("pos_embed",
                     layers.partitioned(nn.initializers.normal(0.02), (None, "embed")),
                     (h * w, width), self.param_dtype)
    x = x + pos.astype(self.dtype)
    x = layers.TransformerStack(
        num_layers=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        activation=self.activation, scan=self.scan, remat_policy=self.remat_policy,
        dtype=self.dtype, param_dtype=self.param_dtype, name="encoder")(x)
    return layers.LayerNorm(self.dtype, self.param_dtype, name="ln_post")(x)
