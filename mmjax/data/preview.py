"""Look at what the model will see: a grid of one batch and mixing statistics.

  python -m mmjax.data.preview --config configs/shapes.py --out batch.png [--num_batches N] [--json]

The grid shows the first batch (image, decoded text, source key, text type). Statistics
over `--num_batches` batches: fraction_per_source, weights_per_source (normalised config
weights), mean_tokens_per_text (incl. BOS/EOS), skipped (records substituted). The
batches are the whole mixture's: an objective's unimodal phase (FLAVA's
`loss.unimodal_steps`, `mmjax.objectives.unimodal_steps`) is not previewed.
"""
from __future__ import annotations

import json
import os

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from mmjax import command, errors, vocabulary
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data import pipeline, sources

_CELL, _TEXT_H, _COLS = 128, 44, 8


def batch_grid(batch: dict[str, np.ndarray], texts: list[str], keys: list[str]) -> Image.Image:
  """A grid image of a batch: image uint8 [b, H, W, 3] with text/source/type below."""
  n = len(texts)
  rows = (n + _COLS - 1) // _COLS
  grid = Image.new("RGB", (_COLS * _CELL, rows * (_CELL + _TEXT_H)), "white")
  draw = ImageDraw.Draw(grid)
  for i in range(n):
    x, y = (i % _COLS) * _CELL, (i // _COLS) * (_CELL + _TEXT_H)
    grid.paste(Image.fromarray(batch["image"][i]).resize((_CELL, _CELL), Image.NEAREST), (x, y))
    kind = "label" if batch["text_type"][i] == 1 else "caption"
    words, lines = texts[i].split(), [""]
    for w in words:  # wrap to the cell width
      if len(lines[-1]) + len(w) > 21:
        lines.append("")
      lines[-1] += (" " if lines[-1] else "") + w
    lines = [f"[{keys[batch['source'][i]]}/{kind}]"] + lines[:2]
    draw.multiline_text((x + 2, y + _CELL + 1), "\n".join(lines), fill="black", spacing=1)
  return grid


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  config = command.config()
  if f.num_batches < 1:
    raise errors.UsageError(f"--num_batches {f.num_batches}: must be at least 1")
  folder = os.path.dirname(os.path.abspath(os.path.expanduser(f.out)))
  if not os.path.isdir(folder):  # checked before the data work, not after it
    raise errors.UsageError(f"--out {f.out}: no such folder {folder}")
  tok = tokenizer_lib.get_tokenizer(config)
  keys = sources.active_source_keys(config)
  it = pipeline.make_train_iterator(config, tok, start_step=0, process_index=0, process_count=1)
  try:
    batches = [next(it) for _ in range(f.num_batches)]
  finally:
    it.close()
  first = batches[0]
  texts = [tok.decode(t) for t in first["text"]]
  batch_grid(first, texts, keys).save(os.path.expanduser(f.out))
  src = np.concatenate([b["source"] for b in batches])
  text = np.concatenate([b["text"] for b in batches])
  weights = np.array([config.data.sources[k].weight for k in keys], np.float64)
  stats = {
      "num_examples": int(src.size),
      "fraction_per_source": {k: float((src == i).mean()) for i, k in enumerate(keys)},
      "weights_per_source": {k: float(w) for k, w in zip(keys, weights / weights.sum())},
      "mean_tokens_per_text": float((text != vocabulary.PAD_ID).sum(1).mean()),
      "skipped": int(sum(int(b["skipped"].sum()) for b in batches)),
      "out": f.out,
  }
  if f.json:
    print(json.dumps(stats))
  else:
    for k, v in stats.items():
      print(f"{k}: {v}")
    for i, t in enumerate(texts[:8]):
      print(f"  {keys[first['source'][i]]}: {t}")


if __name__ == "__main__":
  flags.DEFINE_string("out", "batch.png", "Where to write the grid PNG.")
  flags.DEFINE_integer("num_batches", 1, "Batches to compute statistics over.")
  flags.DEFINE_bool("json", False, "Print statistics as one JSON line.")
  command.run(main, "mmjax.data.preview")  # a usage error is one line, exit status 2
