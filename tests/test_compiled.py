"""mmjax.compiled: the figures read from a compiled program and its XLA dump (the full report
on a TPU target: tests/test_aot.py)."""
import jax
import jax.numpy as jnp

from mmjax import compiled


def test_memory_line_on_cpu_says_capacity_unknown():
  program = jax.jit(lambda x: x * 2).lower(jax.ShapeDtypeStruct((1024,), "float32")).compile()
  line = compiled.memory_line(program, jax.devices()[0])
  assert line.startswith("Train step memory per device: ")
  assert "capacity unknown on cpu" in line and "\n" not in line


def test_compile_lowered_reads_the_peak_buffers_from_the_dump():
  """A program whose peak holds one large temporary: the dump's live ranges name it."""
  def f(x):
    big = jnp.sin(jnp.outer(x, x))  # 512 x 512 float32 = 1 MiB, a matmul operand
    return (big @ big).sum(0)

  lowered = jax.jit(f).lower(jax.ShapeDtypeStruct((512,), jnp.float32))
  result = compiled.compile_lowered("f", lowered, 0.0, "cpu")
  assert result.compiled is not None and result.out_of_memory is None
  assert result.hlo_text and result.compile_s > 0
  assert result.peak_buffers, "no live ranges read from the dump"
  largest = result.peak_buffers[0]
  assert largest["bytes"] == 512 * 512 * 4 and largest["shape"] == "f32[512,512]"
  assert result.dumped_memory["total"] == sum(
      result.dumped_memory[k] for k in ("argument", "output_not_aliased", "temp"))


def test_shard_bytes_is_one_devices_shard():
  mesh = jax.make_mesh((4,), ("d",), devices=jax.devices()[:4])
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  tree = {"w": jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=sharding)}
  assert compiled.shard_bytes(tree) == 16 * 8 * 4


def test_format_size():
  assert compiled.format_size(None) == "?"
  assert compiled.format_size(3 * 2**30) == "3.00 GiB"
  assert compiled.format_size(5 * 2**20) == "5.0 MiB"
