"""CoCa: Contrastive Captioners (arXiv 2205.01917).

ViT image encoder -> attentional poolers (captioning: N queries; contrastive: 1 query, in
`cascade` over the captioning pooler's outputs as in the paper, or `parallel`);
unimodal causal text decoder whose appended CLS gives the text embedding; multimodal decoder
that cross-attends to the captioning pooler's tokens and predicts the next token.

`pooler="openclip"` with the options below expresses open_clip's CoCa exactly (see
`configs/openclip.py` and `mmjax.convert.openclip`): one pooler of N queries whose first
output is the contrastive embedding and the rest the caption tokens.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.models import config as model_config
from mmjax.models import layers, text, vit
from mmjax.vocabulary import PAD_ID



@dataclasses.dataclass(frozen=True)
class CoCaVision(model_config.VisionConfig):
  """`model.vision`: the ViT's shape and open_clip's options (configs/schema.py)."""
  patch_bias: bool
  class_token: bool  # prepended class token (its own position row 0)
  ln_pre: bool  # LayerNorm after position embeddings, before the blocks
  ln_post: bool  # LayerNorm after the blocks (open_clip CoCa: none)


@dataclasses.dataclass(frozen=True)
class CoCaText:
  """`model.text`: the unimodal and multimodal decoders."""
  width: int
  num_uni_layers: int
  num_multi_layers: int
  mlp_dim: int
  num_heads: int
  vocab_size: int  # tokenizer ids
  cls_mask: str  # "legacy": open_clip's shipped CoCa weights' CLS mask
  multimodal_block: str  # "openclip": self-attn+MLP then cross-attn+MLP


@dataclasses.dataclass(frozen=True)
class CoCaConfig(model_config.ModelConfig):
  """`config.model` of a CoCa config, key for key (configs/schema.py `coca_model`), plus
  `max_text_len`; the decoders see max_text_len - 1 tokens."""
  vision: CoCaVision
  text: CoCaText
  pooler: str
  pooler_heads: int  # attention heads of the poolers; 0 = text.num_heads
  num_caption_queries: int
  tie_embeddings: bool
  prefix_length: int
  num_text_types: int
  image_norm: str  # "clip": map the [-1, 1] inputs to CLIP mean/std
  logit_bias: bool  # a learned logit bias for sigmoid losses (SigLIP)
  logit_bias_init: float
  patch_dropout: float  # read by the objective (drop_fraction), not by the modules

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "CoCaConfig":
    return model_config.from_section(cls, config.model, max_text_len=config.data.max_text_len)


def check(config: ml_collections.ConfigDict) -> list[str]:
  """CoCa's own `model` keys (the shared ones: `mmjax.models.check`), one line each."""
  m = config.model
  problems = [f"config model.{key}={value!r}: choose one of {list(allowed)}"
              for key, value, allowed in (
                  ("pooler", m.pooler, POOLERS), ("text.cls_mask", m.text.cls_mask, CLS_MASKS),
                  ("text.multimodal_block", m.text.multimodal_block, MULTIMODAL_BLOCKS),
                  ("image_norm", m.image_norm, tuple(IMAGE_NORMS)))
              if value not in allowed]
  if m.pooler == "openclip" and m.embed_dim != m.text.width:
    # open_clip's pooler width is embed_dim and its tokens feed the decoder's
    # cross-attention, whose key width is the text width.
    problems.append(f"config model.pooler='openclip' needs model.embed_dim={m.embed_dim} == "
                    f"model.text.width={m.text.width}")
  return problems + vit.check_patch_dropout(m.patch_dropout)


POOLERS = ("cascade", "parallel", "openclip")
CLS_MASKS = ("correct", "legacy")
MULTIMODAL_BLOCKS = ("fused", "openclip")
# Per-channel (mean, std) applied to images in [0, 1]; "clip" is OpenAI CLIP's (open_clip's
# OPENAI_DATASET_MEAN/STD), which open_clip's CoCa checkpoints were trained with.
IMAGE_NORMS = {"none": None,
               "clip": ((0.48145466, 0.4578275, 0.40821073),
                        (0.26862954, 0.26130258, 0.27577711))}


class AttentionPooler(nn.Module):
  """Learned queries [Q, D] attend once over `x` [B, N, Dx] -> [B, Q, D] (LayerNormed)."""
  num_queries: int
  width: int
  num_heads: int
  stack: layers.Stack = layers.Stack()  # dtypes, norm_eps, attention_impl

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.stack
    queries = self.param("queries",
                         layers.partitioned(nn.initializers.normal(0.02), (None, "embed")),
                         (self.num_queries, self.width), s.param_dtype)
    q = layers.norm(s, "ln_q")(queries.astype(s.dtype))
    q = jnp.broadcast_to(q, (x.shape[0], *q.shape))
    context = layers.norm(s, "ln_k")(x)
    out = layers.Attention(self.num_heads, **s.dtypes, implementation=s.attention_impl,
                           name="attn")(q, context)
    return layers.norm(s, "ln_out")(out)


class CoCa(layers.ContrastiveModel):
  """Batch inputs: images [B, H, W, 3], uint8 pixels or floating point in [-1, 1]
  (`vit.normalize_images`); text int32 [B, L] (BOS ... EOS PAD...); text_type int32 [B].
  The decoders read text[:, :-1] and predict text[:, 1:].

  `decode=True` gives the same parameters with K/V-cached text decoders for autoregressive
  captioning (`decode_prefill`, `decode_step`; driven by `mmjax.decode`)."""
  config: CoCaConfig
  decode: bool = False

  def setup(self):
    c, t, stack = self.config, self.config.text, self.config.stack
    kw = stack.dtypes
    self.vision = vit.ViT(c.patch_size, **model_config.kwargs(c.vision), stack=stack)
    pooler_heads = c.pooler_heads or t.num_heads
    if c.pooler == "openclip":
      # One pooler: query 0 is the contrastive embedding, queries 1.. the caption tokens;
      # its output LayerNorm is open_clip's ln_post.
      self.caption_pooler = AttentionPooler(c.num_caption_queries + 1, t.width, pooler_heads,
                                            stack)
    else:
      self.caption_pooler = AttentionPooler(c.num_caption_queries, t.width, pooler_heads,
                                            stack)
      self.contrastive_pooler = AttentionPooler(1, t.width, pooler_heads, stack)
    self.token_embed = nn.Embed(
        t.vocab_size, t.width, **kw,
        embedding_init=layers.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")))
    self.unimodal = text.UnimodalDecoder(
        t.num_uni_layers, t.num_heads, t.mlp_dim, c.max_text_len - 1, c.prefix_length,
        c.num_text_types, stack, cls_mask=t.cls_mask, decode=self.decode)
    self.multimodal = text.MultimodalDecoder(t.num_multi_layers, t.num_heads, t.mlp_dim,
                                             stack, block=t.multimodal_block,
                                             decode=self.decode)
    if not c.tie_embeddings:
      self.lm_head = layers.Dense(t.vocab_size, ("embed", "vocab"), use_bias=False, **kw)
    self.image_proj = layers.Dense(c.embed_dim, ("embed", None), use_bias=False, **kw)
    self.text_proj = layers.Dense(c.embed_dim, ("embed", None), use_bias=False, **kw)
    self.contrastive_params()

  def pool_image(self, images: jax.Array, drop_rng: jax.Array | None = None,
                 drop_fraction: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, 3] (uint8 or [-1, 1], see the class) -> (contrastive pooler output
    [B, D] before the projection, caption tokens [B, Q, D]). With `drop_rng` (training,
    model.patch_dropout) the encoder sees only the kept patches (`vit.drop_patches`), and so
    do both poolers: the captioning decoder attends to the kept tokens' features too."""
    norm = IMAGE_NORMS[self.config.image_norm]
    if norm is not None:
      # The checkpoint expects (pixel/255 - mean) / std: from the [-1, 1] inputs.
      mean, std = (jnp.asarray(v, jnp.float32) for v in norm)
      images = ((vit.normalize_images(images, jnp.float32) + 1.0) / 2.0 - mean) / std
    tokens = self.vision(images, drop_rng=drop_rng, drop_fraction=drop_fraction)
    if self.config.pooler == "openclip":
      pooled = self.caption_pooler(tokens)
      return pooled[:, 0], pooled[:, 1:]
    caption_tokens = self.caption_pooler(tokens)
    source = caption_tokens if self.config.pooler == "cascade" else tokens
    return self.contrastive_pooler(source)[:, 0], caption_tokens

  def encode_image(self, images: jax.Array, drop_rng: jax.Array | None = None,
                   drop_fraction: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, 3] -> (embedding [B, E] float32 unnormalised, caption tokens [B, Q, D])."""
    pooled, caption_tokens = self.pool_image(images, drop_rng, drop_fraction)
    return self.image_proj(pooled).astype(jnp.float32), caption_tokens

  def image_features(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] -> frozen features [B, D] float32 for linear probes: the
    contrastive pooler's output, before the projection to the embedding space.

    Why: CLIP's linear probes (arXiv 2103.00020, App. A.3) use the image features before
    that projection, and big_vision's few-shot / linear evaluators read a model's
    `pre_logits`, the pooled representation before its head. CoCa's own frozen-feature
    evaluation (arXiv 2205.01917) trains a new attentional pooler over the frozen ViT
    tokens, which a linear probe cannot; the contrastive pooler is the pooling CoCa learned
    for a single image vector.
    """
    return self.pool_image(images)[0].astype(jnp.float32)

  def encode_text_tokens(self, text_ids: jax.Array,
                         text_type: jax.Array) -> tuple[jax.Array, jax.Array]:
    """text_ids [B, L] -> (embedding [B, E] float32, unimodal features [B, P+L-1, D])."""
    inputs = text_ids[:, :-1]
    features, cls = self.unimodal(self.token_embed(inputs), inputs != PAD_ID, text_type)
    return self.text_proj(cls).astype(jnp.float32), features

  def encode_text(self, text_ids: jax.Array, text_type: jax.Array) -> jax.Array:
    return self.encode_text_tokens(text_ids, text_type)[0]

  def caption_features(self, features: jax.Array, caption_tokens: jax.Array) -> jax.Array:
    """Unimodal features [B, P+T, D] + caption tokens [B, Q, D] -> the multimodal decoder's
    final states [B, T, D] (compute dtype): the captioning head's input."""
    return self.multimodal(features, caption_tokens)[:, self.config.prefix_length:]

  def caption_logits(self, features: jax.Array, caption_tokens: jax.Array) -> jax.Array:
    """Unimodal features [B, P+T, D] + caption tokens -> float32 logits [B, T, V]."""
    return self._lm_head(self.caption_features(features, caption_tokens))

  def caption_kernel(self) -> jax.Array:
    """The captioning head's kernel [D, V] in the parameter dtype: the untied `lm_head`'s,
    or the token embedding table transposed (tied). `_lm_head(h)` is `h @ kernel` computed
    in the compute dtype; `losses.fused_caption_loss` takes the two factors."""
    if self.config.tie_embeddings:
      return self.token_embed.embedding.T
    return self.lm_head.variables["params"]["dense"]["kernel"]

  def _lm_head(self, h: jax.Array) -> jax.Array:
    """Multimodal features [B, T, D] -> float32 logits [B, T, V]."""
    logits = self.token_embed.attend(h) if self.config.tie_embeddings else self.lm_head(h)
    return layers.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def decode_prefill(self, caption_tokens: jax.Array, text_ids: jax.Array,
                     text_type: jax.Array) -> jax.Array:
    """First decoding call (decode=True, mutable "cache"): prefix + `text_ids` [B, T] (BOS
    ...) through both decoders, image K/V stored. caption_tokens [B, Q, D] from
    `encode_image`; text_type int32 [B]. Returns float32 logits [B, T, V]."""
    features, _ = self.unimodal(self.token_embed(text_ids), None, text_type)
    return self.caption_logits(features, caption_tokens)

  def decode_step(self, text_ids: jax.Array) -> jax.Array:
    """Next tokens [B, T] (usually T=1) after the cached ones -> float32 logits [B, T, V]."""
    features, _ = self.unimodal(self.token_embed(text_ids), None, None, continuation=True)
    return self._lm_head(self.multimodal(features, None))

  def __call__(self, images: jax.Array, text_ids: jax.Array, text_type: jax.Array, *,
               with_captions: bool = True, fused_head: bool = False,
               drop_rng: jax.Array | None = None,
               drop_fraction: float = 0.0) -> dict[str, jax.Array]:
    """-> image_emb, text_emb [B, E] float32, logit_scale, logit_bias, and with captions
    either caption_logits float32 [B, T, V] or, with `fused_head` (for a loss that fuses the
    head, `losses.fused_caption_loss`), caption_features [B, T, D] and caption_kernel [D, V].
    `drop_rng`, `drop_fraction`: patch dropout (training only, `pool_image`)."""
    image_emb, caption_tokens = self.encode_image(images, drop_rng, drop_fraction)
    text_emb, features = self.encode_text_tokens(text_ids, text_type)
    out = dict(image_emb=image_emb, text_emb=text_emb, logit_scale=self.logit_scale(),
               logit_bias=self.logit_bias())
    if with_captions and fused_head:
      out["caption_features"] = self.caption_features(features, caption_tokens)
      out["caption_kernel"] = self.caption_kernel()
    elif with_captions:
      out["caption_logits"] = self.caption_logits(features, caption_tokens)
    return out


# Parameter groups by top-level module (`mmjax.summary`). The paper's Table 1 "total" is
# image encoder + text decoder (86M + 297M = 383M): poolers and projections are outside it.
PARAMETER_PARTS = {
    "image_encoder": ("vision",),
    "poolers": ("caption_pooler", "contrastive_pooler"),
    "text_decoder": ("token_embed", "unimodal", "multimodal", "lm_head"),
}
PAPER_TOTAL_PARTS = ("image_encoder", "text_decoder")


def forward_flops(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Forward matmul FLOPs per example of CoCa's training forward, per part (model FLOPs,
  the MFU convention; `mmjax.summary` turns them into training FLOPs).

  Training FLOPs per example (model FLOPs, the MFU convention)
  -------------------------------------------------------------
  Only matrix multiplications are counted; a multiply-add is 2 FLOPs. Norms, GELU, softmax,
  residual adds, the cross-entropy and the optimizer update are left out (they are O(tokens x
  width), against O(tokens x width^2) for the matmuls). A forward matmul of an [n, k] input
  with a [k, m] weight costs 2nkm; the backward pass costs twice that (dX = dY W^T and
  dW = X^T dY), so training = 3 x forward. The one exception is the patch embedding: nothing
  needs the gradient of the images, so it costs forward + dW = 2 x forward. Rematerialisation
  (`model.remat_policy`), the recomputed logits of the sharded contrastive loss and the extra
  embedding pass of gradient accumulation are real work but not counted (as for MFU).

  Notation: N = (image_size / patch)^2 image tokens (with model.patch_dropout, the patch
  embedding still sees all of them, the rest the round((1 - fraction) N) kept), p patch, L = data.max_text_len,
  P = model.prefix_length, Q = num_caption_queries, V vocab, E embed_dim, B global batch;
  Dv, Fv, Lv vision width / MLP / layers; Dt, Ft text width / MLP; Lu, Lm unimodal /
  multimodal layers. Positions: unimodal Tu = P + (L - 1) + 1 (prefix, input tokens, CLS),
  multimodal Tm = P + L - 1 (CLS dropped), predicted tokens Tc = L - 1.
  An attention layer with T queries over S keys of width D costs 4*T*S*D forward
  (QK^T: 2TSD, probabilities x V: 2TSD), plus its projections. Causal attention is counted in
  full (T*T, not T*(T+1)/2): the dense XLA kernel computes the masked half too.

  Forward FLOPs per example:
    patch embedding   2*N*(p*p*3*Dv)
    ViT               Lv * [2*N*(4*Dv^2 + 2*Dv*Fv) + 4*N^2*Dv]
    caption pooler    2*Q*Dt^2 (q) + 2*2*N*Dv*Dt (k, v) + 2*Q*Dt^2 (out) + 4*Q*N*Dt
    contrastive pool. cascade: 2*Dt^2 + 2*2*Q*Dt^2 + 2*Dt^2 + 4*Q*Dt   (1 query over Q tokens)
                      parallel: 2*Dt^2 + 2*2*N*Dv*Dt + 2*Dt^2 + 4*N*Dt
    unimodal          Lu * [2*Tu*(4*Dt^2 + 2*Dt*Ft) + 4*Tu^2*Dt]
    multimodal        Lm * [2*Tm*(4*Dt^2 + 2*Dt*Ft) + 4*Tm^2*Dt
                            + 2*2*Tm*Dt^2 (cross q, out) + 2*2*Q*Dt^2 (cross k, v) + 4*Tm*Q*Dt]
    lm head           2*Tc*Dt*V (tied or untied)
    projections       2*Dt*E (image) + 2*Dt*E (text)
    contrastive loss  2*B*E (this example's share of the B x B logits)
  Training FLOPs per example = 3 x (sum of the above) - 1 x (patch embedding).
  Note the multimodal cross-attention k/v projections run over Q = 256 tokens per layer, more
  than the text itself, so "6 x params x text tokens" underestimates the decoder.
  `tests/test_summary.py` checks the total against XLA's cost analysis of the jitted
  forward+backward of the real loss.
  """
  c = CoCaConfig.from_config(config)
  n = vit.kept_patches(c.num_patches, c.patch_dropout)  # what the encoder sees in training
  dv, fv, dt, ft, q = c.vision.width, c.vision.mlp_dim, c.text.width, c.text.mlp_dim, \
      c.num_caption_queries
  tu = c.prefix_length + (c.max_text_len - 1) + 1
  tm = c.prefix_length + c.max_text_len - 1
  tc = c.max_text_len - 1
  attention = lambda t, s, d: 4 * t * s * d
  block = lambda t, d, f: 2 * t * (4 * d * d + 2 * d * f) + attention(t, t, d)
  if c.pooler == "cascade":
    contrastive_pooler = 2 * dt * dt + 2 * 2 * q * dt * dt + 2 * dt * dt + attention(1, q, dt)
  else:
    contrastive_pooler = 2 * dt * dt + 2 * 2 * n * dv * dt + 2 * dt * dt + attention(1, n, dt)
  cross = 2 * 2 * tm * dt * dt + 2 * 2 * q * dt * dt + attention(tm, q, dt)
  return {
      "patch_embedding": 2 * c.num_patches * c.patch_size ** 2 * 3 * dv,
      "vision_blocks": c.vision.depth * block(n, dv, fv),
      "caption_pooler": 2 * q * dt * dt + 2 * 2 * n * dv * dt + 2 * q * dt * dt
                        + attention(q, n, dt),
      "contrastive_pooler": contrastive_pooler,
      "unimodal": c.text.num_uni_layers * block(tu, dt, ft),
      "multimodal": c.text.num_multi_layers * (block(tm, dt, ft) + cross),
      "lm_head": 2 * tc * dt * c.text.vocab_size,
      "projections": 2 * 2 * dt * c.embed_dim,
      "contrastive_loss": 2 * config.batch_size * c.embed_dim,
  }
