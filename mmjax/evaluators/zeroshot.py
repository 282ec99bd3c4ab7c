"""Classification by class-name prompts (templates averaged), type "zeroshot".

Zero-shot when the dataset's classes are not training labels (configs/shapes.py's
`evals.zeroshot` on the held-out shapes classes); on training classes the same evaluator
measures closed-set accuracy (`evals.seen_classes`). Candidates are the dataset's own
classes."""
from typing import Any

import ml_collections
import numpy as np

from mmjax import vocabulary
from mmjax.data import classnames, pipeline
from mmjax.data.tokenizer import Tokenizer
from mmjax.evaluators.base import Evaluator
from mmjax.evaluators.embedder import Embedder


class ZeroShot(Evaluator):
  """Top-1/top-5 accuracy of classifying images by their class prompts (`evals.<key>`:
  dataset, split, image_key, label_key, class_names, num_examples, prefix, templates;
  class names and templates through `mmjax.data.classnames`)."""
  METRIC_PREFIX = "zeroshot"

  def __init__(self, key: str, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    super().__init__(key, config)
    e = self.entry
    split = pipeline.load_eval_split(config, key, num_examples=e.num_examples,
                                     for_prompts=True)
    self.images, self.labels = split["images"], split["labels"]
    self.class_names = split["class_names"]
    self.templates = classnames.label_templates(config, e.templates, f"evals.{key}.templates")
    self.prompts = [t.format(name) for name in self.class_names for t in self.templates]
    self.tokens = tokenizer.encode(self.prompts, config.data.max_text_len)
    self.text_type = np.full(len(self.prompts), vocabulary.TEXT_TYPES[e.prefix], np.int32)
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
