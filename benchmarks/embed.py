"""Images per second of `mmjax.embed` on this machine, per model size, in one run:

  python benchmarks/embed.py [--configs 'configs/shapes.py:coca_unicl_prefix,tiny;configs/coca.py:base']
      [--images 64] [--batch_size 16]

For each config: an initialised checkpoint (random parameters: throughput does not depend
on the weights) with a small tokenizer among its assets, written under --workdir; a folder
of --images JPEG photos (scikit-image's, 512 px and larger, re-encoded); then, side by side,
  pipeline:    mmjax.embed's shard loop (read, decode, centre-crop + resize on a thread
               pool, embed on the devices, float16 to the host), as `python -m mmjax.embed`
  model_only:  the same jitted image encoder on pre-processed pixels (the ceiling)
each after one warm-up batch (compilation excluded; its seconds are reported). Ends with one
JSON line. Figures: benchmarks/RESULTS.md ("Embedding throughput").
"""
import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import cpu_model  # noqa: E402
from mmjax import checkpoint, cli, embed, inference, runtime, state as state_lib  # noqa: E402
from mmjax.data import tokenizer as tokenizer_lib  # noqa: E402
from mmjax.tokenizers import sentencepiece  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def write_initialised_checkpoint(spec: str, workdir: str) -> str:
  """Step 0 of `spec` with random parameters (no optimizer state: mmjax.load reads only the
  parameters) and a 200-piece tokenizer."""
  config = cli.load_config(spec)
  rt = runtime.build(config, jax.devices()[:1], params_only=True)
  with rt.activate():
    params = jax.jit(lambda k: nn.unbox(rt.model.init(k, *state_lib.dummy_inputs(config))[
        "params"]), out_shardings=rt.shardings)(jax.random.key(0))
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state={},
                               nonfinite_steps=jnp.zeros((), jnp.int32))
  words = ["a", "photo", "of", "red", "blue", "circle", "square", "cat", "dog", "large"]
  tokenizer = sentencepiece.train_tokenizer([" ".join(words[i:] + words[:i]) for i in
                                             range(len(words))] * 20, 200)
  ckpt = checkpoint.Checkpointer(workdir, config)
  ckpt.save(0, state, config, assets=tokenizer_lib.checkpoint_assets(tokenizer))
  ckpt.close()
  return workdir


def write_photos(folder: str, n: int) -> None:
  os.makedirs(folder, exist_ok=True)
  for i in range(n):
    photo = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
    Image.fromarray(np.roll(photo, 7 * i, axis=1)).save(os.path.join(folder, f"{i:05d}.jpg"),
                                                        quality=90)


def measure(workdir: str, folder: str, batch_size: int) -> dict:
  model = inference.load(workdir, devices=jax.local_devices())
  embedder = embed.Embedder(model, batch_size)
  source = embed.images_dir_source(folder, shard_size=10**9)
  start = time.perf_counter()
  jax.block_until_ready(embedder.images(np.zeros((1, embedder.size, embedder.size, 3),
                                                 np.uint8)))
  compile_s = time.perf_counter() - start
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    start = time.perf_counter()
    emb, _, kept, _ = embed.embed_shard(embedder, source.items(0), False, pool, lambda n: None)
    pipeline_s = time.perf_counter() - start
  pixels = model.preprocess([os.path.join(folder, item.id) for item in kept])
  start = time.perf_counter()
  for i in range(0, len(pixels), embedder.batch_size):
    out = embedder.images(pixels[i:i + embedder.batch_size])
  jax.block_until_ready(out)
  model_s = time.perf_counter() - start
  n = len(kept)
  return {"images": n, "embed_dim": int(emb.shape[1]), "batch_size": embedder.batch_size,
          "image_size": int(model.config.data.image_size),
          "params_m": round(sum(x.size for x in jax.tree.leaves(model.params)) / 1e6, 1),
          "compile_s": round(compile_s, 1),
          "pipeline_images_per_s": round(n / pipeline_s, 2),
          "model_only_images_per_s": round(n / model_s, 2)}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs",
                      default="configs/shapes.py:coca_unicl_prefix,tiny;configs/coca.py:base")
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--workdir", default="")
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix="mmjax_embed_bench_")
  folder = os.path.join(root, "photos")
  write_photos(folder, args.images)
  results = {"cpu": cpu_model(), "devices": jax.local_device_count(),
             "device": jax.devices()[0].device_kind}
  for spec in args.configs.split(";"):
    workdir = os.path.join(root, spec.replace("/", "_").replace(":", "_").replace(",", "_"))
    write_initialised_checkpoint(spec, workdir)
    results[spec] = row = measure(workdir, folder, args.batch_size)
    print(f"{spec}: {row}", flush=True)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
