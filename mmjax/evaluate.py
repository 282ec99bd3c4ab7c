"""Evaluators (zero-shot classification, image-text retrieval, captioning) and the eval CLI.

  python -m mmjax.evaluate --config configs/shapes.py --workdir /tmp/mmjax_shapes [--step N]

Restores parameters only (no optimizer state) onto whatever devices exist, runs the
evaluators the config lists, writes `<workdir>/eval/step_<N>.json`, a picture grid of
sample captions and zero-shot classes `<workdir>/eval/samples_<N>.png` (also to
TensorBoard) and prints a table. The trainer runs the same evaluators every
`eval_every_steps` and logs the same grid to TensorBoard.
"""
import json
import os
import re
import textwrap
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mmjax import cli, decode, linear_probe, sharding
from mmjax.data import classnames, pipeline
from mmjax.tokenizer import Tokenizer

TEXT_TYPES = {"caption": 0, "label": 1}


class Embedder:
  """Embeds images / texts in fixed-size batches sharded over the mesh's batch axes."""

  def __init__(self, model: nn.Module, mesh: Mesh, batch_size: int):
    self.model = model  # generative evaluators build their own jitted functions from it
    self.mesh = mesh
    self.batch_size = _round_up(batch_size, sharding.batch_parallel_size(mesh))
    self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image")[0])
    self._text = jax.jit(lambda p, t, tt: model.apply({"params": p}, t, tt,
                                                      method="encode_text"))
    self._features = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                      method="image_features"))

  def images(self, params: Any, images: np.ndarray) -> np.ndarray:
    """images [N, H, W, 3] -> L2-normalised embeddings [N, E] (host)."""
    return self._run(lambda x: self._image(params, x[0]), images)

  def texts(self, params: Any, tokens: np.ndarray, text_type: np.ndarray) -> np.ndarray:
    """tokens [N, L], text_type [N] -> L2-normalised embeddings [N, E] (host)."""
    return self._run(lambda x: self._text(params, x[0], x[1]), tokens, text_type)

  def features(self, params: Any, images: np.ndarray) -> np.ndarray:
    """images [N, H, W, 3] -> the model's frozen `image_features` [N, D] (host, float64,
    not normalised): what linear probes read."""
    return self.map_batches(lambda x: self._features(params, x[0]), images).astype(np.float64)

  def _run(self, fn: Callable, *arrays: np.ndarray) -> np.ndarray:
    emb = self.map_batches(fn, *arrays).astype(np.float64)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

  def map_batches(self, fn: Callable, *arrays: np.ndarray) -> np.ndarray:
    """fn(list of sharded [batch_size, ...] arrays) -> [batch_size, ...] over arrays [N, ...]
    in fixed-size padded batches (one compiled program); returns [N, ...] on the host."""
    n, out = len(arrays[0]), []
    with jax.set_mesh(self.mesh):
      for start in range(0, n, self.batch_size):
        chunk = [_pad_to(a[start:start + self.batch_size], self.batch_size) for a in arrays]
        result = multihost_utils.process_allgather(fn([self._shard(c) for c in chunk]),
                                                   tiled=True)
        out.append(np.asarray(result)[:min(self.batch_size, n - start)])
    return np.concatenate(out)

  def _shard(self, x: np.ndarray) -> jax.Array:
    # Every process holds the same eval arrays; each device takes its slice of the batch.
    return jax.make_array_from_callback(x.shape, sharding.batch_sharding(self.mesh),
                                        lambda index: x[index])


class ZeroShot:
  """Top-1/top-5 accuracy of classifying images by their class prompts (templates averaged)."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    e = config.evals.zeroshot
    self.name = e.dataset.replace("/", "_")
    split = pipeline.load_eval_split(config, dataset=e.dataset, split=e.split,
                                     image_key=e.image_key, label_key=e.label_key,
                                     num_examples=e.num_examples, class_names=e.class_names,
                                     class_names_key="evals.zeroshot.class_names",
                                     for_prompts=True)
    self.images, self.labels = split["images"], split["labels"]
    self.class_names = split["class_names"]
    self.templates = classnames.label_templates(config, e.templates, "evals.zeroshot.templates")
    self.prompts = [t.format(name) for name in self.class_names for t in self.templates]
    self.tokens = tokenizer.encode(self.prompts, config.data.max_text_len)
    if e.prefix not in TEXT_TYPES:
      raise ValueError(f"config evals.zeroshot.prefix={e.prefix!r}: choose {list(TEXT_TYPES)}")
    self.text_type = np.full(len(self.prompts), TEXT_TYPES[e.prefix], np.int32)

  def class_embeddings(self, embedder: Embedder, params: Any) -> np.ndarray:
    """[C, E]: mean of each class's template embeddings, renormalised."""
    emb = embedder.texts(params, self.tokens, self.text_type)
    emb = emb.reshape(len(self.class_names), len(self.templates), -1).mean(1)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

  def __call__(self, embedder: Embedder, params: Any) -> dict[str, float]:
    self.last_class_embeddings = self.class_embeddings(embedder, params)  # for the grid
    scores = embedder.images(params, self.images) @ self.last_class_embeddings.T
    top = np.argsort(-scores, axis=1)[:, :5]
    hits = top == self.labels[:, None]
    return {f"zeroshot/{self.name}/top1": float(hits[:, 0].mean()),
            f"zeroshot/{self.name}/top5": float(hits.any(1).mean())}


class Retrieval:
  """Image->text and text->image recall@{1,5,10}; an image may have several captions."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    e = config.evals.retrieval
    self.name = e.dataset.replace("/", "_")
    split = pipeline.load_eval_split(config, dataset=e.dataset, split=e.split,
                                     image_key=e.image_key, text_key=e.text_key,
                                     num_examples=e.num_examples)
    self.images = split["images"]
    texts = [(i, t) for i, captions in enumerate(split["texts"]) for t in captions]
    self.text_image = np.array([i for i, _ in texts])
    self.tokens = tokenizer.encode([t for _, t in texts], config.data.max_text_len)
    self.text_type = np.zeros(len(texts), np.int32)

  def __call__(self, embedder: Embedder, params: Any) -> dict[str, float]:
    scores = embedder.images(params, self.images) @ embedder.texts(
        params, self.tokens, self.text_type).T  # [images, texts]
    i2t_rank = np.argsort(-scores, axis=1)
    t2i_rank = np.argsort(-scores.T, axis=1)
    matches_i2t = self.text_image[i2t_rank] == np.arange(len(self.images))[:, None]
    matches_t2i = t2i_rank == self.text_image[:, None]
    out = {}
    for k in (1, 5, 10):
      out[f"retrieval/{self.name}/i2t_r{k}"] = float(matches_i2t[:, :k].any(1).mean())
      out[f"retrieval/{self.name}/t2i_r{k}"] = float(matches_t2i[:, :k].any(1).mean())
    return out


def caption_words(text: str) -> str:
  """Lower-cased words joined by spaces: a Python stand-in for the PTB tokenizer (Java),
  which also drops punctuation."""
  return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def caption_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
  """CIDEr (CIDEr-D as in pycocoevalcap) and BLEU-4 over the corpus, pycocoevalcap scorers.

  hypotheses: one caption per image; references: every reference caption per image.
  """
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  res = {i: [caption_words(h)] for i, h in enumerate(hypotheses)}
  gts = {i: [caption_words(r) for r in refs] for i, refs in enumerate(references)}
  cider, _ = Cider().compute_score(gts, res)
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  return {"cider": float(cider), "bleu4": float(bleu[3])}


class Captioning:
  """Generated captions (K/V-cached decoding, `mmjax.decode`) scored with CIDEr and BLEU-4
  against all reference captions of each image."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    e = config.evals.captioning
    self.name = e.dataset.replace("/", "_")
    split = pipeline.load_eval_split(config, dataset=e.dataset, split=e.split,
                                     image_key=e.image_key, text_key=e.text_key,
                                     num_examples=e.num_examples)
    self.images, self.references = split["images"], split["texts"]
    self.tokenizer = tokenizer
    self.decode_config = decode.DecodeConfig(
        strategy=e.strategy, max_new_tokens=e.max_new_tokens, beam_size=e.beam_size,
        length_penalty=e.length_penalty, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id)
    self.num_samples, self.sample_scale = e.num_samples, e.sample_scale
    self.seed = config.seed
    self.last_captions: list[str] = []
    self._captioners: dict[int, Callable] = {}

  def captions(self, embedder: Embedder, params: Any, images: np.ndarray) -> list[str]:
    """images [N, H, W, 3] -> N decoded captions."""
    key = id(embedder.model)
    if key not in self._captioners:  # one jitted decoder per model, compiled once
      self._captioners[key] = decode.make_captioner(embedder.model, self.decode_config)
    captioner, rng = self._captioners[key], jax.random.key(self.seed)
    tokens = embedder.map_batches(lambda x: captioner(params, x[0], rng), images)
    return [self.tokenizer.decode(t) for t in tokens]

  def __call__(self, embedder: Embedder, params: Any) -> dict[str, float]:
    self.last_captions = self.captions(embedder, params, self.images)
    scores = caption_scores(self.last_captions, self.references)
    return {f"caption/{self.name}/{k}": v for k, v in scores.items()}


EVALUATORS = {"zeroshot": ZeroShot, "retrieval": Retrieval, "captioning": Captioning,
              "linear_probe": linear_probe.LinearProbe}  # frozen image features, any model


def build_evaluators(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> list:
  """One evaluator per `config.evals` entry; an entry with num_examples=0 is off (locked
  configs cannot drop keys, e.g. `--config.evals.captioning.num_examples=0`)."""
  return [cls(config, tokenizer) for name, cls in EVALUATORS.items()
          if name in config.evals and config.evals[name].num_examples > 0]


def run_evaluators(evaluators: list, embedder: Embedder, params: Any) -> dict[str, float]:
  results = {}
  for evaluator in evaluators:
    results.update(evaluator(embedder, params))
  return results


def sample_grid(evaluators: list, embedder: Embedder, params: Any) -> np.ndarray | None:
  """uint8 [H, W, 3]: the first `evals.captioning.num_samples` captioning images, upscaled,
  each with its generated caption and (if a zero-shot evaluator runs) its top-3 classes.
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
    class_emb = getattr(zeroshot, "last_class_embeddings", None)
    if class_emb is None:
      class_emb = zeroshot.class_embeddings(embedder, params)
    top = np.argsort(-(embedder.images(params, images) @ class_emb.T), axis=1)[:, :3]
    classes = [[zeroshot.class_names[c] for c in row] for row in top]
  return render_grid(images, captions, classes, scale=captioner.sample_scale)


def render_grid(images: np.ndarray, captions: list[str], classes: list[list[str]] | None,
                *, scale: int = 4, columns: int = 0) -> np.ndarray:
  """images float [N, H, W, 3] in [-1, 1] -> uint8 grid [rows * cell_h, cols * cell_w, 3]
  with each image upscaled `scale`x (nearest) above its caption and top-3 classes."""
  from PIL import Image, ImageDraw, ImageFont
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
    pixels = np.clip((images[i] + 1) * 127.5, 0, 255).round().astype(np.uint8)
    canvas.paste(Image.fromarray(pixels).resize((size, size), Image.NEAREST), (x, y))
    for j, line in enumerate(texts[i]):
      colour = "black" if j < len(texts[i]) - (3 if classes else 0) else (40, 40, 160)
      draw.text((x, y + size + 2 + j * line_h), line, fill=colour, font=font)
  return np.asarray(canvas)


def write_sample_grid(workdir: str, step: int, grid: np.ndarray) -> str:
  """Writes `<workdir>/eval/samples_<step>.png` and the TensorBoard image `samples`."""
  from etils import epath  # local or gs://
  from PIL import Image
  from mmjax import writers
  path = epath.Path(workdir) / "eval" / f"samples_{step}.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    Image.fromarray(grid).save(f, format="PNG")
  writer = writers.MetricWriter(workdir)
  writer.write_image(step, "samples", grid)
  writer.close()
  return os.fspath(path)


def format_table(results: dict[str, float]) -> str:
  """One `name  value` line per metric; 4 decimals, or 4 significant digits for values
  below 1e-3 that are not zero (a probe's chosen lambda of 1e-5 must not read 0.0000)."""
  width = max((len(k) for k in results), default=0)
  def fmt(v: float) -> str:
    return f"{v:.4g}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
  return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in sorted(results.items()))


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x


# --- CLI ------------------------------------------------------------------------------------
def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> tuple[int, dict[str, float]]:
  """Restores params only onto the devices present and runs the configured evaluators."""
  from mmjax import checkpoint, models, state as state_lib, tokenizer as tokenizer_lib
  from mmjax.optimizer import make_optimizer
  mesh = sharding.make_mesh(config)
  tokenizer = tokenizer_lib.get_tokenizer(config)
  model = models.build_model(config)
  checkpointer = checkpoint.Checkpointer(workdir, config)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {checkpointer.directory}")
  with jax.set_mesh(mesh), nn.logical_axis_rules(config.mesh.rules):
    abstract, _ = state_lib.abstract_state(model, make_optimizer(config), config, mesh)
    params = checkpointer.restore_params(step, abstract.params)
    evaluators = build_evaluators(config, tokenizer)
    embedder = Embedder(model, mesh, config.evals.batch_size)
    results = run_evaluators(evaluators, embedder, params)
    grid = sample_grid(evaluators, embedder, params)
  checkpointer.close()
  if jax.process_index() == 0:
    from etils import epath  # local or gs://
    out = epath.Path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_{step}.json").write_text(json.dumps({"step": step, **results}, indent=1))
    if grid is not None:
      write_sample_grid(workdir, step, grid)
  return step, results


def main(argv: list[str]) -> None:
  del argv
  cli.quiet_libraries()
  config = cli.validated_config()
  cli.enable_compilation_cache(config)
  step, results = evaluate_checkpoint(config, cli.FLAGS.workdir, cli.FLAGS.step)
  print(f"step {step}\n{format_table(results)}")


if __name__ == "__main__":
  cli.define_flags(step=True)
  app.run(main)
