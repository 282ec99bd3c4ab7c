"""mmjax.losses.contrastive (UniCL, SigLIP; dense and ring) against independent float64
NumPy references.

Sharded cases need 8 CPU devices (tests/conftest.py sets jax_num_cpu_devices=8).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax.losses import siglip_loss, unicl_loss

B, D = 32, 8
SCALE = 7.5  # not 1 so that the logit-scale gradient is exercised at a realistic size
BIAS = -3.0  # SigLIP: both targets' terms matter (at -10 negatives are ~saturated)


# ---------------------------------------------------------------------------------------
# NumPy float64 references (written from the definition, not from the implementation).
# ---------------------------------------------------------------------------------------

def _softmax(z: np.ndarray, axis: int) -> np.ndarray:
  e = np.exp(z - z.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def ref_unicl(x, y, labels, s):
  """float64 UniCL loss and analytic gradients wrt (x, y, s).

  Loss = 1/2 [mean_i CE(T_row[i], softmax_row(L)[i]) + mean_j CE(T_col[:, j], softmax_col(L)[:, j])]
  with L = s * u v^T, u = x / |x|, v = y / |y|, T_row = P / rowsum(P), T_col = P / colsum(P).
  """
  x, y, s = np.float64(x), np.float64(y), np.float64(s)
  nb = x.shape[0]
  nx = np.linalg.norm(x, axis=1, keepdims=True)
  ny = np.linalg.norm(y, axis=1, keepdims=True)
  u, v = x / nx, y / ny
  sim = u @ v.T
  logits = s * sim
  pos = np.zeros((nb, nb))
  for i in range(nb):
    for j in range(nb):
      pos[i, j] = float(i == j or (labels[i] == labels[j] and labels[i] >= 0))
  t_row = pos / pos.sum(1, keepdims=True)
  t_col = pos / pos.sum(0, keepdims=True)
  a_row = _softmax(logits, 1)
  a_col = _softmax(logits, 0)
  loss = 0.5 * (-(t_row * np.log(a_row)).sum() / nb - (t_col * np.log(a_col)).sum() / nb)
  # d/dlogits of softmax cross-entropy = softmax - target, per direction.
  g = 0.5 / nb * ((a_row - t_row) + (a_col - t_col))
  du = s * g @ v
  dv = s * g.T @ u
  ds = (g * sim).sum()
  # Through the normalisation: d(x/|x|) = (I - u u^T) / |x|.
  dx = (du - u * (u * du).sum(1, keepdims=True)) / nx
  dy = (dv - v * (v * dv).sum(1, keepdims=True)) / ny
  return loss, dx, dy, ds


def textbook_clip(x, y, s):
  """CLIP's loss as in the paper's pseudo-code: symmetric CE with labels = arange(B)."""
  x, y = np.float64(x), np.float64(y)
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  v = y / np.linalg.norm(y, axis=1, keepdims=True)
  logits = s * u @ v.T
  idx = np.arange(len(x))
  ce_i = -np.log(_softmax(logits, 1)[idx, idx]).mean()
  ce_t = -np.log(_softmax(logits.T, 1)[idx, idx]).mean()
  return (ce_i + ce_t) / 2


def _labels(kind: str, rng: np.random.Generator, nb: int = B) -> np.ndarray:
  if kind == "mixed":  # captions (-1) and classes with duplicates
    lab = rng.integers(-1, 5, size=nb)
  elif kind == "captions":
    lab = np.full(nb, -1)
  elif kind == "all_labels":
    lab = rng.integers(0, 4, size=nb)
  elif kind == "half_one_class":  # one class fills half the rows, spread over all shards
    lab = np.concatenate([np.full(nb // 2, 3), rng.integers(-1, 3, size=nb - nb // 2)])
    lab = rng.permutation(lab)
  else:
    raise ValueError(kind)
  return lab.astype(np.int32)


def _inputs(kind: str, seed: int = 0, nb: int = B):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(nb, D)).astype(np.float32)
  y = (0.5 * x + rng.normal(size=(nb, D))).astype(np.float32)  # correlated, like a model
  return x, y, _labels(kind, rng, nb)


def _jax_value_and_grads(x, y, labels, s, **kw):
  fn = jax.jit(jax.value_and_grad(
      lambda a, b, l, sc: unicl_loss(a, b, l, sc, **kw), argnums=(0, 1, 3)))
  val, (gx, gy, gs) = fn(x, y, labels, jnp.float32(s))
  return float(val), np.asarray(gx), np.asarray(gy), float(gs)


def _assert_close(got, want, tol):
  names = ("loss", "d_image", "d_text", "d_scale")
  for n, a, b in zip(names, got, want):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=n)


# ---------------------------------------------------------------------------------------
# Reference sanity: the analytic NumPy gradient agrees with finite differences.
# ---------------------------------------------------------------------------------------

def assert_matches_finite_differences(reference, x, y, labels, *scalars):
  """reference(x, y, labels, *scalars) -> (loss, d_x, d_y, *d_scalars) in float64: its
  analytic gradients equal central differences (eps 1e-6) at a few entries of x and y and
  at every scalar."""
  _, dx, dy, *d_scalars = reference(x, y, labels, *scalars)
  loss = lambda x, y, *s: reference(x, y, labels, *s)[0]
  eps = 1e-6
  for which, grad in ((0, dx), (1, dy)):
    for idx in [(0, 0), (2, 3), (5, 7)]:
      plus, minus = [x.copy(), y.copy()], [x.copy(), y.copy()]
      plus[which][idx] += eps
      minus[which][idx] -= eps
      fd = (loss(*plus, *scalars) - loss(*minus, *scalars)) / (2 * eps)
      assert abs(fd - grad[idx]) < 1e-7, (which, idx, fd, grad[idx])
  for i, grad in enumerate(d_scalars):
    step = np.eye(len(scalars))[i] * eps
    fd = (loss(x, y, *(np.array(scalars) + step)) - loss(x, y, *(np.array(scalars) - step))
          ) / (2 * eps)
    assert abs(fd - grad) < 1e-7, (i, fd, grad)


def test_reference_gradient_matches_finite_differences():
  x, y, lab = _inputs("mixed", seed=1, nb=6)
  assert_matches_finite_differences(ref_unicl, np.float64(x), np.float64(y), lab, SCALE)


# ---------------------------------------------------------------------------------------
# Unsharded.
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mixed", "captions", "all_labels", "half_one_class"])
def test_unsharded_matches_numpy(kind):
  x, y, lab = _inputs(kind)
  _assert_close(_jax_value_and_grads(x, y, lab, SCALE), ref_unicl(x, y, lab, SCALE), 1e-5)


def test_all_captions_is_clip():
  x, y, lab = _inputs("captions", seed=3)
  got = float(unicl_loss(x, y, lab, SCALE))
  np.testing.assert_allclose(got, textbook_clip(x, y, SCALE), rtol=1e-6)
  # And labels do matter: sharing classes changes the value.
  assert abs(float(unicl_loss(x, y, _labels("all_labels", np.random.default_rng(0)), SCALE))
             - got) > 1e-3


# ---------------------------------------------------------------------------------------
# Sharded (ring) on 8 CPU devices, inside jit with batch-sharded inputs.
# ---------------------------------------------------------------------------------------

def _mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _sharded_inputs(shape, kind):
  """The mesh of `shape` and _inputs(kind) (seeded by the shape), on the host and
  batch-sharded over the mesh: (mesh, (x, y, labels), [x, y, labels] sharded)."""
  assert jax.device_count() == 8
  x, y, lab = _inputs(kind, seed=sum(shape))
  mesh = _mesh(shape)
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  return mesh, (x, y, lab), [jax.device_put(a, sh) for a in (x, y, lab)]


# (mesh shape, label kind, chunk size): the sharded cases both losses are checked on.
SHARDED_CASES = [
    ((8, 1, 1), "mixed", None),
    ((8, 1, 1), "half_one_class", 2),
    ((4, 2, 1), "mixed", 2),
    ((4, 2, 1), "captions", None),
    ((2, 2, 2), "half_one_class", None),
]


@pytest.mark.parametrize("shape,kind,chunk", [*SHARDED_CASES, ((2, 2, 2), "all_labels", 4)])
def test_sharded_matches_unsharded_and_numpy(shape, kind, chunk):
  mesh, (x, y, lab), args = _sharded_inputs(shape, kind)
  with jax.set_mesh(mesh):
    got = _jax_value_and_grads(*args, SCALE, mesh=mesh, chunk_size=chunk)
  dense = _jax_value_and_grads(x, y, lab, SCALE)
  _assert_close(got, dense, 1e-5)
  _assert_close(got, ref_unicl(x, y, lab, SCALE), 1e-5)


def test_sharded_gradients_keep_batch_sharding():
  mesh = _mesh((4, 2, 1))
  x, y, lab = _inputs("mixed")
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  args = [jax.device_put(a, sh) for a in (x, y, lab)]
  with jax.set_mesh(mesh):
    gx = jax.jit(jax.grad(lambda a, b, l: unicl_loss(a, b, l, SCALE, mesh=mesh)))(*args)
  assert gx.sharding.is_equivalent_to(sh, 2)


def test_sharded_memory_is_linear_in_batch():
  """Compile-only: per-device temporaries stay far below one [B, B/n] slab of logits."""
  mesh = _mesh((8, 1, 1))
  nb, d = 4096, 32
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  args = (jax.ShapeDtypeStruct((nb, d), jnp.float32, sharding=sh),
          jax.ShapeDtypeStruct((nb, d), jnp.float32, sharding=sh),
          jax.ShapeDtypeStruct((nb,), jnp.int32, sharding=sh),
          jax.ShapeDtypeStruct((), jnp.float32))

  def temp_bytes(**kw):
    f = jax.jit(jax.grad(lambda a, b, l, s: unicl_loss(a, b, l, s, **kw), argnums=(0, 1, 3)))
    with jax.set_mesh(mesh):
      return f.lower(*args).compile().memory_analysis().temp_size_in_bytes

  ring = temp_bytes(mesh=mesh, chunk_size=128)
  slab = nb * (nb // 8) * 4  # one device's share of a B x B f32 matrix: 8 MiB
  assert ring < slab / 4, (ring, slab)
  # The naive loss on the same sharded inputs needs far more: the test can tell them apart.
  assert temp_bytes() > 2 * ring


def test_bad_batch_raises():
  mesh = _mesh((8, 1, 1))
  x, y, lab = _inputs("mixed", nb=12)
  with pytest.raises(ValueError, match="divisible"):
    unicl_loss(x, y, lab, SCALE, mesh=mesh)
  x, y, lab = _inputs("mixed", nb=48)  # 6 rows per device
  with pytest.raises(ValueError, match="chunk_size"):
    unicl_loss(x, y, lab, SCALE, mesh=mesh, chunk_size=4)


# ---------------------------------------------------------------------------------------
# SigLIP (sigmoid) loss: float64 reference, dense and ring.
# ---------------------------------------------------------------------------------------

def ref_siglip(x, y, labels, s, bias):
  """float64 SigLIP loss and analytic gradients wrt (x, y, s, bias).

  Loss = -1/B sum_ij log sigmoid(T_ij (s <u_i, v_j> + bias)), T = +1 where i == j or both
  share a class >= 0, else -1; u = x / |x|, v = y / |y|.
  """
  x, y, s, bias = np.float64(x), np.float64(y), np.float64(s), np.float64(bias)
  nb = x.shape[0]
  nx = np.linalg.norm(x, axis=1, keepdims=True)
  ny = np.linalg.norm(y, axis=1, keepdims=True)
  u, v = x / nx, y / ny
  sim = u @ v.T
  target = -np.ones((nb, nb))
  for i in range(nb):
    for j in range(nb):
      if i == j or (labels[i] == labels[j] and labels[i] >= 0):
        target[i, j] = 1.0
  z = s * sim + bias
  loss = np.logaddexp(0.0, -target * z).sum() / nb  # -log sigmoid(t z) = log(1 + e^(-t z))
  g = -target / (1.0 + np.exp(target * z)) / nb  # d/dz: -t sigmoid(-t z)
  du, dv = s * g @ v, s * g.T @ u
  dx = (du - u * (u * du).sum(1, keepdims=True)) / nx
  dy = (dv - v * (v * dv).sum(1, keepdims=True)) / ny
  return loss, dx, dy, (g * sim).sum(), g.sum()


def _siglip_value_and_grads(x, y, labels, s, bias, **kw):
  fn = jax.jit(jax.value_and_grad(
      lambda a, b, l, sc, bi: siglip_loss(a, b, l, sc, bi, **kw), argnums=(0, 1, 3, 4)))
  val, grads = fn(x, y, labels, jnp.float32(s), jnp.float32(bias))
  return (float(val), *(np.asarray(g) for g in grads))


def _assert_siglip_close(got, want, tol):
  for name, a, b in zip(("loss", "d_image", "d_text", "d_scale", "d_bias"), got, want):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=name)


def test_siglip_reference_gradient_matches_finite_differences():
  x, y, lab = _inputs("mixed", seed=1, nb=6)
  assert_matches_finite_differences(ref_siglip, np.float64(x), np.float64(y), lab, SCALE,
                                    BIAS)


@pytest.mark.parametrize("kind", ["mixed", "captions", "all_labels", "half_one_class"])
@pytest.mark.parametrize("scale,bias", [(SCALE, BIAS), (10.0, -10.0)])  # ours; paper init
def test_siglip_unsharded_matches_numpy(kind, scale, bias):
  x, y, lab = _inputs(kind)
  _assert_siglip_close(_siglip_value_and_grads(x, y, lab, scale, bias),
                       ref_siglip(x, y, lab, scale, bias), 1e-5)


def test_siglip_labels_and_bias_matter():
  """The checks above can fail: shared classes and the bias change the value."""
  x, y, lab = _inputs("captions", seed=3)
  clip_style = float(siglip_loss(x, y, lab, SCALE, BIAS))
  shared = _labels("all_labels", np.random.default_rng(0))
  assert abs(float(siglip_loss(x, y, shared, SCALE, BIAS)) - clip_style) > 1e-3
  assert abs(float(siglip_loss(x, y, lab, SCALE, BIAS + 1.0)) - clip_style) > 1e-3


@pytest.mark.parametrize("shape,kind,chunk", [
    *SHARDED_CASES,
    ((2, 1, 4), "all_labels", 4),
    ((1, 1, 8), "mixed", None),  # no batch parallelism: one device's ring, 8-way tensor
])
def test_siglip_sharded_matches_dense_and_numpy(shape, kind, chunk):
  mesh, (x, y, lab), args = _sharded_inputs(shape, kind)
  with jax.set_mesh(mesh):
    got = _siglip_value_and_grads(*args, SCALE, BIAS, mesh=mesh, chunk_size=chunk)
  _assert_siglip_close(got, _siglip_value_and_grads(x, y, lab, SCALE, BIAS), 1e-5)
  _assert_siglip_close(got, ref_siglip(x, y, lab, SCALE, BIAS), 1e-5)


def test_siglip_sharded_memory_is_linear_in_batch():
  """Compile-only, as for UniCL: far below one [B, B/n] slab, and below the dense loss."""
  mesh = _mesh((8, 1, 1))
  nb, d = 4096, 32
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  args = (jax.ShapeDtypeStruct((nb, d), jnp.float32, sharding=sh),
          jax.ShapeDtypeStruct((nb, d), jnp.float32, sharding=sh),
          jax.ShapeDtypeStruct((nb,), jnp.int32, sharding=sh), scalar, scalar)

  def temp_bytes(**kw):
    f = jax.jit(jax.grad(lambda a, b, l, s, bi: siglip_loss(a, b, l, s, bi, **kw),
                         argnums=(0, 1, 3, 4)))
    with jax.set_mesh(mesh):
      return f.lower(*args).compile().memory_analysis().temp_size_in_bytes

  ring = temp_bytes(mesh=mesh, chunk_size=128)
  slab = nb * (nb // 8) * 4
  assert ring < slab / 4, (ring, slab)
  assert temp_bytes() > 2 * ring
