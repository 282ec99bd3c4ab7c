"""Train state, created abstractly first and then directly sharded on the mesh."""
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mmjax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: number of updates applied
  params: Any
  opt_state: Any
  nonfinite_steps: jax.Array  # int32 []: updates skipped for a non-finite loss or gradient


def dummy_inputs(config: ml_collections.ConfigDict, batch_size: int = 1) -> tuple:
  """Shape-only model inputs: images [B, H, W, 3], text [B, L], text_type [B]."""
  size = config.model.image_size
  return (jnp.zeros((batch_size, size, size, 3), jnp.float32),
          jnp.zeros((batch_size, config.data.max_text_len), jnp.int32),
          jnp.zeros((batch_size,), jnp.int32))


def make_init_fn(model: nn.Module, optimizer: optax.GradientTransformation,
                 config: ml_collections.ConfigDict) -> Callable[[jax.Array], TrainState]:
  """rng -> TrainState whose leaves are boxed with logical axis names."""
  def init(rng: jax.Array) -> TrainState:
    params = model.init(rng, *dummy_inputs(config))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      nonfinite_steps=jnp.zeros((), jnp.int32))
  return init


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation,
                   config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Any, Any]:
  """(abstract unboxed state with shardings attached, shardings). No device memory used."""
  boxed = jax.eval_shape(make_init_fn(model, optimizer, config), jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh, config.mesh.rules)
  unboxed = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(
      x, nn.Partitioned) else x, boxed,
                         is_leaf=lambda x: isinstance(x, nn.Partitioned))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          unboxed, shardings)
  return abstract, shardings


def create_state(model: nn.Module, optimizer: optax.GradientTransformation,
                 config: ml_collections.ConfigDict, shardings: Any) -> TrainState:
  """Initialises parameters and optimizer state directly sharded (never whole on a device)."""
  init = make_init_fn(model, optimizer, config)
  return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(
      jax.random.key(config.seed))
