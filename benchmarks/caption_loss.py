"""Captioning head + loss, plain logits vs fused in token chunks (`losses.fused_caption_loss`).

  PYTHONPATH=. python benchmarks/caption_loss.py [--steps 7] [--chunks 8,16]

Two parts, each the gradient of the loss with respect to the hidden states and the kernel
(what the train step differentiates), plain = `losses.token_ce(h @ W)` as the model's
`lm_head` computes it (logits in the compute dtype, then float32):
  memory  compiled temporary bytes (XLA memory analysis, nothing executed) at CoCa-Base's
          per-device micro-batch: 256 examples x 63 tokens x 768 width x 64,000 vocabulary,
          bfloat16 compute, float32 kernel (configs/coca.py:base at 256 per device).
  time    seconds per forward + backward at a size a 2-core CPU runs in seconds: CoCa-B/32
          (configs/openclip.py:coca_vit_b32) batch 8: 8 x 76 x 512 x 49,408, float32.
          Variants are interleaved per repetition; medians.
The last line is one JSON object.
"""
import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import losses

MEMORY_SHAPE = (256, 63, 768, 64_000)
TIME_SHAPE = (8, 76, 512, 49_408)


def grad_fn(chunk: int):
  """(hidden, kernel, targets, mask) -> (d hidden, d kernel), plain (chunk 0) or fused."""
  def loss(h, w, y, m):
    if chunk == 0:
      return losses.token_ce(jnp.dot(h, w.astype(h.dtype)).astype(jnp.float32), y, m)[0]
    return losses.fused_caption_loss(h, w, y, m, chunk_size=chunk)[0]
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def abstract_args(shape, dtype):
  b, t, d, v = shape
  return (jax.ShapeDtypeStruct((b, t, d), dtype), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.float32))


def concrete_args(shape, seed=0):
  b, t, d, v = shape
  rng = np.random.default_rng(seed)
  mask = (np.arange(t)[None] < rng.integers(t // 2, t + 1, b)[:, None]).astype(np.float32)
  return (jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(d, v)) * 0.02, jnp.float32),
          jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32), jnp.asarray(mask))


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
      flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
  except (OSError, StopIteration):
    return platform.processor()
  isa = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {x}" in flags]
  return f"{names[0] if names else '?'} ({'+'.join(isa)})"


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=7, help="timed repetitions per variant")
  parser.add_argument("--chunks", default="8,16", help="fused chunk sizes (token positions)")
  args = parser.parse_args()
  variants = [0] + [int(c) for c in args.chunks.split(",")]
  name = lambda c: "plain" if c == 0 else f"fused_c{c}"
  results = {"memory_shape_btdv": MEMORY_SHAPE, "time_shape_btdv": TIME_SHAPE,
             "jax": jax.__version__, "cpu": cpu_model(), "load_avg_start": os.getloadavg()[0]}

  print(f"compiled temporaries, B x T x D x V = {MEMORY_SHAPE}, bfloat16:")
  for c in variants:
    compiled = grad_fn(c).lower(*abstract_args(MEMORY_SHAPE, jnp.bfloat16)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    results[f"{name(c)}_temp_gib"] = round(temp / 2**30, 3)
    print(f"  {name(c):10s} {temp / 2**30:8.3f} GiB", flush=True)

  data = concrete_args(TIME_SHAPE)
  fns = {c: grad_fn(c) for c in variants}
  for c, fn in fns.items():
    start = time.perf_counter()
    jax.block_until_ready(fn(*data))
    results[f"{name(c)}_first_call_s"] = round(time.perf_counter() - start, 2)
  times = {c: [] for c in variants}
  for _ in range(args.steps):
    for c, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*data))
      times[c].append(time.perf_counter() - start)
  print(f"forward + backward, B x T x D x V = {TIME_SHAPE}, float32, median of {args.steps}:")
  for c in variants:
    results[f"{name(c)}_s"] = round(statistics.median(times[c]), 4)
    print(f"  {name(c):10s} {results[f'{name(c)}_s']:8.3f} s", flush=True)
  results["load_avg_end"] = os.getloadavg()[0]
  print(json.dumps(results))


if __name__ == "__main__":
  main()
