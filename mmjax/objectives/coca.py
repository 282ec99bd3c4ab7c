"""CoCa's objective: contrastive + captioning (arXiv 2205.01917), with UniCL's label-aware
targets (arXiv 2204.03610) and CLIP as the case where every pair is its own class.

  loss = loss.contrastive_weight * contrastive + loss.caption_weight * captioning

Batch (global arrays, leading dim B sharded over the mesh's batch axes):
  image uint8 [B, H, W, 3] (the model maps pixels to [-1, 1] per micro-batch,
  `mmjax.models.vit.normalize_images`); text int32 [B, L]; label int32 [B] (-1: caption, no
  class); text_type int32 [B] (mmjax.vocabulary.TEXT_TYPES).
The contrastive term is the memory-linear ring of `losses.unicl_loss` (loss.sharded) or the
dense B x B form; captioning is next-token cross-entropy over real tokens (padding never
counts), over captions and, with loss.caption_loss_on_labels, label prompts too. With
loss.caption_chunk_size > 0 the captioning head and its cross-entropy are fused and computed
in token chunks (`losses.fused_caption_loss`): the [B, L-1, V] logits never exist, forward
or backward, and the vocabulary is split over the mesh as the head's kernel is.

With grad_accum_steps = k > 1 the gradient is still the full batch's, exactly (gradient
caching, `accumulated_grads`): every negative of the whole batch is seen while activation
memory is one micro-batch's.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from configs import schema
from mmjax import losses, models, sharding
from mmjax.vocabulary import PAD_ID

Batch = dict[str, jax.Array]


class CocaObjective:
  """Closes over the model and config; every method is a pure function of its inputs."""
  section = staticmethod(schema.coca_loss)  # its `loss` keys
  modalities = ("paired",)  # the data.sources.*.modality views it trains on

  @staticmethod
  def check(config: ml_collections.ConfigDict) -> list[str]:
    """Problems of its `loss` keys, one line each."""
    problems = []
    if config.loss.caption_chunk_size < 0:
      problems.append(f"config loss.caption_chunk_size={config.loss.caption_chunk_size} must "
                      "be >= 0 (0 = plain logits)")
    entry = models.MODELS.get(config.model.name)
    if config.loss.caption_weight > 0 and entry is not None and not entry.captions:
      problems.append(f"config loss.caption_weight={config.loss.caption_weight}: "
                      f"model.name={config.model.name!r} has no captioning decoder; set "
                      "--config.loss.caption_weight=0 (contrastive only) or use model.name='coca'")
    return problems

  @staticmethod
  def unimodal_steps(config: ml_collections.ConfigDict) -> int:
    """Steps whose batches come from the unimodal sources only (`mmjax.data.pipeline`)."""
    del config
    return 0

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh | None):
    self.config, self.model, self.mesh = config, model, mesh
    self.c = config.loss
    self.accum_steps = config.grad_accum_steps
    self.with_captions = self.c.caption_weight > 0
    self.batch_axes = sharding.batch_axes(config.mesh.rules)
    self.fused_head = self.c.caption_chunk_size > 0
    self.patch_dropout = config.model.patch_dropout

  def contrastive_labels(self, batch: Batch) -> jax.Array:
    """UniCL targets come from labels; CLIP gives every pair its own class (-1)."""
    if self.c.label_aware:
      return batch["label"]
    return jnp.full_like(batch["label"], -1)

  def contrastive(self, image_emb: jax.Array, text_emb: jax.Array, labels: jax.Array,
                  scale: jax.Array, bias: jax.Array) -> jax.Array:
    """The contrastive term of embeddings [B, E], labels [B], the learned logit scale and
    bias (softmax losses are shift-invariant: the bias is unused, and without
    model.logit_bias the model's bias is the constant 0)."""
    del bias
    mesh = self.mesh if self.c.sharded else None
    return losses.unicl_loss(image_emb, text_emb, labels, scale, mesh=mesh,
                             batch_axes=self.batch_axes)

  def caption_mask(self, batch: Batch) -> jax.Array:
    """[B, L-1] float: 1 where the next token is real text (padding never counts)."""
    mask = batch["text"][:, 1:] != PAD_ID
    if not self.c.caption_loss_on_labels:
      mask &= (batch["text_type"] == 0)[:, None]
    return mask.astype(jnp.float32)

  def caption_sum(self, out: dict[str, jax.Array], batch: Batch) -> jax.Array:
    """Summed token cross-entropy over the caption mask (normalised by the caller): of the
    model's caption logits, or of its head's input and kernel fused in chunks."""
    mask, targets = self.caption_mask(batch), batch["text"][:, 1:]
    if not self.fused_head:
      mean, count = losses.token_ce(out["caption_logits"], targets, mask)
      return mean * count
    embed_axes, vocab_axis = nn.logical_to_mesh_axes(("embed", "vocab"),
                                                     self.config.mesh.rules)
    mean, count = losses.fused_caption_loss(
        out["caption_features"], out["caption_kernel"], targets, mask,
        chunk_size=self.c.caption_chunk_size, mesh=self.mesh, batch_axes=self.batch_axes,
        vocab_axis=vocab_axis, embed_axes=embed_axes)
    return mean * count

  def dropout_rng(self, step: jax.Array | None, microbatch_index: Any = 0) -> jax.Array | None:
    """The patch-dropout key of a step's micro-batch (None without model.patch_dropout):
    fold_in(key(seed), step), so a resumed run drops the same patches; both passes over a
    micro-batch (embedding and re-run, `accumulated_grads`) get the same key."""
    if not self.patch_dropout or step is None:
      return None
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), step),
                              microbatch_index)

  def forward(self, params: Any, batch: Batch, with_captions: bool,
              rng: jax.Array | None = None) -> dict[str, jax.Array]:
    return self.model.apply({"params": params}, batch["image"], batch["text"],
                            batch["text_type"], with_captions=with_captions,
                            fused_head=self.fused_head, drop_rng=rng,
                            drop_fraction=self.patch_dropout)

  def loss(self, params: Any, batch: Batch,
           step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted objective over the whole batch; metrics: both terms and the logit scale."""
    c = self.c
    out = self.forward(params, batch, self.with_captions, self.dropout_rng(step))
    contrastive = self.contrastive(out["image_emb"], out["text_emb"],
                                   self.contrastive_labels(batch), out["logit_scale"],
                                   out["logit_bias"])
    num_tokens = self.caption_mask(batch).sum()
    caption = (self.caption_sum(out, batch) / jnp.maximum(num_tokens, 1.0)
               if self.with_captions else jnp.zeros(()))
    loss = c.contrastive_weight * contrastive + c.caption_weight * caption
    return loss, self.metrics(contrastive, caption, out["logit_scale"], out["logit_bias"])

  def metrics(self, contrastive: jax.Array, caption: jax.Array, scale: jax.Array,
              bias: jax.Array) -> dict[str, jax.Array]:
    del bias
    return dict(contrastive_loss=contrastive, caption_loss=caption, logit_scale=scale)

  def grads(self, params: Any, batch: Batch,
            step: jax.Array | None = None) -> tuple[jax.Array, dict, Any]:
    if self.accum_steps == 1:
      (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(params, batch, step)
      return loss, aux, grads
    return self.accumulated_grads(params, batch, step)

  def accumulated_grads(self, params: Any, batch: Batch,
                        step: jax.Array | None = None) -> tuple[jax.Array, dict, Any]:
    """Exact gradient accumulation for a contrastive loss (gradient caching).

    1. Embed micro-batches 0..k-2 without gradients; run the last micro-batch's whole
    forward once, keeping its residuals (`jax.vjp`). 2. Differentiate the contrastive loss
    of the whole batch with respect to the cached embeddings (and the logit scale and bias).
    3. Back-propagate the last micro-batch from its residuals, then re-run each of the others
    with gradients, back-propagating their embedding gradients plus their caption loss.
    Every negative of the full batch is seen; activation memory is one micro-batch's, and
    the embedding pass costs k-1 micro-batch forwards, not k (k = 2: both, see below).
    """
    c, k = self.c, self.accum_steps
    micro = jax.tree.map(lambda x: interleave_microbatches(x, k), batch)
    take = lambda tree, j: jax.tree.map(lambda x: microbatch(x, j), tree)
    num_tokens = jnp.maximum(self.caption_mask(batch).sum(), 1.0)

    def embed(j: jax.Array) -> tuple[jax.Array, jax.Array]:
      out = self.forward(params, take(micro, j), False, self.dropout_rng(step, j))
      return out["image_emb"], out["text_emb"]

    def terms(p: Any, mb: Batch, j: Any) -> tuple[jax.Array, ...]:
      """What micro-batch j's share of the loss depends on: embeddings [B/k, E], scale,
      bias, and its summed caption cross-entropy."""
      out = self.forward(p, mb, self.with_captions, self.dropout_rng(step, j))
      caption = self.caption_sum(out, mb) if self.with_captions else jnp.zeros(())
      return out["image_emb"], out["text_emb"], out["logit_scale"], out["logit_bias"], caption

    def share(t: tuple[jax.Array, ...], d_img: jax.Array, d_txt: jax.Array, d_scale: jax.Array,
              d_bias: jax.Array) -> jax.Array:
      """Linear in the terms; its gradient wrt them, pulled back to the parameters, is this
      micro-batch's share of the full-batch gradient."""
      image_emb, text_emb, scale, bias, caption = t
      value = c.contrastive_weight * (jnp.vdot(image_emb, d_img) + jnp.vdot(text_emb, d_txt)
                                      + (scale * d_scale + bias * d_bias) / k)
      return value + c.caption_weight * caption / num_tokens

    # Kept: the last micro-batch's forward, unless k = 2. Then the re-run loop below runs
    # once, XLA inlines it, and nothing orders it after the kept backward: both micro-
    # batches' residuals were alive at once (CoCa-Base at 512 per v5p chip: 73.74 GiB
    # against 43.44), so for k = 2 both are embedded and re-run.
    kept = 1 if k > 2 else 0
    image_emb, text_emb = jax.lax.map(embed, jnp.arange(k - kept))
    if kept:
      # Asks XLA to run the last forward after the embedding pass, so that its residuals
      # are not alive while the others are embedded (a request, not a guarantee: a second
      # barrier did not order the k = 2 case above on XLA:CPU).
      last_params, image_emb, text_emb = jax.lax.optimization_barrier(
          (params, image_emb, text_emb))
      last_terms, pull_back = jax.vjp(lambda p: terms(p, take(micro, k - 1), k - 1),
                                      last_params)
      image_emb, text_emb = (jnp.concatenate([first, last[None]]) for first, last in
                             ((image_emb, last_terms[0]), (text_emb, last_terms[1])))
      scale, bias = last_terms[2], last_terms[3]
    else:
      scale = self.model.apply({"params": params}, method="logit_scale")
      bias = self.model.apply({"params": params}, method="logit_bias")
    image_emb, text_emb = merge_microbatches(image_emb), merge_microbatches(text_emb)
    labels = self.contrastive_labels(batch)
    contrastive, (d_image, d_text, d_scale, d_bias) = jax.value_and_grad(
        self.contrastive, argnums=(0, 1, 3, 4))(image_emb, text_emb, labels, scale, bias)
    d_micro = jax.tree.map(lambda x: interleave_microbatches(x, k), (d_image, d_text))
    carry = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()))
    if kept:
      d_last = (*take(d_micro, k - 1), d_scale, d_bias)
      last_grads, = pull_back(jax.grad(share)(last_terms, *d_last))
      carry = (last_grads, last_terms[4])

    def accumulate(carry, j):
      grads, caption_total = carry
      d_img, d_txt = take(d_micro, j)

      def surrogate(p: Any) -> tuple[jax.Array, jax.Array]:
        t = terms(p, take(micro, j), j)
        return share(t, d_img, d_txt, d_scale, d_bias), t[4]

      g, caption = jax.grad(surrogate, has_aux=True)(params)
      return (jax.tree.map(jnp.add, grads, g), caption_total + caption), None

    (grads, caption_total), _ = jax.lax.scan(accumulate, carry, jnp.arange(k - kept))
    caption = caption_total / num_tokens
    loss = c.contrastive_weight * contrastive + c.caption_weight * caption
    return loss, self.metrics(contrastive, caption, scale, bias), grads


def interleave_microbatches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [B/k, k, ...]: micro-batch j (`microbatch(., j)`) is rows j, j+k, ...

  Each device keeps its rows (the leading axis keeps the batch sharding) and the split is a
  reshape, so the batch is never copied: a micro-batch is sliced out where it lies.
  Stacking the micro-batches first ([k, B/k, ...], a transpose) to scan over them made XLA
  copy the whole batch every step (a second copy of the images, the largest input)."""
  if x.shape[0] % k:
    raise ValueError(f"config grad_accum_steps={k} does not divide the batch {x.shape[0]}")
  return x.reshape(x.shape[0] // k, k, *x.shape[1:])


def microbatch(x: jax.Array, j: jax.Array) -> jax.Array:
  """Micro-batch j of `interleave_microbatches`' [B/k, k, ...] -> [B/k, ...]."""
  return jax.lax.dynamic_index_in_dim(x, j, axis=1, keepdims=False)


def merge_microbatches(x: jax.Array) -> jax.Array:
  """Micro-batch results stacked in order [k, B/k, ...] -> [B, ...] in batch row order (row
  i of micro-batch j is batch row i * k + j)."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])
