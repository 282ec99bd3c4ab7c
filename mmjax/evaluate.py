"""Evaluators (zero-shot classification, image-text retrieval) and the eval CLI.

  python -m mmjax.evaluate --config configs/shapes.py --workdir /tmp/mmjax_shapes [--step N]

Restores parameters only (no optimizer state) onto whatever devices exist, runs the
evaluators the config lists, writes `<workdir>/eval/step_<N>.json` and prints a table.
The trainer runs the same evaluators every `eval_every_steps`.
"""
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mmjax import cli, linear_probe, sharding
from mmjax.data import pipeline
from mmjax.tokenizer import Tokenizer

TEXT_TYPES = {"caption": 0, "label": 1}


class Embedder:
  """Embeds images / texts in fixed-size batches sharded over the mesh's batch axes."""

  def __init__(self, model: nn.Module, mesh: Mesh, batch_size: int):
    self.mesh = mesh
    self.batch_size = _round_up(batch_size, sharding.batch_parallel_size(mesh))
    self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image")[0])
    self._text = jax.jit(lambda p, t, tt: model.apply({"params": p}, t, tt,
                                                      method="encode_text"))

  def images(self, params: Any, images: np.ndarray) -> np.ndarray:
    """images [N, H, W, 3] -> L2-normalised embeddings [N, E] (host)."""
    return self._run(lambda x: self._image(params, x[0]), images)

  def texts(self, params: Any, tokens: np.ndarray, text_type: np.ndarray) -> np.ndarray:
    """tokens [N, L], text_type [N] -> L2-normalised embeddings [N, E] (host)."""
    return self._run(lambda x: self._text(params, x[0], x[1]), tokens, text_type)

  def _run(self, fn: Callable, *arrays: np.ndarray) -> np.ndarray:
    n, out = len(arrays[0]), []
    with jax.set_mesh(self.mesh):
      for start in range(0, n, self.batch_size):
        chunk = [_pad_to(a[start:start + self.batch_size], self.batch_size) for a in arrays]
        emb = multihost_utils.process_allgather(fn([self._shard(c) for c in chunk]),
                                                tiled=True)
        out.append(np.asarray(emb)[:min(self.batch_size, n - start)])
    emb = np.concatenate(out).astype(np.float64)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

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
                                     num_examples=e.num_examples)
    self.images, self.labels = split["images"], split["labels"]
    self.class_names = split["class_names"]
    self.templates = tuple(config.data.label_templates)
    prompts = [t.format(name) for name in self.class_names for t in self.templates]
    self.tokens = tokenizer.encode(prompts, config.data.max_text_len)
    if e.prefix not in TEXT_TYPES:
      raise ValueError(f"config evals.zeroshot.prefix={e.prefix!r}: choose {list(TEXT_TYPES)}")
    self.text_type = np.full(len(prompts), TEXT_TYPES[e.prefix], np.int32)

  def class_embeddings(self, embedder: Embedder, params: Any) -> np.ndarray:
    """[C, E]: mean of each class's template embeddings, renormalised."""
    emb = embedder.texts(params, self.tokens, self.text_type)
    emb = emb.reshape(len(self.class_names), len(self.templates), -1).mean(1)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

  def __call__(self, embedder: Embedder, params: Any) -> dict[str, float]:
    scores = embedder.images(params, self.images) @ self.class_embeddings(embedder, params).T
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


EVALUATORS = {"zeroshot": ZeroShot, "retrieval": Retrieval}
EVALUATORS["linear_probe"] = linear_probe.LinearProbe  # frozen image features, any model


def build_evaluators(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> list:
  return [cls(config, tokenizer) for name, cls in EVALUATORS.items() if name in config.evals]


def run_evaluators(evaluators: list, embedder: Embedder, params: Any) -> dict[str, float]:
  results = {}
  for evaluator in evaluators:
    results.update(evaluator(embedder, params))
  return results


def format_table(results: dict[str, float]) -> str:
  width = max((len(k) for k in results), default=0)
  return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in sorted(results.items()))


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
    results = run_evaluators(build_evaluators(config, tokenizer),
                             Embedder(model, mesh, config.evals.batch_size), params)
  checkpointer.close()
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", f"step_{step}.json"), "w") as f:
      json.dump({"step": step, **results}, f, indent=1)
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
