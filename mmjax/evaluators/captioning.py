"""Captioning: generated captions (K/V-cached decoding) scored with CIDEr and BLEU-4."""
import os
import re
import shutil
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.spice import spice as spice_module
from pycocoevalcap.spice.spice import Spice

from configs import schema
from mmjax import decode, models
from mmjax.data import pipeline
from mmjax.data.tokenizer import Tokenizer
from mmjax.evaluators.base import Evaluator
from mmjax.evaluators.embedder import Embedder


def caption_words(text: str) -> str:
  """Lower-cased words joined by spaces: a Python stand-in for the PTB tokenizer (Java),
  which also drops punctuation."""
  return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def caption_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
  """CIDEr (CIDEr-D as in pycocoevalcap) and BLEU-4 over the corpus, pycocoevalcap scorers.

  hypotheses: one caption per image; references: every reference caption per image.
  """
  res = {i: [caption_words(h)] for i, h in enumerate(hypotheses)}
  gts = {i: [caption_words(r) for r in refs] for i, refs in enumerate(references)}
  cider, _ = Cider().compute_score(gts, res)
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  return {"cider": float(cider), "bleu4": float(bleu[3])}


def java_scorers() -> dict[str, Callable[[], Any]]:
  """pycocoevalcap's scorers that run in Java, where `java` is on PATH: METEOR (its jar ships
  with pycocoevalcap) and SPICE only where its Stanford CoreNLP jars are installed
  (pycocoevalcap would otherwise download them). {} without Java."""
  if shutil.which("java") is None:
    return {}
  scorers = {"meteor": Meteor}
  corenlp = os.path.join(os.path.dirname(spice_module.__file__), "lib",
                         "stanford-corenlp-3.6.0.jar")
  if os.path.exists(corenlp):
    scorers["spice"] = Spice
  return scorers


def java_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
  """METEOR (and SPICE) over the corpus where Java allows (`java_scorers`), on the same
  lower-cased words as `caption_scores`; seconds to start the JVM."""
  res = {i: [caption_words(h)] for i, h in enumerate(hypotheses)}
  gts = {i: [caption_words(r) for r in refs] for i, refs in enumerate(references)}
  return {name: float(make().compute_score(gts, res)[0])
          for name, make in java_scorers().items()}


class Captioning(Evaluator):
  """Generated captions scored against all reference captions of each image
  (`evals.<key>`: dataset, split, image_key, text_key, num_examples, strategy, beam_size,
  length_penalty, max_new_tokens, num_samples, sample_scale)."""
  METRIC_PREFIX = "caption"
  section = staticmethod(schema.captioning_eval)
  choices = {"strategy": decode.STRATEGIES}

  @classmethod
  def check(cls, key: str, config: ml_collections.ConfigDict) -> list[str]:
    """The shared checks, and the model must have a captioning decoder (else the entry must
    be off)."""
    model = models.MODELS.get(config.model.name)
    if model is None or model.captions:
      return super().check(key, config)
    if config.evals[key].num_examples:
      return [f"config evals.{key}: model.name={config.model.name!r} has no captioning "
              f"decoder; set evals.{key}.num_examples=0"]
    return []

  def __init__(self, key: str, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    super().__init__(key, config)
    e = self.entry
    split = pipeline.load_eval_split(config, key, num_examples=e.num_examples)
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
    tokens = embedder.map_batches(lambda x: captioner(params, x[0], rng), images,
                                  what="captions")
    return [self.tokenizer.decode(t) for t in tokens]

  def __call__(self, embedder: Embedder, params: Any) -> dict[str, float]:
    self.last_captions = self.captions(embedder, params, self.images)
    scores = caption_scores(self.last_captions, self.references)
    return {f"{self.name}/{k}": v for k, v in scores.items()}
