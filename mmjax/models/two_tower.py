"""Two-tower contrastive model: CLIP (arXiv 2103.00020) and SigLIP (arXiv 2303.15343).

A ViT image tower pooled by its class token, the mean of its patch tokens or an attention
pool with one learned probe (MAP, SigLIP's head), an optional linear projection; a text
transformer, causal and pooled at the end-of-text token (OpenAI CLIP, open_clip) or
bidirectional and pooled at the last or first position (SigLIP), then a projection; a learned
logit scale and, for sigmoid losses, a learned logit bias.

The options express the public architectures exactly (configs/pretrained.py) so that
`mmjax.convert` can load OpenAI CLIP, open_clip and Hugging Face CLIP / SigLIP weights and
`mmjax.export` hand them back. It trains with the `coca` objective without captions
(loss.caption_weight=0: CLIP / UniCL) and with `siglip`.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.models import config as model_config
from mmjax.models import coca, layers, vit
from mmjax.vocabulary import PAD_ID

IMAGE_POOLS = ("cls", "mean", "map")  # class token | mean of patch tokens | attention probe
TEXT_POOLS = ("eot", "last", "first")  # end-of-text (last non-pad) token | last | first slot


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig(model_config.ModelConfig):
  """The model part of a config, frozen so Flax can hash it (configs/schema.py
  `two_tower_model` names the keys)."""
  text_depth: int  # model.text.num_layers
  text_causal: bool  # model.text.causal
  text_pool: str  # model.text.pool
  text_proj_bias: bool  # model.text.proj_bias
  vision_patch_bias: bool  # model.vision.patch_bias
  vision_class_token: bool  # model.vision.class_token
  vision_ln_pre: bool  # model.vision.ln_pre
  vision_pool: str  # model.vision.pool
  vision_proj: bool  # model.vision.proj (False: the pooled width is the embedding, SigLIP)
  norm_eps: float  # model.norm_eps
  image_norm: str  # model.image_norm
  logit_bias: bool  # model.logit_bias
  logit_bias_init: float  # model.logit_bias_init

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "TwoTowerConfig":
    m = config.model
    for key, value, allowed in (("vision.pool", m.vision.pool, IMAGE_POOLS),
                                ("text.pool", m.text.pool, TEXT_POOLS),
                                ("image_norm", m.image_norm, tuple(coca.IMAGE_NORMS)),
                                ("activation", m.activation, tuple(layers.ACTIVATIONS))):
      if value not in allowed:
        raise ValueError(f"config model.{key}={value!r}: choose one of {allowed}")
    if m.vision.pool == "cls" and not m.vision.class_token:
      raise ValueError("config model.vision.pool='cls' needs model.vision.class_token=True")
    if not m.vision.proj and m.vision.width != m.embed_dim:
      raise ValueError(f"config model.vision.proj=False needs model.embed_dim={m.embed_dim} "
                       f"== model.vision.width={m.vision.width} (the pooled features are "
                       "the embedding)")
    return cls(
        **cls.shared_fields(config), text_depth=m.text.num_layers, text_causal=m.text.causal,
        text_pool=m.text.pool, text_proj_bias=m.text.proj_bias,
        vision_patch_bias=m.vision.patch_bias, vision_class_token=m.vision.class_token,
        vision_ln_pre=m.vision.ln_pre, vision_pool=m.vision.pool, vision_proj=m.vision.proj,
        norm_eps=m.norm_eps, image_norm=m.image_norm, logit_bias=m.logit_bias,
        logit_bias_init=m.logit_bias_init)


class MapHead(nn.Module):
  """Multihead attention pooling (big_vision's MAP head, SigLIP's vision head): one learned
  probe attends over the tokens, then a residual MLP on its LayerNormed output.
  x [B, N, D] -> [B, D]."""
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  norm_eps: float = 1e-6
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    probe = self.param("probe", layers.partitioned(nn.initializers.xavier_uniform(),
                                                   (None, "embed")), (1, width),
                       self.param_dtype)
    q = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, width))
    h = layers.Attention(self.num_heads, **kw, implementation=self.attention_impl,
                         name="attn")(q, x)
    h = h + layers.Mlp(self.mlp_dim, self.activation, **kw, name="mlp")(
        layers.LayerNorm(**kw, epsilon=self.norm_eps, name="ln")(h))
    return h[:, 0]


class TextTransformer(nn.Module):
  """Token and position embeddings, pre-LN blocks (causal or bidirectional), a final
  LayerNorm, and one pooled position. text int32 [B, L] (padding PAD_ID after the text) ->
  [B, D]."""
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  max_len: int
  causal: bool = True
  pool: str = "eot"
  activation: str = "gelu"
  scan: bool = True
  remat_policy: str = "none"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  norm_eps: float = 1e-6
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, text: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 embedding_init=layers.partitioned(init, ("vocab", "embed")),
                 name="token_embed")(text)
    pos = self.param("pos_embed", layers.partitioned(nn.initializers.normal(0.01),
                                                     (None, "embed")),
                     (self.max_len, self.width), self.param_dtype)
    x = x + pos[:text.shape[1]].astype(self.dtype)
    # Causal: no real token attends to the padding after it, so no padding mask is needed
    # for the end-of-text pooling. Bidirectional (SigLIP): every slot, padding included,
    # as SigLIP was trained (its texts are padded to a fixed length).
    x = layers.TransformerStack(
        num_layers=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        causal=self.causal, activation=self.activation, scan=self.scan,
        remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype,
        norm_eps=self.norm_eps, attention_impl=self.attention_impl, name="encoder")(x)
    x = layers.LayerNorm(self.dtype, self.param_dtype, epsilon=self.norm_eps,
                         name="ln_final")(x)
    if self.pool == "first":
      return x[:, 0]
    if self.pool == "last":
      return x[:, -1]
    return x[jnp.arange(x.shape[0]), end_of_text(text)]


def end_of_text(text: jax.Array) -> jax.Array:
  """text int32 [B, L] -> the index of each row's last non-padding token [B] (its EOS: mmjax
  tokenizers keep EOS last, truncated or not). The same position as OpenAI CLIP's argmax
  over ids (EOS has the largest id) and transformers' first EOS, with any tokenizer."""
  positions = jnp.arange(text.shape[1], dtype=jnp.int32)
  return jnp.max(jnp.where(text != PAD_ID, positions, 0), axis=1)


class TwoTower(nn.Module):
  """Batch inputs: images [B, H, W, 3], uint8 pixels or floating point in [-1, 1]
  (`vit.normalize_images`; `image_norm="clip"` then maps them to CLIP's mean/std); text
  int32 [B, L] (data.max_text_len tokens); text_type int32 [B] (unused: no prefix)."""
  config: TwoTowerConfig

  def setup(self):
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    stack = dict(scan=c.scan_layers, remat_policy=c.remat_policy, activation=c.activation,
                 norm_eps=c.norm_eps, attention_impl=c.attention_impl)
    self.vision = vit.ViT(c.patch_size, c.vision_width, c.vision_depth, c.vision_mlp_dim,
                          c.vision_heads, **stack, **kw, patch_bias=c.vision_patch_bias,
                          class_token=c.vision_class_token, ln_pre=c.vision_ln_pre,
                          ln_post=True)
    if c.vision_pool == "map":
      self.map_head = MapHead(c.vision_heads, c.vision_mlp_dim, c.activation, **kw,
                              norm_eps=c.norm_eps, attention_impl=c.attention_impl)
    if c.vision_proj:
      self.image_proj = layers.Dense(c.embed_dim, ("embed", None), use_bias=False, **kw)
    self.text = TextTransformer(c.vocab_size, c.text_width, c.text_depth, c.text_mlp_dim,
                                c.text_heads, c.max_text_len, c.text_causal, c.text_pool,
                                **stack, **kw)
    self.text_proj = layers.Dense(c.embed_dim, ("embed", None), use_bias=c.text_proj_bias,
                                  **kw)
    self.logit_scale_log = self.param(
        "logit_scale", nn.initializers.constant(jnp.log(c.logit_scale_init)), (), jnp.float32)
    if c.logit_bias:
      self.logit_bias_param = self.param(
          "logit_bias", nn.initializers.constant(c.logit_bias_init), (), jnp.float32)

  def image_features(self, images: jax.Array, drop_rng: jax.Array | None = None,
                     drop_fraction: float = 0.0) -> jax.Array:
    """images [B, H, W, 3] -> pooled features [B, Dv] float32, before the projection (what
    CLIP's linear probes read). `drop_rng`: patch dropout (training, `vit.drop_patches`)."""
    norm = coca.IMAGE_NORMS[self.config.image_norm]
    if norm is not None:
      mean, std = (jnp.asarray(v, jnp.float32) for v in norm)
      images = ((vit.normalize_images(images, jnp.float32) + 1.0) / 2.0 - mean) / std
    tokens = self.vision(images, drop_rng=drop_rng, drop_fraction=drop_fraction)
    pool = self.config.vision_pool
    if pool == "cls":
      pooled = tokens[:, 0]
    elif pool == "mean":
      pooled = tokens[:, int(self.config.vision_class_token):].mean(axis=1)
    else:
      pooled = self.map_head(tokens)
    return pooled.astype(jnp.float32)

  def encode_image(self, images: jax.Array, drop_rng: jax.Array | None = None,
                   drop_fraction: float = 0.0) -> tuple[jax.Array, None]:
    """images [B, H, W, 3] -> (embedding [B, E] float32 unnormalised, None: no caption
    tokens)."""
    pooled = self.image_features(images, drop_rng, drop_fraction).astype(
        jnp.dtype(self.config.dtype))
    emb = self.image_proj(pooled) if self.config.vision_proj else pooled
    return emb.astype(jnp.float32), None

  def encode_text(self, text_ids: jax.Array, text_type: jax.Array | None = None) -> jax.Array:
    """text_ids int32 [B, L] -> embedding [B, E] float32 unnormalised."""
    del text_type
    return self.text_proj(self.text(text_ids)).astype(jnp.float32)

  def logit_scale(self) -> jax.Array:
    """exp of the learned log-scale, at most logit_scale_max; its gradient never stops."""
    return layers.capped_logit_scale(self.logit_scale_log, self.config.logit_scale_max)

  def logit_bias(self) -> jax.Array:
    """The learned logit bias (model.logit_bias), else the constant 0."""
    if self.config.logit_bias:
      return self.logit_bias_param
    return jnp.zeros((), jnp.float32)

  def __call__(self, images: jax.Array, text_ids: jax.Array, text_type: jax.Array, *,
               with_captions: bool = False, fused_head: bool = False,
               drop_rng: jax.Array | None = None,
               drop_fraction: float = 0.0) -> dict[str, jax.Array]:
    """-> image_emb, text_emb [B, E] float32, logit_scale, logit_bias. The objectives'
    captioning flags must be off: a two-tower model has no caption decoder. `drop_rng`,
    `drop_fraction`: patch dropout (training only)."""
    del fused_head
    if with_captions:
      raise ValueError("model.name='two_tower' has no captioning decoder: set "
                       "loss.caption_weight=0")
    return dict(image_emb=self.encode_image(images, drop_rng, drop_fraction)[0],
                text_emb=self.encode_text(text_ids, text_type),
                logit_scale=self.logit_scale(), logit_bias=self.logit_bias())


def resize_position_embedding(pos: np.ndarray, num_prefix: int, grid: int) -> np.ndarray:
  """A ViT position table [P + g*g, D] for another image size: the grid rows resized
  bicubically on the 2-D grid to [grid, grid], the P class-token rows kept.
  -> [P + grid*grid, D] in pos's dtype."""
  prefix, patches = pos[:num_prefix], pos[num_prefix:]
  old = int(round(np.sqrt(patches.shape[0])))
  if old * old != patches.shape[0]:
    raise ValueError(f"position embedding of {patches.shape[0]} patch rows is not a square "
                     "grid")
  if old == grid:
    return pos
  resized = jax.image.resize(jnp.asarray(patches, jnp.float32).reshape(old, old, -1),
                             (grid, grid, patches.shape[1]), method="bicubic",
                             antialias=False)
  return np.concatenate([prefix, np.asarray(resized).reshape(grid * grid, -1)
                         .astype(pos.dtype)])


# Parameter groups by top-level module (`mmjax.summary`).
PARAMETER_PARTS = {
    "image_tower": ("vision", "map_head", "image_proj"),
    "text_tower": ("text", "text_proj"),
}
PAPER_TOTAL_PARTS = ("image_tower", "text_tower")


def forward_flops(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Forward matmul FLOPs per example, per part (model FLOPs; conventions as
  `coca.forward_flops`: a multiply-add is 2 FLOPs, attention T queries over S keys of width
  D costs 4*T*S*D, causal attention counted in full).

  N = (image_size / patch)^2 patches, Nv = N (+1 with a class token), L = data.max_text_len:
    patch embedding   2*N*(p*p*3*Dv)
    vision blocks     Lv * [2*Nv*(4*Dv^2 + 2*Dv*Fv) + 4*Nv^2*Dv]
    map head          2*Dv^2 (q) + 2*2*Nv*Dv^2 (k, v) + 2*Dv^2 (out) + 4*Nv*Dv + 2*2*Dv*Fv
    text blocks       Lt * [2*L*(4*Dt^2 + 2*Dt*Ft) + 4*L^2*Dt]
    projections       2*Dv*E (image, when projected) + 2*Dt*E (text)
    contrastive loss  2*B*E (this example's share of the B x B logits)
  """
  c = TwoTowerConfig.from_config(config)
  n = c.num_patches
  nv = n + int(c.vision_class_token)
  dv, fv, dt, ft, length = (c.vision_width, c.vision_mlp_dim, c.text_width, c.text_mlp_dim,
                            c.max_text_len)
  block = lambda t, d, f: 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d
  out = {
      "patch_embedding": 2 * n * c.patch_size ** 2 * 3 * dv,
      "vision_blocks": c.vision_depth * block(nv, dv, fv),
  }
  if c.vision_pool == "map":
    out["map_head"] = 2 * dv * dv + 2 * 2 * nv * dv * dv + 2 * dv * dv + 4 * nv * dv \
        + 2 * 2 * dv * fv
  out["text_blocks"] = c.text_depth * block(length, dt, ft)
  out["projections"] = 2 * dv * c.embed_dim * int(c.vision_proj) + 2 * dt * c.embed_dim
  out["contrastive_loss"] = 2 * config.batch_size * c.embed_dim
  return out
