"""Optimisers and learning-rate schedules (optax): AdamW and the CoCa paper's Adafactor."""
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameters that are never weight-decayed: biases, norms, position embeddings, learned
# queries/prefix/CLS and the logit scale and bias (matched on the last path element).
NO_DECAY_NAMES = ("bias", "scale", "pos_embed", "logit_scale", "logit_bias", "queries", "prefix",
                  "cls")


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


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optimizer
  schedule = make_schedule(config)
  clip = optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm else optax.identity()
  if o.name == "adamw":
    return optax.chain(clip, optax.adamw(schedule, b1=o.b1, b2=o.b2,
                                         weight_decay=o.weight_decay, mask=decay_mask))
  if o.name == "adafactor":
    # The paper's Adafactor: factored second moments with beta2 capped at b2, momentum b1,
    # decoupled weight decay (added after the preconditioner, scaled by the schedule).
    beta2 = lambda step, exponent: jnp.minimum(1.0 - (step + 1.0) ** (-exponent), o.b2)
    return optax.chain(
        clip, optax.scale_by_factored_rms(decay_rate=0.8, decay_rate_fn=beta2),
        optax.trace(decay=o.b1), optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule))
  raise ValueError(f"config optimizer.name={o.name!r}: choose 'adamw' or 'adafactor'")
