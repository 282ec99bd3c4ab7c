"""mmjax.losses.tokens against independent float64 NumPy references (token cross-entropy;
patch_mse and itm_bce: tests/test_objectives_flava.py)."""
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import token_ce


def _ref_caption(logits, targets, mask):
  lg = np.float64(logits)
  logp = lg - lg.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  total, count = 0.0, 0
  for b in range(lg.shape[0]):
    for t in range(lg.shape[1]):
      if mask[b, t]:
        total -= logp[b, t, targets[b, t]]
        count += 1
  return total / count, count


def test_token_ce_matches_numpy_and_ignores_padding():
  rng = np.random.default_rng(0)
  nb, t, v = 3, 7, 11
  logits = rng.normal(size=(nb, t, v)).astype(np.float32) * 3
  targets = rng.integers(0, v, size=(nb, t)).astype(np.int32)
  lengths = np.array([7, 4, 1])
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  loss, ntok = token_ce(jnp.asarray(logits), targets, mask)
  want, count = _ref_caption(logits, targets, mask)
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  assert float(ntok) == count == lengths.sum()

  changed = logits.copy()
  changed[mask == 0] = rng.normal(size=(int((mask == 0).sum()), v)) * 100
  changed[1, 6, 0] = np.nan  # even non-finite logits at padding must not leak in
  loss2, _ = token_ce(jnp.asarray(changed), targets, mask)
  assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
  # Changing a real token does change it (the check above can fail).
  changed[0, 0, targets[0, 0]] += 5.0  # (a shift of all V logits would cancel)
  assert abs(float(token_ce(jnp.asarray(changed), targets, mask)[0]) - float(loss)) > 1e-4


def test_token_ce_all_padding_is_zero_not_nan():
  loss, ntok = token_ce(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32),
                            jnp.zeros((2, 3)))
  assert float(loss) == 0.0 and float(ntok) == 0.0
