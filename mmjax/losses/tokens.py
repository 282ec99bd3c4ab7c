"""Per-token and per-example losses, each a mean over weighted positions: token
cross-entropy (captioning, MLM), patch regression (MIM), binary image-text matching (ITM)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _weighted_mean(values: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """sum(w * v) / max(sum(w), 1) with where() so NaN/inf at weight 0 cannot leak in."""
  weights = weights.astype(jnp.float32)
  total = jnp.where(weights > 0, values * weights, 0.0).sum()
  count = weights.sum()
  return total / jnp.maximum(count, 1.0), count


def token_ce(logits: jax.Array, targets: jax.Array,
             weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy averaged over positions with weight 1.

  logits float [..., V], targets int [...], weights [...] (0/1). Returns (mean, count).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return _weighted_mean(nll, weights)


def patch_mse(pred: jax.Array, target: jax.Array,
              weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-patch mean squared error (over the P values) averaged over weighted patches.
  pred, target [B, N, P]; weights [B, N]. Returns (mean, count)."""
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)).mean(-1)
  return _weighted_mean(err, weights)


def itm_bce(logit: jax.Array, match: jax.Array,
            weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Binary cross-entropy of match (1) / mismatch (0). logit [B], match [B], weights [B]."""
  logit = logit.astype(jnp.float32)
  y = match.astype(jnp.float32)
  nll = -(y * jax.nn.log_sigmoid(logit) + (1 - y) * jax.nn.log_sigmoid(-logit))
  return _weighted_mean(nll, weights)
