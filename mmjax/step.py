"""The pure train step `(state, batch) -> (state, metrics)`, jitted once.

The objective (`mmjax.objectives`) gives the loss, its metrics and the gradients (with any
accumulation it needs); the step applies the optimizer, guards against non-finite updates
and counts. Everything the step needs besides (state, batch) is bound with
`functools.partial` before jitting, so the jitted function is a pure function of them.
"""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Sharding

from mmjax.data import accounting
from mmjax.objectives import Objective
from mmjax.state import TrainState

Batch = dict[str, jax.Array]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def ema_decay(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """The EMA's decay at update `step` + 1: `decay`, or with warm-up
  min(decay, (1 + step) / (10 + step)) (TensorFlow's ExponentialMovingAverage)."""
  if not warmup:
    return jnp.float32(decay)
  t = step.astype(jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def update_ema(ema: Any, params: Any, decay: jax.Array) -> Any:
  """ema <- decay * ema + (1 - decay) * params, per leaf in the parameters' dtype."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def train_step(state: TrainState, batch: Batch, *, objective: Objective,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               num_sources: int, ema: tuple[float, bool] = (0.0, False)
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update. Metrics: loss, grad_norm, learning_rate, finite, nonfinite_steps,
  data_counts (int32 [3, num_sources]: this global batch's examples, bad draws and skipped
  records per source, `mmjax.data.accounting`) and the objective's own. `ema`: (decay,
  warm-up) of `state.ema_params` (decay 0: there is none)."""
  loss, aux, grads = objective.grads(state.params, batch, state.step)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A non-finite step leaves parameters and optimizer state exactly as they were.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  ema_params = state.ema_params
  if ema[0]:
    ema_params = keep(update_ema(ema_params, params, ema_decay(state.step, *ema)), ema_params)
  new_state = TrainState(
      step=state.step + 1, params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
      ema_params=ema_params)
  metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                 finite=finite, nonfinite_steps=new_state.nonfinite_steps,
                 data_counts=accounting.batch_counts(batch, num_sources), **aux)
  return new_state, metrics


def jit_train_step(objective: Objective, optimizer: optax.GradientTransformation,
                   schedule: optax.Schedule, num_sources: int, state_shardings: Any,
                   batch_shardings: Any, metrics_sharding: Sharding,
                   ema: tuple[float, bool] = (0.0, False)) -> TrainStep:
  """`train_step` jitted with explicit shardings; the old state is donated."""
  step = functools.partial(train_step, objective=objective, optimizer=optimizer,
                           schedule=schedule, num_sources=num_sources, ema=ema)
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, metrics_sharding), donate_argnums=0)
