"""SigLIP's objective: the sigmoid contrastive loss (arXiv 2303.15343) in place of CoCa's
softmax one, with UniCL's label-aware pairs (`config.loss`, name "siglip").

  loss = loss.contrastive_weight * sigmoid contrastive + loss.caption_weight * captioning

Everything but the contrastive term is `CocaObjective`'s: the batch, the targets
(loss.label_aware: same class = positive; False: CLIP-style, own pair only), the optional
captioning term, and exact gradient accumulation (gradient caching differentiates the
contrastive term wrt the cached embeddings, the logit scale t and the bias b).

The model must learn the bias (`model.logit_bias=True`): with the constant bias 0 every
negative starts at sigmoid(0) = 1/2 and dominates the loss, the imbalance the paper's bias
(init -10) corrects. The learned temperature t = exp(t') is capped at model.logit_scale_max
like the softmax losses' (configs/shapes.py:siglip lifts the cap, see there).
"""
import jax
import ml_collections

from configs import schema
from mmjax import losses
from mmjax.objectives.coca import CocaObjective


class SiglipObjective(CocaObjective):
  """CoCa's objective with the sigmoid contrastive term; pure methods like its parent's."""
  section = staticmethod(schema.siglip_loss)

  @staticmethod
  def check(config: ml_collections.ConfigDict) -> list[str]:
    """CoCa's checks, and the model must learn the logit bias."""
    problems = CocaObjective.check(config)
    if "logit_bias" not in config.model:
      problems.append(f"config loss.name='siglip': model.name={config.model.name!r} has no "
                      "learned logit bias; use model.name='coca' with model.logit_bias=True")
    elif not config.model.logit_bias:
      problems.append("config model.logit_bias=False: loss.name='siglip' needs the learned "
                      "logit bias; set model.logit_bias=True")
    return problems

  def contrastive(self, image_emb: jax.Array, text_emb: jax.Array, labels: jax.Array,
                  scale: jax.Array, bias: jax.Array) -> jax.Array:
    """Sigmoid loss of embeddings [B, E], labels [B], t and b: the memory-linear ring over
    the mesh's batch axes (loss.sharded) or the dense B x B form."""
    mesh = self.mesh if self.c.sharded else None
    return losses.siglip_loss(image_emb, text_emb, labels, scale, bias, mesh=mesh,
                              batch_axes=self.batch_axes)

  def metrics(self, contrastive: jax.Array, caption: jax.Array, scale: jax.Array,
              bias: jax.Array) -> dict[str, jax.Array]:
    return dict(super().metrics(contrastive, caption, scale, bias), logit_bias=bias)
