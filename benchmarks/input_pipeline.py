"""Input pipeline throughput (examples/s for one process) with 0, 1 and 2 Grain workers.

  PYTHONPATH=. python benchmarks/input_pipeline.py [--data_dir DIR] [--num_batches 20]

Cases: the shapes train mixture (64px) and a generated folder of synthetic 224px JPEGs
imported with mmjax.data.build (label source, resized to 224). Ends with ONE JSON line.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from configs import schema
from configs import shapes as shapes_config
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data import pipeline
from mmjax.ingest import files as build

_DATA_DIR = flags.DEFINE_string("data_dir", "", "Dataset dir ('' = a fresh temp dir).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 20, "Timed batches per case.")
_NUM_JPEGS = flags.DEFINE_integer("num_jpegs", 512, "Synthetic 224px JPEGs to generate.")


def _jpeg_folder(root: str, n: int) -> str:
  rng = np.random.default_rng(0)
  for i in range(n):
    d = os.path.join(root, f"class{i % 4}")
    os.makedirs(d, exist_ok=True)
    # Smooth noise + shapes compress like photos more than white noise does.
    small = rng.integers(0, 255, (14, 14, 3), np.uint8)
    img = Image.fromarray(small).resize((224, 224), Image.BICUBIC)
    img.save(os.path.join(d, f"{i}.jpg"), quality=90)
  return root


def _rate(config, tok) -> float:
  it = pipeline.make_train_iterator(config, tok, start_step=0, process_index=0, process_count=1)
  try:
    next(it)  # start-up (worker spawn, file opening) is not throughput
    t = time.perf_counter()
    for _ in range(_NUM_BATCHES.value):
      next(it)
    return _NUM_BATCHES.value * config.batch_size / (time.perf_counter() - t)
  finally:
    it.close()


def main(argv: list[str]) -> None:
  del argv
  data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix="mmjax_bench_")
  results: dict[str, float] = {}
  c = shapes_config.get_config()
  c.unlock()
  c.data_dir = data_dir
  tok = tokenizer_lib.get_tokenizer(c)
  for w in (0, 1, 2):
    c.data.num_workers = w
    results[f"shapes_64px_workers{w}"] = round(_rate(c, tok), 1)
    print(f"shapes 64px, {w} workers: {results[f'shapes_64px_workers{w}']} examples/s")

  name = "bench_jpeg224"
  if not os.path.isdir(os.path.join(data_dir, name)):
    build.build_from_images_dir(_jpeg_folder(os.path.join(data_dir, "jpegs"), _NUM_JPEGS.value),
                                name, data_dir)
  j = shapes_config.get_config()
  j.unlock()
  j.data_dir = data_dir
  j.data.image_size = 224
  j.data.sources = {"jpegs": schema.source(name, kind="label", label_key="label",
                                           weight=1.0)}
  jtok = tokenizer_lib.get_tokenizer(j)
  for w in (0, 1, 2):
    j.data.num_workers = w
    results[f"jpeg_224px_workers{w}"] = round(_rate(j, jtok), 1)
    print(f"jpeg 224px, {w} workers: {results[f'jpeg_224px_workers{w}']} examples/s")
  print(json.dumps({"unit": "examples/s/process", "batch_size": c.batch_size,
                    "cpus": os.cpu_count(), **results}))


if __name__ == "__main__":
  app.run(main)
