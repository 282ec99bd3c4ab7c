"""mmjax.hlo: matmul FLOPs and collectives of compiled HLO, loops counted by trip count.

Each count is checked against an exact figure written here (2 m k n per matmul, the number
of iterations, the bytes of each collective's result) on the CPU, TPU (libtpu) and GPU
(CUDA plugin) compilers: each writes matmuls differently (dot, convolution, cuBLAS/cuDNN
custom calls).
"""
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax import hlo, topologies


def _compiled_text(fn, *args) -> str:
  # Compile-only executables cannot be read back from the persistent cache conftest sets.
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    return jax.jit(fn).lower(*args).compile().as_text()
  finally:
    jax.config.update("jax_enable_compilation_cache", True)


HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_cuda12_plugin") is not None
# TPU: libtpu comes with the `test` extra. GPU: the CUDA plugin is the 4.4 GB `gpu-aot`
# extra, not installed by CI; those cases skip without it.
BACKENDS = ["cpu", "tpu", pytest.param("gpu", marks=pytest.mark.skipif(
    not HAS_CUDA_PLUGIN, reason="needs the CUDA plugin: pip install -e '.[gpu-aot]'"))]


@functools.lru_cache(maxsize=None)
def _abstract_device(backend: str):
  return topologies.parse("v4-8" if backend == "tpu" else "h100x1").devices()[0]


def _spec(backend: str):
  """shape -> float32 ShapeDtypeStruct on one device of `backend` (abstract for tpu/gpu)."""
  if backend == "cpu":
    return lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  mesh = Mesh(np.array([_abstract_device(backend)]), ("d",))
  return lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32,
                                             sharding=NamedSharding(mesh, P()))


def test_shape_bytes():
  assert hlo.shape_bytes("bf16[128,1024]{1,0:T(8,128)(2,1)}") == 128 * 1024 * 2
  assert hlo.shape_bytes("(f32[4]{0}, s32[2,3]{1,0}, pred[])") == 16 + 24 + 1
  assert hlo.shape_bytes("f32[]") == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_flops_exact(backend):
  m, k, n = 64, 96, 160
  spec = _spec(backend)
  text = _compiled_text(lambda x, w: jnp.tanh(x @ w), spec(m, k), spec(k, n))
  assert hlo.analyze(text).matmul_flops == 2 * m * k * n


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_matmul_and_gradient_flops(backend):
  """A batched matmul (dot_general with batch dims) and its gradient: forward 2bmkn,
  backward twice that (dX and dW)."""
  b, m, k, n = 4, 32, 64, 48
  spec = _spec(backend)
  loss = lambda x, w: jnp.sum(jnp.einsum("bmk,bkn->bmn", x, w) ** 2)
  text = _compiled_text(jax.grad(loss, argnums=(0, 1)), spec(b, m, k), spec(b, k, n))
  assert hlo.analyze(text).matmul_flops == 3 * 2 * b * m * k * n


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_multiplies_loop_body_by_trip_count(backend):
  """XLA's cost_analysis counts a while body once; hlo.analyze counts every iteration."""
  layers, m, d = 5, 32, 128
  spec = _spec(backend)

  def stack(x, ws):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

  stats = hlo.analyze(_compiled_text(stack, spec(m, d), spec(layers, d, d)))
  assert stats.matmul_flops == layers * 2 * m * d * d
  assert stats.unknown_trip_counts == 0
  assert any(loop["trip_count"] == layers for loop in stats.loops)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_convolution_and_its_gradient_flops(backend):
  """The ViT patch embedding, a strided convolution: 2 x outputs x (p * p * 3) per pass;
  its weight gradient is another such pass (XLA:GPU: cuDNN custom calls; XLA:TPU: a
  dilated convolution)."""
  b, size, p, d = 2, 64, 16, 128
  spec = _spec(backend)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (p, p), "VALID",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  loss = lambda x, w: jnp.sum(conv(x, w) ** 2)
  text = _compiled_text(jax.grad(loss, argnums=1), spec(b, size, size, 3), spec(p, p, 3, d))
  outputs = b * (size // p) ** 2 * d
  assert hlo.analyze(text).matmul_flops == 2 * 2 * outputs * p * p * 3


def test_padded_window_counts_only_real_inputs():
  """XLA:TPU writes some matmuls as convolutions that broadcast an operand through a padded
  window; taps that land on padding do no work."""
  # 1 input position, window 4 padded 3 on both sides -> 4 outputs, each with 1 real tap.
  assert hlo._valid_taps(length=1, outputs=4, size=4, pad_lo=3, stride=1, lhs_dilate=1,
                         rhs_dilate=1) == 4
  # A plain valid convolution: every tap is real.
  assert hlo._valid_taps(length=8, outputs=5, size=4, pad_lo=0, stride=1, lhs_dilate=1,
                         rhs_dilate=1) == 20
  # Weight gradients window over the whole batch: O(outputs), not outputs x window.
  assert hlo._valid_taps(length=2**24, outputs=1, size=2**24, pad_lo=0, stride=1,
                         lhs_dilate=1, rhs_dilate=1) == 2**24
  # ... also input-dilated ones (the 32768-example step of tests/test_aot.py): every
  # second of 2**24 taps lands between two inputs.
  assert hlo._valid_taps(length=2**23, outputs=1, size=2**24, pad_lo=0, stride=1,
                         lhs_dilate=2, rhs_dilate=1) == 2**23


def test_valid_taps_equal_counting_every_tap():
  rng = np.random.default_rng(0)
  for _ in range(3000):
    length, outputs, size, pad_lo, stride, lhs_dilate, rhs_dilate = (
        int(v) for v in rng.integers([1, 1, 1, 0, 1, 1, 1], [9, 9, 9, 7, 4, 7, 7]))
    span = (length - 1) * lhs_dilate + 1
    every = sum(0 <= (x := o * stride + k * rhs_dilate - pad_lo) < span
                and x % lhs_dilate == 0 for o in range(outputs) for k in range(size))
    assert hlo._valid_taps(length, outputs, size, pad_lo, stride, lhs_dilate,
                           rhs_dilate) == every


def test_collectives_in_a_loop_on_cpu_devices():
  """A psum inside a 3-step scan over 8 devices: 3 all-reduces of the carry per step."""
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  steps, n = 3, 1024

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("d"), out_specs=P("d"))
  def body(x):
    def step(h, _):
      return jnp.tanh(h + jax.lax.psum(h, "d")), None
    return jax.lax.scan(step, x, None, length=steps)[0]

  x = jax.ShapeDtypeStruct((8 * n,), jnp.float32, sharding=NamedSharding(mesh, P("d")))
  stats = hlo.analyze(_compiled_text(body, x))
  assert stats.collectives["all-reduce"].count == steps
  assert stats.collectives["all-reduce"].bytes == steps * n * 4


# A windowed-einsum loop as XLA:TPU emits it: the induction variable goes through copies and
# advances by 2 (a bidirectional ring), so `i < 8` from 0 runs 4 times.
STEP_TWO_LOOP = """HloModule m, entry_computation_layout={()->f32[8,8]{1,0}}

%cond (p: (u32[], f32[8,8])) -> pred[] {
  %limit = u32[]{:T(128)} constant(8)
  %p = (u32[]{:T(128)}, f32[8,8]{1,0}) parameter(0)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (q: (u32[], f32[8,8])) -> (u32[], f32[8,8]) {
  %two = u32[]{:T(128)} constant(2)
  %q = (u32[]{:T(128)}, f32[8,8]{1,0}) parameter(0)
  %j = u32[]{:T(128)} get-tuple-element(%q), index=0
  %jc = u32[]{:T(128)} copy(%j)
  %next = u32[]{:T(128)} add(%jc, %two)
  %nextc = u32[]{:T(128)} copy(%next)
  %x = f32[8,8]{1,0} get-tuple-element(%q), index=1
  %y = f32[8,8]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %z = f32[8,8]{1,0} all-reduce(%y), replica_groups={}, to_apply=%add
  ROOT %t = (u32[]{:T(128)}, f32[8,8]{1,0}) tuple(%nextc, %z)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main () -> f32[8,8] {
  %zero = u32[]{:T(128)} constant(0)
  %zc = u32[]{:T(128)} copy(%zero)
  %init = f32[8,8]{1,0} constant({...})
  %t0 = (u32[]{:T(128)}, f32[8,8]{1,0}) tuple(%zc, %init)
  %w = (u32[]{:T(128)}, f32[8,8]{1,0}) while(%t0), condition=%cond, body=%body
  ROOT %out = f32[8,8]{1,0} get-tuple-element(%w), index=1
}
"""


def test_trip_count_with_step_and_copies():
  stats = hlo.analyze(STEP_TWO_LOOP)
  assert [loop["trip_count"] for loop in stats.loops] == [4]
  assert stats.matmul_flops == 4 * 2 * 8 * 8 * 8
  assert stats.collectives["all-reduce"].count == 4
  assert stats.collectives["all-reduce"].bytes == 4 * 8 * 8 * 4


def test_unknown_trip_count_is_counted_once_and_flagged():
  text = STEP_TWO_LOOP.replace("%limit = u32[]{:T(128)} constant(8)",
                               "%limit = u32[]{:T(128)} get-tuple-element(%p), index=0")
  stats = hlo.analyze(text)
  assert stats.unknown_trip_counts == 1
  assert stats.matmul_flops == 2 * 8 * 8 * 8
  assert stats.collectives["all-reduce"].count_in_loops_of_unknown_trip_count == 1
