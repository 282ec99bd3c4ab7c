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
  # The parameters' exponential moving average (optimizer.ema_decay > 0, `mmjax.step`):
  # sharded like them, checkpointed with them; None when off.
  ema_params: Any = None


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
    opt_state = box_like_params(optimizer.init(nn.unbox(params)), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      nonfinite_steps=jnp.zeros((), jnp.int32),
                      ema_params=params if config.optimizer.ema_decay else None)
  return init


def box_like_params(opt_state: Any, boxed_params: Any) -> Any:
  """Gives optimizer-state leaves their parameter's logical axis names.

  Every sub-tree of `opt_state` shaped like the parameter tree (AdamW's mu and nu,
  Adafactor's factored statistics) is matched leaf by leaf: a leaf of the parameter's shape
  takes its names; one with a single axis removed (Adafactor's row / column statistics)
  takes the names without that axis; anything else (scalars, Adafactor's (1,) placeholders)
  stays replicated. Initialising optax on boxed parameters instead would copy each
  parameter's names onto factored statistics of a lower rank, an invalid sharding. A tree
  with optax.MaskedNode where parameters are locked (`optimizer.frozen`) matches too.
  """
  treedef = jax.tree.structure(boxed_params, is_leaf=_is_boxed)
  boxes = treedef.flatten_up_to(boxed_params)

  def box(leaf: jax.Array, param: nn.Partitioned) -> Any:
    if not isinstance(param, nn.Partitioned) or isinstance(leaf, optax.MaskedNode):
      return leaf
    shape, names = param.value.shape, tuple(param.names)
    if leaf.shape == shape:
      return param.replace_boxed(leaf)
    for axis in range(len(shape)):
      if leaf.shape == shape[:axis] + shape[axis + 1:]:
        return param.replace(value=leaf, names=names[:axis] + names[axis + 1:])
    return leaf

  param_def = jax.tree.structure(nn.unbox(boxed_params))
  masked = lambda node: isinstance(node, optax.MaskedNode)
  is_param_tree = lambda node: jax.tree.structure(node, is_leaf=masked) == param_def

  def visit(node: Any) -> Any:
    if is_param_tree(node):
      leaves = jax.tree.structure(node, is_leaf=masked).flatten_up_to(node)
      return treedef.unflatten(map(box, leaves, boxes))
    return node

  return jax.tree.map(visit, opt_state, is_leaf=is_param_tree)


def _is_boxed(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation,
                   config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Any, Any]:
  """(abstract unboxed state with shardings attached, shardings). Nothing concrete is
  created, not even the rng key: this also runs over a mesh of abstract (ahead-of-time)
  devices."""
  init = make_init_fn(model, optimizer, config)
  return _with_shardings(jax.eval_shape(lambda: init(jax.random.key(0))), mesh, config)


def abstract_params(model: nn.Module, config: ml_collections.ConfigDict,
                    mesh: Mesh) -> tuple[Any, Any]:
  """(abstract unboxed parameters with shardings attached, shardings): what evaluation and
  conversion restore, without an optimizer."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config)))
  return _with_shardings(boxed["params"], mesh, config)


def _with_shardings(boxed: Any, mesh: Mesh, config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  shardings = sharding.logical_shardings(boxed, mesh, config.mesh.rules)
  unboxed = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_boxed(x) else x,
                         boxed, is_leaf=_is_boxed)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          unboxed, shardings)
  return abstract, shardings


def create_state(model: nn.Module, optimizer: optax.GradientTransformation,
                 config: ml_collections.ConfigDict, shardings: Any) -> TrainState:
  """Initialises parameters and optimizer state directly sharded (never whole on a device)."""
  init = make_init_fn(model, optimizer, config)
  return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(
      jax.random.key(config.seed))
