"""Image-text retrieval: recall@{1,5,10} in both directions."""
from typing import Any

import ml_collections
import numpy as np

from configs import schema
from mmjax import vocabulary
from mmjax.data import pipeline
from mmjax.data.tokenizer import Tokenizer
from mmjax.evaluators.base import Evaluator
from mmjax.evaluators.embedder import Embedder


class Retrieval(Evaluator):
  """Image->text and text->image recall@{1,5,10}; an image may have several captions
  (`evals.<key>`: dataset, split, image_key, text_key, num_examples)."""
  METRIC_PREFIX = "retrieval"
  section = staticmethod(schema.retrieval_eval)

  def __init__(self, key: str, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    super().__init__(key, config)
    e = self.entry
    split = pipeline.load_eval_split(config, key, num_examples=e.num_examples)
    self.images = split["images"]
    texts = [(i, t) for i, captions in enumerate(split["texts"]) for t in captions]
    self.text_image = np.array([i for i, _ in texts])
    self.tokens = tokenizer.encode([t for _, t in texts], config.data.max_text_len)
    self.text_type = np.full(len(texts), vocabulary.CAPTION, np.int32)

  def __call__(self, embedder: Embedder, params: Any) -> dict[str, float]:
    scores = embedder.images(params, self.images) @ embedder.texts(
        params, self.tokens, self.text_type).T  # [images, texts]
    i2t_rank = np.argsort(-scores, axis=1)
    t2i_rank = np.argsort(-scores.T, axis=1)
    matches_i2t = self.text_image[i2t_rank] == np.arange(len(self.images))[:, None]
    matches_t2i = t2i_rank == self.text_image[:, None]
    out = {}
    for k in (1, 5, 10):
      out[f"{self.name}/i2t_r{k}"] = float(matches_i2t[:, :k].any(1).mean())
      out[f"{self.name}/t2i_r{k}"] = float(matches_t2i[:, :k].any(1).mean())
    return out
