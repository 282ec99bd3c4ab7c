"""Classification by class-name prompts (templates averaged), type "zeroshot".

Zero-shot when the dataset's classes are not training labels (configs/shapes.py's
`evals.zeroshot` on the held-out shapes classes); on training classes the same evaluator
measures closed-set accuracy (`evals.seen_classes`). Candidates are the dataset's own
classes, or the `class_subset` a variant keeps (ImageNet-A and -R: 200 of ImageNet's 1000).
Images stream through in batches (`Embedder.image_batches`): a split of any size needs host
memory for one batch and an int per image."""
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from configs import schema
from mmjax import errors, vocabulary
from mmjax.data import classnames, pipeline
from mmjax.data.tokenizer import Tokenizer
from mmjax.evaluators.base import Evaluator
from mmjax.evaluators.embedder import Embedder


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """Every template filled with every class name, class-major: [C * T]."""
  return [t.format(name) for name in class_names for t in templates]


def class_embeddings(prompt_embeddings: np.ndarray, num_classes: int) -> np.ndarray:
  """prompt_embeddings [C * T, E] (class-major, `class_prompts`) -> [C, E]: the mean of each
  class's template embeddings, renormalised."""
  emb = prompt_embeddings.reshape(num_classes, -1, prompt_embeddings.shape[-1]).mean(1)
  return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


class ZeroShot(Evaluator):
  """Top-1/top-5 accuracy and mean per-class recall of classifying images by their class
  prompts (`evals.<key>`: dataset, split, image_key, label_key, class_names, class_subset,
  num_examples, prefix, templates; class names, subsets and templates through
  `mmjax.data.classnames`)."""
  METRIC_PREFIX = "zeroshot"
  section = staticmethod(schema.zeroshot_eval)
  choices = {"prefix": tuple(vocabulary.TEXT_TYPES)}

  def __init__(self, key: str, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    super().__init__(key, config)
    e = self.entry
    self.split = pipeline.EvalSplit(config, key, num_examples=e.num_examples,
                                    for_prompts=True)
    kept = list(range(len(self.split.class_names)))
    if e.class_subset:
      if self.split.dataset_class_names is None:
        raise errors.UsageError(f"config evals.{key}.class_subset={e.class_subset!r}: "
                                f"{e.dataset!r} has no class names to match")
      kept = classnames.class_subset(self.split.dataset_class_names, e.class_subset,
                                     key=f"evals.{key}.class_subset")
    # dataset class id -> candidate index (-1: a class the subset drops)
    self.candidate = np.full(len(self.split.class_names), -1, np.int64)
    self.candidate[kept] = np.arange(len(kept))
    self.class_names = [self.split.class_names[i] for i in kept]
    self.templates = classnames.label_templates(config, e.templates, f"evals.{key}.templates")
    self.prompts = class_prompts(self.class_names, self.templates)
    self.tokens = tokenizer.encode(self.prompts, config.data.max_text_len)
    self.text_type = np.full(len(self.prompts), vocabulary.TEXT_TYPES[e.prefix], np.int32)
    self.last_class_embeddings: np.ndarray | None = None  # for the picture grid

  @property
  def images(self) -> np.ndarray:
    """Every image of the split, uint8 [N, S, S, 3], in host memory (for small splits)."""
    return self.split.rows(range(len(self.split)))["images"]

  def class_embeddings(self, embedder: Embedder, params: Any) -> np.ndarray:
    """[C, E]: mean of each class's template embeddings, renormalised."""
    return class_embeddings(embedder.texts(params, self.tokens, self.text_type),
                            len(self.class_names))

  def __call__(self, embedder: Embedder, params: Any, *, progress: str = ""
               ) -> dict[str, float]:
    self.last_class_embeddings = self.class_embeddings(embedder, params)
    top5, labels = [], []
    for emb, label in embedder.image_batches(params, self.split, progress=progress):
      scores = emb @ self.last_class_embeddings.T
      top5.append(np.argsort(-scores, axis=1)[:, :5])
      labels.append(self.candidate[label])
    return {f"{self.name}/{k}": v
            for k, v in classification_metrics(np.concatenate(top5),
                                               np.concatenate(labels), self.name).items()}


def classification_metrics(top5: np.ndarray, labels: np.ndarray, name: str = ""
                           ) -> dict[str, float]:
  """top5 [N, 5] predicted classes, best first; labels [N] -> top1, top5 and mean per-class
  recall (the mean over the classes present in `labels` of the fraction of their images
  classified right: sklearn's balanced_accuracy_score, CLIP_benchmark's metric)."""
  if (labels < 0).any():
    raise errors.UsageError(f"{name}: {int((labels < 0).sum())} images belong to classes "
                            "outside the evaluated class subset")
  hits = top5 == labels[:, None]
  classes, per_image_class = np.unique(labels, return_inverse=True)
  recall = np.bincount(per_image_class, weights=hits[:, 0]) / np.bincount(per_image_class)
  return {"top1": float(hits[:, 0].mean()), "top5": float(hits.any(1).mean()),
          "mean_per_class_recall": float(recall.mean())}
