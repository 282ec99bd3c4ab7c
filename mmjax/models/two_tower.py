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
class TwoTowerVision(model_config.VisionConfig):
  """`model.vision`: the ViT's shape, open_clip / SigLIP options, pooling, projection."""
  patch_bias: bool
  class_token: bool
  ln_pre: bool
  pool: str  # one of IMAGE_POOLS
  proj: bool  # False: the pooled width is the embedding (SigLIP)


@dataclasses.dataclass(frozen=True)
class TwoTowerText(model_config.EncoderConfig):
  """`model.text`: the text transformer's shape, attention, pooling and projection."""
  vocab_size: int
  causal: bool
  pool: str  # one of TEXT_POOLS
  proj_bias: bool


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig(model_config.ModelConfig):
  """`config.model` of a two-tower config, key for key (configs/schema.py
  `two_tower_model`), plus `max_text_len`."""
  vision: TwoTowerVision
  text: TwoTowerText
  image_norm: str
  logit_bias: bool
  logit_bias_init: float
  patch_dropout: float  # read by the objective (drop_fraction), not by the modules

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "TwoTowerConfig":
    return model_config.from_section(cls, config.model, max_text_len=config.data.max_text_len)


def check(config: ml_collections.ConfigDict) -> list[str]:
  """The two-tower model's own `model` keys (the shared ones: `mmjax.models.check`)."""
  m = config.model
  problems = [f"config model.{key}={value!r}: choose one of {list(allowed)}"
              for key, value, allowed in (("vision.pool", m.vision.pool, IMAGE_POOLS),
                                          ("text.pool", m.text.pool, TEXT_POOLS),
                                          ("image_norm", m.image_norm, tuple(coca.IMAGE_NORMS)))
              if value not in allowed]
  if m.vision.pool == "cls" and not m.vision.class_token:
    problems.append("config model.vision.pool='cls' needs model.vision.class_token=True")
  if not m.vision.proj and m.vision.width != m.embed_dim:
    problems.append(f"config model.vision.proj=False needs model.embed_dim={m.embed_dim} == "
                    f"model.vision.width={m.vision.width} (the pooled features are the "
                    "embedding)")
  return problems + vit.check_patch_dropout(m.patch_dropout)


class MapHead(nn.Module):
  """Multihead attention pooling (big_vision's MAP head, SigLIP's vision head): one learned
  probe attends over the tokens, then a residual MLP on its LayerNormed output.
  x [B, N, D] -> [B, D]."""
  num_heads: int
  mlp_dim: int
  stack: layers.Stack = layers.Stack()  # activation, dtypes, norm_eps, attention_impl

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.stack
    width = x.shape[-1]
    probe = self.param("probe", layers.partitioned(nn.initializers.xavier_uniform(),
                                                   (None, "embed")), (1, width),
                       s.param_dtype)
    q = jnp.broadcast_to(probe.astype(s.dtype), (x.shape[0], 1, width))
    h = layers.Attention(self.num_heads, **s.dtypes, implementation=s.attention_impl,
                         name="attn")(q, x)
    h = h + layers.Mlp(self.mlp_dim, s.activation, **s.dtypes, name="mlp")(
        layers.norm(s, "ln")(h))
    return h[:, 0]


class TextTransformer(nn.Module):
  """Token and position embeddings, pre-LN blocks (causal or bidirectional), a final
  LayerNorm, and one pooled position. text int32 [B, L] (padding PAD_ID after the text) ->
  [B, D]."""
  vocab_size: int
  width: int
  num_layers: int
  mlp_dim: int
  num_heads: int
  max_len: int
  causal: bool = True
  pool: str = "eot"
  stack: layers.Stack = layers.Stack()

  @nn.compact
  def __call__(self, text: jax.Array) -> jax.Array:
    s = self.stack
    init = nn.initializers.normal(0.02)
    x = nn.Embed(self.vocab_size, self.width, **s.dtypes,
                 embedding_init=layers.partitioned(init, ("vocab", "embed")),
                 name="token_embed")(text)
    pos = self.param("pos_embed", layers.partitioned(nn.initializers.normal(0.01),
                                                     (None, "embed")),
                     (self.max_len, self.width), s.param_dtype)
    x = x + pos[:text.shape[1]].astype(s.dtype)
    # Causal: no real token attends to the padding after it, so no padding mask is needed
    # for the end-of-text pooling. Bidirectional (SigLIP): every slot, padding included,
    # as SigLIP was trained (its texts are padded to a fixed length).
    x = layers.TransformerStack(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        causal=self.causal, stack=s, name="encoder")(x)
    x = layers.norm(s, "ln_final")(x)
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


class TwoTower(layers.ContrastiveModel):
  """Batch inputs: images [B, H, W, 3], uint8 pixels or floating point in [-1, 1]
  (`vit.normalize_images`; `image_norm="clip"` then maps them to CLIP's mean/std); text
  int32 [B, L] (data.max_text_len tokens); text_type int32 [B] (unused: no prefix)."""
  config: TwoTowerConfig

  def setup(self):
    c, v, stack = self.config, self.config.vision, self.config.stack
    kw = stack.dtypes
    self.vision = vit.ViT(c.patch_size, v.width, v.depth, v.mlp_dim, v.num_heads, stack,
                          patch_bias=v.patch_bias, class_token=v.class_token, ln_pre=v.ln_pre,
                          ln_post=True)
    if v.pool == "map":
      self.map_head = MapHead(v.num_heads, v.mlp_dim, stack)
    if v.proj:
      self.image_proj = layers.Dense(c.embed_dim, ("embed", None), use_bias=False, **kw)
    t = c.text
    self.text = TextTransformer(t.vocab_size, t.width, t.num_layers, t.mlp_dim, t.num_heads,
                                c.max_text_len, t.causal, t.pool, stack)
    self.text_proj = layers.Dense(c.embed_dim, ("embed", None), use_bias=c.text.proj_bias,
                                  **kw)
    self.contrastive_params()

  def image_features(self, images: jax.Array, drop_rng: jax.Array | None = None,
                     drop_fraction: float = 0.0) -> jax.Array:
    """images [B, H, W, 3] -> pooled features [B, Dv] float32, before the projection (what
    CLIP's linear probes read). `drop_rng`: patch dropout (training, `vit.drop_patches`)."""
    norm = coca.IMAGE_NORMS[self.config.image_norm]
    if norm is not None:
      mean, std = (jnp.asarray(v, jnp.float32) for v in norm)
      images = ((vit.normalize_images(images, jnp.float32) + 1.0) / 2.0 - mean) / std
    tokens = self.vision(images, drop_rng=drop_rng, drop_fraction=drop_fraction)
    pool = self.config.vision.pool
    if pool == "cls":
      pooled = tokens[:, 0]
    elif pool == "mean":
      pooled = tokens[:, int(self.config.vision.class_token):].mean(axis=1)
    else:
      pooled = self.map_head(tokens)
    return pooled.astype(jnp.float32)

  def encode_image(self, images: jax.Array, drop_rng: jax.Array | None = None,
                   drop_fraction: float = 0.0) -> tuple[jax.Array, None]:
    """images [B, H, W, 3] -> (embedding [B, E] float32 unnormalised, None: no caption
    tokens)."""
    pooled = self.image_features(images, drop_rng, drop_fraction).astype(
        self.config.stack.dtype)
    emb = self.image_proj(pooled) if self.config.vision.proj else pooled
    return emb.astype(jnp.float32), None

  def encode_text(self, text_ids: jax.Array, text_type: jax.Array | None = None) -> jax.Array:
    """text_ids int32 [B, L] -> embedding [B, E] float32 unnormalised."""
    del text_type
    return self.text_proj(self.text(text_ids)).astype(jnp.float32)

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

  N = (image_size / patch)^2 patches, Nv = N (+1 with a class token), L = data.max_text_len;
  with model.patch_dropout, Nv counts the round((1 - fraction) N) patches kept in training:
    patch embedding   2*N*(p*p*3*Dv)
    vision blocks     Lv * [2*Nv*(4*Dv^2 + 2*Dv*Fv) + 4*Nv^2*Dv]
    map head          2*Dv^2 (q) + 2*2*Nv*Dv^2 (k, v) + 2*Dv^2 (out) + 4*Nv*Dv + 2*2*Dv*Fv
    text blocks       Lt * [2*L*(4*Dt^2 + 2*Dt*Ft) + 4*L^2*Dt]
    projections       2*Dv*E (image, when projected) + 2*Dt*E (text)
    contrastive loss  2*B*E (this example's share of the B x B logits)
  """
  c = TwoTowerConfig.from_config(config)
  n = c.num_patches
  nv = vit.kept_patches(n, c.patch_dropout) + int(c.vision.class_token)
  dv, fv, dt, ft, length = (c.vision.width, c.vision.mlp_dim, c.text.width, c.text.mlp_dim,
                            c.max_text_len)
  block = lambda t, d, f: 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d
  out = {
      "patch_embedding": 2 * n * c.patch_size ** 2 * 3 * dv,
      "vision_blocks": c.vision.depth * block(nv, dv, fv),
  }
  if c.vision.pool == "map":
    out["map_head"] = 2 * dv * dv + 2 * 2 * nv * dv * dv + 2 * dv * dv + 4 * nv * dv \
        + 2 * 2 * dv * fv
  out["text_blocks"] = c.text.num_layers * block(length, dt, ft)
  out["projections"] = 2 * dv * c.embed_dim * int(c.vision.proj) + 2 * dt * c.embed_dim
  out["contrastive_loss"] = 2 * config.batch_size * c.embed_dim
  return out
