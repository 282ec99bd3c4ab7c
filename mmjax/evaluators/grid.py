"""A picture of what the model does: validation images with their generated captions and
top-3 prompt classes, as a PNG under `<workdir>/eval/` and a TensorBoard image; and
`evaluate_and_record`, an evaluation with its picture, as the trainer and mmjax.evaluate
run it."""
import os
import textwrap
from typing import Any

import numpy as np
from etils import epath  # local or gs://
from PIL import Image, ImageDraw, ImageFont

from mmjax import evaluators as evaluators_lib
from mmjax import writers
from mmjax.evaluators.captioning import Captioning
from mmjax.evaluators.embedder import Embedder
from mmjax.evaluators.zeroshot import ZeroShot


def sample_grid(evaluators: list[Any], embedder: Embedder, params: Any) -> np.ndarray | None:
  """uint8 [H, W, 3]: the first `evals.captioning.num_samples` captioning images, upscaled,
  each with its generated caption and (if a prompt-classification evaluator runs: the
  first in key order, e.g. configs/shapes.py's seen_classes) its top-3 classes.
  None without a captioning evaluator. Runs on every process (collectives); reuses the
  captions and class embeddings of the last evaluation when there was one."""
  captioner = next((e for e in evaluators if isinstance(e, Captioning)), None)
  if captioner is None or not captioner.num_samples:
    return None
  images = captioner.images[:captioner.num_samples]
  captions = captioner.last_captions[:len(images)]
  if len(captions) < len(images):
    captions = captioner.captions(embedder, params, images)
  classes = None
  zeroshot = next((e for e in evaluators if isinstance(e, ZeroShot)), None)
  if zeroshot is not None:
    class_emb = zeroshot.last_class_embeddings
    if class_emb is None:
      class_emb = zeroshot.class_embeddings(embedder, params)
    top = np.argsort(-(embedder.images(params, images) @ class_emb.T), axis=1)[:, :3]
    classes = [[zeroshot.class_names[c] for c in row] for row in top]
  return render_grid(images, captions, classes, scale=captioner.sample_scale)


def render_grid(images: np.ndarray, captions: list[str], classes: list[list[str]] | None,
                *, scale: int = 4, columns: int = 0) -> np.ndarray:
  """images uint8 [N, H, W, 3] -> uint8 grid [rows * cell_h, cols * cell_w, 3]
  with each image upscaled `scale`x (nearest) above its caption and top-3 classes."""
  font = ImageFont.load_default()
  n, size = len(images), images.shape[1] * scale
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // columns)
  chars = max(8, int(size // font.getlength("x")))  # wrap width in characters
  texts = []
  for i in range(n):
    lines = textwrap.wrap(captions[i] or "(empty)", chars)[:4]
    if classes is not None:
      lines += textwrap.wrap("top-3: " + ", ".join(classes[i]), chars)[:3]
    texts.append(lines)
  line_h = int(font.getbbox("Ag")[3]) + 3
  pad = 6
  cell_w, cell_h = size + 2 * pad, size + 2 * pad + line_h * max(len(t) for t in texts)
  canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
  draw = ImageDraw.Draw(canvas)
  for i in range(n):
    x, y = (i % columns) * cell_w + pad, (i // columns) * cell_h + pad
    canvas.paste(Image.fromarray(images[i]).resize((size, size), Image.NEAREST), (x, y))
    for j, line in enumerate(texts[i]):
      colour = "black" if j < len(texts[i]) - (3 if classes else 0) else (40, 40, 160)
      draw.text((x, y + size + 2 + j * line_h), line, fill=colour, font=font)
  return np.asarray(canvas)


def evaluate_and_record(due: list[Any], evaluators: list[Any], embedder: Embedder,
                        params: Any, writer: writers.MetricWriter, workdir: str,
                        step: int) -> dict[str, float]:
  """Runs the `due` evaluators and records the sample grid of `evaluators` (PNG and
  TensorBoard image, through `writer`): what the trainer does at each evaluation and
  `mmjax.evaluate` once. Returns the metrics; where they go (metrics.jsonl,
  eval/step_<N>.json) is the caller's. Every process runs it (collectives)."""
  results = evaluators_lib.run_evaluators(due, embedder, params)
  picture = sample_grid(evaluators, embedder, params)
  if picture is not None:
    write_sample_grid(writer, workdir, step, picture)
  return results


def write_sample_grid(writer: writers.MetricWriter, workdir: str, step: int,
                      grid: np.ndarray) -> str:
  """Writes `<workdir>/eval/samples_<step>.png` and, through `writer`, the TensorBoard image
  `samples`; only where the writer is enabled (process 0). Returns the PNG's path."""
  path = epath.Path(workdir) / "eval" / f"samples_{step}.png"
  if writer.enabled:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
      Image.fromarray(grid).save(f, format="PNG")
    writer.write_image(step, "samples", grid)
  return os.fspath(path)
