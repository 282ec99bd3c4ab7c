"""Greedy captioning throughput with and without the K/V cache, side by side.

  python benchmarks/decode.py [--batch 8] [--new_tokens 32,64] [--repeats 3]

Model: the shapes config's CoCa (configs/shapes.py, random init), with data.max_text_len
raised to new_tokens + 1 so both paths run `new_tokens` steps (the cached loop only stops
early when every row has emitted EOS; the script checks that did not happen).

* cached: `mmjax.decode.make_captioner` (image side once, one position per step through
  K/V-cached unimodal + multimodal layers).
* uncached: `mmjax.decode.uncached_greedy`: every step re-runs both text decoders on the
  whole sequence, padded to the fixed window of new_tokens positions (one compiled
  program), and takes the argmax at the last real position.

Both are compiled and run once before timing (warm-up); the figure is the best of
`--repeats` timed runs. tokens/s = batch * new_tokens / seconds. The last line is one JSON
object with all figures.
"""
import argparse
import json
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from configs import shapes
from mmjax import decode, models
from mmjax.vocabulary import EOS_ID


def build(new_tokens: int, batch: int):
  """(model, params, images uint8 [batch, H, W, 3]) for a window of new_tokens."""
  config = shapes.get_config()
  config.unlock()
  config.data.max_text_len = new_tokens + 1
  config.lock()
  model = models.build_model(config)
  size, length = config.data.image_size, config.data.max_text_len
  images = jax.random.randint(jax.random.key(1), (batch, size, size, 3), 0, 256, jnp.uint8)
  text = jnp.full((batch, length), 2, jnp.int32)
  params = jax.jit(lambda: flax.linen.unbox(model.init(
      jax.random.key(0), images, text, jnp.zeros((batch,), jnp.int32))["params"]))()
  return model, params, images


def timed(fn, *args, repeats: int) -> tuple[float, np.ndarray]:
  """Best wall time of `repeats` runs after one warm-up run (compile); and the output."""
  out = np.asarray(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = np.asarray(jax.block_until_ready(fn(*args)))
    best = min(best, time.perf_counter() - start)
  return best, out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new_tokens", default="32,64")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  results = {"device": jax.devices()[0].device_kind, "batch": args.batch,
             "model": "configs/shapes.py CoCa (random init), greedy"}
  for new_tokens in [int(n) for n in args.new_tokens.split(",")]:
    model, params, images = build(new_tokens, args.batch)
    cached = decode.make_captioner(model, decode.DecodeConfig(max_new_tokens=new_tokens))
    uncached = jax.jit(lambda p, x: decode.uncached_greedy(model, p, x, new_tokens))
    t_cached, tok_cached = timed(cached, params, images, repeats=args.repeats)
    t_uncached, tok_uncached = timed(uncached, params, images, repeats=args.repeats)
    # The loop runs all steps unless every row emitted EOS.
    assert not (tok_cached == EOS_ID).any(axis=1).all(), "every row stopped early"
    n = args.batch * new_tokens
    row = {"cached_tok_s": n / t_cached, "uncached_tok_s": n / t_uncached,
           "speedup": t_uncached / t_cached,
           "same_tokens": bool((tok_cached == tok_uncached).all())}
    results[f"new_{new_tokens}"] = row
    print(f"{new_tokens:3d} new tokens, batch {args.batch}: cached {row['cached_tok_s']:9.1f} "
          f"tok/s  uncached {row['uncached_tok_s']:9.1f} tok/s  x{row['speedup']:.2f}  "
          f"same tokens: {row['same_tokens']}", flush=True)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
