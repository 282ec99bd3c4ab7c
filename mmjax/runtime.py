"""One setup path from a config to everything a command runs: mesh, model, optimizer,
objective, abstract and sharded state, shardings and the batch layout.

  rt = runtime.build(config)                        # train: the whole train state
  with rt.activate():
    state = rt.init_state()                         # or a checkpoint restored onto
    step = rt.lower_train_step().compile()          #   rt.abstract_state / rt.shardings
  rt = runtime.build(config, topology_devices)      # aot: abstract devices of a target
  rt = runtime.build(config, params_only=True)      # evaluate / convert: parameters only

`mmjax.train`, `mmjax.evaluate`, `mmjax.aot`, `mmjax.convert.openclip`, the benchmarks and
the tests all build through here, so what one compiles is what the others run.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from mmjax import errors, models, objectives, optimizer as optimizer_lib, sharding
from mmjax import state as state_lib
from mmjax import step as step_lib
from mmjax.data import sources

# Batch fields. Every pipeline batch has all of them (`mmjax.data.pipeline.TrainIterator`):
# image (uint8 pixels, normalised to [-1, 1] on the device by the model's image entry,
# `mmjax.models.vit.normalize_images`: a quarter of float32's bytes in host memory, in the
# host-to-device copy and in the device's batch buffers), text, label, text_type (the
# example's text kind), source (mixture index), skipped (records substituted to make the
# example) and FLAVA's modality flags has_image, has_text, paired.
BATCH_FIELDS = ("image", "text", "label", "text_type", "source", "skipped", "has_image",
                "has_text", "paired")


def batch_spec(config: ml_collections.ConfigDict,
               batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a global batch (`config.batch_size` rows unless given): image
  uint8 [B, S, S, 3] (S = data.image_size), text int32 [B, data.max_text_len], every other
  field int32 [B]."""
  b = config.batch_size if batch_size is None else batch_size
  size, length = config.data.image_size, config.data.max_text_len
  spec = {"image": ((b, size, size, 3), np.uint8), "text": ((b, length), np.int32)}
  return {name: jax.ShapeDtypeStruct(*spec.get(name, ((b,), np.int32)))
          for name in BATCH_FIELDS}


@dataclasses.dataclass
class Runtime:
  """What `build` makes. `optimizer`, `schedule`, `objective` are None with params_only;
  `abstract_state` is then the abstract parameters and `shardings` theirs."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  model: nn.Module
  optimizer: optax.GradientTransformation | None
  schedule: optax.Schedule | None
  objective: objectives.Objective | None
  abstract_state: Any  # ShapeDtypeStructs carrying their shardings
  shardings: Any

  @contextlib.contextmanager
  def activate(self) -> Iterator[None]:
    """The mesh and logical-axis rules under which the model is traced and run."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.config.mesh.rules):
      yield

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding.batch_sharding(self.mesh, self.config.mesh.rules)

  def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """`batch_spec` with the batch sharding attached (for lowering without data)."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
            for k, v in batch_spec(self.config, batch_size).items()}

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays sharded over the batch axes."""
    return sharding.global_batch(local_batch, self.mesh, self.config.mesh.rules)

  def init_state(self) -> state_lib.TrainState:
    """A fresh train state (seed `config.seed`) created directly sharded."""
    return state_lib.create_state(self.model, self.optimizer, self.config, self.shardings)

  def jit_train_step(self) -> step_lib.TrainStep:
    return step_lib.jit_train_step(self.objective, self.optimizer, self.schedule,
                                   len(sources.active_source_keys(self.config)),
                                   self.shardings, self.batch_sharding,
                                   sharding.replicated(self.mesh),
                                   ema=(self.config.optimizer.ema_decay,
                                        self.config.optimizer.ema_warmup))

  def lower_train_step(self) -> jax.stages.Lowered:
    """`jit_train_step` lowered against `abstract_state` and `abstract_batch()`: what
    `mmjax.train` compiles and runs, and what `mmjax.aot` compiles for a target's abstract
    devices (same function, shardings, donation and micro-batching)."""
    with self.activate():
      return self.jit_train_step().lower(self.abstract_state, self.abstract_batch())


def build(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None, *,
          params_only: bool = False) -> Runtime:
  """Mesh over `devices` (default: all), model, and (unless params_only) optimizer,
  schedule and objective; abstract state or parameters with their shardings. Allocates no
  device memory and creates no concrete array, so it also runs over abstract devices
  (ahead-of-time compilation)."""
  mesh = sharding.make_mesh(config, devices)
  platform = mesh.devices.flat[0].platform
  if config.model.attention_impl == "cudnn" and platform not in ("gpu", "cuda"):
    raise errors.ConfigError(
        f"config model.attention_impl='cudnn' runs only on NVIDIA GPUs, these devices are "
        f"{platform!r}: use --config.model.attention_impl=xla")
  model = models.build_model(config)
  optimizer = schedule = objective = None
  with jax.set_mesh(mesh), nn.logical_axis_rules(config.mesh.rules):
    if params_only:
      abstract, shardings = state_lib.abstract_params(model, config, mesh)
    else:
      optimizer = optimizer_lib.make_optimizer(config)
      schedule = optimizer_lib.make_schedule(config)
      objective = objectives.build(config, model, mesh)
      abstract, shardings = state_lib.abstract_state(model, optimizer, config, mesh)
  return Runtime(config, mesh, model, optimizer, schedule, objective, abstract, shardings)
