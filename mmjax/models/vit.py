"""Vision Transformer image encoder (patch embedding, learned positions, pre-LN blocks), and
`normalize_images`: where the pipeline's uint8 pixels become the model's inputs in [-1, 1]."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import layers

# uint8 pixel x -> x * (2/255) - 1, as float32(x) * float32(2/255) - 1 in NumPy: two roundings,
# the product's and the difference's. XLA:CPU contracts that multiply and subtract into one
# fused multiply-add, which skips the product's rounding and moves 158 of the 256 values by
# one ulp (jax 0.10.2); XLA:GPU did not in a check on an H200 (jax 0.11.2), and nothing says
# it never will. So the product is summed from two exact ones: PIXEL_SCALE_HI keeps the
# scale's top 16 significant bits (8-bit x times it fits float32's 24), PIXEL_SCALE_LO =
# PIXEL_SCALE - PIXEL_SCALE_HI its last 8; their sum is rounded once, to
# float32(x * PIXEL_SCALE), whether or not a multiply-add computes it.
PIXEL_SCALE = np.float32(2.0 / 255.0)
PIXEL_SCALE_HI = (np.array(PIXEL_SCALE).view(np.uint32) & 0xFFFFFF00).view(np.float32)[()]
PIXEL_SCALE_LO = np.float32(PIXEL_SCALE - PIXEL_SCALE_HI)


def normalize_images(images: jax.Array, dtype: layers.Dtype = jnp.float32) -> jax.Array:
  """Pipeline images -> model inputs in [-1, 1], [B, H, W, 3] -> [B, H, W, 3] `dtype`.

  uint8 (what the data pipeline emits, `mmjax.data.transforms`): pixel x becomes
  x * (2/255) - 1, computed in float32 bit for bit as NumPy's float32 `x * (2/255) - 1`
  (the host conversion of earlier versions; checked on CPU and an H200), then cast to
  `dtype`. XLA may still fold a constant added right after it into the -1 (CoCa's CLIP
  normalisation adds the 1 back), which can only drop a rounding.
  Floating point (open_clip parity inputs, hand-made arrays): taken as already in [-1, 1]
  and only cast to `dtype`. Any other dtype is refused (TypeError).

  Called inside the jitted computation at the model's image entry, so a float copy exists
  only for the images being encoded (one micro-batch), never for the whole uint8 batch.
  """
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32)
    return ((x * PIXEL_SCALE_HI + x * PIXEL_SCALE_LO) - 1.0).astype(dtype)
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images.astype(dtype)
  raise TypeError(f"images of dtype {images.dtype}: expected uint8 pixels (0..255) or "
                  "floating point in [-1, 1]")


def drop_patches(tokens: jax.Array, rng: jax.Array, fraction: float,
                 num_prefix: int = 0) -> jax.Array:
  """Patch dropout (FLIP, arXiv 2212.00794; open_clip's PatchDropout): of the N patch tokens
  of each example keep a fresh random subset of round((1 - fraction) N) (at least one),
  drawn from `rng`; the first `num_prefix` tokens (a class token) are always kept.
  tokens [B, num_prefix + N, D] with positions already added -> [B, num_prefix + K, D]."""
  prefix, patches = tokens[:, :num_prefix], tokens[:, num_prefix:]
  batch, n = patches.shape[:2]
  keep = kept_patches(n, fraction)
  order = jnp.argsort(jax.random.uniform(rng, (batch, n)), axis=1)[:, :keep]
  kept = jnp.take_along_axis(patches, order[..., None], axis=1)
  return jnp.concatenate([prefix, kept], axis=1)


def kept_patches(num_patches: int, fraction: float) -> int:
  """How many of `num_patches` patch tokens patch dropout keeps (`drop_patches`)."""
  return max(1, int(round(num_patches * (1.0 - fraction))))


def check_patch_dropout(fraction: float) -> list[str]:
  """`model.patch_dropout` (the models that have it) as one problem line, if any."""
  if 0.0 <= fraction < 1.0:
    return []
  return [f"config model.patch_dropout={fraction} must be in [0, 1) (0 = off; FLIP: 0.5)"]


class ViT(nn.Module):
  """images [B, H, W, 3] uint8 pixels or floating point in [-1, 1] (`normalize_images`)
  -> tokens [B, N, width], N = (H/p)*(W/p) (+1 with `class_token`).

  The defaults are mmjax's ViT: biased patch embedding, no class token, a final LayerNorm.
  open_clip's (OpenAI CLIP's) ViT: bias-free patch embedding, a class token first in the
  sequence (its position embedding is row 0), `ln_pre` before the blocks, and for CoCa no
  final LayerNorm (its attentional pooler normalises keys with its own LayerNorm).

  `mask_token=True` adds a learned `mask_token` parameter (BEiT, FLAVA's MIM / MMM): where
  `patch_mask` [B, N] is True the patch embedding is replaced by it before the class token
  and positions are added, so the blocks must infer the patch from its context. Without it
  (the default) the parameter tree is unchanged and `patch_mask` must be None.

  `drop_rng` with `drop_fraction` > 0 (training only) drops that fraction of the patch
  tokens after the positions are added (`drop_patches`): N becomes round((1 - f) N).
  """
  patch_size: int
  width: int  # the attributes from `width` to `ln_post` are model.vision's keys
  depth: int
  mlp_dim: int
  num_heads: int
  stack: layers.Stack = layers.Stack()
  patch_bias: bool = True
  class_token: bool = False
  ln_pre: bool = False
  ln_post: bool = True
  mask_token: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, patch_mask: jax.Array | None = None,
               drop_rng: jax.Array | None = None, drop_fraction: float = 0.0) -> jax.Array:
    p, s = self.patch_size, self.stack
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", **s.dtypes,
                use_bias=self.patch_bias,
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                               (None, None, None, "embed")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
                name="patch_embed")(normalize_images(images, s.dtype))
    batch, h, w, width = x.shape
    x = x.reshape(batch, h * w, width)
    if self.mask_token:
      token = self.param("mask_token",
                         layers.partitioned(nn.initializers.normal(0.02), ("embed",)),
                         (width,), s.param_dtype)
      if patch_mask is not None:
        x = jnp.where(patch_mask[..., None], token.astype(s.dtype), x)
    elif patch_mask is not None:
      raise ValueError("ViT(mask_token=False) was given a patch_mask: build it with "
                       "mask_token=True to mask patches")
    if self.class_token:
      cls = self.param("cls", layers.partitioned(nn.initializers.normal(0.02), ("embed",)),
                       (width,), s.param_dtype)
      x = jnp.concatenate(
          [jnp.broadcast_to(cls.astype(s.dtype), (batch, 1, width)), x], axis=1)
    pos = self.param("pos_embed",
                     layers.partitioned(nn.initializers.normal(0.02), (None, "embed")),
                     (x.shape[1], width), s.param_dtype)
    x = x + pos.astype(s.dtype)
    if drop_rng is not None and drop_fraction > 0:
      x = drop_patches(x, drop_rng, drop_fraction, num_prefix=int(self.class_token))
    if self.ln_pre:
      x = layers.norm(s, "ln_pre")(x)
    x = layers.TransformerStack(num_layers=self.depth, num_heads=self.num_heads,
                                mlp_dim=self.mlp_dim, stack=s, name="encoder")(x)
    return layers.norm(s, "ln_post")(x) if self.ln_post else x
