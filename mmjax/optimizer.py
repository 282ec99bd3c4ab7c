"""Optimisers and learning-rate schedules (optax): AdamW and the CoCa paper's Adafactor.

Every optimizer ends by projecting the logit-scale parameter back under log(max): the model
cannot push it past the cap and freeze there (see `project_logit_scale`). Fine-tuning
switches (`mmjax.param_groups` picks the parameters by path):
  optimizer.frozen             locked parameters: no optimizer state, no update, no decay
  optimizer.frozen_until_step  ... only for the first N updates (`make_optimizer`)
  optimizer.layer_decay        layer-wise learning-rate decay (`scale_by_layer`)
"""
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mmjax import param_groups

# Parameters that are never weight-decayed: biases, norms, position embeddings, learned
# queries/prefix/CLS and the logit scale and bias (matched on the last path element).
NO_DECAY_NAMES = ("bias", "scale", "pos_embed", "logit_scale", "logit_bias", "queries", "prefix",
                  "cls")
LOGIT_SCALE_NAME = "logit_scale"  # the models' learned log of the contrastive logit scale


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to the peak, then cosine or linear decay until `total_steps`."""
  o = config.optimizer
  peak, warmup = o.learning_rate, o.warmup_steps
  decay_steps = max(config.total_steps - warmup, 1)
  end = peak * o.end_learning_rate_fraction
  if o.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.end_learning_rate_fraction)
  elif o.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    raise ValueError(f"config optimizer.schedule={o.schedule!r}: choose 'cosine' or 'linear'")
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params) -> dict:
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {path: path[-1] not in NO_DECAY_NAMES for path in flat})


def adam_beta2(step: jax.Array, beta2: float) -> jax.Array:
  """Adafactor's second-moment decay for Adam's beta2, bias correction folded in.

  With beta2_hat(t) = beta2 (1 - beta2^(t-1)) / (1 - beta2^t) at update t = step + 1, the
  running average v_t = beta2_hat v_(t-1) + (1 - beta2_hat) g_t^2 equals Adam's
  bias-corrected second moment (1 - beta2) sum_k beta2^(t-k) g_k^2 / (1 - beta2^t).
  praxis ShardedAdafactor's decay_method="adam" (lingvo's Adafactor lineage).
  1 - beta2^t is computed as -expm1(t log beta2), log in float64: in float32, 1 - 0.999^t
  by subtraction loses ~4 of 7 digits for small t.
  """
  log_beta2 = math.log(float(beta2))
  t = step.astype(jnp.float32) + 1.0
  return beta2 * jnp.expm1((t - 1.0) * log_beta2) / jnp.expm1(t * log_beta2)


def adafactor(config: ml_collections.ConfigDict,
              schedule: optax.Schedule) -> optax.GradientTransformation:
  """The CoCa paper's Adafactor (b1, b2 and decoupled weight decay from `config.optimizer`).

  optax.adafactor's chain, with the paper's Adam-style beta2 and a weight decay that follows
  the learning rate. For each parameter p with gradient g, at update t (lr_t = schedule):
    v_t   = beta2_hat(t) v_(t-1) + (1 - beta2_hat(t)) (g^2 + 1e-30)  (factored: row / column
            means of g^2 for the two largest axes when both have >= min_dim_size_to_factor,
            v_hat = row x col / mean(row); otherwise elementwise); beta2_hat = `adam_beta2`
    u_t   = g / sqrt(v_t), divided by max(1, rms(u_t) / update_clip_threshold)
    m_t   = b1 m_(t-1) + (1 - b1) lr_t u_t                       (EMA, no bias correction)
    p    <- p - m_t - weight_decay lr_t p                         (decay: masked by decay_mask)
  lr inside the momentum and weight decay times lr_t follow praxis ShardedAdafactor (the
  paper's codebase lineage); configs/coca.py says what the paper states and what is ours.
  """
  o = config.optimizer
  return optax.chain(
      optax.scale_by_factored_rms(decay_rate=o.b2, decay_rate_fn=adam_beta2,
                                  min_dim_size_to_factor=o.min_dim_size_to_factor),
      optax.clip_by_block_rms(o.update_clip_threshold) if o.update_clip_threshold
      else optax.identity(),
      optax.scale_by_learning_rate(schedule, flip_sign=False),
      optax.ema(o.b1, debias=False),
      optax.add_decayed_weights(lambda step: o.weight_decay * schedule(step), mask=decay_mask),
      optax.scale(-1.0))


def project_logit_scale(max_scale: float) -> optax.GradientTransformation:
  """Updates that leave every `logit_scale` parameter (a log-scale) at most log(max_scale).

  Why: capping exp(log_scale) in the forward pass has a zero gradient past the cap, so a
  parameter that crosses it never comes back. Projecting the parameter itself after each
  update, as open_clip clamps `logit_scale` after each optimizer step, keeps it where the
  gradient acts. Must be the last transformation (it sees the final update).
  """
  bound = math.log(max_scale)

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)

    def project(path, update, param):
      if getattr(path[-1], "key", None) != LOGIT_SCALE_NAME:
        return update
      return jnp.minimum(param + update, bound) - param

    return jax.tree_util.tree_map_with_path(project, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_layer(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its layer's factor (`param_groups.layer_scales`): a scanned
  stack's [L, ...] update row by row. Placed after the whole optimizer (weight decay and, for
  Adafactor, the momentum included), a constant factor s on a parameter's final update is the
  same as running that parameter at s times the learning rate."""
  def update_fn(updates, state, params=None):
    del params
    scales = param_groups.layer_scales(updates, decay)
    return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def lock_labels(config: ml_collections.ConfigDict):
  """params -> a tree of "trained" | "locked" labels (optax.multi_transform's)."""
  pattern = config.optimizer.frozen
  return lambda params: jax.tree.map(lambda locked: "locked" if locked else "trained",
                                     param_groups.matches(pattern, params))


def core_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  o = config.optimizer
  if o.name == "adamw":
    return optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                       mask=decay_mask)
  if o.name == "adafactor":
    return adafactor(config, schedule)
  raise ValueError(f"config optimizer.name={o.name!r}: choose 'adamw' or 'adafactor'")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip -> AdamW or Adafactor -> layer-wise scale -> logit-scale projection.

  With `optimizer.frozen` the locked parameters get `optax.set_to_zero` through
  `optax.multi_transform`: the optimizer's state holds nothing for them (optax.MaskedNode)
  and no update or weight decay reaches them (the objective also stops their gradient,
  `mmjax.objectives.build`). With `optimizer.frozen_until_step=N` they are locked for the
  first N updates and then train: their gradient is zeroed before the global-norm clip while
  locked (the trained parameters see exactly what a permanent lock gives them), and they get
  an optimizer of their own that starts at update N (optax.conditionally_mask: state
  untouched and update zero before). Its learning rate follows the run's schedule from step
  N on, and its step count (Adam's bias correction, Adafactor's beta2) starts at the unlock,
  as for a fresh optimizer: an unlocked tower is not hit with moments it never accumulated.
  """
  o = config.optimizer
  schedule = make_schedule(config)
  clip = optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm else optax.identity()
  core = core_optimizer(config, schedule)
  parts = [clip, core]
  if o.frozen:
    labels = lock_labels(config)
    until = o.frozen_until_step
    if until:
      unlocked = lambda count: count >= until
      gate = optax.multi_transform(
          {"trained": optax.identity(),
           "locked": optax.transforms.conditionally_mask(optax.identity(), unlocked)}, labels)
      later = optax.transforms.conditionally_mask(
          core_optimizer(config, lambda count: schedule(count + until)), unlocked)
      parts = [gate, clip, optax.multi_transform({"trained": core, "locked": later}, labels)]
    else:
      parts = [clip, optax.multi_transform({"trained": core, "locked": optax.set_to_zero()},
                                           labels)]
  if o.layer_decay != 1.0:
    parts.append(scale_by_layer(o.layer_decay))
  return optax.chain(*parts, project_logit_scale(config.model.logit_scale_max))


def check(config: ml_collections.ConfigDict, params: Any) -> list[str]:
  """Problems with the optimizer's keys for this parameter tree (abstract is enough), one
  line each, naming the key."""
  o = config.optimizer
  problems = param_groups.check_frozen(o.frozen, params)
  if not 0.0 < o.layer_decay <= 1.0:
    problems.append(f"config optimizer.layer_decay={o.layer_decay} must be in (0, 1] "
                    "(1 = off; BEiT and open_clip fine-tune ViT-B with 0.65-0.75)")
  if not 0.0 <= o.ema_decay < 1.0:
    problems.append(f"config optimizer.ema_decay={o.ema_decay} must be in [0, 1) (0 = off; "
                    "e.g. 0.9999)")
  if config.eval_use_ema and not o.ema_decay:
    problems.append("config eval_use_ema=True needs optimizer.ema_decay > 0 (the run keeps no "
                    "EMA of the parameters without it)")
  if o.frozen_until_step < 0:
    problems.append(f"config optimizer.frozen_until_step={o.frozen_until_step} must be >= 0 "
                    "(0 = locked for the whole run)")
  elif o.frozen_until_step and not o.frozen:
    problems.append(f"config optimizer.frozen_until_step={o.frozen_until_step} needs "
                    "optimizer.frozen (the parameters to lock)")
  return problems
