"""Zero-shot classification: images against class-name prompts (templates averaged)."""
from typing import Any

import ml_collections
import numpy as np

from mmjax import vocabulary
from mmjax.data import pipeline
from mmjax.data.tokenizer import Tokenizer
from mmjax.evaluators.embedder import Embedder


class ZeroShot:
  """Top-1/top-5 accuracy of classifying images by their class prompts (`evals.<key>`:
  dataset, split, image_key, label_key, num_examples, prefix; prompts from
  `data.label_templates`)."""
  METRIC_PREFIX = "zeroshot"

  def __init__(self, prefix: str, e: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    self.name = f"{prefix}/{e.dataset.replace('/', '_')}"
    split = pipeline.load_eval_split(config, dataset=e.dataset, split=e.split,
                                     image_key=e.image_key, label_key=e.label_key,
                                     num_examples=e.num_examples)
    self.images, self.labels = split["images"], split["labels"]
    self.class_names = split["class_names"]
    self.templates = tuple(config.data.label_templates)
    prompts = [t.format(name) for name in self.class_names for t in self.templates]
    self.tokens = tokenizer.encode(prompts, config.data.max_text_len)
    self.text_type = np.full(len(prompts), vocabulary.TEXT_TYPES[e.prefix], np.int32)
    self.last_class_embeddings: np.ndarray | None = None  # for the picture grid

  def class_embeddings(self, embedder: Embedder, params: Any) -> np.ndarray:
    """[C, E]: mean of each class's template embeddings, renormalised."""
    emb = embedder.texts(params, self.tokens, self.text_type)
    emb = emb.reshape(len(self.class_names), len(self.templates), -1).mean(1)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

  def __call__(self, embedder: Embedder, params: Any) -> dict[str, float]:
    self.last_class_embeddings = self.class_embeddings(embedder, params)
    scores = embedder.images(params, self.images) @ self.last_class_embeddings.T
    top = np.argsort(-scores, axis=1)[:, :5]
    hits = top == self.labels[:, None]
    return {f"{self.name}/top1": float(hits[:, 0].mean()),
            f"{self.name}/top5": float(hits.any(1).mean())}
