"""FLAVA: A Foundational Language And Vision Alignment model (arXiv 2112.04482).

Three encoders built from `layers.TransformerStack` (pre-LN blocks, scanned or unrolled):
  * image encoder: `vit.ViT` (uint8 pixels normalised on entry, `vit.normalize_images`)
    with a prepended learned CLS token, learned positions and a final LayerNorm; masked
    patches (MIM / MMM) have their embedding replaced by its learned mask token (BEiT,
    `vit.ViT(mask_token=True)`).
  * text encoder: bidirectional (causal=False) with a padding mask; BOS is the text CLS.
  * multimodal encoder: over [mm CLS, projected image tokens (CLS + N), projected text
    tokens (L)] with a padding mask on the text part.
Heads: MLM (text vocab, on text-encoder outputs), MIM (on image-encoder patch outputs),
MMM text / image (on multimodal outputs), ITM (one logit on the multimodal CLS), and the
contrastive projections of the image / text CLS outputs.

MIM targets (`config.loss.mim_target`): "pixels" regresses per-patch normalised pixels
(MAE); "codebook" classifies each masked patch into one of `loss.codebook_size` codes
(nearest centroid of a user codebook, see `mmjax.objectives.flava`). The heads only need
the output size, `FlavaConfig.mim_outputs`.

Token ids: the tokenizer's ids are [0, vocab_size) with PAD=0, EOS=1, BOS=2, UNK=3. MLM's
[MASK] id is `vocab_size` (one extra embedding row); the MLM heads predict the tokenizer's
vocab_size ids only. The embedding's rows and the text heads' outputs are padded to
`FlavaConfig.padded_vocab` (a multiple of 128) so their `vocab` axis splits over a
tensor-parallel mesh axis (vocab_size + 1 is often odd: 65, 30,523); padded rows are never
looked up and padded logits are sliced off.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.models import config as model_config
from mmjax.models import layers, vit
from mmjax.vocabulary import PAD_ID

VOCAB_MULTIPLE = 128  # rows of the token table / text-head outputs, see the module docstring


@dataclasses.dataclass(frozen=True)
class FlavaText(model_config.EncoderConfig):
  """`model.text`: the text encoder's shape and the tokenizer's ids."""
  vocab_size: int


@dataclasses.dataclass(frozen=True)
class FlavaConfig(model_config.ModelConfig):
  """`config.model` of a FLAVA config, key for key (configs/schema.py `flava_model`), plus
  `max_text_len` and `mim_outputs` (from `loss`). text.vocab_size counts the tokenizer's
  ids; the embedding has one more row for [MASK]."""
  vision: model_config.VisionConfig
  text: FlavaText
  multimodal: model_config.EncoderConfig
  mim_outputs: int  # loss.mim_target: p*p*3 for pixel regression, codebook_size for codes

  @property
  def mask_id(self) -> int:
    return self.text.vocab_size

  @property
  def padded_vocab(self) -> int:
    """text.vocab_size + 1 ([MASK]) rounded up to a multiple of VOCAB_MULTIPLE."""
    return -(-(self.text.vocab_size + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "FlavaConfig":
    return model_config.from_section(cls, config.model, max_text_len=config.data.max_text_len,
                                     mim_outputs=mim_outputs(config))


MIM_TARGETS = ("pixels", "codebook")  # loss.mim_target


def mim_outputs(config: ml_collections.ConfigDict) -> int:
  """Outputs of the MIM heads per patch: p*p*3 pixels, or codebook_size codes."""
  f = config.loss
  if f.mim_target == "codebook":
    return int(f.codebook_size)
  return config.model.patch_size ** 2 * 3


def check(config: ml_collections.ConfigDict) -> list[str]:
  """FLAVA has no keys of its own to check beyond the shared ones (`mmjax.models.check`);
  its MIM heads are sized by the FLAVA objective's `loss` keys, which that checks."""
  if config.loss.name != "flava":
    return [f"config model.name='flava' needs loss.name='flava' (its heads are the FLAVA "
            f"objective's), not {config.loss.name!r}"]
  return []


def padding_mask(valid: jax.Array) -> jax.Array:
  """valid bool [B, S] -> attention mask bool [B, 1, 1, S] (queries may see valid keys).

  Position 0 (a CLS) is always a valid key, so an all-padding row (image-only examples
  carry all-PAD text) still has one key and its softmax stays finite.
  """
  valid = valid.at[:, 0].set(True)
  return valid[:, None, None, :]


class TextEncoder(nn.Module):
  """Embedded tokens [B, L, D] + valid bool [B, L] -> features [B, L, D] (bidirectional, LN'd)."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  max_len: int
  stack: layers.Stack = layers.Stack()

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    s = self.stack
    pos = self.param("pos_embed",
                     layers.partitioned(nn.initializers.normal(0.02), (None, "embed")),
                     (self.max_len, x.shape[-1]), s.param_dtype)
    x = x.astype(s.dtype) + pos[:x.shape[1]].astype(s.dtype)
    x = layers.TransformerStack(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        causal=False, stack=s, name="encoder")(x, padding_mask(valid))
    return layers.norm(s, "ln_post")(x)


class Head(nn.Module):
  """BERT-style prediction head: Dense(width) -> GELU -> LayerNorm -> Dense(outputs).

  x [..., D] -> float32 [..., outputs].
  """
  outputs: int
  out_axis: str | None
  stack: layers.Stack = layers.Stack()  # dtypes, norm_eps

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = self.stack.dtypes
    h = layers.Dense(x.shape[-1], ("embed", "mlp"), **kw, name="transform")(x)
    h = layers.norm(self.stack, "ln")(nn.gelu(h, approximate=False))
    return layers.Dense(self.outputs, ("mlp", self.out_axis), **kw,
                        name="out")(h).astype(jnp.float32)


class Flava(nn.Module):
  """Batch inputs: images [B, H, W, 3], uint8 pixels or floating point in [-1, 1]
  (`vit.normalize_images`, applied by the image encoder); text int32 [B, L]
  (BOS ... EOS PAD...)."""
  config: FlavaConfig

  def setup(self):
    c, stack = self.config, self.config.stack
    kw = stack.dtypes
    self.vision = vit.ViT(c.patch_size, **model_config.kwargs(c.vision), stack=stack,
                          class_token=True, mask_token=True)
    self.token_embed = nn.Embed(
        c.padded_vocab, c.text.width, **kw,
        embedding_init=layers.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")))
    self.text = TextEncoder(c.text.num_layers, c.text.num_heads, c.text.mlp_dim,
                            c.max_text_len, stack)
    mm = c.multimodal
    self.image_to_mm = layers.Dense(mm.width, ("embed", "mlp"), **kw)
    self.text_to_mm = layers.Dense(mm.width, ("embed", "mlp"), **kw)
    self.mm_cls = self.param("mm_cls",
                             layers.partitioned(nn.initializers.normal(0.02), ("embed",)),
                             (mm.width,), stack.param_dtype)
    self.multimodal = layers.TransformerStack(
        num_layers=mm.num_layers, num_heads=mm.num_heads, mlp_dim=mm.mlp_dim, stack=stack)
    self.mm_ln = layers.LayerNorm(**kw, epsilon=stack.norm_eps)
    self.image_proj = layers.Dense(c.embed_dim, ("embed", None), use_bias=False, **kw)
    self.text_proj = layers.Dense(c.embed_dim, ("embed", None), use_bias=False, **kw)
    self.mlm_head = Head(c.padded_vocab, "vocab", stack)
    self.mim_head = Head(c.mim_outputs, None, stack)
    self.mmm_text_head = Head(c.padded_vocab, "vocab", stack)
    self.mmm_image_head = Head(c.mim_outputs, None, stack)
    self.itm_head = Head(1, None, stack)
    self.logit_scale_log = self.param(
        "logit_scale", nn.initializers.constant(jnp.log(c.logit_scale_init)), (), jnp.float32)

  # --- encoders -----------------------------------------------------------------------------
  def image_tokens(self, images: jax.Array, patch_mask: jax.Array | None = None) -> jax.Array:
    """images [B, H, W, 3], patch_mask bool [B, N] or None -> tokens [B, 1+N, Dv]."""
    return self.vision(images, patch_mask)

  def text_tokens(self, text_ids: jax.Array) -> jax.Array:
    """text_ids int32 [B, L] (may contain mask_id) -> features [B, L, Dt]; [:, 0] is CLS."""
    return self.text(self.token_embed(text_ids), text_ids != PAD_ID)

  def image_embedding(self, tokens: jax.Array) -> jax.Array:
    """Image tokens [B, 1+N, Dv] -> contrastive embedding [B, E] float32 (unnormalised)."""
    return self.image_proj(tokens[:, 0]).astype(jnp.float32)

  def text_embedding(self, features: jax.Array) -> jax.Array:
    """Text features [B, L, Dt] -> contrastive embedding [B, E] float32 (unnormalised)."""
    return self.text_proj(features[:, 0]).astype(jnp.float32)

  def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, 3] -> (embedding [B, E] float32, tokens [B, 1+N, Dv]); as CoCa's."""
    tokens = self.image_tokens(images)
    return self.image_embedding(tokens), tokens

  def image_features(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] -> frozen features [B, Dv] float32 for linear probes: the image
    encoder's CLS output (after its final LayerNorm), before the contrastive projection.

    Why this token: it is FLAVA's image representation h_CLS,I (the one the contrastive
    head projects and the multimodal encoder receives first); and CLIP's linear probes
    (arXiv 2103.00020, App. A.3) use the image features before the projection to the
    embedding space, since the projection only needs to carry what matches text. The
    probe standardises the features itself (`mmjax.evaluators.linear_probe`).
    """
    return self.image_tokens(images)[:, 0].astype(jnp.float32)

  def encode_text(self, text_ids: jax.Array, text_type: jax.Array) -> jax.Array:
    """text_ids [B, L] -> embedding [B, E] float32. text_type is accepted for the common
    evaluator signature and ignored (FLAVA has no prefix conditioning)."""
    del text_type
    return self.text_embedding(self.text_tokens(text_ids))

  def fuse(self, image_tokens: jax.Array, text_features: jax.Array,
           text_ids: jax.Array) -> jax.Array:
    """Multimodal encoder.

    image_tokens [B, 1+N, Dv], text_features [B, L, Dt], text_ids [B, L] (padding mask)
    -> [B, 1 + (1+N) + L, Dm] LN'd: position 0 mm CLS, 1..1+N image (1 = image CLS),
    then text.
    """
    batch = image_tokens.shape[0]
    img = self.image_to_mm(image_tokens)
    txt = self.text_to_mm(text_features)
    cls = jnp.broadcast_to(self.mm_cls.astype(img.dtype), (batch, 1, img.shape[-1]))
    x = jnp.concatenate([cls, img, txt.astype(img.dtype)], axis=1)
    valid = jnp.concatenate([jnp.ones((batch, 1 + img.shape[1]), bool), text_ids != PAD_ID],
                            axis=1)
    return self.mm_ln(self.multimodal(x, padding_mask(valid)))

  def mm_heads(self, fused: jax.Array) -> dict[str, jax.Array]:
    """Fused [B, 2+N+L, Dm] -> itm_logit [B], mmm_text_logits [B, L, V],
    mmm_image_pred [B, N, mim_outputs] (all float32)."""
    n = self.config.num_patches
    return dict(itm_logit=self.itm_head(fused[:, 0])[:, 0],
                mmm_image_pred=self.mmm_image_head(fused[:, 2:2 + n]),
                mmm_text_logits=self.text_logits(self.mmm_text_head, fused[:, 2 + n:]))

  def text_logits(self, head: nn.Module, x: jax.Array) -> jax.Array:
    """A text head over x [B, L, D] -> float32 logits [B, L, vocab_size] (padding cut)."""
    return head(x)[..., :self.config.text.vocab_size]

  def logit_scale(self) -> jax.Array:
    """exp of the learned log-scale, at most logit_scale_max; its gradient never stops."""
    return layers.capped_logit_scale(self.logit_scale_log, self.config.logit_scale_max)

  # --- pretraining forward ------------------------------------------------------------------
  def pretrain(self, images: jax.Array, patch_mask: jax.Array, text_ids: jax.Array,
               mm_text_ids: jax.Array) -> dict[str, jax.Array]:
    """Everything the FLAVA objectives need, in one call.

    Args:
      images: [B, H, W, 3], uint8 pixels or floating point in [-1, 1] (see the class).
      patch_mask: bool [B, N], patches replaced by the mask token (MIM / MMM image).
      text_ids: int32 [B, L], the clean captions (contrastive).
      mm_text_ids: int32 [B, L], the MLM-masked texts (after ITM caption swaps).
    Returns float32 dict: image_emb, text_emb [B, E]; logit_scale []; mim_pred
    [B, N, mim_outputs] (masked image through the image encoder); mlm_logits [B, L, V]
    (masked text through the text encoder); itm_logit [B], mmm_text_logits [B, L, V],
    mmm_image_pred [B, N, mim_outputs] (masked image + masked text, multimodal encoder).
    """
    b = images.shape[0]
    # Clean and masked passes share one call per encoder (2B rows): one compiled encoder.
    img = self.image_tokens(jnp.concatenate([images, images]),
                            jnp.concatenate([jnp.zeros_like(patch_mask), patch_mask]))
    txt = self.text_tokens(jnp.concatenate([text_ids, mm_text_ids]))
    img_clean, img_masked = img[:b], img[b:]
    txt_clean, txt_masked = txt[:b], txt[b:]
    out = dict(image_emb=self.image_embedding(img_clean),
               text_emb=self.text_embedding(txt_clean), logit_scale=self.logit_scale(),
               mim_pred=self.mim_head(img_masked[:, 1:]),
               mlm_logits=self.text_logits(self.mlm_head, txt_masked))
    out.update(self.mm_heads(self.fuse(img_masked, txt_masked, mm_text_ids)))
    return out

  def __call__(self, images: jax.Array, text_ids: jax.Array,
               text_type: jax.Array | None = None) -> dict[str, jax.Array]:
    """Unmasked forward through every module (creates all parameters at init).
    Returns the `pretrain` dict with no patch masked and the clean text everywhere."""
    del text_type
    patch_mask = jnp.zeros((images.shape[0], self.config.num_patches), bool)
    return self.pretrain(images, patch_mask, text_ids, text_ids)


# Parameter groups by top-level module (`mmjax.summary`).
PARAMETER_PARTS = {
    "image_encoder": ("vision",),
    "text_encoder": ("token_embed", "text"),
    "multimodal_encoder": ("image_to_mm", "text_to_mm", "mm_cls", "multimodal", "mm_ln"),
    "heads": ("mlm_head", "mim_head", "mmm_text_head", "mmm_image_head", "itm_head"),
}
PAPER_TOTAL_PARTS = ()


def forward_flops(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Forward matmul FLOPs per example of FLAVA's pretraining forward (`Flava.pretrain`),
  per part; same conventions as `mmjax.models.coca.forward_flops` (matmuls only, causal-free
  dense attention).

  Every example runs the image encoder twice (clean for the contrastive loss, masked for
  MIM / MMM) and the text encoder twice (clean, masked), whatever its modality: the batch
  is dense, flags only weight the losses. With T_i = 1 + N image tokens (CLS), L text
  tokens, T_m = 1 + T_i + L multimodal tokens (its CLS first), and a head
  x -> Dense(D) -> Dense(out) costing 2*T*D^2 + 2*T*D*out:
    patch embedding     2 x 2*N*(p*p*3*Dv)
    image encoder       2 x Lv * [2*T_i*(4*Dv^2 + 2*Dv*Fv) + 4*T_i^2*Dv]
    text encoder        2 x Lt * [2*L*(4*Dt^2 + 2*Dt*Ft) + 4*L^2*Dt]
    multimodal encoder  2*T_i*Dv*Dm + 2*L*Dt*Dm (input projections)
                        + Lm * [2*T_m*(4*Dm^2 + 2*Dm*Fm) + 4*T_m^2*Dm]
    heads               MLM (L, Dt, V) + MIM (N, Dv, M) + MMM text (L, Dm, V)
                        + MMM image (N, Dm, M) + ITM (1, Dm, 1); M = p*p*3 or codebook size,
                        V = FlavaConfig.padded_vocab (vocab + [MASK], rounded up to 128)
    projections         2*Dv*E + 2*Dt*E
    contrastive loss    2*B*E (this example's share of the dense B x B logits)
  MIM targets (normalised pixels, nearest codebook centroid) are target preprocessing
  without gradients and are not counted. Training = 3 x forward, patch embedding 2 x.
  """
  c = FlavaConfig.from_config(config)
  n, p, length = c.num_patches, c.patch_size, c.max_text_len
  dv, dt, dm = c.vision.width, c.text.width, c.multimodal.width
  ti, tm = 1 + n, 2 + n + length
  block = lambda t, d, f: 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d
  head = lambda t, d, out: 2 * t * d * d + 2 * t * d * out
  v, m = c.padded_vocab, c.mim_outputs  # the text heads compute the padded logits
  return {
      "patch_embedding": 2 * 2 * n * p * p * 3 * dv,
      "image_encoder": 2 * c.vision.depth * block(ti, dv, c.vision.mlp_dim),
      "text_encoder": 2 * c.text.num_layers * block(length, dt, c.text.mlp_dim),
      "multimodal_encoder": (2 * ti * dv * dm + 2 * length * dt * dm
                             + c.multimodal.num_layers * block(tm, dm, c.multimodal.mlp_dim)),
      "heads": (head(length, dt, v) + head(n, dv, m) + head(length, dm, v) + head(n, dm, m)
                + head(1, dm, 1)),
      "projections": 2 * (dv + dt) * c.embed_dim,
      "contrastive_loss": 2 * config.batch_size * c.embed_dim,
  }
