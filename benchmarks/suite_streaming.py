"""Zero-shot evaluation's host memory and speed: the split loaded into memory first (the
evaluators before the benchmark suites) vs streamed batch by batch (`Embedder.image_batches`).

  PYTHONPATH=. python benchmarks/suite_streaming.py [--data_dir DIR] [--num_images 2048]

Each variant runs in a fresh process (peak RSS is per process) on the same synthetic 224 px
JPEG label dataset (imported with mmjax.data.build) with the tiny shapes model at 224 px,
random weights, batches of 128 on one CPU device; both must give the same top-1. Ends with
ONE JSON line.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from benchmarks.common import cpu_model

_DATA_DIR = flags.DEFINE_string("data_dir", "", "Dataset dir ('' = a fresh temp dir).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 2048, "Synthetic 224 px JPEGs.")
_VARIANT = flags.DEFINE_string("variant", "", "Internal: run one variant in this process.")
NAME = "bench_zeroshot224"
VARIANTS = ("in_memory", "streamed")


def _jpeg_folder(root: str, n: int) -> str:
  rng = np.random.default_rng(0)
  for i in range(n):
    d = os.path.join(root, f"class{i % 8}")
    os.makedirs(d, exist_ok=True)
    small = rng.integers(0, 255, (14, 14, 3), np.uint8)
    Image.fromarray(small).resize((224, 224), Image.BICUBIC).save(
        os.path.join(d, f"{i}.jpg"), quality=90)
  return root


def _config(data_dir: str):
  from configs import schema
  from configs import shapes as shapes_config
  c = shapes_config.get_config("clip,tiny")
  c.unlock()
  c.data_dir = data_dir
  c.data.image_size = 224
  c.model.patch_size = 16
  c.eval_batch_size = 128
  c.data.sources = {"bench": schema.source(NAME, kind="label", label_key="label", weight=1.0)}
  c.evals = {"zeroshot": schema.zeroshot_eval(NAME, split="train", num_examples=10**9)}
  c.lock()
  return c


def _run_variant(variant: str, data_dir: str) -> dict:
  import jax
  from mmjax import evaluators, runtime
  from mmjax.data import pipeline
  from mmjax.data import tokenizer as tokenizer_lib
  config = _config(data_dir)
  rt = runtime.build(config, jax.devices()[:1])
  tokenizer = tokenizer_lib.get_tokenizer(config)
  with rt.activate():
    params = rt.init_state().params
    embedder = evaluators.Embedder(rt.model, rt.mesh, config.mesh.rules, 128)
    zeroshot = evaluators.ZeroShot("zeroshot", config, tokenizer)
    class_emb = zeroshot.class_embeddings(embedder, params)  # compiles the text side
    embedder.images(params, np.zeros((1, 224, 224, 3), np.uint8))  # and the image side
    start = time.perf_counter()
    if variant == "in_memory":
      split = pipeline.load_eval_split(config, "zeroshot", num_examples=10**9)
      top1 = float(((embedder.images(params, split["images"]) @ class_emb.T).argmax(1)
                    == split["labels"]).mean())
    else:
      top1 = zeroshot(embedder, params)["zeroshot/" + NAME + "/top1"]
    seconds = time.perf_counter() - start
  n = len(zeroshot.split)
  return {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1),
          "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
          "top1": top1}


def main(argv: list[str]) -> None:
  del argv
  data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix="mmjax_bench_")
  if _VARIANT.value:
    print(json.dumps(_run_variant(_VARIANT.value, data_dir)))
    return
  from mmjax.ingest import files as build
  if not os.path.isdir(os.path.join(data_dir, NAME)):
    build.build_from_images_dir(_jpeg_folder(os.path.join(data_dir, "jpegs"), _NUM_IMAGES.value),
                                NAME, data_dir)
  results = {}
  for variant in VARIANTS:
    proc = subprocess.run([sys.executable, __file__, f"--variant={variant}",
                           f"--data_dir={data_dir}"], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode:
      raise SystemExit(proc.stderr[-3000:])
    results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{variant}: {results[variant]}", flush=True)
  assert results["in_memory"]["top1"] == results["streamed"]["top1"], results
  print(json.dumps({"cpu": cpu_model(), "image_size": 224, "batch": 128, **results}))


if __name__ == "__main__":
  app.run(main)
