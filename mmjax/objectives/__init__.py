"""Training objectives, chosen by `config.loss.name` from `OBJECTIVES`.

An objective is built once from (config, model, mesh) and exposes pure functions of its
inputs, closed over by the jitted train step (`mmjax.step.train_step`):
  loss(params, batch, step) -> (scalar loss, metrics)  the objective on one batch
  grads(params, batch, step) -> (loss, metrics, grads) what the step applies, including any
                                                       gradient accumulation the objective
                                                       needs to stay exact
`batch` is `mmjax.data.pipeline`'s global batch (see `mmjax.runtime.batch_spec`); `step` is
the int32 train-state step (schedules and masks may depend on it).

An objective class also owns its `loss` keys (`Objective` below): `section` (its
configs/schema.py `<name>_loss`), `check(config)` (`mmjax.cli.validate` runs it through
`check` here), the source modalities it trains on, and its data hook `unimodal_steps`
(the pipeline takes the number, so it knows no objective). A new objective is its module,
one line in OBJECTIVES and its section in configs/schema.py.
"""
from typing import Any, Protocol

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from mmjax import param_groups
from mmjax.data import transforms
from mmjax.objectives import coca, flava, siglip

Batch = dict[str, jax.Array]


class Objective(Protocol):
  """What an entry of OBJECTIVES provides: on the class, its schema section, its checks, the
  data views it trains on and its data hook; built, the two pure functions."""
  section: Any  # () -> its `loss` section, configs/schema.py `<name>_loss`
  modalities: tuple[str, ...]  # the data.sources.*.modality views it trains on

  @staticmethod
  def check(config: ml_collections.ConfigDict) -> list[str]: ...  # its keys' problems

  @staticmethod
  def unimodal_steps(config: ml_collections.ConfigDict) -> int: ...  # see the pipeline

  def loss(self, params: Any, batch: Batch,
           step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]: ...

  def grads(self, params: Any, batch: Batch,
            step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], Any]: ...


OBJECTIVES = {
    "coca": coca.CocaObjective,  # contrastive (CLIP / UniCL targets) + captioning
    "flava": flava.FlavaObjective,  # MLM, MIM, MMM, ITM, contrastive
    "siglip": siglip.SiglipObjective,  # sigmoid contrastive (SigLIP / label-aware) + captioning
}


def check(config: ml_collections.ConfigDict) -> list[str]:
  """Problems of `config.loss`, one line each: the objective's own (`check`), and every
  source viewed in a modality it does not train on."""
  name = config.loss.name
  if name not in OBJECTIVES:
    return [f"config loss.name={name!r}: choose one of {list(OBJECTIVES)}"]
  objective = OBJECTIVES[name]
  users = [n for n, o in OBJECTIVES.items() if set(transforms.MODALITIES) <= set(o.modalities)]
  problems = [f"config data.sources.{key}.modality={source.modality!r}: unimodal views need "
              f"an objective that uses them (loss.name={' or '.join(map(repr, users))}), "
              f"not {name!r}"
              for key, source in config.data.sources.items()
              if source.modality in transforms.MODALITIES
              and source.modality not in objective.modalities]
  return problems + objective.check(config)


def unimodal_steps(config: ml_collections.ConfigDict) -> int:
  """Steps at the start of training whose batches come from the unimodal sources only
  (`mmjax.data.pipeline`; the objective's hook, 0 for all but FLAVA)."""
  return OBJECTIVES[config.loss.name].unimodal_steps(config)


def build(config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh | None) -> Objective:
  """The objective `config.loss.name` for `model` on `mesh` (None: single-device losses).

  Parameters locked for the whole run (`optimizer.frozen`, no `frozen_until_step`) reach
  the model through `lax.stop_gradient`: their gradient is never computed, and a tower that
  is locked whole has no backward pass (XLA gets no computation for it)."""
  o = config.optimizer
  if o.frozen and not o.frozen_until_step:
    model = param_groups.StopGradientModel(model, o.frozen)
  return OBJECTIVES[config.loss.name](config, model, mesh)
