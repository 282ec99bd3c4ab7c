"""Per-device temporary memory of the UniCL loss (forward + backward), compile only.

  PYTHONPATH=. python benchmarks/loss_memory.py [--batches 16384 65536] [--dim 512]

Compares, from XLA's memory analysis of jit(grad(loss)) (nothing is executed):
  naive_1dev      dense loss on one device
  naive_sharded   dense loss under jit with batch-sharded inputs on 8 fake CPU devices
  mmjax_ring      mmjax.losses.unicl_loss(mesh=...) on the same 8 devices
Prints a table and ends with one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import time

import jax

# Before any JAX operation: 8 fake CPU devices for the sharded variants.
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from mmjax.losses import unicl_loss, unicl_loss_dense  # noqa: E402

MIB = 1 << 20


def temp_bytes(fn, args, mesh=None) -> int:
  """Temporary bytes per device of jit(grad(fn)) wrt embeddings and logit scale."""
  f = jax.jit(jax.grad(fn, argnums=(0, 1, 3)))
  if mesh is None:
    compiled = f.lower(*args).compile()
  else:
    with jax.set_mesh(mesh):
      compiled = f.lower(*args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def abstract_inputs(b: int, d: int, sharding=None):
  kw = {} if sharding is None else {"sharding": sharding}
  return (jax.ShapeDtypeStruct((b, d), jnp.float32, **kw),
          jax.ShapeDtypeStruct((b, d), jnp.float32, **kw),
          jax.ShapeDtypeStruct((b,), jnp.int32, **kw),
          jax.ShapeDtypeStruct((), jnp.float32))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", type=int, nargs="+", default=[16384, 65536])
  ap.add_argument("--dim", type=int, default=512)
  ap.add_argument("--chunk_size", type=int, default=None)
  args = ap.parse_args()

  mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  results: dict[str, dict[str, int]] = {"naive_1dev": {}, "naive_sharded": {}, "mmjax_ring": {}}
  for b in args.batches:
    t0 = time.time()
    results["naive_1dev"][str(b)] = temp_bytes(unicl_loss_dense, abstract_inputs(b, args.dim))
    results["naive_sharded"][str(b)] = temp_bytes(
        unicl_loss_dense, abstract_inputs(b, args.dim, sh), mesh)
    results["mmjax_ring"][str(b)] = temp_bytes(
        lambda x, y, l, s: unicl_loss(x, y, l, s, mesh=mesh, chunk_size=args.chunk_size),
        abstract_inputs(b, args.dim, sh), mesh)
    print(f"# compiled B={b} in {time.time() - t0:.1f}s", flush=True)

  cols = [str(b) for b in args.batches]
  print(f"\nper-device temp bytes, fwd+bwd, D={args.dim}, 8 CPU devices (mesh 8x1x1)")
  print(f"{'variant':<15}" + "".join(f"{'B=' + c:>16}" for c in cols) + f"{'ratio':>8}")
  for name, row in results.items():
    ratio = row[cols[-1]] / max(row[cols[0]], 1)
    print(f"{name:<15}" + "".join(f"{row[c] / MIB:>12.1f} MiB" for c in cols)
          + f"{ratio:>8.2f}")
  summary = {
      "dim": args.dim, "devices": 8, "temp_bytes": results,
      "mmjax_ratio": results["mmjax_ring"][cols[-1]] / max(results["mmjax_ring"][cols[0]], 1),
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
