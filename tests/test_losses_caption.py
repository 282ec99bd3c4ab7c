"""mmjax.losses.fused_caption_loss (the captioning head fused with its cross-entropy, in
token chunks) against a float64 NumPy reference and against the plain logits path.

Sharded cases use 8 fake CPU devices (tests/conftest.py), the vocabulary split over
`tensor` as configs/schema.py's mesh rules split the `vocab` axis.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import losses
from mmjax.losses import fused_caption_loss

B, T, D, V = 8, 7, 16, 32


def ref_loss_and_grads(hidden, kernel, targets, mask):
  """float64: mean NLL over mask, and its gradients wrt hidden [B, T, D], kernel [D, V]."""
  h, w = np.float64(hidden), np.float64(kernel)
  logits = h @ w
  logits = logits - logits.max(-1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  one_hot = np.eye(w.shape[1])[targets]
  count = mask.sum()
  nll = -np.log((probs * one_hot).sum(-1))
  loss = (nll * mask).sum() / count
  d_logits = (probs - one_hot) * mask[..., None] / count
  return loss, d_logits @ w.T, np.einsum("btd,btv->dv", h, d_logits)


def inputs(seed=0, dtype=np.float32, t=T):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(B, t, D)).astype(dtype)
  kernel = (rng.normal(size=(D, V)) * 0.5).astype(np.float32)
  targets = rng.integers(0, V, size=(B, t)).astype(np.int32)
  lengths = rng.integers(1, t + 1, size=B)
  lengths[0] = t  # one row without padding
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  return hidden, kernel, targets, mask


def value_and_grads(hidden, kernel, targets, mask, **kw):
  fn = lambda h, w: fused_caption_loss(h, w, targets, mask, **kw)[0]
  loss, (dh, dw) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(hidden, kernel)
  return float(loss), np.asarray(dh, np.float64), np.asarray(dw, np.float64)


def assert_close(got, want, rtol):
  """Relative to the largest entry (gradient entries at padding are exactly zero)."""
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("chunk_size", [1, 3, T, T + 2])
def test_matches_float64_reference(chunk_size):
  hidden, kernel, targets, mask = inputs()
  loss, dh, dw = value_and_grads(hidden, kernel, targets, mask, chunk_size=chunk_size)
  want_loss, want_dh, want_dw = ref_loss_and_grads(hidden, kernel, targets, mask)
  assert loss == pytest.approx(want_loss, rel=1e-6)
  assert_close(dh, want_dh, 1e-5)
  assert_close(dw, want_dw, 1e-5)
  assert np.all(dh[mask == 0] == 0)
  # Without differentiation only the loss is computed; the same value.
  primal = fused_caption_loss(hidden, kernel, targets, mask, chunk_size=chunk_size)
  assert float(primal[0]) == pytest.approx(loss, rel=1e-6) and float(primal[1]) == mask.sum()


def test_padded_tokens_change_nothing():
  hidden, kernel, targets, mask = inputs()
  reference = value_and_grads(hidden, kernel, targets, mask, chunk_size=3)
  changed_hidden, changed_targets = hidden.copy(), targets.copy()
  rng = np.random.default_rng(1)
  changed_hidden[mask == 0] = rng.normal(size=(int((mask == 0).sum()), D)) * 100
  changed_targets[mask == 0] = rng.integers(0, V, size=int((mask == 0).sum()))
  changed = value_and_grads(changed_hidden, kernel, changed_targets, mask, chunk_size=3)
  assert changed[0] == pytest.approx(reference[0], rel=1e-6)
  assert_close(changed[1], reference[1], 1e-6)
  assert_close(changed[2], reference[2], 1e-6)
  # A real token does count (the check above can fail).
  changed_hidden[0, 0] += 1.0
  assert abs(value_and_grads(changed_hidden, kernel, targets, mask, chunk_size=3)[0]
             - reference[0]) > 1e-4


def test_tied_embedding_table_passed_transposed():
  """A tied head computes h @ E.T; the gradient reaches E [V, D] through the transpose."""
  hidden, kernel, targets, mask = inputs(seed=2)
  table = kernel.T.copy()
  fn = lambda h, e: fused_caption_loss(h, e.T, targets, mask, chunk_size=2)[0]
  loss, (dh, de) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(hidden, table)
  want_loss, want_dh, want_dw = ref_loss_and_grads(hidden, kernel, targets, mask)
  assert float(loss) == pytest.approx(want_loss, rel=1e-6)
  assert_close(np.asarray(dh), want_dh, 1e-5)
  assert_close(np.asarray(de), want_dw.T, 1e-5)


def plain_value_and_grads(hidden, kernel, targets, mask):
  """The model's path: logits in hidden's dtype (nn.Dense(dtype=...)), float32 loss."""
  def fn(h, w):
    logits = jnp.dot(h, w.astype(h.dtype)).astype(jnp.float32)
    return losses.token_ce(logits, targets, mask)[0]
  loss, (dh, dw) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(hidden, kernel)
  return float(loss), np.asarray(dh, np.float64), np.asarray(dw, np.float64)


def test_bfloat16_matches_the_plain_path():
  hidden, kernel, targets, mask = inputs(seed=3)
  hidden = jnp.asarray(hidden, jnp.bfloat16)
  loss, dh, dw = value_and_grads(hidden, kernel, targets, mask, chunk_size=3)
  plain = plain_value_and_grads(hidden, kernel, targets, mask)
  # Same bf16 logits, so the same loss up to float32 summation order.
  assert loss == pytest.approx(plain[0], rel=1e-5)
  # Gradients: the plain path rounds dH and dW to bf16 once more than we do (we
  # accumulate in float32), so they agree to bf16 precision.
  assert_close(dh, plain[1], 1e-2)
  assert_close(dw, plain[2], 1e-2)
  want = ref_loss_and_grads(np.asarray(hidden, np.float64), kernel, targets, mask)
  assert loss == pytest.approx(want[0], rel=2e-2)
  assert_close(dw, want[2], 3e-2)
  assert jax.grad(lambda h: fused_caption_loss(h, kernel, targets, mask, chunk_size=3)[0])(
      hidden).dtype == jnp.bfloat16


def mesh_of(shape):
  return jax.make_mesh(shape, ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (1, 2, 4), (1, 8, 1)])
def test_sharded_matches_float64_reference(mesh_shape):
  """Rows over data x fsdp, vocabulary over tensor, kernel stored (fsdp, tensor) as the
  lm_head's (embed, vocab) rules place it; its gradient comes back sharded the same way."""
  hidden, kernel, targets, mask = inputs(seed=4)
  mesh = mesh_of(mesh_shape)
  rows, kernel_sharding = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(
      mesh, P("fsdp", "tensor"))
  with jax.set_mesh(mesh):
    args = (jax.device_put(hidden, rows), jax.device_put(kernel, kernel_sharding),
            jax.device_put(targets, rows), jax.device_put(mask, rows))
    fn = lambda h, w, y, m: fused_caption_loss(h, w, y, m, chunk_size=3, mesh=mesh)[0]
    loss, (dh, dw) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(*args)
  want_loss, want_dh, want_dw = ref_loss_and_grads(hidden, kernel, targets, mask)
  assert float(loss) == pytest.approx(want_loss, rel=1e-6)
  assert_close(np.asarray(dh), want_dh, 1e-5)
  assert_close(np.asarray(dw), want_dw, 1e-5)
  assert dw.sharding.is_equivalent_to(kernel_sharding, 2)
  assert dh.sharding.is_equivalent_to(rows, 3)


def test_bfloat16_sharded_equals_one_device():
  hidden, kernel, targets, mask = inputs(seed=5)
  hidden = jnp.asarray(hidden, jnp.bfloat16)
  one = value_and_grads(hidden, kernel, targets, mask, chunk_size=4)
  mesh = mesh_of((2, 1, 4))
  with jax.set_mesh(mesh):
    sharded = value_and_grads(hidden, kernel, targets, mask, chunk_size=4, mesh=mesh)
  assert sharded[0] == pytest.approx(one[0], rel=1e-6)
  assert_close(sharded[1], one[1], 1e-2)  # bf16 dH: rounding after differently split sums
  assert_close(sharded[2], one[2], 1e-5)


def test_never_holds_the_full_logits():
  """Compiled forward + backward temporaries: the plain path needs several float32
  [B, T, V] logits arrays; the fused one a few [B, chunk, V] chunks (chunk = T / 8)."""
  b, t, d, v = 16, 64, 32, 4096
  logits_bytes = b * t * v * 4
  args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32),
          jax.ShapeDtypeStruct((d, v), jnp.float32), jax.ShapeDtypeStruct((b, t), jnp.int32),
          jax.ShapeDtypeStruct((b, t), jnp.float32))

  def temp_bytes(loss_fn):
    grad = jax.jit(jax.grad(lambda h, w, y, m: loss_fn(h, w, y, m)[0], argnums=(0, 1)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

  fused = temp_bytes(lambda h, w, y, m: fused_caption_loss(h, w, y, m, chunk_size=8))
  plain = temp_bytes(lambda h, w, y, m: losses.token_ce(h @ w, y, m))
  assert plain > 2 * logits_bytes
  assert fused < 4 * logits_bytes / 8


def test_bad_arguments_raise():
  hidden, kernel, targets, mask = inputs()
  with pytest.raises(ValueError, match="chunk_size"):
    fused_caption_loss(hidden, kernel, targets, mask, chunk_size=0)
  with pytest.raises(ValueError, match="shape mismatch"):
    fused_caption_loss(hidden, kernel.T, targets, mask, chunk_size=2)
  with pytest.raises(ValueError, match="vocab_size"):
    fused_caption_loss(hidden, kernel[:, :30], targets, mask, chunk_size=2,
                       mesh=mesh_of((2, 1, 4)))
