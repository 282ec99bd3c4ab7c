"""Training objectives, chosen by `config.loss.name` from `OBJECTIVES`.

An objective is built once from (config, model, mesh) and exposes pure functions of its
inputs, closed over by the jitted train step (`mmjax.step.train_step`):
  loss(params, batch, step) -> (scalar loss, metrics)  the objective on one batch
  grads(params, batch, step) -> (loss, metrics, grads) what the step applies, including any
                                                       gradient accumulation the objective
                                                       needs to stay exact
`batch` is `mmjax.data.pipeline`'s global batch (see `mmjax.runtime.batch_spec`); `step` is
the int32 train-state step (schedules and masks may depend on it).
"""
from typing import Any, Protocol

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from mmjax import param_groups
from mmjax.objectives import coca, flava, siglip

Batch = dict[str, jax.Array]


class Objective(Protocol):

  def loss(self, params: Any, batch: Batch,
           step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]: ...

  def grads(self, params: Any, batch: Batch,
            step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], Any]: ...


OBJECTIVES = {
    "coca": coca.CocaObjective,  # contrastive (CLIP / UniCL targets) + captioning
    "flava": flava.FlavaObjective,  # MLM, MIM, MMM, ITM, contrastive
    "siglip": siglip.SiglipObjective,  # sigmoid contrastive (SigLIP / label-aware) + captioning
}


def build(config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh | None) -> Objective:
  """The objective `config.loss.name` for `model` on `mesh` (None: single-device losses).

  Parameters locked for the whole run (`optimizer.frozen`, no `frozen_until_step`) reach
  the model through `lax.stop_gradient`: their gradient is never computed, and a tower that
  is locked whole has no backward pass (XLA gets no computation for it)."""
  o = config.optimizer
  if o.frozen and not o.frozen_until_step:
    model = param_groups.StopGradientModel(model, o.frozen)
  return OBJECTIVES[config.loss.name](config, model, mesh)
