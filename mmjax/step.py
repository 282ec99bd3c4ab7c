"""The pure train step `(state, batch) -> (state, metrics)` and its losses.

Batch (global arrays, leading dim B sharded over data x fsdp):
  image float32 [B, H, W, 3]; text int32 [B, L]; label int32 [B] (-1: caption, no class);
  text_type int32 [B] (0 caption, 1 label prompt); skipped int32 [B] (bad records replaced).
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mmjax import fused_xent, losses, sharding
from mmjax.models.coca import PAD_ID
from mmjax.state import TrainState

Batch = dict[str, jax.Array]


class StepFns:
  """Closes over the model and config; every method is a pure function of its inputs."""

  def __init__(self, model: nn.Module, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, config: ml_collections.ConfigDict, mesh: Mesh):
    self.model, self.optimizer, self.schedule = model, optimizer, schedule
    self.config, self.mesh = config, mesh
    self.with_captions = config.loss.caption_weight > 0
    # FLAVA has its own objective (masks, ITM negatives, phases); CoCa/UniCL use the below.
    self.flava = None
    if config.model.name == "flava":
      from mmjax import flava_objectives
      self.flava = flava_objectives.FlavaObjective(model, config, mesh)

  # --- losses ---------------------------------------------------------------------------
  def contrastive_labels(self, batch: Batch) -> jax.Array:
    """UniCL targets come from labels; CLIP gives every pair its own class (-1)."""
    if self.config.loss.label_aware:
      return batch["label"]
    return jnp.full_like(batch["label"], -1)

  def contrastive(self, image_emb: jax.Array, text_emb: jax.Array, labels: jax.Array,
                  logit_scale: jax.Array) -> jax.Array:
    mesh = self.mesh if self.config.loss.sharded else None
    return losses.unicl_loss(image_emb, text_emb, labels, logit_scale, mesh=mesh,
                             batch_axes=sharding.BATCH_AXES)

  def caption_mask(self, batch: Batch) -> jax.Array:
    """[B, L-1] float: 1 where the next token is real text (padding never counts)."""
    mask = batch["text"][:, 1:] != PAD_ID
    if not self.config.loss.caption_loss_on_labels:
      mask &= (batch["text_type"] == 0)[:, None]
    return mask.astype(jnp.float32)

  def caption_sum(self, out: dict[str, jax.Array], batch: Batch) -> jax.Array:
    """Summed token cross-entropy over the caption mask (normalised by the caller); from
    the logits, or fused with the head in chunks (loss.caption_chunk_size > 0)."""
    mask, targets = self.caption_mask(batch), batch["text"][:, 1:]
    if "caption_logits" in out:
      mean, count = losses.caption_loss(out["caption_logits"], targets, mask)
    else:
      embed_axes, vocab_axis = nn.logical_to_mesh_axes(("embed", "vocab"),
                                                       self.config.mesh.rules)
      mean, count = fused_xent.fused_caption_loss(
          out["caption_features"], out["caption_kernel"], targets, mask,
          chunk_size=self.config.loss.caption_chunk_size, mesh=self.mesh,
          batch_axes=sharding.BATCH_AXES, vocab_axis=vocab_axis, embed_axes=embed_axes)
    return mean * count

  def forward(self, params: Any, batch: Batch, with_captions: bool) -> dict[str, jax.Array]:
    return self.model.apply({"params": params}, batch["image"], batch["text"],
                            batch["text_type"], with_captions=with_captions,
                            fused_head=self.config.loss.caption_chunk_size > 0)

  def loss(self, params: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted CoCa/UniCL objective over the whole batch."""
    c = self.config.loss
    out = self.forward(params, batch, self.with_captions)
    contrastive = self.contrastive(out["image_emb"], out["text_emb"],
                                   self.contrastive_labels(batch), out["logit_scale"])
    num_tokens = self.caption_mask(batch).sum()
    caption = (self.caption_sum(out, batch) / jnp.maximum(num_tokens, 1.0)
               if self.with_captions else jnp.zeros(()))
    loss = c.contrastive_weight * contrastive + c.caption_weight * caption
    return loss, dict(contrastive_loss=contrastive, caption_loss=caption,
                      logit_scale=out["logit_scale"])

  # --- gradients --------------------------------------------------------------------------
  def grads(self, params: Any, batch: Batch) -> tuple[jax.Array, dict, Any]:
    if self.config.grad_accum_steps == 1:
      (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(params, batch)
      return loss, aux, grads
    return self.accumulated_grads(params, batch)

  def accumulated_grads(self, params: Any, batch: Batch) -> tuple[jax.Array, dict, Any]:
    """Exact gradient accumulation for a contrastive loss (gradient caching).

    1. Embed every micro-batch without gradients. 2. Differentiate the contrastive loss of
    the whole batch with respect to the cached embeddings. 3. Re-run each micro-batch with
    gradients, back-propagating those embedding gradients plus its caption loss. Every
    negative of the full batch is seen; activation memory is one micro-batch's.
    """
    c, k = self.config.loss, self.config.grad_accum_steps
    micro = jax.tree.map(lambda x: split_microbatches(x, k), batch)

    def embed(mb: Batch) -> tuple[jax.Array, jax.Array]:
      out = self.forward(params, mb, with_captions=False)
      return out["image_emb"], out["text_emb"]

    image_emb, text_emb = jax.tree.map(merge_microbatches, jax.lax.map(embed, micro))
    logit_scale = self.model.apply({"params": params}, method="logit_scale")
    labels = self.contrastive_labels(batch)
    contrastive, (d_image, d_text, d_scale) = jax.value_and_grad(
        self.contrastive, argnums=(0, 1, 3))(image_emb, text_emb, labels, logit_scale)
    num_tokens = jnp.maximum(self.caption_mask(batch).sum(), 1.0)
    cotangents = jax.tree.map(lambda x: split_microbatches(x, k), (d_image, d_text))

    def surrogate(p: Any, mb: Batch, d_img: jax.Array, d_txt: jax.Array):
      """Its gradient wrt p is this micro-batch's share of the full-batch gradient."""
      out = self.forward(p, mb, self.with_captions)
      value = c.contrastive_weight * (jnp.vdot(out["image_emb"], d_img)
                                      + jnp.vdot(out["text_emb"], d_txt)
                                      + out["logit_scale"] * d_scale / k)
      caption = (self.caption_sum(out, mb) if self.with_captions
                 else jnp.zeros(()))
      return value + c.caption_weight * caption / num_tokens, caption

    def accumulate(carry, xs):
      grads, caption_total = carry
      g, caption = jax.grad(surrogate, has_aux=True)(params, *xs)
      return (jax.tree.map(jnp.add, grads, g), caption_total + caption), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, caption_total), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros(())),
                                             (micro, *cotangents))
    caption = caption_total / num_tokens
    loss = c.contrastive_weight * contrastive + c.caption_weight * caption
    return loss, dict(contrastive_loss=contrastive, caption_loss=caption,
                      logit_scale=logit_scale), grads

  # --- the step ---------------------------------------------------------------------------
  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    if self.flava is not None:
      loss, aux, grads = self.flava.grads(state.params, batch, state.step)
    else:
      loss, aux, grads = self.grads(state.params, batch)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite step leaves parameters and optimizer state exactly as they were.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
    metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=self.schedule(state.step),
                   finite=finite, nonfinite_steps=new_state.nonfinite_steps,
                   skipped_records=batch["skipped"].sum(), **aux)
    return new_state, metrics


def split_microbatches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...], micro-batch j = rows j, j+k, ...: each device keeps its rows."""
  if x.shape[0] % k:
    raise ValueError(f"config grad_accum_steps={k} does not divide the batch {x.shape[0]}")
  return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def merge_microbatches(x: jax.Array) -> jax.Array:
  """Inverse of `split_microbatches`."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def jit_train_step(fns: StepFns, state_shardings: Any,
                   mesh: Mesh) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Jitted once with explicit shardings; the old state is donated."""
  return jax.jit(fns.train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
